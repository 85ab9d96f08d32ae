"""The evaluator protocol and the loop that runs a model over a data loader into an evaluator."""
from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DatasetEvaluator", "inference_on_dataset", "sum_over_ranks"]


class DatasetEvaluator(ABC):
    """Accumulates per-image predictions and computes flat metrics.

    ``process`` sees targets and outputs in original image pixels (torchvision's eval-mode output).
    ``evaluate`` gathers across ranks itself, returns the same dict on every rank, and keeps the printed
    table for ``summary``.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget everything processed so far."""

    @abstractmethod
    def process(self, targets: list[dict[str, Any]], outputs: list[dict[str, torch.Tensor]]) -> None:
        """Record one batch (same order in both lists)."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Metrics such as ``bbox/AP``, ``segm/AP50`` or ``mIoU``."""

    @abstractmethod
    def summary(self) -> str:
        """The human-readable table of the last ``evaluate``."""


@torch.no_grad()
def inference_on_dataset(
    model: nn.Module,
    loader: Iterable,
    evaluator: DatasetEvaluator,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    max_images: int | None = None,
) -> dict[str, float]:
    """Run ``model`` in eval mode over ``loader`` (batches of ``(images, targets)``) and evaluate.

    Args:
        amp_dtype: autocast dtype (bf16/fp16) or None for full precision.
        max_images: stop after this many images on this rank.

    Returns:
        ``evaluator.evaluate()`` plus ``time/inference_per_image`` (seconds, this rank).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    evaluator.reset()
    seen, elapsed = 0, 0.0
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    try:
        for images, targets in loader:
            if max_images is not None and seen >= max_images:
                break
            images = [img.to(device) for img in images]
            start = time.perf_counter()
            with autocast:
                outputs = model(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - start
            outputs = [{k: _to_cpu(v) for k, v in o.items()} for o in outputs]
            evaluator.process(list(targets), outputs)
            seen += len(images)
    finally:
        model.train(was_training)
    metrics = dict(evaluator.evaluate())
    metrics["time/inference_per_image"] = elapsed / max(1, seen)
    return metrics


def _to_cpu(value: Any) -> Any:
    """A tensor on the CPU (floating point as float32); anything else (e.g. ``segments_info``) as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.float().cpu() if value.is_floating_point() else value.cpu()


def sum_over_ranks(counts: Tensor, distributed: bool | None = None) -> Tensor:
    """Sums a CPU count tensor over all ranks and returns it on the CPU.

    Args:
        counts: Per-rank counts (any shape), on the CPU.
        distributed: True/False forces the choice; None sums when a process group of more than one rank
            is initialized. Under NCCL the tensor travels through the current CUDA device.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return counts
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = counts.to(device, copy=True)  # all_reduce works in place: the rank's own counts stay as they are
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()
