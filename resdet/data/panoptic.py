"""Panoptic datasets in panopticapi's format: COCO panoptic and Cityscapes panoptic (``createPanopticImgs``).

Layouts:
    COCO:        ``{root}/{train,val}2017/*.jpg``, ``annotations/panoptic_{split}2017.json`` and its PNG folder
                 (``annotations/panoptic_{split}2017/``, the json path without ``.json``, unless given).
    Cityscapes:  ``leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png``, ``gtFine/cityscapes_panoptic_{split}.json``
                 and ``gtFine/cityscapes_panoptic_{split}/`` (written by cityscapesScripts' ``createPanopticImgs``
                 or ``tools/convert_cityscapes_to_panoptic.py``); the json's ``image_id`` is ``<city>_<seq>_<frame>``
                 and its ``file_name`` is not the image's, so images are found by id.

Labels. Things (``isthing=1``) are labels ``1..T`` in the order of their category ids, stuff categories labels
``T+1..T+S``; ``class_names`` / ``contiguous_to_cat_id`` cover all ``T+S`` (the model's label space), and
``num_classes = T + 1`` is the detector's class count. The semantic branch's classes are ``0`` = "any thing"
and ``1..S`` = the stuff categories in the same order (detectron2's convention).

Training target (numpy, then tensors): ``boxes``/``labels``/``masks``/``iscrowd``/``area`` of the non-crowd
thing segments (crowd segments are not training instances, as in detectron2 and torchvision), and
``sem_seg`` int64 [H, W] with stuff pixels 1..S, every thing pixel (crowd included) 0 and void 255 (ignored).
Evaluation targets (``with_panoptic_gt``) also carry ``panoptic_seg`` (int64 [H, W] segment ids),
``segments_info`` (``id``, ``category_id``, ``iscrowd``, ``area``, ``isthing``), ``panoptic_image_id`` and
``panoptic_file_name``, what :class:`resdet.evaluation.PanopticEvaluator` reads.

Bad input is an error naming the file and the id: a PNG id missing from the json or the reverse, an unknown
category id, a PNG or image whose size differs from the json's.
"""
from __future__ import annotations

import collections
import glob
import json
import os
from typing import Any, Literal

import numpy as np

from .base import DetectionDatasetBase, Transform, masks_to_boxes
from .image_io import ImageReadError
from .panoptic_io import check_segments, read_panoptic_png

__all__ = ["CocoPanopticDataset", "CityscapesPanopticDataset"]


