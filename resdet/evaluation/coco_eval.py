"""COCO bbox and segm AP with pycocotools.

Predictions become COCO result dicts (``image_id``, json ``category_id`` through the dataset's
contiguous→json mapping, ``bbox`` as x, y, w, h, ``score``, and an RLE ``segmentation`` from masks
thresholded at 0.5). Under ``torchrun`` each rank processes its share of images; ``evaluate`` gathers
the results on rank 0, runs ``COCOeval`` there and broadcasts the metrics to every rank.

A metric pycocotools cannot define (it prints -1: no ground-truth object in that area range, or none at all)
is NaN in the metrics, never 0; with no detections at all the metrics are 0 where there is ground truth.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from resdet.engine import distributed as dist

from .base import DatasetEvaluator

__all__ = ["COCOEvaluator", "instances_to_coco_results", "COCO_METRIC_NAMES"]

COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def instances_to_coco_results(
    image_id: int,
    output: dict[str, torch.Tensor],
    contiguous_to_cat_id: dict[int, int] | None,
    *,
    with_masks: bool,
    cat_ids: set[int] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Convert one image's prediction into (bbox results, segm results).

    Args:
        output: ``boxes`` [N, 4] xyxy, ``labels`` [N], ``scores`` [N], optional ``masks`` [N, 1, H, W]
            probabilities, all in original image pixels.
        contiguous_to_cat_id: label → json category id (the model's label space); None keeps labels as
            ids. A label it does not map is left out.
        with_masks: also encode masks (requires ``masks`` in ``output``).
        cat_ids: the dataset's category ids; detections of other categories (e.g. torchvision's "N/A"
            labels) are left out. None keeps every one.
    """
    labels = output["labels"].detach().cpu().tolist()
    cats = [contiguous_to_cat_id.get(int(lab)) if contiguous_to_cat_id else int(lab) for lab in labels]
    keep = [i for i, c in enumerate(cats) if c is not None and (cat_ids is None or c in cat_ids)]
    cats = [cats[i] for i in keep]
    boxes = output["boxes"].detach().float().cpu().numpy().reshape(-1, 4)[keep]
    scores = output["scores"].detach().float().cpu()[keep].tolist()
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    bbox_results = [
        {"image_id": int(image_id), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
        for b, c, s in zip(xywh, cats, scores)
    ]
    segm_results: list[dict[str, Any]] = []
    if with_masks:
        if "masks" not in output:
            raise KeyError("segm evaluation needs 'masks' in the model output; got keys "
                           f"{sorted(output)} (set eval.iou_types=[bbox] for a box-only model)")
        masks = output["masks"].detach().float().cpu()[keep]
        binary = (masks[:, 0] >= 0.5).numpy().astype(np.uint8)  # [N, H, W]
        for m, c, s in zip(binary, cats, scores):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            segm_results.append({"image_id": int(image_id), "category_id": c, "segmentation": rle, "score": float(s)})
    return bbox_results, segm_results


class COCOEvaluator(DatasetEvaluator):
    """COCO AP for ``bbox`` and/or ``segm`` against a pycocotools ground truth.

    Args:
        coco_gt: ground truth (e.g. ``CocoDataset.coco``).
        contiguous_to_cat_id: model label → json category id (None: labels are json ids).
        iou_types: subset of ``("bbox", "segm")``.
        output_dir: if given, rank 0 writes ``coco_<type>_results.json`` there.
    """

    def __init__(self, coco_gt: COCO, contiguous_to_cat_id: dict[int, int] | None = None, *,
                 iou_types: tuple[str, ...] | list[str] = ("bbox", "segm"),
                 output_dir: str | os.PathLike | None = None) -> None:
        bad = [t for t in iou_types if t not in ("bbox", "segm")]
        if bad or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of ('bbox', 'segm'), got {list(iou_types)}")
        self.coco_gt = coco_gt
        self.contiguous_to_cat_id = contiguous_to_cat_id
        self.iou_types = tuple(iou_types)
        self.output_dir = output_dir
        self._cat_ids = set(coco_gt.getCatIds())
        self._summary = ""
        self.reset()

    def reset(self) -> None:
        self._image_ids: list[int] = []
        self._dropped = 0  # detections whose label maps to no category of the ground truth
        self._results: dict[str, list[dict[str, Any]]] = {t: [] for t in self.iou_types}
        self._summary = ""

    def process(self, targets: list[dict[str, Any]], outputs: list[dict[str, torch.Tensor]]) -> None:
        for target, output in zip(targets, outputs, strict=True):
            if "image_id" not in target:
                raise KeyError(f"COCO evaluation needs 'image_id' in each target; got keys {sorted(target)}")
            image_id = int(target["image_id"])
            bbox, segm = instances_to_coco_results(image_id, output, self.contiguous_to_cat_id,
                                                   with_masks="segm" in self.iou_types, cat_ids=self._cat_ids)
            self._dropped += len(output["labels"]) - len(bbox)
            self._image_ids.append(image_id)
            if "bbox" in self.iou_types:
                self._results["bbox"] += bbox
            if "segm" in self.iou_types:
                self._results["segm"] += segm

    def _gather(self) -> tuple[list[int], dict[str, list[dict[str, Any]]]]:
        gathered = dist.all_gather_object((self._image_ids, self._results, self._dropped))
        self._dropped_total = sum(g[2] for g in gathered)
        image_ids: list[int] = []
        results: dict[str, list[dict[str, Any]]] = {t: [] for t in self.iou_types}
        seen: set[int] = set()
        for ids, res, _ in gathered:
            fresh = set(ids) - seen  # a padded sampler may repeat an image on two ranks: count it once
            image_ids += sorted(fresh)
            for t in self.iou_types:
                results[t] += [r for r in res[t] if r["image_id"] in fresh]
            seen |= fresh
        return image_ids, results

    def evaluate(self) -> dict[str, float]:
        image_ids, results = self._gather()
        metrics: dict[str, float] = {}
        lines: list[str] = []
        if dist.is_main_process():
            for iou_type in self.iou_types:
                stats, text = self._evaluate_one(iou_type, image_ids, results[iou_type])
                for name, value in zip(COCO_METRIC_NAMES, stats):  # -1: undefined (no such ground truth)
                    metrics[f"{iou_type}/{name}"] = float(value) if value >= 0 else float("nan")
                gt = self.coco_gt.loadAnns(self.coco_gt.getAnnIds(imgIds=image_ids)) if image_ids else []
                if not any(not ann.get("iscrowd", 0) for ann in gt):
                    text += ("no valid objects: the evaluated images hold no (non-crowd) ground truth, so AP is "
                             "undefined\n")
                lines.append(f"Evaluate annotation type *{iou_type}* ({len(image_ids)} images)\n{text}")
                if self.output_dir is not None:
                    Path(self.output_dir).mkdir(parents=True, exist_ok=True)
                    path = Path(self.output_dir) / f"coco_{iou_type}_results.json"
                    with open(path, "w") as f:
                        json.dump(results[iou_type], f)
                    lines.append(f"{iou_type} results (dataset category ids): {path}")
            if self._dropped_total:
                lines.append(f"{self._dropped_total} detections left out: their label maps to no category "
                             f"of the ground truth")
        metrics, summary = dist.broadcast_object((metrics, "\n".join(lines)))
        self._summary = summary
        return metrics

    def _evaluate_one(self, iou_type: str, image_ids: list[int],
                      results: list[dict[str, Any]]) -> tuple[np.ndarray, str]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            if results:
                coco_dt = self.coco_gt.loadRes(copy.deepcopy(results))  # loadRes adds fields in place
            else:  # loadRes refuses an empty list: an empty result set scores 0 where there is ground truth
                coco_dt = COCO()
                coco_dt.dataset = {"images": list(self.coco_gt.dataset.get("images", [])),
                                   "categories": copy.deepcopy(self.coco_gt.dataset.get("categories", [])),
                                   "annotations": []}
                coco_dt.createIndex()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_eval = COCOeval(self.coco_gt, coco_dt, iou_type)
            coco_eval.params.imgIds = sorted(image_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            coco_eval.summarize()
        text = table.getvalue() + self._per_category_table(coco_eval)
        return coco_eval.stats, text  # -1 where no ground truth falls in an area range

    def _per_category_table(self, coco_eval: COCOeval, columns: int = 3) -> str:
        """AP@[.5:.95] (all areas, 100 detections) per category, by name, as detectron2 prints it."""
        # precision: [T IoU thresholds, R recall points, K categories, A area ranges, M max-dets]
        precision = coco_eval.eval["precision"]
        cells = []
        for k, cat in enumerate(self.coco_gt.loadCats(coco_eval.params.catIds)):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            cells.append((str(cat["name"]), f"{100 * p.mean():.1f}" if p.size else "-"))
        if not cells:
            return ""
        width = max(len(name) for name, _ in cells)
        rows = [cells[i:i + columns] for i in range(0, len(cells), columns)]
        lines = ["  ".join(f"{name:<{width}} {ap:>5}" for name, ap in row) for row in rows]
        return f"Per-category {coco_eval.params.iouType} AP (%):\n" + "\n".join(lines) + "\n"

    def summary(self) -> str:
        return self._summary
