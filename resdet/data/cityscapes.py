"""Cityscapes fine annotations: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_{labelIds,instanceIds}.png``.
"""
from __future__ import annotations

import collections
import glob
import os
from typing import Any, Literal

import numpy as np
from PIL import Image

from .base import DetectionDatasetBase, Transform, masks_to_boxes
from .cityscapes_labels import LABEL_ID_TO_THING, THING_NAMES, TRAIN_ID_NAMES, label_ids_to_train_ids
from .image_io import read_label_map

__all__ = ["CityscapesDataset"]

_IMAGE_SUFFIX = "_leftImg8bit.png"


class CityscapesDataset(DetectionDatasetBase):
    """Cityscapes (fine) for semantic or instance segmentation.

    Targets (all with ``image_id`` int = position in the sorted file list):
        ``"semantic"``: ``sem_seg`` int64 [H, W] in the 19 train ids, 255 ignored; empty ``boxes``/``labels``.
        ``"instance"``: ``boxes`` float32 [N, 4], ``labels`` int64 [N] in 1..8 (``THING_NAMES`` order:
        person, rider, car, truck, bus, train, motorcycle, bicycle), ``masks`` uint8 [N, H, W],
        ``iscrowd``, ``area``. Group (crowd) regions — instanceIds values below 1000 — are left out of the
        target; ``crowd_masks(index)`` returns them for evaluation and the COCO converter writes them with
        ``iscrowd=1``.

    Args:
        root: folder holding ``leftImg8bit`` and ``gtFine``.
        split: "train" | "val" | "test" (any folder name under ``leftImg8bit``).
        task: "semantic" | "instance".
        transforms: see ``CocoDataset``.
        remove_empty: (instance task) drop images without instances.
    """

    def __init__(self, root: str, split: str = "train", *, task: Literal["semantic", "instance"] = "semantic",
                 transforms: Transform | None = None, remove_empty: bool = False) -> None:
        super().__init__(transforms=transforms)
        if task not in ("semantic", "instance"):
            raise ValueError(f"task must be 'semantic' or 'instance', got {task!r}")
        self.root, self.split, self.task = root, split, task
        image_root = os.path.join(root, "leftImg8bit", split)
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"Cityscapes image folder not found: {image_root!r} "
                                    f"(root must hold leftImg8bit/{split}/<city>/)")
        self.class_names = list(TRAIN_ID_NAMES) if task == "semantic" else list(THING_NAMES)
        self.cat_id_to_contiguous = {i + 1: i + 1 for i in range(len(THING_NAMES))}
        self.contiguous_to_cat_id = dict(self.cat_id_to_contiguous)
        self.records = self._build_records(image_root, remove_empty)

    @property
    def num_classes(self) -> int:
        """19 for the semantic task, 9 (8 things + background) for the instance task."""
        return len(TRAIN_ID_NAMES) if self.task == "semantic" else len(THING_NAMES) + 1

    def _build_records(self, image_root: str, remove_empty: bool) -> list[dict[str, Any]]:
        paths = sorted(glob.glob(os.path.join(image_root, "*", "*" + _IMAGE_SUFFIX)))
        if not paths:
            raise FileNotFoundError(f"no *{_IMAGE_SUFFIX} files under {image_root!r}")
        counts: collections.Counter[str] = collections.Counter()
        records = []
        for image_id, path in enumerate(paths):
            city = os.path.basename(os.path.dirname(path))
            stem = os.path.basename(path)[: -len(_IMAGE_SUFFIX)]
            gt = os.path.join(self.root, "gtFine", self.split, city, f"{stem}_gtFine_")
            record = {"image_id": image_id, "path": path, "file_name": f"{city}/{stem}{_IMAGE_SUFFIX}",
                      "labelIds": gt + "labelIds.png", "instanceIds": gt + "instanceIds.png"}
            needed = ("labelIds",) if self.task == "semantic" else ("instanceIds",)
            for key in needed:
                if not os.path.isfile(record[key]):
                    raise FileNotFoundError(f"Cityscapes annotation not found: {record[key]!r} (for {path!r})")
            with Image.open(path) as im:  # header only
                record["width"], record["height"] = im.size
            if remove_empty and self.task == "instance":
                ids = np.unique(read_label_map(record["instanceIds"]))
                if not any(i >= 1000 and i // 1000 in LABEL_ID_TO_THING for i in ids):
                    counts["removed_empty"] += 1
                    continue
            records.append(record)
        self._report(f"CityscapesDataset({self.split}/{self.task})", images=len(records), instances=None,
                     extra=dict(counts))
        return records

    def load_target(self, index: int) -> dict[str, Any]:
        """The numpy target of one item without decoding its image."""
        record = self.records[index]
        if self.task == "semantic":
            sem = label_ids_to_train_ids(read_label_map(record["labelIds"]))
            return {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "sem_seg": sem,
                    "image_id": record["image_id"]}
        ids_map = read_label_map(record["instanceIds"])
        masks, labels = [], []
        for value in np.unique(ids_map):
            if value < 1000 or value // 1000 not in LABEL_ID_TO_THING:
                continue
            masks.append((ids_map == value).astype(np.uint8))
            labels.append(LABEL_ID_TO_THING[value // 1000])
        n = len(masks)
        masks_array = np.stack(masks) if masks else np.zeros((0, *ids_map.shape), dtype=np.uint8)
        return {"boxes": masks_to_boxes(masks_array), "labels": np.array(labels, dtype=np.int64),
                "masks": masks_array, "iscrowd": np.zeros(n, dtype=np.int64),
                "area": masks_array.sum(axis=(1, 2)).astype(np.float32), "image_id": record["image_id"]}

    def crowd_masks(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Group regions of thing classes: (labels int64 [M] in 1..8, masks uint8 [M, H, W])."""
        ids_map = read_label_map(self.records[index]["instanceIds"])
        values = [v for v in np.unique(ids_map) if v < 1000 and v in LABEL_ID_TO_THING]
        masks = [(ids_map == v).astype(np.uint8) for v in values]
        return (np.array([LABEL_ID_TO_THING[v] for v in values], dtype=np.int64),
                np.stack(masks) if masks else np.zeros((0, *ids_map.shape), dtype=np.uint8))

    def _item_name(self, record: dict[str, Any]) -> str:
        return os.path.basename(record["path"])

    def _sem_seg_file(self, record: dict[str, Any]) -> str:
        return record.get("labelIds", record["path"])

    def _expected_size(self, record: dict[str, Any], target: dict[str, Any]) -> tuple[tuple[int, int], str]:
        shape = target["sem_seg"].shape if "sem_seg" in target else target["masks"].shape[1:]
        source = record.get("labelIds") if "sem_seg" in target else record.get("instanceIds")
        return (int(shape[0]), int(shape[1])), repr(source) if source else "its gtFine maps"
