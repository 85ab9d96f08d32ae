"""resdet's Conv2d: the Winograd kernels (``resdet::conv3x3*``) equal PyTorch's convolution, forward and backward.

Tests of NNPACK's kernel need a PyTorch built with it; the F(4×4, 3×3) weight gradient and every fallback
are pure torch and run everywhere.
"""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import resdet.layers.winograd as winograd
from resdet import fast_paths
from resdet.layers import policy
from resdet.layers.conv import Conv2d
from resdet.models import from_torchvision

from helpers import resdet_ops

needs_nnpack = pytest.mark.skipif(not policy.nnpack_usable(), reason="this PyTorch build has no NNPACK")


@pytest.fixture(autouse=True)
def _winograd_on():
    """These tests are about the fast kernels: on even where the environment turns fast paths off."""
    with fast_paths(True):
        yield
    policy.set_thresholds(None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "shape, bias, channels_last, grid, kernels",
    [
        pytest.param((2, 128, 48, 64), True, False, False, {"nnpack"}, marks=needs_nnpack),  # one call per image
        pytest.param((1, 128, 50, 70), False, True, False, {"nnpack"}, marks=needs_nnpack),  # channels-last input
        pytest.param((5, 256, 7, 9), True, False, True, {"nnpack"}, marks=needs_nnpack),  # 3×2 grid, one empty tile
        pytest.param((4, 256, 14, 14), False, False, True, {"nnpack"}, marks=needs_nnpack),  # a full 2×2 grid
        ((2, 256, 32, 44), True, False, False, {"wgrad"}),  # oneDNN forward, F(4×4, 3×3) weight gradient
        ((2, 256, 30, 45), False, True, False, {"wgrad"}),  # the same on sides that are no multiple of 4
    ],
)
def test_winograd_equals_conv2d(monkeypatch, shape, bias, channels_last, grid, kernels):
    if grid:  # the grid path pays from ~6k pixels; force it on these small inputs
        policy.set_thresholds(grid_min_pixels=0)
    ran = set()
    real_nnpack, real_wgrad = winograd._nnpack_conv3x3, winograd._winograd_weight_grad
    monkeypatch.setattr(winograd, "_nnpack_conv3x3", lambda *a: ran.add("nnpack") or real_nnpack(*a))
    monkeypatch.setattr(winograd, "_winograd_weight_grad", lambda *a: ran.add("wgrad") or real_wgrad(*a))
    n, c, h, w = shape
    conv = Conv2d(c, c, 3, padding=1, bias=bias)
    x = torch.randn(shape).relu()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with resdet_ops() as calls:
        y = conv(x)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, *conv.parameters()], g)
    assert calls["conv3x3"] == 1 and y.shape == (n, c, h, w) and y.is_contiguous()
    assert ran == kernels
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    ref_grads = torch.autograd.grad(ref, [x, *conv.parameters()], g)
    assert _rel(y, ref) < 1e-4  # Winograd F(6x6, 3x3) rounding: ~1e-5 of the largest output
    for a, b in zip(grads, ref_grads):
        assert _rel(a, b) < 1e-4


def test_winograd_weight_gradient_is_exact_in_float64():
    x, grad = torch.randn(3, 5, 13, 10, dtype=torch.float64), torch.randn(3, 7, 13, 10, dtype=torch.float64)
    ref = torch.nn.grad.conv2d_weight(x, (7, 5, 3, 3), grad, padding=1)
    torch.testing.assert_close(winograd._winograd_weight_grad(x, grad), ref, rtol=1e-10, atol=1e-10)


def test_disabled_and_ineligible_calls_are_pytorch_exactly():
    conv = Conv2d(256, 256, 3, padding=1)
    x = torch.randn(2, 256, 32, 44, requires_grad=True)  # pays for the weight gradient, not for NNPACK
    with resdet_ops() as calls:
        conv(x)
    assert calls["conv3x3"] == 1
    with fast_paths(False), resdet_ops() as calls:
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    with fast_paths(False, "winograd"), resdet_ops() as more:
        conv(x)
    strided = Conv2d(256, 256, 3, stride=2, padding=1)
    small = torch.randn(1, 256, 8, 8, requires_grad=True)
    with resdet_ops() as ineligible:
        strided(x), conv(small)
        with torch.no_grad():  # then only NNPACK could pay, and not at these sizes
            conv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
    assert not calls and not more and not ineligible and y.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_traced_and_scripted_graphs_hold_plain_convolutions():
    conv = Conv2d(128, 128, 3, padding=1).eval()
    x = torch.randn(1, 128, 48, 64)
    with torch.no_grad():
        traced = torch.jit.trace(conv, x, check_trace=False)
        scripted = torch.jit.script(conv)
        eager = conv(x)
    for module in (traced, scripted):
        graph = str(module.inlined_graph)
        assert "aten::_convolution" in graph or "aten::conv2d" in graph
        assert "nnpack" not in graph and "resdet::" not in graph
        torch.testing.assert_close(module(x), eager, rtol=1e-4, atol=1e-4)


@needs_nnpack
def test_mask_rcnn_parity_with_torchvision_on_winograd_sizes(monkeypatch):
    """At sizes where P2/P3, the RPN conv and the mask head (40 RoIs on a grid) take the Winograd path,
    detections stay torchvision's: same labels, boxes within 1e-2 px, scores and masks within 1e-3."""
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3, norm_layer=FrozenBatchNorm2d)
    tv = MaskRCNN(body, num_classes=5, min_size=320, max_size=448, box_score_thresh=0.0,
                  rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_detections_per_img=40).eval()
    with torch.no_grad():
        cls = tv.roi_heads.box_predictor.cls_score
        cls.weight.normal_(0, 0.01)
        cls.bias.copy_(torch.linspace(0, 4, cls.out_features))
    ours = from_torchvision(tv)
    image = torch.rand(3, 320, 440, generator=torch.Generator().manual_seed(3))
    calls = []
    real = winograd._nnpack_conv3x3
    monkeypatch.setattr(winograd, "_nnpack_conv3x3", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        ref, got = tv([image])[0], ours([image])[0]
    assert any(s[-2:] == (80, 112) for s in calls)  # P2 (FPN output conv, RPN conv)
    assert any(s[0] == 40 for s in calls)  # mask head: 40 RoIs of 14×14 on a grid
    # Order by score (the same detections may swap places where scores tie to float rounding).
    order_a, order_b = got["scores"].argsort(descending=True), ref["scores"].argsort(descending=True)
    assert torch.equal(got["labels"][order_a], ref["labels"][order_b])
    torch.testing.assert_close(got["boxes"][order_a], ref["boxes"][order_b], rtol=0, atol=1e-2)
    torch.testing.assert_close(got["scores"][order_a], ref["scores"][order_b], rtol=0, atol=1e-3)
    torch.testing.assert_close(got["masks"][order_a], ref["masks"][order_b], rtol=0, atol=1e-3)


def test_optimize_for_inference_layout_follows_the_policy(monkeypatch):
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3, norm_layer=FrozenBatchNorm2d)
    tv = MaskRCNN(body, num_classes=3, min_size=64, max_size=96).eval()
    nchw = policy.nnpack_usable()  # NNPACK reads NCHW: kept where it can run
    assert from_torchvision(tv).optimize_for_inference().transform.channels_last is not nchw
    with fast_paths(False, "winograd"):
        assert from_torchvision(tv).optimize_for_inference().transform.channels_last is True
    assert from_torchvision(tv).optimize_for_inference(channels_last=False).transform.channels_last is False
