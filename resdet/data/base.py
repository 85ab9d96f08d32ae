"""What every resdet dataset shares: the numpy target layout, box sanitising, build-time skip summaries and
the final conversion to tensors.

Datasets first build a *record* per image (file names, size, annotations) when constructed — that is where
bad annotations are found, counted and reported — and at ``__getitem__`` time load the image, make a numpy
target, run the transforms on numpy arrays and convert to tensors.

Numpy target (what transforms see), N instances:
    boxes      float32 [N, 4] x1, y1, x2, y2 in pixels
    labels     int64   [N]    contiguous 1..K (0 is background)
    masks      uint8   [N, H, W]               (instance tasks)
    sem_seg    int64   [H, W], 255 ignored      (semantic tasks)
    panoptic_seg int64 [H, W] segment ids, with ``segments_info`` (panoptic evaluation targets)
    iscrowd    int64   [N], area float32 [N], difficult bool [N] (VOC) — per-instance extras
    image_id   int
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.ops import masks_to_boxes as tv_masks_to_boxes

from .image_io import ImageReadError, image_to_tensor, read_image

__all__ = ["PER_INSTANCE_KEYS", "IGNORE_LABEL", "DetectionDatasetBase", "sanitize_box", "select_instances",
           "target_to_tensors", "masks_to_boxes"]

logger = logging.getLogger("resdet.data")

IGNORE_LABEL = 255
PER_INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "area", "difficult")

Transform = Callable[[np.ndarray, dict[str, Any]], tuple[np.ndarray, dict[str, Any]]]


def sanitize_box(box: list[float] | np.ndarray, height: int, width: int) -> tuple[np.ndarray | None, str]:
    """Clips an xyxy box to the image.

    Returns:
        (box, status): status is ``"ok"``, ``"clipped"`` (box reached outside the image) or ``"degenerate"``
        (zero or negative width/height after clipping; box is then None).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        return None, "degenerate"
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if cx2 <= cx1 or cy2 <= cy1:
        return None, "degenerate"
    status = "clipped" if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2) else "ok"
    return np.array([cx1, cy1, cx2, cy2], dtype=np.float32), status


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes of uint8/bool masks ``[N, H, W]`` (pixel-edge convention: a one-pixel mask at
    (x, y) gives [x, y, x+1, y+1]; an empty mask gives zeros). torchvision's inclusive-corner version plus
    one on the far corner."""
    masks = np.asarray(masks)
    if masks.size == 0:
        return np.zeros((len(masks), 4), dtype=np.float32)
    boxes = tv_masks_to_boxes(torch.from_numpy(masks.astype(bool, copy=False))).numpy()
    nonempty = masks.reshape(len(masks), -1).any(axis=1)
    boxes[nonempty, 2:] += 1.0
    return boxes.astype(np.float32, copy=False)


def select_instances(target: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    """Indexes every per-instance array of a numpy target with ``keep`` (indices or bool mask)."""
    out = dict(target)
    for key in PER_INSTANCE_KEYS:
        if key in out and out[key] is not None:
            out[key] = out[key][keep]
    return out


def target_to_tensors(target: dict[str, Any]) -> dict[str, Any]:
    """Numpy target → the tensor target models take (dtypes per the module docstring)."""
    dtypes = {"boxes": torch.float32, "labels": torch.int64, "masks": torch.uint8, "sem_seg": torch.int64,
              "iscrowd": torch.int64, "area": torch.float32, "difficult": torch.bool,
              "panoptic_seg": torch.int64}
    out: dict[str, Any] = {}
    for key, value in target.items():
        if key in dtypes:
            array = np.ascontiguousarray(value)
            if key == "boxes":
                array = array.reshape(-1, 4)
            out[key] = torch.as_tensor(array).to(dtypes[key])
        else:
            out[key] = value
    return out


class DetectionDatasetBase(Dataset):
    """Shared ``__getitem__``: load → numpy target → transforms → tensors.

    Subclasses fill ``self.records`` (one dict per image, with at least ``height`` and ``width``), set
    ``self.skipped`` (a Counter of what was dropped while building) and implement ``load_target(index)``;
    ``load`` (image + target + size check) is shared.
    """

    records: list[dict[str, Any]]

    def __init__(self, *, transforms: Transform | None = None) -> None:
        self.transforms = transforms
        self.skipped: collections.Counter[str] = collections.Counter()
        self.summary = ""  # the one-line build report, set by _report

    def __len__(self) -> int:
        return len(self.records)

    def load_target(self, index: int) -> dict[str, Any]:
        """The untransformed numpy target of one item, without decoding its image."""
        raise NotImplementedError

    def _item_name(self, record: dict[str, Any]) -> str:
        """How error messages name an item (besides its index and file)."""
        return f"image id {record.get('image_id')}"

    def _expected_size(self, record: dict[str, Any], target: dict[str, Any]) -> tuple[tuple[int, int], str]:
        """``((height, width), what says so)`` that the decoded image must match."""
        return (int(record["height"]), int(record["width"])), "its annotation"

    def load(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Returns the untransformed ``(image uint8 [H, W, 3], numpy target)`` for one item: the image of
        ``records[index]["path"]``, the target of :meth:`load_target`, and a check that their sizes agree."""
        record = self.records[index]
        try:
            image = read_image(record["path"])
        except ImageReadError as err:
            raise ImageReadError(f"{type(self).__name__}[{index}] ({self._item_name(record)}): {err}") from err
        target = self.load_target(index)
        (height, width), source = self._expected_size(record, target)
        if image.shape[:2] != (height, width):
            raise ImageReadError(f"{record['path']!r} is {image.shape[0]}x{image.shape[1]} (HxW) but {source} says "
                                 f"{height}x{width}")
        if "sem_seg" in target:
            self._check_sem_seg(record, target["sem_seg"])
        return image, target

    def _sem_seg_file(self, record: dict[str, Any]) -> str:
        """The file an item's semantic labels come from (named in errors)."""
        return record["path"]

    def _check_sem_seg(self, record: dict[str, Any], sem_seg: np.ndarray) -> None:
        """Raise naming the label file when a semantic label is outside ``0..num_classes-1`` and not ignored
        (a dataset whose ``sem_seg`` classes are not its ``num_classes`` says so in ``num_sem_seg_classes``)."""
        num_classes = getattr(self, "num_sem_seg_classes", getattr(self, "num_classes", None))
        if num_classes is None:
            return
        bad = (sem_seg != IGNORE_LABEL) & ((sem_seg < 0) | (sem_seg >= num_classes))
        if bad.any():
            values = np.unique(sem_seg[bad])
            raise ValueError(f"{self._sem_seg_file(record)!r}: semantic label(s) {values[:8].tolist()} at "
                             f"{int(bad.sum())} pixels, expected 0..{num_classes - 1} or {IGNORE_LABEL} (ignored)")

    def get_image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of an item's image from the annotations, without reading the image."""
        record = self.records[index]
        return int(record["height"]), int(record["width"])

    def get_annotation(self, index: int) -> dict[str, torch.Tensor]:
        """The untransformed target in original image pixels (for evaluation), without image decoding."""
        return target_to_tensors(self.load_target(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        image, target = self.load(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image_to_tensor(image), target_to_tensors(target)

    def _report(self, name: str, *, images: int, instances: int | None, extra: dict[str, int] | None = None) -> None:
        """Logs the one-line build summary, with every counted skip."""
        parts = [f"{name}: {images} images" + ("" if instances is None else f", {instances} instances")]
        if extra:
            parts += [f"{k}={v}" for k, v in extra.items()]
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
            logger.warning("; ".join(parts))
        else:
            logger.info("; ".join(parts))
        self.summary = "; ".join(parts)
