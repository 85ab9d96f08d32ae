"""Panoptic quality (PQ, SQ, RQ) exactly as panopticapi and cityscapesScripts compute it.

Definitions (Kirillov et al., "Panoptic Segmentation"; panopticapi's ``pq_compute``), per image:

* a ground-truth segment g and a predicted segment p of the same category *match* iff
  ``IoU = |g ∩ p| / (|g| + |p| - |g ∩ p| - |p ∩ void|) > 0.5`` (void pixels of the prediction are left out
  of the union); ``|g|`` is the ground truth's json ``area``, ``|p|`` the prediction's pixel count;
* crowd ground-truth segments (``iscrowd=1``) are never matched and never counted as misses;
* an unmatched ground-truth segment is a false negative (FN); an unmatched prediction is a false positive
  (FP) unless more than half of it lies on void plus the crowd region of its own category (where an image
  has several crowd segments of one category, the last listed one is that region, as in panopticapi);

then per category, summed over all images, ``PQ = ΣIoU(TP) / (TP + FP/2 + FN/2)``,
``SQ = ΣIoU(TP) / TP`` (0 without TP), ``RQ = TP / (TP + FP/2 + FN/2)``. ``All`` / ``Things`` / ``Stuff``
average these over the categories (of that kind) with at least one TP, FP or FN; a group with none has
NaN and ``n = 0`` (panopticapi divides by zero there). Values are fractions, not percentages.

Two entry points share one implementation (:func:`pq_image_stat` + :meth:`PQStat.average`):
:func:`pq_compute` scores panopticapi files (a json and a PNG folder for ground truth and prediction),
:class:`PanopticEvaluator` scores model outputs during training and ``tools/test.py``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from resdet.data.panoptic_io import VOID, check_segments, read_panoptic_png, write_panoptic_png
from resdet.engine import distributed as dist

from .base import DatasetEvaluator
from .coco_eval import COCOEvaluator

__all__ = ["PQStat", "pq_image_stat", "pq_compute", "PanopticEvaluator", "OFFSET"]

OFFSET = 256 * 256 * 256  # joint id = gt id * OFFSET + prediction id (ids are below 256^3)
_GROUPS = (("All", None), ("Things", True), ("Stuff", False))


class PQStat:
    """Per-category sums over images: ``[IoU of true positives, TP, FP, FN]``."""

    def __init__(self) -> None:
        self.per_cat: dict[int, list] = {}

    def __getitem__(self, category_id: int) -> list:
        return self.per_cat.setdefault(category_id, [0.0, 0, 0, 0])

    def __iadd__(self, other: PQStat) -> PQStat:
        for cat, (iou, tp, fp, fn) in other.per_cat.items():
            s = self[cat]
            s[0] += iou
            s[1] += tp
            s[2] += fp
            s[3] += fn
        return self

    def average(self, categories: Mapping[int, Mapping[str, Any]], isthing: bool | None
                ) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """``({"pq", "sq", "rq", "n"}, {category id: {"pq", "sq", "rq", "tp", "fp", "fn"}})`` over the
        categories of one kind (``isthing`` True/False) or all (None); see the module docstring."""
        pq = sq = rq = 0.0
        n = 0
        per_class: dict[int, dict[str, float]] = {}
        for cat_id, info in categories.items():
            if isthing is not None and (int(info["isthing"]) == 1) != isthing:
                continue
            iou, tp, fp, fn = self.per_cat.get(cat_id, [0.0, 0, 0, 0])
            counts = {"tp": tp, "fp": fp, "fn": fn}
            if tp + fp + fn == 0:  # left out of the averages (panopticapi reports zeros)
                per_class[cat_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0, **counts}
                continue
            n += 1
            pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
            sq_class = iou / tp if tp != 0 else 0.0
            rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[cat_id] = {"pq": pq_class, "sq": sq_class, "rq": rq_class, **counts}
            pq += pq_class
            sq += sq_class
            rq += rq_class
        if n == 0:
            return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class

    def results(self, categories: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
        """``{"All", "Things", "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category id: {...}}}``."""
        out: dict[str, Any] = {}
        for name, isthing in _GROUPS:
            out[name], per_class = self.average(categories, isthing)
            if isthing is None:
                out["per_class"] = per_class
        return out


def _segment_field(segment: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in segment:
        raise ValueError(f"{where}: a segments_info entry lacks {key!r} (keys: {sorted(segment)})")
    return segment[key]


def pq_image_stat(gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]], pred_ids: np.ndarray,
                  pred_segments: Sequence[Mapping[str, Any]], categories: Mapping[int, Mapping[str, Any]], *,
                  gt_where: str = "ground truth", pred_where: str = "prediction",
                  stat: PQStat | None = None) -> PQStat:
    """Adds one image's matches to ``stat`` (a new :class:`PQStat` when None) and returns it.

    Args:
        gt_ids: ground-truth segment id map ``[H, W]`` (0 void).
        gt_segments: its ``segments_info`` (``id``, ``category_id``, ``iscrowd``; ``area`` as in the json —
            panopticapi's union uses it — else counted from the map).
        pred_ids: predicted segment id map of the same size.
        pred_segments: its ``segments_info`` (``id``, ``category_id``); areas are counted from the map.
        categories: category id → ``{"isthing": 0/1, ...}``.
        gt_where, pred_where: how errors name the two sides (their PNG files).

    Raises:
        ValueError: a map and its segments disagree (an id in the PNG but not the json, or the reverse), a
            category id is not in ``categories``, or the two maps differ in size — one line naming the file
            and the id.
    """
    stat = PQStat() if stat is None else stat
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"{pred_where}: prediction is {pred_ids.shape[0]}x{pred_ids.shape[1]} (HxW) but the "
                         f"ground truth ({gt_where}) is {gt_ids.shape[0]}x{gt_ids.shape[1]}")
    sides = []
    for ids, segments, where in ((gt_ids, gt_segments, gt_where), (pred_ids, pred_segments, pred_where)):
        seg_ids = [int(_segment_field(s, "id", where)) for s in segments]
        values, counts = check_segments(ids, seg_ids, where)
        area = dict(zip(values.tolist(), counts.tolist()))
        info = {}
        for seg_id, seg in zip(seg_ids, segments):
            cat = _segment_field(seg, "category_id", where)
            if cat not in categories:
                raise ValueError(f"{where}: segment id {seg_id} has unknown category_id {cat!r} (known: "
                                 f"{sorted(categories)[:20]})")
            info[seg_id] = {"category_id": cat, "iscrowd": int(seg.get("iscrowd", 0)), "area": area[seg_id]}
        sides.append(info)
    gt_segms, pred_segms = sides
    for seg in gt_segments:  # panopticapi's union takes the ground truth's area from the json
        if "area" in seg:
            gt_segms[int(seg["id"])]["area"] = seg["area"]

    joint = gt_ids.astype(np.uint64) * np.uint64(OFFSET) + pred_ids.astype(np.uint64)
    labels, intersections = np.unique(joint, return_counts=True)
    gt_pred_map = {(int(label) // OFFSET, int(label) % OFFSET): int(inter)
                   for label, inter in zip(labels.tolist(), intersections.tolist())}

    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():  # sorted by joint id, as panopticapi
        gt, pred = gt_segms.get(gt_label), pred_segms.get(pred_label)
        if gt is None or pred is None or gt["iscrowd"] == 1 or gt["category_id"] != pred["category_id"]:
            continue
        union = pred["area"] + gt["area"] - intersection - gt_pred_map.get((VOID, pred_label), 0)
        iou = intersection / union
        if iou > 0.5:
            s = stat[gt["category_id"]]
            s[1] += 1
            s[0] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    crowd_by_category: dict[Any, int] = {}
    for gt_label, gt in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt["iscrowd"] == 1:
            crowd_by_category[gt["category_id"]] = gt_label  # the last crowd segment of a category wins
            continue
        stat[gt["category_id"]][3] += 1

    for pred_label, pred in pred_segms.items():
        if pred_label in pred_matched:
            continue
        ignored = gt_pred_map.get((VOID, pred_label), 0)
        if pred["category_id"] in crowd_by_category:
            ignored += gt_pred_map.get((crowd_by_category[pred["category_id"]], pred_label), 0)
        if ignored / pred["area"] > 0.5:  # mostly on void / same-class crowd: not a false positive
            continue
        stat[pred["category_id"]][2] += 1
    return stat


def _load_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} json not found: {os.fspath(path)!r}")
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)!r} is not valid json: {err}") from err
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{os.fspath(path)!r}: expected a panoptic json with 'annotations'")
    return data


