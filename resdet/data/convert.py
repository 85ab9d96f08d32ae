"""Writing COCO instance json from PASCAL VOC and Cityscapes, so ``CocoDataset`` and ``COCOeval`` read them.

Masks are written as compressed RLE (``counts`` as a string); detection-only VOC objects get their box as a
four-point polygon. ``file_name`` entries are relative to the image folder to pass to ``CocoDataset``:
``VOC{year}/JPEGImages`` and ``leftImg8bit/{split}``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

from .cityscapes import CityscapesDataset
from .cityscapes_labels import THING_NAMES
from .voc import VOC_CLASSES, VOCDataset

__all__ = ["encode_rle", "voc_to_coco", "cityscapes_to_coco", "write_json"]


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
