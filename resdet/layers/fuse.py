"""Fold BatchNorm into the preceding convolution for inference.

A BatchNorm with fixed statistics is an affine map per channel, ``y = x * s + t`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``; applied right after a
convolution it folds into the convolution's weight (``W * s``) and bias (``b * s + t``), saving one
full pass over every activation.

Which pairs are folded (no tracing, names only — the torchvision/timm ResNet layout):
    * siblings ``convX`` → ``bnX`` (``conv1``/``bn1``, ``conv2``/``bn2``, ...) inside one module;
    * consecutive ``Conv2d``, ``BatchNorm`` children of an ``nn.Sequential`` (``downsample.0``/``.1``,
      torchvision's ``Conv2dNormActivation``).
The caller vouches that in those modules the BatchNorm consumes the convolution's output directly,
which holds for resdet's and torchvision's ResNets, FPN and heads.

Folded: ``nn.BatchNorm2d`` in eval mode with running statistics, and any frozen BatchNorm (a module
whose class name contains ``FrozenBatchNorm`` with ``weight``/``bias``/``running_mean``/``running_var``
buffers and ``eps``). BatchNorm in training mode and GroupNorm are left alone.

Also here: :func:`pointwise_convs_as_matmul`, which runs 1×1 stride-1 convolutions on channels-last
tensors as one matrix product (used by ``GeneralizedRCNN.optimize_for_inference``).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .conv import PLAIN_CONVS

__all__ = ["PointwiseConv2d", "fuse_bn", "fold_bn_into_conv", "is_foldable_bn", "pointwise_convs_as_matmul"]


def is_foldable_bn(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm with fixed statistics (frozen, or eval-mode with stats)."""
    if "FrozenBatchNorm" in type(module).__name__:
        return all(hasattr(module, k) for k in ("weight", "bias", "running_mean", "running_var", "eps"))
    if isinstance(module, nn.BatchNorm2d):
        return not module.training and module.running_mean is not None and module.running_var is not None
    return False


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """Returns a copy of ``conv`` equal to ``bn(conv(x))``, with a bias.

    The arithmetic is ``torch.nn.utils.fusion.fuse_conv_bn_weights``; resdet feeds it float64 copies and
    stores the result in the convolution's dtype (one rounding instead of several: exactness), and it
    also takes frozen BatchNorms, which ``fuse_conv_bn_eval`` (``nn.BatchNorm`` modules only) does not.
    """

    def f64(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().double()

    weight, bias = fuse_conv_bn_weights(
        f64(conv.weight), f64(conv.bias), f64(bn.running_mean), f64(bn.running_var), bn.eps, f64(bn.weight),
        f64(bn.bias),
    )
    fused = copy.deepcopy(conv)
    trainable = conv.weight.requires_grad
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=trainable)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=trainable)
    return fused


def _fuse_children(parent: nn.Module) -> int:
    count = 0
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        for a, b in zip(names, names[1:]):
            conv, bn = getattr(parent, a), getattr(parent, b)
            if type(conv) in PLAIN_CONVS and is_foldable_bn(bn):
                setattr(parent, a, fold_bn_into_conv(conv, bn))
                setattr(parent, b, nn.Identity())
                count += 1
        return count
    for name, bn in children.items():
        if not name.startswith("bn") or not is_foldable_bn(bn):
            continue
        conv = children.get("conv" + name[2:])
        if type(conv) in PLAIN_CONVS:
            setattr(parent, "conv" + name[2:], fold_bn_into_conv(conv, bn))
            setattr(parent, name, nn.Identity())
            count += 1
    return count


@torch.no_grad()
def fuse_bn(module: nn.Module) -> nn.Module:
    """Folds every foldable BatchNorm of ``module`` into its convolution, in place; returns ``module``.

    The folded BatchNorms become ``nn.Identity``. Intended for inference (see the module docstring).
    """
    for sub in list(module.modules()):
        _fuse_children(sub)
    return module


class PointwiseConv2d(nn.Conv2d):
    """A 1×1, stride-1 convolution computed as one matrix product over channels-last pixels.

    Same parameters and state dict as the ``nn.Conv2d`` it replaces. On a channels-last input the
    pixels are already rows of a [N * H * W, C] matrix, so ``torch.addmm`` (one GEMM, bias fused) does the
    whole convolution without the layout conversions CPU convolution kernels would make; any other
    input falls back to ``nn.Conv2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        n, c, h, w = x.shape
        # Channels-last [N, C, H, W] is [N, H, W, C] in memory: a free view as [N * H * W, C] pixels.
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        weight = self.weight.view(self.out_channels, c)
        y = pixels @ weight.t() if self.bias is None else torch.addmm(self.bias, pixels, weight.t())
        # [N * H * W, O] -> [N, H, W, O] -> [N, O, H, W] view (channels-last again).
        return y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)


def _is_pointwise(conv: nn.Module) -> bool:
    return (
        type(conv) in PLAIN_CONVS
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


@torch.no_grad()
def pointwise_convs_as_matmul(module: nn.Module) -> nn.Module:
    """Replaces every 1×1 stride-1 ``nn.Conv2d`` of ``module`` by :class:`PointwiseConv2d`, in place."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _is_pointwise(child):
                child.__class__ = PointwiseConv2d  # same fields and parameters, another forward
    return module
