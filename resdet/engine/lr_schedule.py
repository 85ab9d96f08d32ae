"""Per-iteration learning-rate schedules: linear (or constant) warmup followed by multistep, cosine, poly or constant.

``solver.steps`` and ``solver.warmup_iters`` may be written as fractions of ``solver.max_iter`` (a value
below 1, e.g. ``steps: [0.75, 0.94]``, ``warmup_iters: 0.1``) so that the schedule follows the run length;
whole numbers are iterations. :func:`resolve_schedule` turns both into iterations and refuses a schedule
whose warmup or steps, given in iterations, lie beyond the end of training (a fraction always follows the run
length: at a very short run it may round onto the last iteration, where it simply never takes effect).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LRFactor", "build_lr_scheduler", "resolve_schedule"]


@dataclass
class LRFactor:
    """Multiplier of the base learning rate after ``it`` optimizer steps (a picklable callable).

    Args:
        schedule: ``multistep``, ``cosine``, ``poly`` or ``constant``.
        max_iter: total optimizer steps (cosine and poly reach ``min_factor`` there).
        steps: multistep milestones (iterations).
        gamma: multistep decay per milestone.
        warmup_iters: warmup length; 0 disables warmup.
        warmup_factor: factor at iteration 0, rising linearly to 1 at ``warmup_iters`` (``linear``), or held
            until then (``constant``: He et al.'s 0.01 start of ResNet-110 on CIFAR).
        warmup_method: ``linear`` or ``constant``.
        min_factor: cosine and poly floor.
        power: poly exponent: ``min_factor + (1 - min_factor) * (1 - it / max_iter) ** power`` (DeepLab's
            schedule, 0.9).
    """

    schedule: str = "multistep"
    max_iter: int = 90000
    steps: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    min_factor: float = 0.0
    warmup_method: str = "linear"
    power: float = 0.9

    def __post_init__(self) -> None:
        if self.schedule not in ("multistep", "cosine", "poly", "constant"):
            raise ValueError(f"schedule {self.schedule!r} is not multistep, cosine, poly or constant")
        if self.warmup_method not in ("linear", "constant"):
            raise ValueError(f"warmup_method {self.warmup_method!r} is not linear or constant")
        if list(self.steps) != sorted(self.steps):
            raise ValueError(f"multistep steps must increase, got {list(self.steps)}")
        self.steps = tuple(self.steps)

    def __call__(self, it: int) -> float:
        if self.schedule == "multistep":
            factor = self.gamma ** bisect.bisect_right(self.steps, it)
        elif self.schedule == "cosine":
            t = min(it, self.max_iter) / max(1, self.max_iter)
            factor = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        elif self.schedule == "poly":
            t = min(it, self.max_iter) / max(1, self.max_iter)
            factor = self.min_factor + (1 - self.min_factor) * (1 - t) ** self.power
        else:
            factor = 1.0
        if it < self.warmup_iters:
            alpha = 0.0 if self.warmup_method == "constant" else it / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, factor: LRFactor) -> LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step; its state dict round-trips through checkpoints."""
    return LambdaLR(optimizer, lr_lambda=factor)


def resolve_schedule(*, max_iter: int, steps: list[float] | tuple[float, ...], warmup_iters: float,
                     schedule: str = "multistep") -> tuple[tuple[int, ...], int]:
    """``(steps, warmup_iters)`` in iterations: values below 1 are fractions of ``max_iter``.

    Raises:
        ValueError: a step or the warmup given in iterations reaches ``max_iter`` (it would never take
            effect), naming the keys and suggesting the fractions to write instead.
    """
    def fraction(value: float) -> bool:
        return 0 < value < 1

    def iters(value: float) -> int:
        return int(round(value * max_iter)) if fraction(value) else int(value)

    abs_steps = tuple(iters(s) for s in steps) if schedule == "multistep" else ()
    warmup = iters(warmup_iters)
    problems = []
    late = [iters(s) for s in steps if not fraction(s) and iters(s) >= max_iter] if schedule == "multistep" else []
    if late:
        problems.append(f"solver.steps {list(steps)} has {late} at or beyond solver.max_iter={max_iter}")
    if warmup >= max_iter and not fraction(warmup_iters):
        problems.append(f"solver.warmup_iters={warmup_iters} is not below solver.max_iter={max_iter}")
    if problems:
        raise ValueError("; ".join(problems) + ": the learning rate would never follow its schedule; write them "
                         "as fractions of max_iter to follow the run length, e.g. solver.steps=[0.75,0.9] "
                         "solver.warmup_iters=0.1")
    return abs_steps, warmup
