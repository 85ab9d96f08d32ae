"""Image classification metrics: top-1 and top-5 accuracy (and error), per-class accuracy.

Definitions, over the N evaluated images with ground-truth class ``g_i`` and class scores ``s_i``:

- an image is correct at ``k`` when ``g_i`` is among the ``k`` highest scores (``torch.topk``; ties broken
  as ``topk`` breaks them, exactly as torchvision's reference scripts and ``timm.utils.accuracy`` count);
- ``top1`` / ``top5`` = correct images / N (``k`` is capped at the number of classes);
  ``top1_error = 1 - top1`` (the papers' "error"), ``top5_error`` likewise;
- ``acc/<class>`` = top-1 correct images of that class / its images, for classes present;
  ``mean_class_acc`` = their mean.

Metrics are fractions in [0, 1] (the printed table shows percentages). Under ``torch.distributed`` the
per-class counts are summed across ranks in ``evaluate()``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import DatasetEvaluator, sum_over_ranks

__all__ = ["ClassificationEvaluator", "topk_correct"]


def topk_correct(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """Whether each label is among the ``k`` highest scores: ``Tensor[N, K]``, ``Tensor[N]`` → bool ``Tensor[N]``."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1, largest=True, sorted=True).indices  # [N, k]
    return (top == labels[:, None]).any(dim=1)


class ClassificationEvaluator(DatasetEvaluator):
    """Counts top-1 and top-5 hits per ground-truth class; ``evaluate`` reports accuracies and errors.

    Targets are dicts with ``labels`` (one class index, ``Tensor[]`` or ``Tensor[1]``); outputs are the
    classifier's dicts with ``scores`` ``Tensor[K]``.

    Args:
        num_classes: K.
        class_names: names for the per-class table and metric keys (default ``"0".."K-1"``).
        distributed: sum the counts across ranks in ``evaluate()``. None: whenever ``torch.distributed`` is
            initialised with more than one process.
    """

    def __init__(self, num_classes: int, *, class_names: Sequence[str] | None = None,
                 distributed: bool | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}; expected >= 1")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
        self.distributed = distributed
        self.reset()

    def reset(self) -> None:
        """Clears the counts."""
        # rows: images, top-1 hits, top-5 hits; one column per ground-truth class
        self.counts = torch.zeros(3, self.num_classes, dtype=torch.int64)
        self._reduced: Tensor | None = None

    def process(self, targets: list[dict], outputs: list[dict]) -> None:
        """Adds one batch: ``targets[i]["labels"]`` against ``outputs[i]["scores"]``."""
        if len(targets) != len(outputs):
            raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
        if not targets:
            return
        for i, (target, output) in enumerate(zip(targets, outputs)):
            if "labels" not in target or "scores" not in output:
                raise KeyError(f"image {i}: expected a target with 'labels' and an output with 'scores', got "
                               f"{sorted(target)} and {sorted(output)}")
            if output["scores"].shape != (self.num_classes,):
                raise ValueError(f"image {i}: scores of shape {tuple(output['scores'].shape)}, expected "
                                 f"({self.num_classes},)")
        labels = torch.stack([torch.as_tensor(t["labels"]).reshape(()) for t in targets]).long().cpu()
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(f"ground-truth label {int(labels[bad][0])} is outside 0..{self.num_classes - 1}")
        scores = torch.stack([o["scores"] for o in outputs]).float().cpu()  # [N, K]
        for row, hits in ((0, torch.ones_like(labels, dtype=torch.bool)), (1, topk_correct(scores, labels, 1)),
                          (2, topk_correct(scores, labels, 5))):
            self.counts[row] += torch.bincount(labels[hits], minlength=self.num_classes)
        self._reduced = None

    def _total(self) -> Tensor:
        if self._reduced is not None:
            return self._reduced
        self._reduced = sum_over_ranks(self.counts, self.distributed)
        return self._reduced

    def evaluate(self) -> dict[str, float]:
        """Flat metrics over everything processed (all ranks when distributed); NaN when nothing was."""
        images, top1, top5 = self._total().double()
        n = float(images.sum())
        nan = float("nan")
        out = {"top1": float(top1.sum()) / n if n else nan, "top5": float(top5.sum()) / n if n else nan}
        out["top1_error"], out["top5_error"] = 1.0 - out["top1"], 1.0 - out["top5"]
        present = images > 0
        per_class = top1[present] / images[present]
        out["mean_class_acc"] = float(per_class.mean()) if bool(present.any()) else nan
        out["num_images"] = n
        for name, ok, count in zip(self.class_names, top1.tolist(), images.tolist()):
            if count:
                out[f"acc/{name}"] = ok / count
        return out

    def summary(self) -> str:
        """Top-1 / top-5 accuracy and error, then per-class top-1 accuracy in three columns (percentages)."""
        m = self.evaluate()
        images = self._total()[0].tolist()
        k5 = min(5, self.num_classes)
        lines = [f"classification: {int(m['num_images'])} images, {self.num_classes} classes",
                 f"top-1 accuracy {100 * m['top1']:6.2f} %   top-1 error {100 * m['top1_error']:6.2f} %",
                 f"top-{k5} accuracy {100 * m['top5']:6.2f} %   top-{k5} error {100 * m['top5_error']:6.2f} %",
                 f"mean per-class accuracy {100 * m['mean_class_acc']:6.2f} %", "per-class top-1 accuracy (%):"]
        width = max(8, *(len(n) for n in self.class_names))
        cells = [f"{name:<{width}} {100 * m[f'acc/{name}']:6.2f}" if count else f"{name:<{width}} {'-':>6}"
                 for name, count in zip(self.class_names, images)]
        for start in range(0, len(cells), 3):
            lines.append("   ".join(cells[start:start + 3]))
        return "\n".join(lines)
