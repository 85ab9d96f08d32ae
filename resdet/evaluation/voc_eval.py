"""PASCAL VOC box mAP at IoU 0.5: the VOC2007 11-point metric or the area under the interpolated
precision/recall curve (VOC2010+). Ground truth comes from the targets (``boxes``, ``labels`` and an
optional ``difficult`` flag, in original image pixels); difficult objects are neither true nor false
positives, as in the official devkit."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from resdet.engine import distributed as dist

from .base import DatasetEvaluator

__all__ = ["VOCEvaluator", "voc_ap", "voc_class_ap"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, *, use_07_metric: bool = False) -> float:
    """Average precision from a precision/recall curve (detections sorted by decreasing score).

    Args:
        use_07_metric: 11-point interpolation (VOC2007) instead of the exact area.
    """
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t].max() if np.any(recall >= t) else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope (monotone from the right)
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def voc_class_ap(
    detections: list[tuple[Any, float, np.ndarray]],
    ground_truth: dict[Any, tuple[np.ndarray, np.ndarray]],
    *,
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
) -> float:
    """AP of one class.

    Args:
        detections: ``(image_key, score, box xyxy)`` for every detection of the class.
        ground_truth: image_key → (boxes [G, 4] xyxy, difficult bool [G]) of the class.

    Returns:
        AP, or NaN when the class has no non-difficult ground truth.
    """
    npos = int(sum((~d).sum() for _, d in ground_truth.values()))
    if npos == 0:
        return float("nan")
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    used = {k: np.zeros(len(b), dtype=bool) for k, (b, _) in ground_truth.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, i in enumerate(order):
        key, _, box = detections[i]
        gt_boxes, difficult = ground_truth.get(key, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(gt_boxes) == 0:
            fp[rank] = 1
            continue
        ious = box_iou(torch.as_tensor(box, dtype=torch.float64)[None],
                       torch.as_tensor(gt_boxes, dtype=torch.float64))[0].numpy()
        j = int(ious.argmax())
        if ious[j] > iou_thresh:  # strict, as in the devkit
            if difficult[j]:
                continue  # neither tp nor fp
            if not used[key][j]:
                tp[rank] = 1
                used[key][j] = True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric=use_07_metric)


class VOCEvaluator(DatasetEvaluator):
    """VOC mAP@0.5 over ``class_names`` (label ``i`` is ``class_names[i - 1]``); the mean is over the
    classes with non-difficult ground truth, NaN when there is none (a set whose objects are all difficult).

    Note: IoU uses continuous pixel coordinates (area = (x2 - x1) * (y2 - y1)), not the devkit's +1
    convention, matching the boxes resdet datasets produce.

    Args:
        class_names: foreground class names.
        use_07_metric: VOC2007 11-point AP instead of the area.
        iou_thresh: match threshold.
    """

    def __init__(self, class_names: list[str], *, use_07_metric: bool = False, iou_thresh: float = 0.5) -> None:
        self.class_names = list(class_names)
        self.use_07_metric = use_07_metric
        self.iou_thresh = iou_thresh
        self._summary = ""
        self.reset()

    def reset(self) -> None:
        self._records: list[tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        self._summary = ""

    def process(self, targets: list[dict[str, Any]], outputs: list[dict[str, torch.Tensor]]) -> None:
        for n, (target, output) in enumerate(zip(targets, outputs, strict=True)):
            key = target.get("image_id", (dist.get_rank(), len(self._records), n))
            key = int(key) if isinstance(key, (int, torch.Tensor)) else key
            difficult = target.get("difficult")
            gt_labels = torch.as_tensor(target["labels"]).cpu().numpy()
            gt = {
                "boxes": torch.as_tensor(target["boxes"]).float().cpu().numpy().reshape(-1, 4),
                "labels": gt_labels,
                "difficult": (np.zeros(len(gt_labels), dtype=bool) if difficult is None
                              else torch.as_tensor(difficult).cpu().numpy().astype(bool)),
            }
            pred = {k: output[k].detach().float().cpu().numpy() for k in ("boxes", "scores")}
            pred["labels"] = output["labels"].detach().cpu().numpy()
            self._records.append((key, gt, pred))

    def evaluate(self) -> dict[str, float]:
        records = [r for part in dist.all_gather_object(self._records) for r in part]
        unique = {}
        for key, gt, pred in records:
            unique.setdefault(key, (gt, pred))
        dets: dict[int, list] = defaultdict(list)
        gts: dict[int, dict] = defaultdict(dict)
        for key, (gt, pred) in unique.items():
            for c in range(1, len(self.class_names) + 1):
                sel = gt["labels"] == c
                if sel.any():
                    gts[c][key] = (gt["boxes"][sel], gt["difficult"][sel])
            for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"]):
                dets[int(label)].append((key, float(score), box))
        aps = {}
        for c, name in enumerate(self.class_names, start=1):
            aps[name] = voc_class_ap(dets[c], gts[c], iou_thresh=self.iou_thresh, use_07_metric=self.use_07_metric)
        valid = [v for v in aps.values() if not np.isnan(v)]
        metrics = {"bbox/mAP50": float(np.mean(valid)) if valid else float("nan")}  # NaN: nothing to measure
        metrics.update({f"bbox/AP50-{name}": v for name, v in aps.items()})
        kind = "VOC07 11-point" if self.use_07_metric else "VOC area"
        width = max([len(n) for n in self.class_names] + [5])
        lines = [f"VOC mAP@0.5 ({kind}, {len(unique)} images)", f"{'class':<{width}}  AP50"]
        lines += [f"{name:<{width}}  {ap:.4f}" for name, ap in aps.items()]
        if valid:
            lines.append(f"{'mean':<{width}}  {metrics['bbox/mAP50']:.4f}")
        else:
            lines.append(f"{'mean':<{width}}  nan (no valid objects: every ground-truth object is difficult, or "
                         f"there is none)")
        self._summary = "\n".join(lines)
        return metrics

    def summary(self) -> str:
        return self._summary
