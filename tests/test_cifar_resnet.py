"""The CIFAR ResNets of the ResNet paper: Table 6's parameter counts, option A/B shortcuts, trunk contract."""
import pytest
import torch
from torch import nn

import resdet.backbones as backbones
from resdet.backbones import BasicBlock, CifarResNet, ShortcutA, build_cifar_resnet, cifar_resnet20
from resdet.backbones.cifar_resnet import CIFAR_DEPTHS, PAPER_PARAMS


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
def test_parameter_counts_match_table_6(depth):
    with torch.device("meta"):  # counting needs no memory (ResNet-1202 has 19.4M parameters)
        model = getattr(backbones, f"cifar_resnet{depth}")()
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / PAPER_PARAMS[depth] - 1) < 0.02, (depth, count)
    assert model.depth == depth
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == depth  # 6n + 2 weighted layers: option A adds none
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 3 * ((depth - 2) // 6)


def test_option_b_adds_two_projections():
    a = sum(p.numel() for p in cifar_resnet20().parameters())
    b = sum(p.numel() for p in cifar_resnet20(shortcut="B").parameters())
    assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # 1x1 conv + BN at each of the two stage changes
    assert isinstance(cifar_resnet20(shortcut="B").layer2[0].downsample[0], nn.Conv2d)


def test_shortcut_a_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 7, 6)
    y = ShortcutA(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 3)  # ceil(7 / 2) x ceil(6 / 2), as a stride-2 3x3 convolution with padding 1
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert not y[:, 16:].any()
    with pytest.raises(ValueError, match="cannot reduce channels"):
        ShortcutA(32, 16, stride=1)


def test_trunk_levels_strides_and_backbone_contract():
    trunk = build_cifar_resnet("cifar_resnet32", out_features=("c3", "c4")).eval()
    assert {k: (s.channels, s.stride) for k, s in trunk.output_shape().items()} == {"c3": (32, 2), "c4": (64, 4)}
    out = trunk(torch.rand(2, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"c3": (2, 32, 16, 16), "c4": (2, 64, 8, 8)}
    assert len(trunk.layer1) == 5
    gray = CifarResNet((1, 1, 1), in_chans=1)
    assert gray(torch.rand(1, 1, 16, 16))["c4"].shape == (1, 64, 4, 4)
    with pytest.raises(ValueError, match="expected 1 input channels"):
        gray(torch.rand(1, 3, 16, 16))


def test_zero_init_residual_starts_every_block_as_its_shortcut():
    model = cifar_resnet20(zero_init_residual=True).eval()
    block = model.layer2[0]
    x = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(block.downsample(x)))
    assert all(b.bn2.weight.abs().sum() == 0 for stage in (model.layer1, model.layer2, model.layer3) for b in stage)
    assert cifar_resnet20().layer1[0].bn2.weight.min() == 1


def test_kaiming_init_and_frozen_stages():
    model = build_cifar_resnet("cifar_resnet20")
    w = model.layer3[1].conv1.weight.detach()
    fan_out = w.shape[0] * 9
    assert abs(float(w.std()) / (2.0 / fan_out) ** 0.5 - 1) < 0.1  # He et al.'s std sqrt(2 / fan)
    frozen = build_cifar_resnet("cifar_resnet20", frozen_stages=2).train()
    assert not frozen.conv1.weight.requires_grad and not any(p.requires_grad for p in frozen.layer1.parameters())
    assert all(p.requires_grad for p in frozen.layer2.parameters()) and not frozen.layer1.training


@pytest.mark.parametrize("bad, match", [
    (dict(name="cifar_resnet21"), "6n \\+ 2 layers"),
    (dict(name="resnet20"), "unknown CIFAR backbone"),
    (dict(name="cifar_resnet20", shortcut="C"), "shortcut must be 'A'"),
    (dict(name="cifar_resnet20", out_features=("c5",)), "subset of"),
])
def test_bad_arguments_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        build_cifar_resnet(**bad)