def _categories(gt: Mapping[str, Any], gt_json: str | os.PathLike) -> dict[int, dict[str, Any]]:
    if "categories" not in gt:
        raise ValueError(f"{os.fspath(gt_json)!r}: the ground-truth json has no 'categories'")
    categories = {}
    for cat in gt["categories"]:
        if "id" not in cat or "isthing" not in cat:
            raise ValueError(f"{os.fspath(gt_json)!r}: category {cat!r} lacks 'id' or 'isthing'")
        categories[cat["id"]] = dict(cat)
    return categories


def pq_compute(gt_json: str | os.PathLike, gt_folder: str | os.PathLike, pred_json: str | os.PathLike,
               pred_folder: str | os.PathLike) -> dict[str, Any]:
    """PQ / SQ / RQ of panopticapi-format predictions against panopticapi-format ground truth.

    Args:
        gt_json: ground truth (``images``, ``annotations`` with ``file_name`` and ``segments_info``,
            ``categories`` with ``isthing``), e.g. COCO's ``panoptic_val2017.json`` or Cityscapes'
            ``cityscapes_panoptic_val.json``.
        gt_folder: folder of its PNGs.
        pred_json: predictions (``annotations`` matched to the ground truth by ``image_id``).
        pred_folder: folder of the predicted PNGs.

    Returns:
        ``{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category id: {"pq", "sq",
        "rq", "tp", "fp", "fn"}}}``, fractions; ``n`` counts the categories averaged.

    Raises:
        ValueError: an image without prediction, or any inconsistency :func:`pq_image_stat` names.
    """
    gt, pred = _load_json(gt_json, "ground-truth"), _load_json(pred_json, "prediction")
    categories = _categories(gt, gt_json)
    pred_by_image = {ann.get("image_id"): ann for ann in pred["annotations"]}
    stat = PQStat()
    for gt_ann in gt["annotations"]:
        image_id = gt_ann.get("image_id")
        pred_ann = pred_by_image.get(image_id)
        if pred_ann is None:
            raise ValueError(f"{os.fspath(pred_json)!r}: no prediction for image id {image_id!r} of "
                             f"{os.fspath(gt_json)!r}")
        gt_png = os.path.join(gt_folder, gt_ann["file_name"])
        pred_png = os.path.join(pred_folder, pred_ann["file_name"])
        pq_image_stat(read_panoptic_png(gt_png), gt_ann["segments_info"], read_panoptic_png(pred_png),
                      pred_ann["segments_info"], categories, gt_where=f"{gt_png} (image id {image_id!r})",
                      pred_where=f"{pred_png} (image id {image_id!r})", stat=stat)
    return stat.results(categories)


