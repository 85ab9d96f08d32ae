"""Optimizers with parameter groups: weight decay on weights, optionally none on norm layers and biases."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["NORM_TYPES", "param_groups", "build_optimizer", "clip_grad_norm", "scaled_lr"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def param_groups(model: nn.Module, *, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """Split trainable parameters into a decayed group and (optionally) a no-decay group.

    Args:
        model: the model (frozen parameters, ``requires_grad=False``, are left out).
        weight_decay: decay for the decayed group.
        no_decay_norm_bias: put normalization-layer parameters and every bias in a group with decay 0.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if no_decay_norm_bias and (isinstance(module, NORM_TYPES) or name == "bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def scaled_lr(lr: float, *, total_batch_size: int, base_batch_size: int) -> float:
    """Linear scaling rule: ``lr * total_batch_size / base_batch_size``."""
    return lr * total_batch_size / base_batch_size


_FUSED_SUPPORT: dict[tuple[type, str], bool] = {}


def _fused_supported(cls: type[torch.optim.Optimizer], device: torch.device) -> bool:
    """Whether this torch has a fused ``cls`` step on ``device``'s type: one probe step on a one-element
    parameter, once per (class, device type). torch before 2.4 has no fused CPU step, and some devices none."""
    key = (cls, device.type)
    if key not in _FUSED_SUPPORT:
        try:
            probe = torch.zeros(1, device=device, requires_grad=True)
            probe.grad = torch.zeros_like(probe)
            cls([probe], lr=0.0, fused=True).step()
            _FUSED_SUPPORT[key] = True
        except (TypeError, RuntimeError, ValueError, NotImplementedError):
            _FUSED_SUPPORT[key] = False
    return _FUSED_SUPPORT[key]


def _fused(cls: type[torch.optim.Optimizer], groups: list[dict]) -> bool:
    """Whether torch's fused (one kernel for all parameters) step can run on these parameters: floating
    point, all on one device whose type has a fused ``cls`` step (:func:`_fused_supported`)."""
    params = [p for g in groups for p in g["params"]]
    return (bool(params) and len({p.device for p in params}) == 1 and all(p.is_floating_point() for p in params)
            and _fused_supported(cls, params[0].device))


def build_optimizer(
    model: nn.Module,
    *,
    name: str = "sgd",
    lr: float,
    weight_decay: float = 1e-4,
    no_decay_norm_bias: bool = False,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over :func:`param_groups`.

    The step is torch's fused implementation where it applies (:func:`_fused`): the same update in one
    pass over the parameters instead of several tensor ops per parameter (torch's CPU default is the
    per-parameter loop). Elsewhere torch's default implementation runs.

    Args:
        name: ``sgd`` or ``adamw``.
        lr: learning rate (already scaled for the total batch size).
    """
    groups = param_groups(model, weight_decay=weight_decay, no_decay_norm_bias=no_decay_norm_bias)
    if name == "sgd":
        fused = {"fused": True} if _fused(torch.optim.SGD, groups) else {}
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **fused)
    if name == "adamw":
        fused = {"fused": True} if _fused(torch.optim.AdamW, groups) else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **fused)
    raise ValueError(f"optimizer name {name!r} is not 'sgd' or 'adamw'")


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that scales the gradients only when their norm exceeds ``max_norm``
    (torch's multiplies every gradient by ``min(1, max_norm / norm)``, a pass over all of them at every
    step). Returns the total 2-norm before clipping, like torch's; the clipped gradients are torch's."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is not None:
        norm = total_norm(grads)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    # torch's factor max_norm / (norm + 1e-6) is below 1 exactly here (and NaN for a NaN norm, as in torch).
    # One host read; the trainer logs the norm anyway.
    if not float(norm) + 1e-6 <= max_norm:
        clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
        if clip_with_norm is not None:
            clip_with_norm(parameters, max_norm, norm)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm
