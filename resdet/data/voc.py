"""PASCAL VOC in its ``VOCdevkit`` layout: detection (Annotations XML), semantic (SegmentationClass) and
instance (SegmentationObject) tasks.

``difficult`` objects: like mmdetection (which turns them into ignored boxes) and unlike detectron2 (which
trains on them), resdet leaves them out of training targets by default (``keep_difficult=False``); the
``difficult`` flag stays available to evaluation through ``get_annotation(index)``, which always returns
every object with its flag, and through the VOC→COCO converter, which writes difficult objects with
``iscrowd=1`` so that ``COCOeval`` ignores them and ``CocoDataset`` does not train on them.
"""
from __future__ import annotations

import collections
import os
import xml.etree.ElementTree as ET
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .base import (
    IGNORE_LABEL,
    DetectionDatasetBase,
    Transform,
    masks_to_boxes,
    sanitize_box,
    select_instances,
    target_to_tensors,
)
from .image_io import read_label_map

__all__ = ["VOC_CLASSES", "VOCDataset", "voc_image_id", "voc_split_file"]

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
_CLASS_TO_LABEL = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}


def voc_image_id(file_id: str, fallback: int) -> int:
    """Integer image id from a VOC file id ("2008_000123" → 2008000123, "000005" → 5)."""
    digits = file_id.replace("_", "")
    return int(digits) if digits.isdigit() else fallback


def voc_split_file(root: str, year: str | int, split: str, *, task: str = "detection") -> str:
    """``VOCdevkit/VOC{year}/ImageSets/{Main|Segmentation}/{split}.txt`` for a task."""
    sets = "Main" if task == "detection" else "Segmentation"
    return os.path.join(root, f"VOC{year}", "ImageSets", sets, f"{split}.txt")


