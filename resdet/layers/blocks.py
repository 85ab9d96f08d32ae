"""Building blocks shared by the heads: norm layers by name, conv-norm-activation blocks, init helpers.

Used by the mask head, the conv box head (``4conv1fc``) and the semantic head, so that no head imports
another head's module for them.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.ops import Conv2dNormActivation

from .conv import Conv2d
from .norm import get_norm

__all__ = ["NormSpec", "conv_norm_act", "init_convs_msra", "make_norm"]

NormSpec = str | Callable[[int], nn.Module] | None
"""A norm: ``None``/``""`` (none), a name of :func:`resdet.layers.norm.get_norm` (``"bn"``,
``"frozen_bn"``, ``"sync_bn"``, ``"gn"``: 32 groups) or a factory ``channels -> Module``."""


def make_norm(norm: NormSpec, channels: int) -> nn.Module | None:
    """The normalization layer ``norm`` describes for ``channels`` channels (None for no norm)."""
    if norm is None or norm == "":
        return None
    if callable(norm):
        return norm(channels)
    if isinstance(norm, str):
        return get_norm(norm, channels)
    raise ValueError(f"norm must be None, a norm name or a callable, got {norm!r}")


def conv_norm_act(in_channels: int, out_channels: int, *, norm: NormSpec = None, dilation: int = 1) -> nn.Sequential:
    """3×3 conv (bias only without norm) → norm → ReLU, torchvision's ``Conv2dNormActivation``.

    Parameter names are ``0.*`` (conv) and ``1.*`` (norm), as torchvision's heads have them. The conv is
    resdet's :class:`~resdet.layers.conv.Conv2d` (Winograd on large CPU maps).
    """
    make_norm(norm, out_channels)  # fail here, with the norm's own message, on a bad spec
    norm_layer = None if norm is None or norm == "" else (lambda c: make_norm(norm, c))
    block = Conv2dNormActivation(
        in_channels, out_channels, kernel_size=3, dilation=dilation, norm_layer=norm_layer,
        activation_layer=nn.ReLU, inplace=True,
    )
    plain = block[0]
    block[0] = Conv2d(
        in_channels, out_channels, 3, padding=plain.padding, dilation=plain.dilation, bias=plain.bias is not None
    )
    return block


def init_convs_msra(module: nn.Module) -> None:
    """MSRA fill (fan_out, ReLU) for every conv in ``module``, zero biases (the R-CNN conv-head init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
