"""The fast-path policy (``resdet.layers.policy``) and the registered ops: switches, fallbacks, PyTorch's
own NNPACK switch, a PyTorch without the private names resdet looks up, opcheck, compile, export,
higher-order gradients."""
import asyncio
import contextlib
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import resdet.layers.roi_align as roi_mod
import resdet.layers.winograd as winograd
from resdet import fast_paths
from resdet.layers import policy
from resdet.layers.conv import Conv2d
from resdet.layers.roi_align import pixel_table, roi_align
from resdet.models import mask_rcnn

from helpers import resdet_ops


@pytest.fixture(autouse=True)
def _fresh_policy():
    """Each test starts with fast paths on, no failed kernel and the environment read afresh."""
    saved = (set(policy._failed), policy._env_disabled)
    policy._failed.clear()
    with fast_paths(True):
        yield
    policy._failed.clear()
    policy._failed.update(saved[0])
    policy._env_disabled = saved[1]


_MODEL = dict(num_classes=3, min_size=192, max_size=256, box_score_thresh=0.0, box_detections_per_img=10,
              rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_representation_size=128, mask_layers=(256,))
_IMAGE = torch.rand(3, 192, 256, generator=torch.Generator().manual_seed(0))  # P2 48×64: NNPACK pays there


def _tiny_mask_rcnn():
    torch.manual_seed(0)
    return mask_rcnn("resnet18", **_MODEL).eval()


def _forward(model):
    with torch.no_grad():
        out = model([_IMAGE])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"} and len(out["boxes"]) == 10
    return out


# --------------------------------------------------------------------------------------------------
# the switch


@contextlib.contextmanager
def _outside_blocks():
    """As outside every ``fast_paths`` block (where the environment decides)."""
    token = policy._disabled.set(None)
    try:
        yield
    finally:
        policy._disabled.reset(token)


def test_switch_is_scoped_nested_and_per_kernel():
    assert policy.fast_path_enabled("winograd") and policy.fast_path_enabled("roi_align")
    with fast_paths(False):
        assert not policy.fast_path_enabled("winograd") and not policy.fast_path_enabled("roi_align")
        with fast_paths(True, "roi_align"):
            assert not policy.fast_path_enabled("winograd") and policy.fast_path_enabled("roi_align")
        assert not policy.fast_path_enabled("roi_align")
    assert policy.fast_path_enabled("winograd")
    with pytest.raises(ValueError, match="unknown fast path 'nnpack'"):
        with fast_paths(False, "nnpack"):
            pass


def test_switch_belongs_to_its_thread_and_task():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def worker():
        with fast_paths(False):
            inside.set()
            release.wait(5)
            seen["worker"] = policy.fast_path_enabled("winograd")

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    seen["main"] = policy.fast_path_enabled("winograd")  # while the worker's block is open
    release.set()
    thread.join()
    assert seen == {"main": True, "worker": False}

    async def task(enabled: bool) -> bool:
        with fast_paths(enabled):
            await asyncio.sleep(0.01)  # the other task runs in between
            return policy.fast_path_enabled("winograd")

    async def both() -> list:
        return await asyncio.gather(task(False), task(True))

    assert asyncio.run(both()) == [False, True]


@pytest.mark.parametrize("env, off", [
    ({"RESDET_FAST_PATHS": "0"}, {"winograd", "roi_align"}),
    ({"RESDET_FAST_PATHS": "1"}, set()),
    ({"RESDET_FAST_PATHS": "-winograd"}, {"winograd"}),
    ({"RESDET_WINOGRAD": "0"}, {"winograd"}),
])
def test_environment(monkeypatch, env, off):
    monkeypatch.delenv("RESDET_FAST_PATHS", raising=False)
    monkeypatch.delenv("RESDET_WINOGRAD", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    policy._env_disabled = None
    with _outside_blocks():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert {k for k in policy.KERNELS if not policy.fast_path_enabled(k)} == off
            with fast_paths(True):  # a block beats the environment
                assert all(policy.fast_path_enabled(k) for k in policy.KERNELS)
    assert [str(w.message).split(":")[0] for w in caught] == (
        ["RESDET_WINOGRAD is deprecated"] if "RESDET_WINOGRAD" in env else [])


def test_environment_bad_value(monkeypatch):
    monkeypatch.setenv("RESDET_FAST_PATHS", "winograd")
    policy._env_disabled = None
    with _outside_blocks(), pytest.raises(ValueError, match="RESDET_FAST_PATHS='winograd': expected"):
        policy.fast_path_enabled("winograd")


# --------------------------------------------------------------------------------------------------
# PyTorch's capabilities and kernel failures


def _nnpack_spy(monkeypatch) -> list:
    """Records every call of PyTorch's NNPACK entry point (and lets it run, where it exists)."""
    calls = []
    real = getattr(torch, "_nnpack_spatial_convolution", None)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", spy, raising=False)
    return calls


@pytest.mark.skipif(not policy.nnpack_usable(), reason="this PyTorch build has no NNPACK")
def test_nnpack_flags_disabled_means_no_nnpack_call(monkeypatch):
    model = _tiny_mask_rcnn()
    calls = _nnpack_spy(monkeypatch)
    expected = _forward(model)
    assert calls  # NNPACK runs at this size when allowed ...
    calls.clear()
    with torch.backends.nnpack.flags(enabled=False), warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _forward(model)
    assert not calls  # ... and not at all under PyTorch's switch
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=1e-3)


