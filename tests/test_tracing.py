"""The tracing branches of the inference steps: traced at one size, run at others, equal to eager there.

Each step is traced on its own (tiny inputs), so a size frozen into a trace shows up here by name; the
whole models are checked through ONNX / TorchScript in ``tests/test_export.py``.
"""
import warnings

import pytest
import torch

from resdet.heads.anchors import AnchorGenerator
from resdet.heads.poolers import MultiScaleRoIAlign
from resdet.layers.tracing import at_most, is_tracing
from resdet.models.semantic_fpn import SemSegTransform
from resdet.models.transform import DetectionTransform, resize_boxes, resized_size


def _trace(fn, *example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constants (checks, fixed sizes)
        return torch.jit.trace(fn, example, check_trace=False)


def test_is_tracing_under_jit_trace_and_onnx_export(tmp_path):
    pytest.importorskip("onnx")
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(is_tracing())
            return x + 1

    assert not is_tracing()
    Probe()(torch.zeros(1))
    _trace(Probe(), torch.zeros(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Probe(), (torch.zeros(1),), str(tmp_path / "p.onnx"), dynamo=False)
    assert seen[0] is False and seen[1] is True and seen[-1] is True


def test_at_most_and_resized_size_agree_on_ints_and_tensors():
    assert at_most(7, 5) == 5 and at_most(3, 5) == 3
    assert int(at_most(torch.tensor(7), 5)) == 5
    for h, w in [(480, 640), (333, 1000), (100, 300), (801, 799), (1, 1), (1024, 2048)]:
        for min_size, max_size in [(800, 1333), (96, 160), (512, None)]:
            ints = resized_size(h, w, min_size, max_size)
            traced = resized_size(torch.tensor(h), torch.tensor(w), min_size, max_size)
            assert tuple(int(v) for v in traced) == ints, (h, w, min_size, max_size)
            # What F.interpolate(scale_factor=..., recompute_scale_factor=True) gives.
            scale = min(min_size / min(h, w), (max_size or float("inf")) / max(h, w))
            shape = torch.nn.functional.interpolate(torch.zeros(1, 1, h, w), scale_factor=scale,
                                                    recompute_scale_factor=True).shape[-2:]
            assert tuple(shape) == ints


@pytest.mark.parametrize("channels_last", [False, True])
def test_detection_transform_traced_equals_eager(channels_last):
    t = DetectionTransform(min_size=64, max_size=100, channels_last=channels_last).eval()

    def run(image):
        batch, sizes, _ = t([image])
        boxes = resize_boxes(torch.tensor([[1.0, 2.0, 30.0, 40.0]]), sizes[0], image.shape[-2:])
        return batch, torch.stack([torch.as_tensor(s) for s in sizes[0]]), boxes

    traced = _trace(run, torch.rand(3, 50, 40))
    for size in [(120, 90), (30, 200), (64, 64)]:
        image = torch.rand(3, *size)
        for got, expected in zip(traced(image), run(image)):
            assert got.shape == expected.shape, size
            torch.testing.assert_close(got, expected.to(got.dtype), rtol=0, atol=0)


def test_semantic_transform_traced_equals_eager():
    t = SemSegTransform(min_size=64, max_size=100).eval()
    logits = torch.rand(1, 3, 128, 128)

    def run(image):
        batch, sizes, _ = t([image])
        return batch, t.postprocess(logits, sizes, [image.shape[-2:]])[0]

    traced = _trace(run, torch.rand(3, 50, 40))
    for size in [(120, 90), (30, 200)]:
        image = torch.rand(3, *size)
        for got, expected in zip(traced(image), run(image)):
            assert got.shape == expected.shape, size
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_anchor_grid_traced_equals_eager():
    gen = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)

    def run(batch):
        return gen(batch.shape[-2:], [batch[:, :, ::4, ::4], batch[:, :, ::8, ::8]])

    traced = _trace(run, torch.zeros(1, 1, 32, 64))
    for size in [(64, 32), (96, 128)]:
        batch = torch.zeros(1, 1, *size)
        assert torch.equal(traced(batch), run(batch))


def test_pooler_traced_with_an_empty_level_pools_it_at_run_time():
    """torchvision's path under tracing: a level with no box in the example still pools at run time."""
    pooler = MultiScaleRoIAlign(("p2", "p3"), output_size=2, impl="torchvision")
    torch.manual_seed(0)
    features = {"p2": torch.rand(1, 4, 32, 32), "p3": torch.rand(1, 4, 16, 16)}

    def run(p2, p3, boxes):
        return pooler({"p2": p2, "p3": p3}, [boxes], [(128, 128)])

    small = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # level p2 only
    traced = _trace(run, features["p2"], features["p3"], small)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 120.0, 120.0], [8.0, 4.0, 100.0, 90.0]])
    got = traced(features["p2"], features["p3"], boxes)
    expected = run(features["p2"], features["p3"], boxes)
    assert got.shape == (3, 4, 2, 2) and (expected[1:] != 0).all()  # the big boxes come from p3
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