def pq_table(results: Mapping[str, Any], categories: Mapping[int, Mapping[str, Any]]) -> str:
    """Per-category PQ / SQ / RQ (%) with TP / FP / FN, then the All / Things / Stuff lines, as
    panopticapi prints them."""
    names = {cat_id: str(info.get("name", cat_id)) for cat_id, info in categories.items()}
    width = max([14, *(len(n) + 1 for n in names.values())])
    lines = [f"{'Category':<{width}}| {'PQ':>5}  {'SQ':>5}  {'RQ':>5}  {'TP':>5} {'FP':>5} {'FN':>5}  kind"]
    for cat_id in sorted(results["per_class"]):
        r = results["per_class"][cat_id]
        kind = "thing" if int(categories[cat_id]["isthing"]) == 1 else "stuff"
        lines.append(f"{names[cat_id]:<{width}}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f}"
                     f"  {r['tp']:>5} {r['fp']:>5} {r['fn']:>5}  {kind}")
    lines.append("-" * (width + 44))
    lines.append(f"{'':<{width}}| {'PQ':>5}  {'SQ':>5}  {'RQ':>5}  {'N':>5}")
    for name, _ in _GROUPS:
        r = results[name]
        cells = "  ".join(f"{100 * r[k]:5.1f}" if r["n"] else f"{'-':>5}" for k in ("pq", "sq", "rq"))
        lines.append(f"{name:<{width}}| {cells}  {r['n']:>5}")
    return "\n".join(lines)