def test_fast_kernels_that_raise_fall_back_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(winograd, "_nnpack_conv3x3", broken)
    monkeypatch.setattr(winograd, "_winograd_weight_grad", broken)
    monkeypatch.setattr(roi_mod, "_map_pieces", broken)
    monkeypatch.setattr(policy, "nnpack_usable", lambda: True)  # as if NNPACK were there, even where it is not
    conv = Conv2d(256, 256, 3, padding=1)
    x = torch.randn(2, 256, 32, 44, requires_grad=True)  # NNPACK (forced below) and the weight gradient pay
    policy.set_thresholds(grid_min_pixels=0)
    try:
        with pytest.warns(RuntimeWarning, match="simulated kernel failure") as caught:
            for _ in range(2):
                y = conv(x)
                y.sum().backward()
                torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, padding=1))
            rois = torch.tensor([[0, 1.0, 1.0, 20.0, 30.0]])
            torch.testing.assert_close(roi_align(x, rois, 7, 0.5, 2), torch.ops.torchvision.roi_align(
                x, rois, 0.5, 7, 7, 2, False))
            _forward(_tiny_mask_rcnn())  # the whole model on the fallbacks
    finally:
        policy.set_thresholds(None)
    assert sorted(str(w.message).split(" fast kernel")[0] for w in caught) == [
        "resdet: the nnpack", "resdet: the roi_align", "resdet: the winograd"]  # one each, not one per call
    assert policy._failed == {"nnpack", "winograd", "roi_align"}


_SCRIPT = """
import warnings
import torch
import torch.fx._symbolic_trace as st
for name in ("is_fx_tracing", "is_fx_symbolic_tracing"):  # a PyTorch that dropped the deprecated FX helpers
    if hasattr(st, name):
        delattr(st, name)
torch.backends.nnpack.is_available = lambda: False  # ... and was built without NNPACK
calls = []
torch._nnpack_spatial_convolution = lambda *a, **k: calls.append(1) or 1 / 0
warnings.simplefilter("error", RuntimeWarning)  # no kernel failure either
import resdet
from resdet.models import mask_rcnn
torch.manual_seed(0)
model = mask_rcnn("resnet18", **MODEL).eval()
with torch.no_grad():
    out = model([torch.rand(3, 192, 256)])[0]
assert len(out["masks"]) == 10 and not calls and not resdet.layers.policy.nnpack_usable()
print("ok")
"""


def test_import_and_mask_rcnn_without_fx_helpers_or_nnpack_in_a_fresh_process():
    script = f"MODEL = {_MODEL!r}\n{_SCRIPT}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_mask_rcnn_without_fx_helpers(monkeypatch):
    import torch.fx._symbolic_trace as st

    for name in ("is_fx_tracing", "is_fx_symbolic_tracing"):
        monkeypatch.delattr(st, name, raising=False)
    _forward(_tiny_mask_rcnn())
    traced = torch.fx.symbolic_trace(Conv2d(4, 4, 3, padding=1))  # FX tracing still records PyTorch's op
    assert "conv2d" in traced.code and "resdet" not in traced.code


def test_nnpack_unavailable_in_process(monkeypatch):
    monkeypatch.setattr(torch.backends.nnpack, "is_available", lambda: False)
    calls = _nnpack_spy(monkeypatch)
    assert not policy.nnpack_usable() and not policy.winograd_possible(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _forward(_tiny_mask_rcnn())
    assert not calls


# --------------------------------------------------------------------------------------------------
# the registered ops as PyTorch sees them


def _roi_inputs():
    levels = [torch.randn(2, 3, 12, 10), torch.randn(2, 3, 6, 5)]
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 20.0], [1, -5.0, 3.0, 12.0, 45.0], [1, 4.0, 4.0, 9.0, 7.0]])
    return levels, rois, torch.tensor([0, 1, 0])


def test_opcheck_every_registered_op():
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    ops = torch.ops.resdet
    cases = [(ops.conv3x3, (x, w, b)), (ops.conv3x3, (x, w, None)), (ops.conv3x3_input_grad, (g, w)),
             (ops.conv3x3_weight_grad, (x, g))]
    levels, rois, level = _roi_inputs()
    levels = [lv.requires_grad_() for lv in levels]
    table = pixel_table(levels).detach().requires_grad_()
    args = ([2, 12, 10, 2, 6, 5], [0.25, 0.125], [3, 2])
    for sr, aligned in ((2, False), (0, True)):
        out = ops.roi_align(table, rois, level, *args, sr, aligned, True)
        grad = torch.randn_like(out[0]).requires_grad_()
        cases += [(ops.roi_align, (table, rois, level, *args, sr, aligned, keep)) for keep in (True, False)]
        cases += [(ops.roi_align_backward, (grad, rois, level, *args, sr, aligned, *out[1:]))]
    cases.append((ops.roi_align_table, (levels,)))
    for op, inputs in cases:
        torch.library.opcheck(op, inputs)


