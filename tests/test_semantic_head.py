"""SemanticFPNHead: tower structure, output size, loss with ignored pixels, init, bad strides."""
import pytest
import torch

from resdet.heads.semantic_head import SemanticFPNHead
from resdet.layers.shape_spec import ShapeSpec

SHAPES = {f"p{i}": ShapeSpec(16, 2**i) for i in range(2, 6)}


def _features(n: int = 2, h: int = 64, w: int = 96) -> dict[str, torch.Tensor]:
    return {name: torch.randn(n, 16, h // s.stride, w // s.stride) for name, s in SHAPES.items()}


def test_towers_follow_panoptic_fpn():
    head = SemanticFPNHead(SHAPES, num_classes=5, conv_dims=32)
    # p2: one conv, no upsample; p3: conv+up; p4: two; p5: three.
    for name, stages in (("p2", 1), ("p3", 1), ("p4", 2), ("p5", 3)):
        tower = head.scale_heads[name]
        assert len(tower) == stages
        ups = sum(isinstance(m, torch.nn.Upsample) for m in tower.modules())
        assert ups == (0 if name == "p2" else stages)
        convs = [m for m in tower.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
        assert sum(isinstance(m, torch.nn.GroupNorm) for m in tower.modules()) == stages
    assert head.predictor.kernel_size == (1, 1) and head.predictor.out_channels == 5
    assert head.predictor.weight.std() < 0.01 and head.predictor.bias.abs().sum() == 0


def test_logits_at_input_size_and_loss_ignores_255():
    head = SemanticFPNHead(SHAPES, num_classes=5, conv_dims=32)
    feats = _features()
    feats["p6"] = torch.randn(2, 16, 1, 2)  # extra levels are ignored
    logits, losses = head(feats)
    assert logits.shape == (2, 5, 64, 96) and losses == {}
    target = torch.randint(0, 5, (2, 64, 96))
    target[:, :10] = 255
    _, losses = head(feats, target)
    ref = torch.nn.functional.cross_entropy(logits[:, :, 10:], target[:, 10:])
    torch.testing.assert_close(losses["loss_sem_seg"], ref)
    all_ignored = torch.full_like(target, 255)
    _, losses = head(feats, all_ignored)
    assert losses["loss_sem_seg"].item() == 0.0 and losses["loss_sem_seg"].requires_grad


def test_loss_weight_and_no_norm():
    feats = _features(1, 32, 32)
    target = torch.randint(0, 3, (1, 32, 32))
    torch.manual_seed(0)
    a = SemanticFPNHead(SHAPES, num_classes=3, conv_dims=32, norm=None)
    torch.manual_seed(0)
    b = SemanticFPNHead(SHAPES, num_classes=3, conv_dims=32, norm=None, loss_weight=0.5)
    assert all(m.bias is not None for m in a.modules() if isinstance(m, torch.nn.Conv2d))
    la, lb = a(feats, target)[1]["loss_sem_seg"], b(feats, target)[1]["loss_sem_seg"]
    torch.testing.assert_close(lb, 0.5 * la)


def test_bad_configuration_fails_fast():
    with pytest.raises(ValueError, match="stride 6"):
        SemanticFPNHead({"p2": ShapeSpec(16, 6)}, num_classes=3, conv_dims=32)
    head = SemanticFPNHead(SHAPES, num_classes=3, conv_dims=32)
    with pytest.raises(KeyError, match="p5"):
        head({k: v for k, v in _features(1, 32, 32).items() if k != "p5"})
    with pytest.raises(ValueError, match="do not match"):
        head(_features(1, 64, 64), torch.zeros(1, 32, 32, dtype=torch.long))
