"""Shared head layers: conv-norm-act blocks are torchvision's Conv2dNormActivation with its names."""
import pytest
import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from resdet.layers.blocks import conv_norm_act, make_norm
from resdet.layers.norm import FrozenBatchNorm2d


@pytest.mark.parametrize("norm,kind", [(None, None), ("gn", nn.GroupNorm), ("frozen_bn", FrozenBatchNorm2d),
                                       (nn.BatchNorm2d, nn.BatchNorm2d)])
def test_conv_norm_act(norm, kind):
    block = conv_norm_act(8, 32, norm=norm, dilation=2)
    assert isinstance(block, Conv2dNormActivation)
    assert block[0].padding == (2, 2) and (block[0].bias is None) == (norm is not None)
    if kind is not None:
        assert isinstance(block[1], kind)
    assert isinstance(block[-1], nn.ReLU) and block(torch.randn(1, 8, 5, 5)).shape == (1, 32, 5, 5)


def test_make_norm_rejects_unknown():
    assert make_norm("", 8) is None
    with pytest.raises(ValueError, match="unknown norm"):
        conv_norm_act(8, 8, norm="bogus")
