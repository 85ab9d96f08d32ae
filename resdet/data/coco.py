"""COCO-format instance datasets (COCO itself, the converted VOC/Cityscapes json, the synthetic shapes).

Crowd regions (``iscrowd=1``) never enter the training target; evaluation sees them because
``CocoDataset.coco`` is the pycocotools ground truth, which a COCO evaluator hands to ``COCOeval`` (it treats
crowds as ignore regions). The one change made to it: polygons with fewer than 3 points are removed there too
(pycocotools' mask evaluation cannot rasterize them), an object left without polygons gets its filled box as
the training target does, and the build report names those annotation ids. Predicted ``labels`` map back
to json category ids through ``contiguous_to_cat_id``.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .base import DetectionDatasetBase, Transform, sanitize_box
from .image_io import ImageReadError, read_label_map

__all__ = ["CocoDataset", "load_coco"]

logger = logging.getLogger("resdet.data")


def _is_polygon(points: Any) -> bool:
    """A COCO polygon pycocotools can rasterize: a flat list of at least 3 (x, y) points."""
    return (isinstance(points, list) and len(points) >= 6 and len(points) % 2 == 0
            and all(isinstance(v, (int, float)) for v in points))


def _encode(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def load_coco(ann_file: str) -> COCO:
    """Loads an instances json quietly; the error names the file when it is missing or not json."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return COCO(ann_file)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{ann_file!r} is not a valid COCO json: {err}") from err


