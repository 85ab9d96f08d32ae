"""Semantic segmentation metrics from a confusion matrix: mIoU, per-class IoU, pixel accuracy.

Definitions (as the Cityscapes and PASCAL VOC scripts use them), with ``M[g, p]`` the number of
pixels of ground-truth class g predicted as class p over the whole dataset and ignored pixels left out:

- ``IoU_k = M[k, k] / (sum_p M[k, p] + sum_g M[g, k] - M[k, k])``; a class whose union is empty
  (never in the ground truth and never predicted) has no IoU and is left out of the mean. A class
  that is predicted but never present has IoU 0 and counts.
- ``mIoU`` = mean of the defined IoUs; ``fwIoU`` = their mean weighted by ground-truth pixel share.
- ``Acc_k = M[k, k] / sum_p M[k, p]`` for classes present in the ground truth; ``mAcc`` its mean.
- ``pAcc`` = correctly labelled pixels / all non-ignored ground-truth pixels.

Metrics are fractions in [0, 1]. Under ``torch.distributed`` the confusion matrix is summed across
ranks in ``evaluate()``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import DatasetEvaluator, sum_over_ranks

__all__ = ["SemSegEvaluator", "confusion_matrix", "metrics_from_confusion"]


def confusion_matrix(target: Tensor, pred: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix Tensor[K, K] int64, rows ground truth, columns prediction.

    Args:
        target: Ground-truth class map (any shape), values in 0..K-1 or ``ignore_index``.
        pred: Predicted class map of the same shape, values in 0..K-1.
        num_classes: K.
        ignore_index: Ground-truth value left out.
    """
    if target.shape != pred.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(target.shape)}")
    target = target.reshape(-1).long()  # flatten: pixels are independent here
    pred = pred.reshape(-1).long()
    valid = target != ignore_index
    target, pred = target[valid], pred[valid]
    if target.numel():
        bad_t = (target < 0) | (target >= num_classes)
        if bool(bad_t.any()):
            raise ValueError(
                f"ground truth has values {target[bad_t].unique().tolist()[:10]}; expected 0..{num_classes - 1} "
                f"or {ignore_index}"
            )
        bad_p = (pred < 0) | (pred >= num_classes)
        if bool(bad_p.any()):
            raise ValueError(
                f"prediction has values {pred[bad_p].unique().tolist()[:10]}; expected 0..{num_classes - 1}"
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()  # [K*K] -> [K (gt), K (pred)]


def metrics_from_confusion(conf: Tensor) -> dict[str, Tensor | float]:
    """Per-class IoU / accuracy (Tensor[K] float64, NaN where undefined) and the summary numbers."""
    conf = conf.double()
    tp = conf.diagonal()
    pos_gt = conf.sum(dim=1)
    pos_pred = conf.sum(dim=0)
    union = pos_gt + pos_pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(pos_gt > 0, tp / pos_gt.clamp(min=1), nan)
    iou_valid = union > 0
    acc_valid = pos_gt > 0
    total = pos_gt.sum()

    def _mean(values: Tensor, valid: Tensor) -> float:
        return float(values[valid].mean()) if bool(valid.any()) else float("nan")

    weights = pos_gt / total if total > 0 else torch.zeros_like(pos_gt)
    return {
        "iou": iou,
        "acc": acc,
        "mIoU": _mean(iou, iou_valid),
        "fwIoU": float((iou[iou_valid] * weights[iou_valid]).sum()) if total > 0 else float("nan"),
        "mAcc": _mean(acc, acc_valid),
        "pAcc": float(tp.sum() / total) if total > 0 else float("nan"),
    }


class SemSegEvaluator(DatasetEvaluator):
    """Accumulates a confusion matrix over ``process`` calls; ``evaluate`` reports mIoU and friends.

    Args:
        num_classes: K; predictions and ground truth use class indices 0..K-1.
        class_names: Names for the per-class table and metric keys (default ``"0".."K-1"``).
        ignore_index: Ground-truth value left out of every metric.
        distributed: Sum the confusion matrix across ranks in ``evaluate()``. None: whenever
            ``torch.distributed`` is initialised with more than one process.

    Targets are dicts with ``"sem_seg"`` Tensor[H, W]; outputs are the model's dicts with
    ``"sem_seg"`` Tensor[H, W] (class indices) or, failing that, ``"sem_seg_logits"`` Tensor[K, H, W].
    ``evaluate()`` returns ``mIoU``, ``fwIoU``, ``mAcc``, ``pAcc`` and ``IoU/<class name>`` (fractions;
    a class neither present in the ground truth nor predicted has no IoU entry).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_names: Sequence[str] | None = None,
        ignore_index: int = 255,
        distributed: bool | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}; expected >= 1")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
        self.ignore_index = ignore_index
        self.distributed = distributed
        self.reset()

    def reset(self) -> None:
        """Clears the accumulated confusion matrix."""
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self._reduced: Tensor | None = None

    def process(self, targets: list[dict], outputs: list[dict]) -> None:
        """Adds one batch: ``targets[i]["sem_seg"]`` against ``outputs[i]["sem_seg"]``."""
        if len(targets) != len(outputs):
            raise ValueError(f"{len(targets)} targets but {len(outputs)} outputs")
        for i, (target, output) in enumerate(zip(targets, outputs)):
            if "sem_seg" not in target:
                raise KeyError(f"target {i} has no 'sem_seg'; keys {sorted(target)}")
            if "sem_seg" in output:
                pred = output["sem_seg"]
            elif "sem_seg_logits" in output:
                pred = output["sem_seg_logits"].argmax(dim=0)  # [K, H, W] -> [H, W]
            else:
                raise KeyError(f"output {i} has neither 'sem_seg' nor 'sem_seg_logits'; keys {sorted(output)}")
            gt = target["sem_seg"]
            if gt.shape[-2:] != pred.shape[-2:]:
                raise ValueError(
                    f"image {i}: prediction of size {tuple(pred.shape[-2:])} but ground truth of size "
                    f"{tuple(gt.shape[-2:])}; outputs must be at the original image size"
                )
            self.conf += confusion_matrix(gt.to(pred.device), pred, self.num_classes, self.ignore_index)
        self._reduced = None

    def _total_confusion(self) -> Tensor:
        if self._reduced is not None:
            return self._reduced
        self._reduced = sum_over_ranks(self.conf, self.distributed)
        return self._reduced

    def evaluate(self) -> dict[str, float]:
        """Flat metrics over everything processed (all ranks when distributed)."""
        m = metrics_from_confusion(self._total_confusion())
        out = {key: float(m[key]) for key in ("mIoU", "fwIoU", "mAcc", "pAcc")}
        for name, value in zip(self.class_names, m["iou"].tolist()):
            if value == value:  # undefined (NaN) IoUs are left out so metric logs stay valid JSON
                out[f"IoU/{name}"] = value
        return out

    def summary(self) -> str:
        """Per-class IoU / accuracy table followed by the summary line (percentages)."""
        conf = self._total_confusion()
        m = metrics_from_confusion(conf)
        width = max(8, *(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}  {'pixels':>12}"]
        pixels = conf.sum(dim=1).tolist()

        def pct(x: float) -> str:
            return f"{100 * x:6.2f}" if x == x else f"{'-':>6}"

        for name, iou, acc, n in zip(self.class_names, m["iou"].tolist(), m["acc"].tolist(), pixels):
            lines.append(f"{name:<{width}}  {pct(iou)}  {pct(acc)}  {n:>12d}")
        lines.append(
            f"mIoU {pct(m['mIoU']).strip()}  fwIoU {pct(m['fwIoU']).strip()}  "
            f"mAcc {pct(m['mAcc']).strip()}  pAcc {pct(m['pAcc']).strip()}"
        )
        return "\n".join(lines)
