"""DeepLabV3 / V3+ / FCN: torchvision parity (model, state dict, ``model.weights=``), the output-stride
switch, sliding-window evaluation shared by every semantic model, training losses and the poly schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from resdet.models import deeplabv3, deeplabv3plus, fcn, from_torchvision, semantic_fpn
from resdet.models.semantic import SemanticSegmentor, SemSegTransform, sliding_window_logits

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _randomize_bn(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters away from (0, 1), so that a mix-up of them shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.stack([o["sem_seg_logits"] for o in model(list(images), return_logits=True)])


def test_torchvision_deeplabv3_resnet50_same_output(tmp_path):
    from torchvision.models.segmentation import deeplabv3_resnet50

    from resdet.config import load_config
    from resdet.engine.pretrained import load_pretrained
    from resdet.models import build_model

    tv = _randomize_bn(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=True))
    images = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        ref = tv((images - MEAN) / STD)["out"]  # torchvision's model takes normalized input
    ours = from_torchvision(tv)
    assert ours.backbone.output_stride == 8 and ours.classifier.aspp.rates == (12, 24, 36)
    assert ours.aux_classifier is not None and not ours.training
    torch.testing.assert_close(_logits(ours, images), ref, rtol=1e-4, atol=1e-4)
    # The same weights as a file through model.weights= (a bare state dict: see the FCN test).
    path = tmp_path / "deeplabv3_resnet50.pth"
    torch.save(tv.state_dict(), path)
    cfg = load_config(None, ["model.arch=deeplabv3", "model.backbone=resnet50", "model.num_classes=5",
                             f"model.weights={path}", "model.options={min_size: null, max_size: null, "
                             "output_stride: 8, aux_loss: true, size_divisible: 1}"])
    model = build_model(cfg)
    report = load_pretrained(model, path)
    assert report.source == "torchvision_segmentation"
    assert not (report.missing or report.unexpected or report.skipped)
    torch.testing.assert_close(_logits(model.eval(), images), ref, rtol=1e-4, atol=1e-4)


def test_torchvision_fcn_resnet50_without_aux_from_state_dict():
    from torchvision.models.segmentation import fcn_resnet50

    tv = _randomize_bn(fcn_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=False))
    images = torch.rand(1, 3, 36, 44)
    with torch.no_grad():
        ref = tv((images - MEAN) / STD)["out"]
    ours = from_torchvision(tv.state_dict())
    assert ours.aux_classifier is None and ours.num_classes == 3
    torch.testing.assert_close(_logits(ours, images), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("builder", [deeplabv3, deeplabv3plus])
def test_trained_at_16_evaluated_at_8_equals_a_model_built_at_8(builder):
    torch.manual_seed(0)
    ours = builder("resnet18", num_classes=3, output_stride=16, test_output_stride=8)
    built_at_8 = builder("resnet18", num_classes=3, output_stride=8)
    built_at_8.load_state_dict(ours.state_dict())
    _randomize_bn(ours), _randomize_bn(built_at_8)
    assert ours.backbone.output_stride == 8 and ours.classifier.aspp.rates == (12, 24, 36)
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(_logits(ours, images), _logits(built_at_8, images))
    ours.train()
    assert ours.backbone.output_stride == 16 and ours.classifier.aspp.rates == (6, 12, 18)
    assert ours.backbone.output_shape()["c5"].stride == 16


@pytest.mark.parametrize("builder", [deeplabv3plus, fcn])
def test_losses_reach_every_parameter_and_eval_gives_original_sizes(builder):
    model = builder("resnet18", num_classes=4, aux_loss=True, aspp_channels=32) if builder is deeplabv3plus \
        else builder("resnet18", num_classes=4, aux_loss=True)
    images = [torch.rand(3, 48, 64), torch.rand(3, 40, 56)]
    targets = [{"sem_seg": torch.randint(0, 4, im.shape[-2:])} for im in images]
    targets[1]["sem_seg"][:10] = 255
    losses = model(images, targets)
    assert set(losses) == {"loss_sem_seg", "loss_aux"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    out = model(images)
    assert [o["sem_seg"].shape for o in out] == [(48, 64), (40, 56)]
    single = model(images[:1])[0]["sem_seg"]
    assert torch.equal(single, out[0]["sem_seg"])  # the largest image: the same padding alone or batched


def test_fcn_refuses_aspp_options():
    with pytest.raises(TypeError, match="FCN has no ASPP"):
        fcn("resnet18", num_classes=3, aspp_rates=(6, 12, 18))


class _PerPixel(SemanticSegmentor):
    """A 1×1-conv model: its logits at a pixel depend on that pixel only, so windows cannot change them."""

    def __init__(self, **options) -> None:
        super().__init__(SemSegTransform(size_divisible=16), **options)
        self.conv = nn.Conv2d(3, 4, 1)
        self.windows: list[tuple[int, int]] = []

    @property
    def num_classes(self) -> int:
        return 4

    def predict_logits(self, batch: Tensor) -> Tensor:
        self.windows.append(tuple(batch.shape[-2:]))
        return self.conv(batch)


def test_sliding_window_averages_overlapping_windows_exactly():
    images = [torch.rand(3, 70, 100), torch.rand(3, 50, 90)]
    whole = _PerPixel().eval()
    slide = _PerPixel(test_crop_size=(32, 48), test_stride=(20, 30)).eval()
    slide.load_state_dict(whole.state_dict())
    expected = whole(images, return_logits=True)
    got = slide(images, return_logits=True)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g["sem_seg_logits"], e["sem_seg_logits"])
    # Padded batch 80x112: rows at 0, 20, 40, 48; columns at 0, 30, 60, 64 — every window the crop size.
    assert len(slide.windows) == 16 and set(slide.windows) == {(32, 48)}


def test_sliding_window_counts_each_pixel_once_per_covering_window():
    batch = torch.zeros(1, 1, 10, 7)
    ones = sliding_window_logits(lambda x: torch.ones_like(x), batch, (4, 4), (3, 3))
    assert torch.equal(ones, torch.ones_like(batch))  # averaged, not summed
    # A window at least as large as the batch is the batch.
    torch.testing.assert_close(sliding_window_logits(lambda x: x * 2, batch + 1, (16, 16), (8, 8)), batch + 2)


def test_semantic_fpn_sliding_window_option():
    model = semantic_fpn("resnet18", num_classes=3, fpn_out_channels=32, conv_dims=16, test_crop_size=(64, 64),
                         test_stride=(32, 32)).eval()
    assert model.test_crop_size == (64, 64)
    assert model([torch.rand(3, 100, 130)])[0]["sem_seg"].shape == (100, 130)
    with pytest.raises(ValueError, match="multiples of size_divisible=32"):
        model.set_sliding_window((50, 64))
    with pytest.raises(ValueError, match="larger steps leave pixels unseen"):
        model.set_sliding_window((64, 64), (80, 32))


def test_poly_schedule():
    from resdet.engine.lr_schedule import LRFactor

    f = LRFactor(schedule="poly", max_iter=100, power=0.9, min_factor=0.01)
    assert f(0) == 1.0 and f(100) == pytest.approx(0.01) and f(200) == pytest.approx(0.01)
    assert f(50) == pytest.approx(0.01 + 0.99 * 0.5**0.9)
    assert all(f(i) > f(i + 1) for i in range(99))
    warm = LRFactor(schedule="poly", max_iter=100, warmup_iters=10, warmup_factor=0.1)
    assert warm(0) == pytest.approx(0.1) and warm(10) == pytest.approx((1 - 0.1) ** 0.9)
    assert math.isclose(LRFactor(schedule="poly", max_iter=10, power=1.0)(5), 0.5)


def test_hard_pixel_mining_loss():
    from resdet.layers.sem_seg_loss import sem_seg_cross_entropy

    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    targets = torch.randint(0, 3, (2, 4, 5))
    targets[0, 0] = 255
    plain = torch.nn.functional.cross_entropy(logits, targets, ignore_index=255)
    assert torch.equal(sem_seg_cross_entropy(logits, targets, ignore_index=255), plain)
    per_pixel = torch.nn.functional.cross_entropy(logits, targets, ignore_index=255, reduction="none")
    valid = per_pixel[targets != 255].sort(descending=True).values  # 35 pixels: the hardest 9 for 0.25
    hard = sem_seg_cross_entropy(logits, targets, ignore_index=255, top_k=0.25)
    torch.testing.assert_close(hard, valid[:9].mean())
    ignored = sem_seg_cross_entropy(logits, torch.full_like(targets, 255), ignore_index=255, top_k=0.25)
    ignored.backward()
    assert ignored.item() == 0.0 and logits.grad is not None