class PanopticEvaluator(DatasetEvaluator):
    """PQ / SQ / RQ of a panoptic model over a dataset, plus COCO box / mask AP of its instance half.

    Targets carry the ground truth as the panoptic datasets give it for evaluation (``image_id`` int,
    ``panoptic_seg`` segment id map Tensor[H, W], ``segments_info`` with dataset category ids, and optionally
    ``panoptic_image_id`` / ``panoptic_file_name``, the json's image id and PNG name). Outputs are the model's
    (``panoptic_seg`` Tensor[H, W], ``segments_info`` whose ``category_id`` is a model label, mapped to a
    dataset category id by ``label_to_cat_id``; ``boxes`` / ``labels`` / ``scores`` / ``masks`` for AP).

    Args:
        categories: the dataset's categories (``id``, ``name``, ``isthing``).
        label_to_cat_id: model label → dataset category id (the model's label space); None: labels are ids.
        instance_iou_types: COCO AP of the thing instances (``bbox``, ``segm``) against the ground truth's
            thing segments (crowd segments as COCO crowds); empty: PQ only.
        output_dir: if given, the predictions are written there in panopticapi's format
            (``panoptic_results.json`` + ``panoptic_results/*.png``, dataset category ids), to be scored by
            :func:`pq_compute` or the official scripts; and the COCO results json.

    ``evaluate`` returns ``panoptic/PQ``, ``panoptic/SQ``, ``panoptic/RQ`` (All), the same with ``_th``
    (things) and ``_st`` (stuff), ``panoptic/PQ/<category name>``, and ``bbox/*`` / ``segm/*``; a group
    without any TP, FP or FN (e.g. no stuff category) has no entry.
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]], label_to_cat_id: Mapping[int, int] | None = None, *,
                 instance_iou_types: Sequence[str] = ("bbox", "segm"),
                 output_dir: str | os.PathLike | None = None) -> None:
        self.categories = {c["id"]: {"id": c["id"], "name": str(c.get("name", c["id"])), "isthing": int(c["isthing"])}
                           for c in categories}
        if not self.categories:
            raise ValueError("PanopticEvaluator needs at least one category")
        self.label_to_cat_id = None if label_to_cat_id is None else {int(k): v for k, v in label_to_cat_id.items()}
        self.output_dir = None if output_dir is None else Path(output_dir)
        things = [c for c in self.categories.values() if c["isthing"]]
        self._coco_gt: COCO | None = None
        self._instances: COCOEvaluator | None = None
        if instance_iou_types and things:
            self._coco_gt = COCO()
            self._set_coco_gt([], [])
            self._instances = COCOEvaluator(self._coco_gt, self.label_to_cat_id, iou_types=list(instance_iou_types),
                                            output_dir=output_dir)
        self._summary = ""
        self.reset()

    def reset(self) -> None:
        self._stats: dict[int, PQStat] = {}
        self._gt_images: list[dict[str, Any]] = []
        self._gt_anns: list[dict[str, Any]] = []
        self._annotations: list[dict[str, Any]] = []
        if self._instances is not None:
            self._instances.reset()
        self._summary = ""

    def _set_coco_gt(self, images: list[dict[str, Any]], anns: list[dict[str, Any]]) -> None:
        things = [c for c in self.categories.values() if c["isthing"]]
        assert self._coco_gt is not None
        self._coco_gt.dataset = {"images": images, "annotations": anns,
                                 "categories": [{"id": c["id"], "name": c["name"]} for c in things]}
        with contextlib.redirect_stdout(io.StringIO()):
            self._coco_gt.createIndex()

    def _pred_segments(self, output: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
        segments = []
        for seg in output["segments_info"]:
            label = int(_segment_field(seg, "category_id", where))
            if self.label_to_cat_id is None:
                cat = label
            elif label in self.label_to_cat_id:
                cat = self.label_to_cat_id[label]
            else:
                raise ValueError(f"{where}: segment id {seg['id']} has label {label}, which the model's label "
                                 f"space maps to no category")
            segments.append({"id": int(seg["id"]), "category_id": cat, "iscrowd": 0,
                             "isthing": int(bool(seg.get("isthing", self.categories.get(cat, {}).get("isthing", 0))))})
        return segments

    def process(self, targets: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        for target, output in zip(targets, outputs, strict=True):
            for key in ("image_id", "panoptic_seg", "segments_info"):
                if key not in target:
                    raise KeyError(f"panoptic evaluation needs {key!r} in each target; got keys {sorted(target)} "
                                   "(build the dataset with its panoptic ground truth)")
            for key in ("panoptic_seg", "segments_info"):
                if key not in output:
                    raise KeyError(f"panoptic evaluation needs {key!r} in the model output; got {sorted(output)}")
            image_id = int(target["image_id"])
            file_name = str(target.get("panoptic_file_name", f"{image_id}.png"))
            where = f"image id {image_id} ({file_name})"
            gt_ids = _numpy(target["panoptic_seg"])
            pred_ids = _numpy(output["panoptic_seg"])
            pred_segments = self._pred_segments(output, f"prediction for {where}")
            self._stats[image_id] = pq_image_stat(gt_ids, target["segments_info"], pred_ids, pred_segments,
                                                  self.categories, gt_where=f"ground truth of {where}",
                                                  pred_where=f"prediction for {where}")
            if self._instances is not None:
                self._add_coco_gt(image_id, gt_ids, target["segments_info"])
            if self.output_dir is not None:
                write_panoptic_png(str(self.output_dir / "panoptic_results" / file_name), pred_ids)
                areas = dict(zip(*np.unique(pred_ids, return_counts=True)))
                for seg in pred_segments:
                    seg["area"] = int(areas[seg["id"]])
                self._annotations.append({"image_id": target.get("panoptic_image_id", image_id),
                                          "file_name": file_name, "segments_info": pred_segments})
        if self._instances is not None:
            self._instances.process(targets, outputs)

    def _add_coco_gt(self, image_id: int, gt_ids: np.ndarray, segments: Sequence[Mapping[str, Any]]) -> None:
        height, width = gt_ids.shape
        self._gt_images.append({"id": image_id, "height": int(height), "width": int(width)})
        for seg in segments:
            if not self.categories[seg["category_id"]]["isthing"]:
                continue
            rle = mask_utils.encode(np.asfortranarray((gt_ids == seg["id"]).astype(np.uint8)))
            area = float(seg.get("area", mask_utils.area(rle)))
            rle["counts"] = rle["counts"].decode("ascii")
            self._gt_anns.append({"image_id": image_id, "category_id": seg["category_id"], "segmentation": rle,
                                  "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                                  "iscrowd": int(seg.get("iscrowd", 0))})

    def evaluate(self) -> dict[str, float]:
        gathered = dist.all_gather_object((self._stats, self._gt_images, self._gt_anns, self._annotations))
        stat, seen = PQStat(), set()
        images, anns, annotations = [], [], []
        for stats, gt_images, gt_anns, pred_annotations in gathered:
            fresh = [i for i in stats if i not in seen]  # an image evaluated on two ranks counts once
            for image_id in fresh:
                stat += stats[image_id]
            images += [im for im in gt_images if im["id"] in fresh]
            anns += [a for a in gt_anns if a["image_id"] in fresh]
            annotations += pred_annotations
            seen.update(fresh)
        results = stat.results(self.categories)
        metrics: dict[str, float] = {}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            if results[group]["n"]:
                for key in ("pq", "sq", "rq"):
                    metrics[f"panoptic/{key.upper()}{suffix}"] = float(results[group][key])
        for cat_id, r in results["per_class"].items():
            if r["tp"] + r["fp"] + r["fn"]:
                metrics[f"panoptic/PQ/{self.categories[cat_id]['name']}"] = float(r["pq"])
        lines = [f"Panoptic quality ({len(seen)} images)", pq_table(results, self.categories)]
        if self.output_dir is not None and dist.is_main_process():
            path = self.output_dir / "panoptic_results.json"
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                json.dump({"annotations": annotations, "categories": list(self.categories.values())}, f,
                          default=_json_default)
            lines.append(f"panoptic results (dataset category ids): {path} + {self.output_dir / 'panoptic_results'}/")
        if self._instances is not None:
            for k, ann in enumerate(anns):
                ann["id"] = k + 1
            self._set_coco_gt(images, anns)
            metrics.update(self._instances.evaluate())
            lines.append(self._instances.summary())
        self._summary = "\n".join(lines)
        return metrics

    def summary(self) -> str:
        return self._summary


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(value, dtype=np.int64)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