class CocoDataset(DetectionDatasetBase):
    """Images and instance targets from a COCO instances json.

    Item: ``(image Tensor[3, H, W] float in [0, 1], target)`` with ``boxes`` float32 [N, 4] xyxy,
    ``labels`` int64 [N] in 1..K, ``masks`` uint8 [N, H, W] (when ``with_masks``), ``iscrowd`` int64 [N]
    (always 0: crowds are left out), ``area`` float32 [N], ``image_id`` int (the json image id), and
    ``sem_seg`` int64 [H, W] when ``sem_seg_dir`` is given.

    Args:
        image_dir: folder that ``file_name`` entries are relative to.
        ann_file: instances json.
        transforms: callable ``(image np.uint8 [H, W, 3], numpy target) -> (image, target)``, e.g. from
            ``build_transforms``.
        remove_empty: drop images with no (non-crowd) instance; by default they stay as negatives.
        with_masks: decode ``segmentation`` (polygons, RLE or uncompressed RLE) into ``masks``; an
            annotation without segmentation gets its filled box.
        sem_seg_dir: optional folder of semantic PNGs named ``<image file stem>.png`` (0 background,
            1..K, 255 ignored), returned as ``sem_seg``.
        missing_images: ``"error"`` raises at build time when an image file is absent, ``"skip"`` drops
            the image (counted in ``skipped``).

    Attributes:
        coco: pycocotools ``COCO`` ground truth (includes crowds).
        cat_ids: sorted json category ids; ``class_names`` their names (label ``i`` is ``class_names[i-1]``).
        cat_id_to_contiguous, contiguous_to_cat_id: label mappings.
        skipped: Counter of dropped annotations/images by reason; ``summary`` the logged one-line report.
    """

    def __init__(self, image_dir: str, ann_file: str, *, transforms: Transform | None = None,
                 remove_empty: bool = False, with_masks: bool = True, sem_seg_dir: str | None = None,
                 missing_images: Literal["error", "skip"] = "error") -> None:
        super().__init__(transforms=transforms)
        if missing_images not in ("error", "skip"):
            raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"COCO image folder not found: {image_dir!r}")
        self.image_dir = image_dir
        self.ann_file = ann_file
        self.with_masks = with_masks
        self.sem_seg_dir = sem_seg_dir
        self.coco = load_coco(ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_id_to_contiguous = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        self.contiguous_to_cat_id = {i: cat_id for cat_id, i in self.cat_id_to_contiguous.items()}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.cat_ids]
        self.records = self._build_records(remove_empty, missing_images)

    @property
    def num_classes(self) -> int:
        """Detection classes counting background (K + 1)."""
        return len(self.cat_ids) + 1

    def _build_records(self, remove_empty: bool, missing_images: str) -> list[dict[str, Any]]:
        anns_by_image: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
        counts: collections.Counter[str] = collections.Counter()
        bad_polygon_ids: list[Any] = []
        for index, ann in enumerate(self.coco.dataset.get("annotations", [])):
            image_id = ann.get("image_id")
            if image_id not in self.coco.imgs:
                self.skipped["annotation_without_image"] += 1
                continue
            cat_id = ann.get("category_id")
            if cat_id not in self.cat_id_to_contiguous:
                raise ValueError(f"{self.ann_file}: annotation #{index} (id {ann.get('id')}) has category_id "
                                 f"{cat_id!r}, which is not among the json's categories {self.cat_ids}")
            info = self.coco.imgs[image_id]
            if ann.get("iscrowd", 0):
                counts["crowd"] += 1
                self._check_segmentation(ann, info, None, bad_polygon_ids)  # COCOeval reads crowds too
                continue
            bbox = ann.get("bbox")
            if bbox is None or len(bbox) != 4:
                raise ValueError(f"{self.ann_file}: annotation #{index} (id {ann.get('id')}) has bbox "
                                 f"{bbox!r}, expected [x, y, width, height]")
            x, y, w, h = (float(v) for v in bbox)
            box, status = sanitize_box([x, y, x + w, y + h], int(info["height"]), int(info["width"]))
            self._check_segmentation(ann, info, box, bad_polygon_ids)
            if box is None:
                self.skipped["degenerate_box"] += 1
                continue
            if status == "clipped":
                counts["clipped_box"] += 1
            anns_by_image[image_id].append({"box": box, "label": self.cat_id_to_contiguous[cat_id],
                                            "area": float(ann.get("area", w * h)), "ann": ann})
        records = []
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            for key in ("file_name", "height", "width"):
                if key not in info:
                    raise ValueError(f"{self.ann_file}: image id {image_id} lacks {key!r}")
            path = os.path.join(self.image_dir, info["file_name"])
            if not os.path.isfile(path):
                if missing_images == "error":
                    raise FileNotFoundError(f"{self.ann_file}: image id {image_id} points at {path!r}, which "
                                            f"does not exist (pass missing_images='skip' to drop such images)")
                self.skipped["missing_image"] += 1
                continue
            anns = anns_by_image.get(image_id, [])
            if remove_empty and not anns:
                counts["removed_empty"] += 1
                continue
            records.append({"image_id": image_id, "path": path, "height": int(info["height"]),
                            "width": int(info["width"]), "anns": anns})
        self._report(f"CocoDataset({os.path.basename(self.ann_file)})", images=len(records),
                     instances=sum(len(r["anns"]) for r in records), extra=dict(counts))
        if bad_polygon_ids:
            shown = ", ".join(map(str, bad_polygon_ids[:10])) + (" ..." if len(bad_polygon_ids) > 10 else "")
            self.summary += (f"; polygons of fewer than 3 points dropped (the filled box where none was left) in "
                             f"annotation ids {shown}")
            logger.warning("%s: polygons of fewer than 3 points dropped (the filled box where none was left) in "
                           "annotation ids %s", self.ann_file, shown)
        return records

    def _check_segmentation(self, ann: dict[str, Any], info: dict[str, Any], box: np.ndarray | None,
                            bad_polygon_ids: list[Any]) -> None:
        """Polygons of fewer than 3 points are dropped (counted) from ``ann`` itself, which is also the
        evaluation ground truth, so COCOeval can rasterize it; left without polygons, the object gets its
        filled ``box`` as training does (a crowd region: nothing). An RLE must have its image's size."""
        seg = ann.get("segmentation")
        height, width = int(info["height"]), int(info["width"])
        if isinstance(seg, list):
            valid = [p for p in seg if _is_polygon(p)]
            if len(valid) != len(seg):
                self.skipped["bad_polygon"] += len(seg) - len(valid)
                bad_polygon_ids.append(ann.get("id"))
                fallback = np.zeros((height, width), dtype=np.uint8) if box is None else \
                    self._ann_mask({}, box, height, width)
                ann["segmentation"] = valid or _encode(fallback)
        elif isinstance(seg, dict):
            size = seg.get("size")
            if not (isinstance(size, (list, tuple)) and list(size) == [height, width]):
                raise ValueError(f"{self.ann_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')}, "
                                 f"{info.get('file_name')!r}) has an RLE segmentation of size {size!r}; expected "
                                 f"[height, width] = [{height}, {width}], the size of its image")

    def _ann_mask(self, ann: dict[str, Any], box: np.ndarray, height: int, width: int) -> np.ndarray:
        seg = ann.get("segmentation")
        if not seg:
            mask = np.zeros((height, width), dtype=np.uint8)
            x1, y1, x2, y2 = box
            mask[int(np.floor(y1)):int(np.ceil(y2)), int(np.floor(x1)):int(np.ceil(x2))] = 1
            return mask
        if isinstance(seg, list):  # polygons
            rles = mask_utils.frPyObjects(seg, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        return mask_utils.decode(rle).astype(np.uint8)

    def load_target(self, index: int) -> dict[str, Any]:
        """The numpy target of one item without decoding its image."""
        record = self.records[index]
        height, width = record["height"], record["width"]
        anns = record["anns"]
        target: dict[str, Any] = {
            "boxes": np.array([a["box"] for a in anns], dtype=np.float32).reshape(-1, 4),
            "labels": np.array([a["label"] for a in anns], dtype=np.int64),
            "iscrowd": np.zeros(len(anns), dtype=np.int64),
            "area": np.array([a["area"] for a in anns], dtype=np.float32),
            "image_id": record["image_id"],
        }
        if self.with_masks:
            masks = [self._ann_mask(a["ann"], a["box"], height, width) for a in anns]
            target["masks"] = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
        if self.sem_seg_dir is not None:
            sem_file = self._sem_seg_file(record)
            sem = read_label_map(sem_file)
            if sem.shape != (height, width):
                raise ImageReadError(f"{sem_file!r} is {sem.shape[0]}x{sem.shape[1]} (HxW) but the image "
                                     f"{record['path']!r} is {height}x{width}")
            target["sem_seg"] = sem
        return target

    def _expected_size(self, record: dict[str, Any], target: dict[str, Any]) -> tuple[tuple[int, int], str]:
        return (record["height"], record["width"]), self.ann_file

    def _sem_seg_file(self, record: dict[str, Any]) -> str:
        if self.sem_seg_dir is None:
            return record["path"]
        return os.path.join(self.sem_seg_dir, os.path.splitext(os.path.basename(record["path"]))[0] + ".png")
