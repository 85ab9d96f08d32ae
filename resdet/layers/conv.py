"""resdet's ``Conv2d``: ``nn.Conv2d`` whose 3×3 stride-1 "same" convolutions may take the Winograd path.

A convolution with kernel 3×3, stride 1, padding 1, dilation 1, one group and zero padding goes through
:func:`resdet.layers.winograd.conv3x3` (the registered op ``resdet::conv3x3``) when
:func:`resdet.layers.policy.use_conv3x3_op` says so: on CPU in float32 outside autocast, at sizes where a
fast kernel pays, in eager mode, ``torch.compile`` and ``torch.export``. Everything else, including
scripting, tracing and ONNX export, is PyTorch's convolution exactly. ``resdet.fast_paths(False)`` (or
``RESDET_FAST_PATHS=0``) turns the Winograd path off: every convolution is then PyTorch's own, bit for bit.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from . import policy
from .winograd import conv3x3

__all__ = ["PLAIN_CONVS", "Conv2d", "conv3x3", "conv_with_weights"]

_REMOVED = {
    "set_winograd": "resdet.fast_paths(False) (a scoped switch) or RESDET_FAST_PATHS=0",
    "use_winograd": "resdet.fast_paths(enabled)",
    "winograd_enabled": "resdet.layers.policy.winograd_possible(device)",
    "conv2d": "resdet.layers.conv.conv_with_weights(conv, x, weight, bias)",
    "eager_mode": "resdet.layers.policy (it decides per call)",
}


def __getattr__(name: str):
    if name in _REMOVED:
        raise ImportError(f"resdet.layers.conv.{name} was removed: use {_REMOVED[name]}")
    raise AttributeError(f"module 'resdet.layers.conv' has no attribute {name!r}")


def _is_same_3x3(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def conv_with_weights(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``conv``'s convolution (its stride, padding, dilation, groups, padding mode) of ``x`` with ``weight``
    and ``bias`` in place of its own parameters (e.g. with a BatchNorm folded in); 3×3 stride-1 "same"
    convolutions through :func:`conv3x3` where the policy says so."""
    if _is_same_3x3(conv) and policy.use_conv3x3_op(x, weight, bias):
        return conv3x3(x, weight, bias)
    return conv._conv_forward(x, weight, bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters and state dict) whose forward goes through
    :func:`conv_with_weights`."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return self._conv_forward(x, self.weight, self.bias)
        else:
            return conv_with_weights(self, x, self.weight, self.bias)


PLAIN_CONVS = (nn.Conv2d, Conv2d)
"""Convolution types whose forward is a plain convolution of their own weight and bias (what BatchNorm
folding and the 1×1-as-GEMM swap may rewrite)."""
