"""Writing COCO instance json from PASCAL VOC and Cityscapes, so ``CocoDataset`` and ``COCOeval`` read them;
and Cityscapes panoptic ground truth as cityscapesScripts' ``createPanopticImgs`` writes it.

Masks are written as compressed RLE (``counts`` as a string); detection-only VOC objects get their box as a
four-point polygon. ``file_name`` entries are relative to the image folder to pass to ``CocoDataset``:
``VOC{year}/JPEGImages`` and ``leftImg8bit/{split}``.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

from .cityscapes import CityscapesDataset
from .cityscapes_labels import LABELS, THING_NAMES
from .image_io import read_label_map
from .panoptic_io import write_panoptic_png
from .voc import VOC_CLASSES, VOCDataset

__all__ = ["encode_rle", "voc_to_coco", "cityscapes_to_coco", "cityscapes_to_panoptic", "write_json"]


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """uint8/bool [H, W] → json-ready compressed RLE."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box_ann(ann_id: int, image_id: int, label: int, box: np.ndarray, **extra: Any) -> dict[str, Any]:
    x1, y1, x2, y2 = (float(v) for v in box)
    ann = {"id": ann_id, "image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
           "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
           "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]}
    ann.update(extra)
    return ann


def _mask_ann(ann_id: int, image_id: int, label: int, mask: np.ndarray, iscrowd: int) -> dict[str, Any]:
    rle = encode_rle(mask)
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {"id": ann_id, "image_id": image_id, "category_id": int(label), "bbox": [x, y, w, h],
            "area": float(mask_utils.area(rle)), "iscrowd": iscrowd, "segmentation": rle}


def write_json(data: dict[str, Any], out: str) -> str:
    """Writes ``data`` to ``out`` (creating folders) and returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(data, f)
    return out


def voc_to_coco(root: str, year: str | int, split: str, *,
                task: Literal["detection", "instance"] = "detection") -> dict[str, Any]:
    """PASCAL VOC → COCO dict.

    Detection: every XML object, difficult ones with ``iscrowd=1`` and ``"difficult": 1`` (ignored by
    ``COCOeval``, left out of training by ``CocoDataset``). Instance: SegmentationObject masks as RLE.

    Args:
        root: the VOCdevkit folder.
        year, split: as for ``VOCDataset``.
        task: "detection" | "instance".
    """
    dataset = VOCDataset(root, year, split, task=task, keep_difficult=True)
    images, annotations = [], []
    for index, record in enumerate(dataset.records):
        images.append({"id": record["image_id"], "file_name": f"{record['file_id']}.jpg",
                       "width": record["width"], "height": record["height"]})
        target = dataset.load_target(index, all_objects=True)
        for i in range(len(target["labels"])):
            ann_id = len(annotations) + 1
            if task == "instance":
                annotations.append(_mask_ann(ann_id, record["image_id"], target["labels"][i], target["masks"][i], 0))
            else:
                difficult = int(target["difficult"][i])
                ann = _box_ann(ann_id, record["image_id"], target["labels"][i], target["boxes"][i], difficult=difficult)
                ann["iscrowd"] = difficult
                annotations.append(ann)
    categories = [{"id": i + 1, "name": name, "supercategory": "voc"} for i, name in enumerate(VOC_CLASSES)]
    return {"info": {"description": f"PASCAL VOC{year} {split} ({task})"}, "images": images,
            "annotations": annotations, "categories": categories}


def cityscapes_to_coco(root: str, split: str) -> dict[str, Any]:
    """Cityscapes gtFine instances → COCO dict (8 thing classes, RLE masks, group regions as crowds)."""
    dataset = CityscapesDataset(root, split, task="instance")
    images, annotations = [], []
    for index, record in enumerate(dataset.records):
        images.append({"id": record["image_id"], "file_name": record["file_name"], "width": record["width"],
                       "height": record["height"]})
        target = dataset.load_target(index)
        crowd_labels, crowd_masks = dataset.crowd_masks(index)
        for labels, masks, iscrowd in ((target["labels"], target["masks"], 0), (crowd_labels, crowd_masks, 1)):
            for label, mask in zip(labels, masks):
                annotations.append(_mask_ann(len(annotations) + 1, record["image_id"], label, mask, iscrowd))
    categories = [{"id": i + 1, "name": name, "supercategory": "cityscapes"} for i, name in enumerate(THING_NAMES)]
    return {"info": {"description": f"Cityscapes gtFine {split} instances"}, "images": images,
            "annotations": annotations, "categories": categories}


def cityscapes_to_panoptic(root: str, split: str, *, out_dir: str | None = None,
                           train_id: bool = False) -> tuple[str, str]:
    """Cityscapes ``gtFine/{split}/*/*_instanceIds.png`` → panoptic json + PNG folder, the files (names,
    ids, categories, segment ids, crowd flags) that cityscapesScripts' ``createPanopticImgs`` writes.

    Conventions kept: the 19 categories evaluated (``ignoreInEval`` labels dropped, their pixels void), with
    their label ids (``train_id``: train ids, and ``_trainId`` in the names); a segment's id is its
    instanceIds value (``label * 1000 + k`` per instance, the bare label id for a stuff region or a thing
    group, the latter ``iscrowd=1``); ``image_id`` is ``<city>_<seq>_<frame>``; the images' ``file_name`` is
    ``<image_id>_gtFine_leftImg8bit.png`` and the PNGs ``<image_id>_gtFine_panoptic.png``.

    Args:
        root: folder holding ``gtFine`` (and ``leftImg8bit``).
        split: the ``gtFine`` split folder.
        out_dir: where the json and the PNG folder go; default ``{root}/gtFine``.
        train_id: category ids are train ids instead of label ids.

    Returns:
        ``(json path, PNG folder)``.

    Raises:
        FileNotFoundError: no instanceIds file in the split.
        ValueError: an instanceIds value whose label id is not in the Cityscapes table (names file and id).
    """
    gt_root = os.path.join(root, "gtFine")
    out_dir = gt_root if out_dir is None else out_dir
    files = sorted(glob.glob(os.path.join(gt_root, split, "*", "*_instanceIds.png")))
    if not files:
        raise FileNotFoundError(f"no *_instanceIds.png under {os.path.join(gt_root, split)!r}")
    by_id = {label.id: label for label in LABELS if label.id >= 0}
    categories = [{"id": int(label.train_id if train_id else label.id), "name": label.name, "color": list(label.color),
                   "supercategory": label.category, "isthing": 1 if label.has_instances else 0}
                  for label in LABELS if not label.ignore_in_eval]
    name = f"cityscapes_panoptic_{split}{'_trainId' if train_id else ''}"
    png_dir = os.path.join(out_dir, name)
    images, annotations = [], []
    for path in files:
        instance_ids = read_label_map(path)
        file_name = os.path.basename(path)
        image_id = file_name.replace("_gtFine_instanceIds.png", "")
        height, width = instance_ids.shape
        images.append({"id": image_id, "width": int(width), "height": int(height),
                       "file_name": file_name.replace("_instanceIds.png", "_leftImg8bit.png")})
        panoptic = np.zeros(instance_ids.shape, dtype=np.int64)
        segments = []
        for segment_id in np.unique(instance_ids).tolist():
            label_id, iscrowd = (segment_id, 1) if segment_id < 1000 else (segment_id // 1000, 0)
            if label_id not in by_id:
                raise ValueError(f"{path}: instance id {segment_id} has label id {label_id}, which is not a "
                                 "Cityscapes label")
            label = by_id[label_id]
            if label.ignore_in_eval:
                continue
            if not label.has_instances:
                iscrowd = 0
            mask = instance_ids == segment_id
            panoptic[mask] = segment_id
            ys, xs = np.nonzero(mask)
            x, y = int(xs.min()), int(ys.min())
            segments.append({"id": int(segment_id), "category_id": int(label.train_id if train_id else label.id),
                             "area": int(mask.sum()), "bbox": [x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1],
                             "iscrowd": iscrowd})
        png_name = file_name.replace("_instanceIds.png", "_panoptic.png")
        write_panoptic_png(os.path.join(png_dir, png_name), panoptic)
        annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})
    out = os.path.join(out_dir, name + ".json")
    os.makedirs(png_dir, exist_ok=True)
    with open(out, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f, sort_keys=True,
                  indent=4)
    return out, png_dir