def test_double_backward_and_func_grad_through_every_op():
    # Second derivatives through all three convolution ops (each op's backward is the other two) equal
    # PyTorch's convolution's, in float64 (the fallbacks of the kernels: the formulas are what is tested).
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def second_order(conv):
        gx, gw, gb = torch.autograd.grad(conv(x, w, b).square().sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum() + gb.square().sum(), (x, w, b))

    with resdet_ops() as calls:
        got = second_order(winograd.conv3x3)
    assert set(calls) == {"conv3x3", "conv3x3_input_grad", "conv3x3_weight_grad"}
    for a, ref in zip(got, second_order(lambda x, w, b: F.conv2d(x, w, b, padding=1))):
        torch.testing.assert_close(a, ref)
    # RoIAlign is linear, y = A x: d/dx |d|Ax|^2/dx|^2 = 4 A^T A (2 A^T A x), from first-order products.
    levels, rois, level = _roi_inputs()
    levels = [lv.requires_grad_() for lv in levels]

    def pool(*lv):
        return roi_mod.multi_level_roi_align(lv, rois, level, [0.25, 0.125], (3, 2), 2)

    with resdet_ops() as calls:
        g = torch.autograd.grad(pool(*levels).square().sum(), levels, create_graph=True)
        h = torch.autograd.grad(sum(t.square().sum() for t in g), levels)
    assert calls["roi_align_backward"] == 2 and calls["roi_align"] >= 2
    ata_g = torch.autograd.grad(pool(*levels), levels, grad_outputs=pool(*[t.detach() for t in g]))
    for a, ref in zip(h, ata_g):
        torch.testing.assert_close(a, 4 * ref, rtol=1e-5, atol=1e-5)
    # torch.func: the same gradients as PyTorch's own ops, for a fast kernel (float32, sizes that pay).
    conv = Conv2d(256, 256, 3, padding=1)
    x32 = torch.randn(2, 256, 32, 44)
    params = dict(conv.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(conv, p, (x32,)).square().mean())(params)
    ref = torch.func.grad(lambda p: F.conv2d(x32, p["weight"], p["bias"], padding=1).square().mean())(params)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-3, atol=1e-6)
    feats = [lv.detach().float() for lv in levels]
    gx = torch.func.grad(lambda t: pool(t, feats[1]).square().sum())(feats[0])
    ref_x = feats[0].clone().requires_grad_()
    pool(ref_x, feats[1]).square().sum().backward()
    torch.testing.assert_close(gx, ref_x.grad)


def test_compile_and_export_see_the_registered_ops():
    from resdet.backbones import build_resnet_fpn

    torch.manual_seed(0)
    model = build_resnet_fpn("resnet18", frozen_stages=1).eval()
    x = torch.rand(1, 3, 256, 320)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend=backend, fullgraph=True)(x)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert "resdet.conv3x3" in targets and not any("nnpack" in t for t in targets)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-4)
    exported = torch.export.export(model, (x,))
    assert any("resdet.conv3x3" in str(n.target) for n in exported.graph.nodes)
    out = exported.module()(x)
    for k in eager:
        torch.testing.assert_close(out[k], eager[k], rtol=1e-4, atol=1e-4)


def test_compile_roi_pooler_fullgraph_in_training():
    from resdet.heads import MultiScaleRoIAlign

    feats = {f"p{k}": torch.randn(2, 4, 64 >> k, 48 >> k, requires_grad=True) for k in range(2, 5)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0], [3.0, 3.0, 9.0, 7.0]]), torch.tensor([[0.0, 0.0, 47.0, 60.0]])]
    pooler = MultiScaleRoIAlign(("p2", "p3", "p4"), 5, 2)
    compiled = torch.compile(pooler, backend="aot_eager", fullgraph=True)
    out = compiled(feats, boxes, [(64, 48), (60, 48)])
    out.square().sum().backward()
    got = [x.grad.clone() for x in feats.values()]
    for x in feats.values():
        x.grad = None
    ref = pooler(feats, boxes, [(64, 48), (60, 48)])
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for a, x in zip(got, feats.values()):
        torch.testing.assert_close(a, x.grad)


def test_compiled_mask_rcnn_runs_the_registered_ops_and_matches_eager():
    """The whole detector under torch.compile: its graphs hold resdet's ops (the graph breaks are NMS's and
    the other data-dependent steps of proposal filtering and post-processing)."""
    model = _tiny_mask_rcnn()
    expected = _forward(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    got = _forward(torch.compile(model, backend=backend))
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"resdet.conv3x3", "resdet.roi_align", "resdet.roi_align_table"} <= targets
    torch.testing.assert_close(got["boxes"], expected["boxes"])
    torch.testing.assert_close(got["masks"], expected["masks"])