class CocoPanopticDataset(DetectionDatasetBase):
    """Images with panoptic ground truth from a panopticapi json and its PNG folder.

    Args:
        image_dir: folder that the json's image ``file_name`` entries are relative to.
        ann_file: panoptic json (``images``, ``annotations`` with ``segments_info``, ``categories`` with
            ``isthing``).
        panoptic_dir: folder of the PNGs; None: ``ann_file`` without ``.json`` (panopticapi's convention).
        transforms: training pipeline (``build_transforms``); it moves boxes, masks and ``sem_seg``.
        remove_empty: drop images without a (non-crowd) thing segment.
        with_panoptic_gt: add the evaluation keys (``panoptic_seg``, ``segments_info``...) to targets;
            only without ``transforms`` (the pipeline does not move panoptic maps).
        missing_images: ``"error"`` or ``"skip"`` (counted) for images absent on disk.

    Attributes:
        categories: the json's categories (``id``, ``name``, ``isthing``, ...) in id order.
        thing_cat_ids, stuff_cat_ids: sorted category ids of each kind.
        class_names, contiguous_to_cat_id, num_classes, num_things, num_stuff_classes: see the module docstring.
    """

    def __init__(self, image_dir: str, ann_file: str, panoptic_dir: str | None = None, *,
                 transforms: Transform | None = None, remove_empty: bool = False, with_panoptic_gt: bool = False,
                 missing_images: Literal["error", "skip"] = "error") -> None:
        super().__init__(transforms=transforms)
        if with_panoptic_gt and transforms is not None:
            raise ValueError("with_panoptic_gt needs transforms=None: the pipeline does not move panoptic maps")
        if missing_images not in ("error", "skip"):
            raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        self.image_dir = image_dir
        self.ann_file = ann_file
        self.panoptic_dir = panoptic_dir if panoptic_dir is not None else os.path.splitext(ann_file)[0]
        self.with_panoptic_gt = with_panoptic_gt
        data = self._load_json()
        if not os.path.isdir(self.panoptic_dir):
            raise FileNotFoundError(f"panoptic PNG folder not found: {self.panoptic_dir!r} (for {ann_file!r})")
        self._set_categories(data["categories"])
        self.records = self._build_records(data, remove_empty, missing_images)

    # ------------------------------------------------------------------------------------------- labels
    def _set_categories(self, categories: list[dict[str, Any]]) -> None:
        by_id: dict[int, dict[str, Any]] = {}
        for index, cat in enumerate(categories):
            for key in ("id", "isthing"):
                if key not in cat:
                    raise ValueError(f"{self.ann_file}: category #{index} lacks {key!r} ({cat!r})")
            if cat["id"] in by_id:
                raise ValueError(f"{self.ann_file}: category id {cat['id']} appears twice")
            by_id[cat["id"]] = dict(cat, name=str(cat.get("name", cat["id"])))
        self.categories = [by_id[c] for c in sorted(by_id)]
        self.thing_cat_ids = [c["id"] for c in self.categories if int(c["isthing"]) == 1]
        self.stuff_cat_ids = [c["id"] for c in self.categories if int(c["isthing"]) != 1]
        ordered = self.thing_cat_ids + self.stuff_cat_ids
        self.class_names = [by_id[c]["name"] for c in ordered]
        self.contiguous_to_cat_id = {i + 1: c for i, c in enumerate(ordered)}
        self.cat_id_to_contiguous = {c: i for i, c in self.contiguous_to_cat_id.items()}
        self._category = by_id

    @property
    def num_things(self) -> int:
        """Thing categories T."""
        return len(self.thing_cat_ids)

    @property
    def num_classes(self) -> int:
        """Detector classes: things + background (T + 1)."""
        return self.num_things + 1

    @property
    def num_stuff_classes(self) -> int:
        """Stuff categories S; the semantic branch predicts S + 1 classes (0 = any thing)."""
        return len(self.stuff_cat_ids)

    @property
    def num_sem_seg_classes(self) -> int:
        """Classes of the ``sem_seg`` targets: S + 1 (0 = any thing, 1..S stuff)."""
        return self.num_stuff_classes + 1

    # ------------------------------------------------------------------------------------------ records
    def _load_json(self) -> dict[str, Any]:
        if not os.path.isfile(self.ann_file):
            raise FileNotFoundError(f"panoptic annotation file not found: {self.ann_file!r}")
        with open(self.ann_file) as f:
            try:
                data = json.load(f)
            except ValueError as err:
                raise ValueError(f"{self.ann_file!r} is not valid json: {err}") from err
        for key in ("images", "annotations", "categories"):
            if not isinstance(data, dict) or key not in data:
                raise ValueError(f"{self.ann_file!r}: not a panoptic json (no {key!r})")
        return data

    def _image_path(self, info: dict[str, Any]) -> str:
        """The image file of a json ``images`` entry."""
        return os.path.join(self.image_dir, info["file_name"])

    def _build_records(self, data: dict[str, Any], remove_empty: bool, missing_images: str) -> list[dict[str, Any]]:
        images = {}
        for info in data["images"]:
            for key in ("id", "file_name", "height", "width"):
                if key not in info:
                    raise ValueError(f"{self.ann_file}: image {info.get('id', info)!r} lacks {key!r}")
            images[info["id"]] = info
        counts: collections.Counter[str] = collections.Counter()
        annotated = set()
        records = []
        for ann in data["annotations"]:
            image_id = ann.get("image_id")
            if image_id not in images:
                raise ValueError(f"{self.ann_file}: annotation {ann.get('file_name')!r} has image_id {image_id!r}, "
                                 "which is not among the json's images")
            if "file_name" not in ann or "segments_info" not in ann:
                raise ValueError(f"{self.ann_file}: annotation of image {image_id!r} lacks 'file_name' or "
                                 "'segments_info'")
            annotated.add(image_id)
            segments = []
            for seg in ann["segments_info"]:
                if "id" not in seg or "category_id" not in seg:
                    raise ValueError(f"{self.ann_file}: image {image_id!r}: a segment lacks 'id' or 'category_id'")
                if seg["category_id"] not in self._category:
                    raise ValueError(f"{self.ann_file}: image {image_id!r}, segment id {seg['id']}: unknown "
                                     f"category_id {seg['category_id']!r} (categories: {sorted(self._category)})")
                segments.append({"id": int(seg["id"]), "category_id": seg["category_id"],
                                 "iscrowd": int(seg.get("iscrowd", 0)), "area": seg.get("area"),
                                 "isthing": int(self._category[seg["category_id"]]["isthing"])})
            info = images[image_id]
            path = self._image_path(info)
            if not os.path.isfile(path):
                if missing_images == "error":
                    raise FileNotFoundError(f"{self.ann_file}: image id {image_id!r} points at {path!r}, which does "
                                            "not exist (missing_images='skip' drops such images)")
                self.skipped["missing_image"] += 1
                continue
            counts["crowd"] += sum(s["iscrowd"] for s in segments if s["isthing"])
            if remove_empty and not any(s["isthing"] and not s["iscrowd"] for s in segments):
                counts["removed_empty"] += 1
                continue
            records.append({"image_id": image_id if isinstance(image_id, int) else len(records),
                            "panoptic_image_id": image_id, "path": path,
                            "png": os.path.join(self.panoptic_dir, ann["file_name"]),
                            "panoptic_file_name": ann["file_name"],
                            "height": int(info["height"]), "width": int(info["width"]), "segments": segments})
        unannotated = len(set(images) - annotated)
        if unannotated:
            self.skipped["image_without_annotation"] += unannotated
        self._report(f"{type(self).__name__}({os.path.basename(self.ann_file)})", images=len(records),
                     instances=sum(1 for r in records for s in r["segments"] if s["isthing"] and not s["iscrowd"]),
                     extra={"segments": sum(len(r["segments"]) for r in records), **counts})
        return records

    # ---------------------------------------------------------------------------------------- targets
    def load_target(self, index: int) -> dict[str, Any]:
        """The numpy target of one item, read from its panoptic PNG (see the module docstring)."""
        record = self.records[index]
        ids = read_panoptic_png(record["png"])
        if ids.shape != (record["height"], record["width"]):
            raise ImageReadError(f"panoptic PNG {record['png']!r} is {ids.shape[0]}x{ids.shape[1]} (HxW) but "
                                 f"{self.ann_file} says {record['height']}x{record['width']} for image id "
                                 f"{record['panoptic_image_id']!r}")
        segments = record["segments"]
        values, counts = check_segments(ids, [s["id"] for s in segments],
                                        f"{record['png']} (image id {record['panoptic_image_id']!r})")
        pixels = dict(zip(values.tolist(), counts.tolist()))
        sem_seg = np.full(ids.shape, 255, dtype=np.int64)
        masks, labels = [], []
        for seg in segments:
            mask = ids == seg["id"]
            if seg["isthing"]:
                sem_seg[mask] = 0
                if not seg["iscrowd"]:
                    masks.append(mask.astype(np.uint8))
                    labels.append(self.cat_id_to_contiguous[seg["category_id"]])
            else:
                sem_seg[mask] = self.cat_id_to_contiguous[seg["category_id"]] - self.num_things
        masks_array = np.stack(masks) if masks else np.zeros((0, *ids.shape), dtype=np.uint8)
        target: dict[str, Any] = {
            "boxes": masks_to_boxes(masks_array), "labels": np.array(labels, dtype=np.int64), "masks": masks_array,
            "iscrowd": np.zeros(len(labels), dtype=np.int64),
            "area": masks_array.sum(axis=(1, 2)).astype(np.float32), "sem_seg": sem_seg,
            "image_id": record["image_id"],
        }
        if self.with_panoptic_gt:
            target["panoptic_seg"] = ids
            target["segments_info"] = [dict(s, area=s["area"] if s["area"] is not None else pixels[s["id"]])
                                       for s in segments]
            target["panoptic_image_id"] = record["panoptic_image_id"]
            target["panoptic_file_name"] = record["panoptic_file_name"]
        return target

    def _item_name(self, record: dict[str, Any]) -> str:
        return f"image id {record['panoptic_image_id']!r}"

    def _expected_size(self, record: dict[str, Any], target: dict[str, Any]) -> tuple[tuple[int, int], str]:
        return (record["height"], record["width"]), self.ann_file


