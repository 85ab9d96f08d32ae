"""Normalization layers selectable by name: ``bn``, ``frozen_bn``, ``sync_bn``, ``gn``."""
import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import policy
from .conv import PLAIN_CONVS, conv_with_weights

__all__ = ["NORMS", "FrozenBatchNorm2d", "conv_norm_forward", "get_norm", "is_norm", "saving_folded_weights"]


def __getattr__(name: str):
    if name == "conv_norm":
        raise ImportError("resdet.layers.norm.conv_norm was renamed conv_norm_forward")
    raise AttributeError(f"module 'resdet.layers.norm' has no attribute {name!r}")

NORMS = ("bn", "frozen_bn", "sync_bn", "gn")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    Holds the same state-dict keys as ``nn.BatchNorm2d`` (``weight``, ``bias``, ``running_mean``,
    ``running_var``) so ImageNet checkpoints load unchanged; ``num_batches_tracked`` is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map ``y = x * scale + shift`` this layer computes, two Tensor[C]."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        # Per-channel affine map; reshape to [1, C, 1, 1] to broadcast over N, H, W.
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Return ``module`` with every BatchNorm2d / SyncBatchNorm replaced by a frozen copy."""
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            frozen = cls(module.num_features, eps=module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.running_mean is not None and module.running_var is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new_child = cls.convert_frozen_batchnorm(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


_RECOMPUTE_FOLDED = contextvars.ContextVar("resdet_recompute_folded_weights", default=True)


@contextlib.contextmanager
def saving_folded_weights() -> Iterator[None]:
    """Within: autograd keeps the folded weights of :func:`conv_norm_forward` as any saved tensor, instead of
    recomputing them in the backward. For code that packs saved tensors itself (non-reentrant activation
    checkpointing, ``torch.autograd.graph.saved_tensors_hooks``), whose hooks must see every saved tensor."""
    token = _RECOMPUTE_FOLDED.set(False)
    try:
        yield
    finally:
        _RECOMPUTE_FOLDED.reset(token)


class _Folded:
    """What autograd keeps in place of a folded weight ``weight * scale``: the two factors (a parameter and a
    Tensor[O, 1, 1, 1]), multiplied again when the backward needs the product."""

    __slots__ = ("weight", "scale")

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        self.weight, self.scale = weight, scale

    def product(self) -> Tensor:
        return self.weight * self.scale


def _conv_recomputing_weight(conv: nn.Module, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """``conv_with_weights(conv, x, conv.weight * scale, bias)`` where the convolution's backward gets the
    folded weight by recomputing it rather than from a copy kept since the forward: a trainable backbone
    would otherwise hold a second copy of all its conv weights (~80 MiB for ResNet-34) from forward to
    backward, which torchvision's separate conv and frozen BatchNorm do not."""
    weight = conv.weight * scale
    # Identified by address, shape and dtype: the hooks live as long as the saved tensors and must not
    # hold the folded weight themselves.
    key = (weight.data_ptr(), weight.shape, weight.dtype)

    def pack(t: Tensor) -> Any:
        if (t.data_ptr(), t.shape, t.dtype) == key:
            return _Folded(conv.weight, scale)
        return t

    def unpack(saved: Any) -> Tensor:
        return saved.product() if isinstance(saved, _Folded) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return conv_with_weights(conv, x, weight, bias)


def conv_norm_forward(conv: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``, with a frozen BatchNorm folded into the convolution.

    A :class:`FrozenBatchNorm2d` after an ``nn.Conv2d`` is an affine map per output channel, so
    ``conv(x; W, b) * s + t == conv(x; W * s, b * s + t)``: the convolution runs once with scaled weights
    (a pass over the weights, not over the much larger activations), in training as in eval, on every
    device, and traced or exported models record the same two steps. Gradients reach ``conv.weight``
    through the scaling, so trainable convolutions train as before; parameters and state dict stay those
    of the separate modules (torchvision's names). Other pairs run as ``norm(conv(x))``.

    In eager training the backward recomputes a trainable folded weight instead of keeping it from the
    forward (:func:`_conv_recomputing_weight`; not under :func:`saving_folded_weights`, tracing, scripting
    or ``torch.compile``).
    """
    if type(norm) is FrozenBatchNorm2d and type(conv) in PLAIN_CONVS and conv.padding_mode == "zeros":
        scale, shift = norm.scale_shift()
        bias = shift if conv.bias is None else conv.bias * scale + shift
        # [O] -> [O, 1, 1, 1] scales every output filter.
        scale = scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
        if (conv.weight.requires_grad and torch.is_grad_enabled() and _RECOMPUTE_FOLDED.get()
                and not policy.tracing(x) and not torch.compiler.is_compiling()):
            return _conv_recomputing_weight(conv, x, scale, bias.to(conv.weight.dtype))
        return conv_with_weights(conv, x, conv.weight * scale, bias.to(conv.weight.dtype))
    return norm(conv(x))


def get_norm(norm: str, channels: int, *, gn_groups: int = 32) -> nn.Module:
    """Build the normalization layer named ``norm`` for ``channels`` channels.

    Args:
        norm: one of ``bn``, ``frozen_bn``, ``sync_bn``, ``gn``.
        channels: number of feature channels.
        gn_groups: groups for GroupNorm (reduced to a divisor of ``channels`` when needed).
    """
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if norm == "sync_bn":
        return nn.SyncBatchNorm(channels)
    if norm == "gn":
        groups = min(gn_groups, channels)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def is_norm(module: nn.Module) -> bool:
    """True for every normalization layer :func:`get_norm` can build."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, FrozenBatchNorm2d))