def _read_split(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VOC split file not found: {path!r}")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


class VOCDataset(DetectionDatasetBase):
    """PASCAL VOC 2007/2012.

    Targets by task (all with ``image_id`` int):
        ``"detection"``: ``boxes`` float32 [N, 4] xyxy (XML's 1-based ``xmin``/``ymin`` minus one),
        ``labels`` int64 [N] in 1..20, ``difficult`` bool [N], ``iscrowd`` int64 [N], ``area`` float32 [N].
        ``"semantic"``: ``sem_seg`` int64 [H, W] in 0..20 (0 background), 255 ignored; empty ``boxes``/``labels``.
        ``"instance"``: as detection plus ``masks`` uint8 [N, H, W] from SegmentationObject; the class of an
        instance is the majority SegmentationClass label under it; 255 (object borders) belongs to no mask.

    Args:
        root: the ``VOCdevkit`` folder.
        year: "2007" or "2012" (selects ``VOC{year}``).
        split: a split name in ``ImageSets/Main`` (detection) or ``ImageSets/Segmentation``.
        task: "detection" | "semantic" | "instance".
        transforms: see ``CocoDataset``.
        keep_difficult: put difficult objects in the target (flagged) instead of leaving them out.
        remove_empty: drop images with no (kept) object (detection and instance tasks).
    """

    def __init__(self, root: str, year: str | int = "2012", split: str = "train", *,
                 task: Literal["detection", "semantic", "instance"] = "detection",
                 transforms: Transform | None = None, keep_difficult: bool = False,
                 remove_empty: bool = False) -> None:
        super().__init__(transforms=transforms)
        if task not in ("detection", "semantic", "instance"):
            raise ValueError(f"task must be 'detection', 'semantic' or 'instance', got {task!r}")
        self.root = os.path.join(root, f"VOC{year}")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{self.root!r} not found: root must be the VOCdevkit folder holding VOC{year}")
        self.year, self.split, self.task = str(year), split, task
        self.keep_difficult = keep_difficult
        self.class_names = ["background", *VOC_CLASSES] if task == "semantic" else list(VOC_CLASSES)
        self.cat_id_to_contiguous = {i: i for i in range(1, len(VOC_CLASSES) + 1)}
        self.contiguous_to_cat_id = dict(self.cat_id_to_contiguous)
        ids = _read_split(voc_split_file(root, self.year, split, task=task))
        self.records = self._build_records(ids, remove_empty)

    @property
    def num_classes(self) -> int:
        """21 for every task: 20 classes plus background."""
        return len(VOC_CLASSES) + 1

    def _parse_xml(self, file_id: str) -> dict[str, Any]:
        path = os.path.join(self.root, "Annotations", f"{file_id}.xml")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VOC annotation not found: {path!r} (listed in the {self.split} split)")
        try:
            tree = ET.parse(path).getroot()
            height = int(tree.find("size/height").text)
            width = int(tree.find("size/width").text)
        except (ET.ParseError, AttributeError, ValueError) as err:
            raise ValueError(f"{path}: cannot read <size> ({err})") from err
        objects = []
        for index, obj in enumerate(tree.findall("object")):
            name = (obj.findtext("name") or "").strip()
            if name not in _CLASS_TO_LABEL:
                raise ValueError(f"{path}: object #{index} has class {name!r}, expected one of {VOC_CLASSES}")
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            try:
                coords = [float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: object #{index} ({name}) has no valid <bndbox> ({err})") from err
            # 1-based inclusive pixel indices -> 0-based pixel edges.
            box, status = sanitize_box([coords[0] - 1, coords[1] - 1, coords[2], coords[3]], height, width)
            if box is None:
                self.skipped["degenerate_box"] += 1
                continue
            if status == "clipped":
                self._counts["clipped_box"] += 1
            objects.append({"box": box, "label": _CLASS_TO_LABEL[name], "difficult": difficult})
        return {"height": height, "width": width, "objects": objects}

    def _build_records(self, ids: list[str], remove_empty: bool) -> list[dict[str, Any]]:
        self._counts: collections.Counter[str] = collections.Counter()
        records = []
        for index, file_id in enumerate(ids):
            record: dict[str, Any] = {"file_id": file_id, "image_id": voc_image_id(file_id, index),
                                      "path": os.path.join(self.root, "JPEGImages", f"{file_id}.jpg")}
            if not os.path.isfile(record["path"]):
                raise FileNotFoundError(f"VOC image not found: {record['path']!r} (listed in the {self.split} split)")
            if self.task == "detection":
                record.update(self._parse_xml(file_id))
                kept = [o for o in record["objects"] if self.keep_difficult or not o["difficult"]]
                self._counts["difficult"] += sum(o["difficult"] for o in record["objects"])
                if remove_empty and not kept:
                    self._counts["removed_empty"] += 1
                    continue
            else:
                for folder in (("SegmentationClass", "SegmentationObject") if self.task == "instance"
                               else ("SegmentationClass",)):
                    path = os.path.join(self.root, folder, f"{file_id}.png")
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"VOC label map not found: {path!r} (listed in the {self.split} split)")
                    record[folder] = path
                with Image.open(record["SegmentationClass"]) as im:  # header only
                    record["width"], record["height"] = im.size
                if remove_empty and self.task == "instance":
                    values = np.unique(read_label_map(record["SegmentationObject"]))
                    if not ((values > 0) & (values < IGNORE_LABEL)).any():
                        self._counts["removed_empty"] += 1
                        continue
            records.append(record)
        instances = sum(len(r["objects"]) for r in records) if self.task == "detection" else None
        self._report(f"VOCDataset({self.year}/{self.split}/{self.task})", images=len(records), instances=instances,
                     extra=dict(self._counts))
        return records

    def _instance_target(self, record: dict[str, Any]) -> dict[str, Any]:
        objects = read_label_map(record["SegmentationObject"])
        classes = read_label_map(record["SegmentationClass"])
        ids = [i for i in np.unique(objects) if 0 < i < IGNORE_LABEL]
        masks, labels = [], []
        for i in ids:
            mask = objects == i
            votes = np.bincount(classes[mask], minlength=256)[1:len(VOC_CLASSES) + 1]
            if votes.sum() == 0:  # instance pixels carry no class: cannot label it
                continue
            masks.append(mask.astype(np.uint8))
            labels.append(int(votes.argmax()) + 1)
        height, width = objects.shape
        masks_array = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
        n = len(masks)
        return {"boxes": masks_to_boxes(masks_array), "labels": np.array(labels, dtype=np.int64),
                "masks": masks_array, "iscrowd": np.zeros(n, dtype=np.int64),
                "area": masks_array.sum(axis=(1, 2)).astype(np.float32),
                "difficult": np.zeros(n, dtype=bool), "image_id": record["image_id"]}

    def load_target(self, index: int, *, all_objects: bool = False) -> dict[str, Any]:
        """The numpy target of one item without decoding its image.

        Args:
            all_objects: include difficult objects even when ``keep_difficult`` is False.
        """
        record = self.records[index]
        if self.task == "instance":
            return self._instance_target(record)
        if self.task == "semantic":
            sem = read_label_map(record["SegmentationClass"])
            return {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "sem_seg": sem,
                    "image_id": record["image_id"]}
        objects = record["objects"]
        boxes = np.array([o["box"] for o in objects], dtype=np.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": np.array([o["label"] for o in objects], dtype=np.int64),
                  "difficult": np.array([o["difficult"] for o in objects], dtype=bool),
                  "iscrowd": np.zeros(len(objects), dtype=np.int64),
                  "area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32),
                  "image_id": record["image_id"]}
        if not (all_objects or self.keep_difficult):
            target = select_instances(target, ~target["difficult"])
        return target

    def _item_name(self, record: dict[str, Any]) -> str:
        return record["file_id"]

    def _sem_seg_file(self, record: dict[str, Any]) -> str:
        return record.get("SegmentationClass", record["path"])

    def _expected_size(self, record: dict[str, Any], target: dict[str, Any]) -> tuple[tuple[int, int], str]:
        if self.task == "detection":
            return super()._expected_size(record, target)
        return (int(record["height"]), int(record["width"])), repr(record["SegmentationClass"])

    def get_annotation(self, index: int) -> dict[str, torch.Tensor]:
        """Every object (difficult ones included, flagged) in original pixels; no image decoding."""
        return target_to_tensors(self.load_target(index, all_objects=True))
