"""resdet's sparse CPU RoIAlign equals torchvision's ``roi_align``, forward and gradients."""
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

from resdet import fast_paths
from resdet.heads import MultiScaleRoIAlign
from resdet.layers.roi_align import multi_level_roi_align, roi_align

from helpers import resdet_ops


@pytest.fixture(autouse=True)
def _sparse_kernel_on():
    """These tests are about the sparse kernel: on even where the environment turns fast paths off."""
    with fast_paths(True):
        yield


def _rois(n: int, image_size: float, num_images: int = 2, min_size: float = 2.0,
          max_size: float = 60.0) -> torch.Tensor:
    """Tensor[n, 5] well-formed boxes, some partly outside ``[0, image_size]``."""
    size = torch.rand(n, 2) * (max_size - min_size) + min_size
    x1y1 = torch.rand(n, 2) * (image_size + 20) - 10
    ids = torch.randint(0, num_images, (n, 1)).float()
    return torch.cat([ids, x1y1, x1y1 + size], dim=1)


def _compare(x: torch.Tensor, rois: torch.Tensor, out, scale, sr, aligned, atol=1e-5, grad_atol=1e-5):
    ours_x = x.detach().clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    rois = rois.to(x.dtype)  # torchvision wants both in one dtype
    with resdet_ops() as calls:
        ours = roi_align(ours_x, rois, out, scale, sr, aligned)
    assert calls["roi_align"] == 1
    ref = tv_roi_align(ref_x, rois, out, scale, sr, aligned)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
    g = torch.randn(ref.shape, dtype=torch.float32).to(ref.dtype)
    ours.backward(g)
    ref.backward(g)
    assert ours_x.grad.shape == x.shape and ours_x.grad.dtype == x.dtype
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=0, atol=grad_atol)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0, 3])
@pytest.mark.parametrize("scale", [0.25, 1 / 32])
def test_roi_align_equals_torchvision(aligned, sampling_ratio, scale):
    x = torch.randn(2, 3, 12, 10)
    rois = _rois(40, 12 / scale, max_size=8 / scale)
    _compare(x, rois, (5, 4), scale, sampling_ratio, aligned)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roi_align_boxes_outside_tiny_and_huge(aligned, sampling_ratio):
    x = torch.randn(2, 3, 9, 11)
    rois = torch.tensor([
        [0, -30.0, -30.0, -20.0, -25.0],  # wholly outside, above left
        [1, 50.0, 40.0, 70.0, 90.0],  # wholly outside, below right
        [0, -3.0, 2.0, 5.0, 15.0],  # partly outside
        [1, 8.5, -0.7, 11.2, 9.6],  # straddles the right and top edges
        [0, 4.0, 4.0, 4.0, 4.0],  # empty box
        [1, 3.2, 3.3, 3.25, 3.31],  # tiny
        [0, 0.0, 0.0, 0.4, 0.3],  # sub-pixel at the origin
        [1, -40.0, -35.0, 60.0, 70.0],  # huge, covers the map
        [0, 0.0, 0.0, 11.0, 9.0],  # exactly the map
        [1, 10.0, 8.0, 10.0, 8.0],  # a point at the last pixel
    ])
    _compare(x, rois, 4, 1.0, sampling_ratio, aligned)


def test_roi_align_empty_and_list_boxes():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), 7, 0.5, 2)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    boxes = [torch.tensor([[1.0, 1.0, 6.0, 5.0]]), torch.zeros(0, 4), torch.tensor([[0.0, 2.0, 3.0, 7.5]])]
    x3 = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(roi_align(x3, boxes, 3, 1.0, 2), tv_roi_align(x3, boxes, 3, 1.0, 2), rtol=0, atol=1e-6)
    assert roi_align(x3, boxes, 3, 1.0, -1)[..., 0].shape == (2, 4, 3)


