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


def _fused(groups: list[dict]) -> bool:
    """Whether torch's fused (one kernel for all parameters) SGD/AdamW step can run on these parameters:
    floating point, all on one CPU or CUDA device."""
    params = [p for g in groups for p in g["params"]]
    return (bool(params) and len({p.device for p in params}) == 1 and params[0].device.type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


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
    per-parameter loop).

    Args:
        name: ``sgd`` or ``adamw``.
        lr: learning rate (already scaled for the total batch size).
    """
    groups = param_groups(model, weight_decay=weight_decay, no_decay_norm_bias=no_decay_norm_bias)
    fused = {"fused": True} if _fused(groups) else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **fused)
    raise ValueError(f"optimizer name {name!r} is not 'sgd' or 'adamw'")


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that scales the gradients only when their norm exceeds ``max_norm``
    (torch's multiplies every gradient by ``min(1, max_norm / norm)``, a pass over all of them at every
    step). Returns the total 2-norm before clipping, like torch's."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm(grads)
    # torch's factor max_norm / (norm + 1e-6) is below 1 exactly here (and NaN for a NaN norm, as in torch).
    # One host read; the trainer logs the norm anyway.
    if not float(norm) + 1e-6 <= max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