class CityscapesPanopticDataset(CocoPanopticDataset):
    """Cityscapes panoptic as cityscapesScripts' ``createPanopticImgs`` writes it (19 categories with their
    label ids, 8 things, group regions as ``iscrowd`` segments).

    Args:
        root: folder holding ``leftImg8bit`` and ``gtFine``.
        split: "train" | "val" (any split the json was written for).
        train_id: read ``cityscapes_panoptic_{split}_trainId.json`` (``--use-train-id``) instead.
        transforms, remove_empty, with_panoptic_gt, missing_images: as for :class:`CocoPanopticDataset`.
    """

    def __init__(self, root: str, split: str = "train", *, train_id: bool = False, transforms: Transform | None = None,
                 remove_empty: bool = False, with_panoptic_gt: bool = False,
                 missing_images: Literal["error", "skip"] = "error") -> None:
        name = f"cityscapes_panoptic_{split}{'_trainId' if train_id else ''}"
        ann_file = os.path.join(root, "gtFine", name + ".json")
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"Cityscapes panoptic json not found: {ann_file!r}; write it with "
                                    f"python tools/convert_cityscapes_to_panoptic.py --root {root} --split {split}")
        image_root = os.path.join(root, "leftImg8bit", split)
        self._images_by_stem = {os.path.basename(p)[: -len("_leftImg8bit.png")]: p
                                for p in glob.glob(os.path.join(image_root, "*", "*_leftImg8bit.png"))}
        self.root, self.split = root, split
        super().__init__(image_root, ann_file, os.path.join(root, "gtFine", name), transforms=transforms,
                         remove_empty=remove_empty, with_panoptic_gt=with_panoptic_gt, missing_images=missing_images)

    def _image_path(self, info: dict[str, Any]) -> str:
        image_id = str(info["id"])
        if image_id in self._images_by_stem:
            return self._images_by_stem[image_id]
        city = image_id.rsplit("_", 2)[0]  # where it should be, for the error message
        return os.path.join(self.image_dir, city, f"{image_id}_leftImg8bit.png")