def test_roi_align_channels_last_and_bfloat16():
    x = torch.randn(2, 6, 10, 12).contiguous(memory_format=torch.channels_last)
    rois = _rois(30, 40.0, max_size=30.0)
    _compare(x, rois, 7, 0.25, 2, False)

    # bfloat16 (torchvision's CPU kernel has none): torchvision's float32 result on the same values, rounded.
    xb = torch.randn(2, 6, 10, 12).to(torch.bfloat16).requires_grad_()
    x32 = xb.detach().float().requires_grad_()
    out = roi_align(xb, rois, 7, 0.25, 0)
    ref = tv_roi_align(x32, rois, 7, 0.25, 0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0.01, atol=0.01)
    g = torch.randn(ref.shape)
    out.backward(g.to(torch.bfloat16))
    ref.backward(g)
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.float(), x32.grad, rtol=0.02, atol=0.05)


def test_roi_align_under_autocast():
    x = torch.randn(2, 6, 10, 12, requires_grad=True)
    rois = _rois(20, 40.0, max_size=30.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(x, rois, 7, 0.25, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, tv_roi_align(x, rois, 7, 0.25, 2), rtol=0, atol=1e-5)


def test_multi_level_roi_align_one_map():
    levels = [torch.randn(2, 3, 16, 12), torch.randn(2, 3, 8, 6).contiguous(memory_format=torch.channels_last)]
    levels = [x.requires_grad_() for x in levels]
    rois = _rois(25, 64.0, max_size=40.0)
    level = torch.randint(0, 2, (25,))
    out = multi_level_roi_align(levels, rois, level, [0.25, 0.125], 5, 2)
    g = torch.randn_like(out)
    out.backward(g)
    for k, scale in enumerate([0.25, 0.125]):
        x = levels[k].detach().clone().requires_grad_()
        idx = torch.where(level == k)[0]
        ref = tv_roi_align(x, rois[idx], 5, scale, 2)
        torch.testing.assert_close(out[idx], ref, rtol=0, atol=1e-5)
        ref.backward(g[idx])
        torch.testing.assert_close(levels[k].grad, x.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("output_size", [7, 14])
def test_multiscale_pooler_equals_torchvision(output_size):
    feats = OrderedDict((f"p{k}", torch.randn(2, 4, 256 >> k, 192 >> k, requires_grad=True)) for k in range(2, 6))
    sizes = [(256, 180), (240, 192)]
    boxes = [_rois(30, 180, 1, 4, 200)[:, 1:], _rois(20, 190, 1, 4, 250)[:, 1:]]
    ours = MultiScaleRoIAlign(output_size=output_size, sampling_ratio=2)
    with fast_paths(True), resdet_ops() as calls:
        out = ours(feats, boxes, sizes)
        g = torch.randn_like(out)
        out.backward(g)
    assert calls == {"roi_align_table": 1, "roi_align": 1, "roi_align_backward": 1}  # all levels in one map
    grads = [x.grad.clone() for x in feats.values()]
    for x in feats.values():
        x.grad = None
    tv_feats = OrderedDict(zip(["0", "1", "2", "3"], feats.values()))
    ref = TVMultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2)(tv_feats, boxes, sizes)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    ref.backward(g)
    for a, x in zip(grads, feats.values()):
        torch.testing.assert_close(a, x.grad, rtol=0, atol=1e-5)


def test_pooler_impl_switch():
    feats = {"p2": torch.randn(1, 2, 8, 8)}
    boxes = [torch.tensor([[1.0, 1.0, 20.0, 20.0]])]
    tv = MultiScaleRoIAlign(("p2",), impl="torchvision")
    with fast_paths(True), resdet_ops() as calls:
        assert torch.equal(tv(feats, boxes, [(32, 32)]), tv_roi_align(feats["p2"], [boxes[0]], 7, 0.25, 2))
    assert not calls
    with fast_paths(True):
        ours = MultiScaleRoIAlign(("p2",))(feats, boxes, [(32, 32)])
    torch.testing.assert_close(ours, tv(feats, boxes, [(32, 32)]))
    with pytest.raises(ValueError, match="impl"):
        MultiScaleRoIAlign(impl="fast")


def test_samples_outside_the_map_read_no_pixel():
    """A sample outside the map contributes 0 without reading a pixel (torchvision's rule), so an inf or NaN
    feature where such a sample's zero-weight taps would point cannot leak into the output as 0 * inf."""
    x = torch.randn(2, 3, 8, 9)
    x[:, :, 0, :] = float("inf")  # the row taps of samples above the map would point at
    x[:, :, :, 0] = float("nan")  # the column taps of samples left of it
    rois = torch.tensor([[1, 2.0, -20.0, 7.0, 5.0], [0, -20.0, 2.0, 5.0, 7.0], [1, 1.5, 1.5, 12.0, 13.0]])
    for sr in (2, 0):
        out = roi_align(x, rois, 4, 1.0, sr)
        clean = x.clone()
        clean[:, :, 0, :] = 0
        clean[:, :, :, 0] = 0
        ref = tv_roi_align(clean, rois, 4, 1.0, sr)
        # Bins whose samples all lie in rows and columns >= 1 are finite and equal torchvision's; the
        # others read a non-finite pixel with a positive weight, as torchvision's do.
        finite = torch.isfinite(tv_roi_align(x, rois, 4, 1.0, sr)) | torch.isfinite(out)
        assert torch.isfinite(out[0, :, :2]).all() and torch.isfinite(out[1, :, :, :2]).all()
        torch.testing.assert_close(out[finite], ref[finite], rtol=0, atol=1e-5)


def test_large_roi_with_adaptive_sampling_keeps_memory_bounded(monkeypatch):
    """One 1000×1000-pixel RoI at scale 1 samples ~143² points per bin of a 7×7 output: ~4M (pixel, weight)
    pairs. The map is built and used in pieces of at most ``_CHUNK_PAIRS`` pairs (or one bin), forward and
    backward, and the result is torchvision's."""
    import resdet.layers.roi_align as roi_mod

    monkeypatch.setattr(roi_mod, "_CHUNK_PAIRS", 1 << 18)
    monkeypatch.setattr(roi_mod, "_KEEP_PAIRS", 1 << 20)  # this map is larger: not kept for the backward pass
    monkeypatch.setattr(roi_mod, "_BACKWARD_CHUNK_BYTES", 1 << 20)
    pieces = []
    real = roi_mod._adaptive_map

    def spy(*args):
        piece = real(*args)
        pieces.append(piece[0].numel())
        return piece

    monkeypatch.setattr(roi_mod, "_adaptive_map", spy)
    x = torch.randn(1, 1, 1010, 1010, requires_grad=True)
    rois = torch.tensor([[0, 3.0, 4.0, 1003.0, 1004.0]])
    out = roi_align(x, rois, 7, 1.0, -1)
    bag = 4 * 143 * 143
    assert sum(pieces) == 49 * bag and max(pieces) <= (1 << 18) + bag  # ~4M pairs, in pieces
    pieces.clear()
    out.backward(torch.ones_like(out))
    assert sum(pieces) == 49 * bag and max(pieces) <= (1 << 18) + bag  # rebuilt piece by piece
    ref_x = x.detach().clone().requires_grad_()
    ref = tv_roi_align(ref_x, rois, 7, 1.0, -1)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=1e-6)


def test_fast_paths_off_is_torchvision_exactly():
    x = torch.randn(2, 3, 12, 10)
    rois = _rois(20, 48.0, max_size=30.0)
    with fast_paths(False), resdet_ops() as calls:
        out = roi_align(x, rois, 5, 0.25, 2)
    assert not calls and torch.equal(out, tv_roi_align(x, rois, 5, 0.25, 2))
