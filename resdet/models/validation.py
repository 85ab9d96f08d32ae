"""Input checks of every resdet model, run once at the model's boundary (``forward``) before any computation.

Each raises :class:`InvalidInput` (a ``ValueError``) naming the image index and the bad value; the
training loop adds the dataset's image id to it. The layers behind the boundary
(transforms, RPN, RoI heads, semantic head) trust what passed. Shape shorthand:
    N   images;  C image channels;  H, W size of one image
    G   ground-truth objects of one image;  K classes
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import torch
from torch import Tensor

__all__ = ["InvalidInput", "check_images", "check_detection_targets", "check_sem_seg_targets", "validate_inputs"]


class InvalidInput(ValueError):
    """A model input is invalid: ``what`` is wrong with image ``index`` of the batch (None: the batch)."""

    def __init__(self, index: int | None, what: str) -> None:
        super().__init__(what if index is None else f"image {index}: {what}")
        self.index = index
        self.what = what


def _fail(index: int, what: str) -> NoReturn:
    raise InvalidInput(index, what)


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def check_images(images: Sequence[Tensor], *, in_chans: int) -> None:
    """Checks a list of Tensor[C, H, W] images: floating point, ``in_chans`` channels, not empty, finite.

    Any floating dtype passes (the transforms compute float64 input in float32).
    """
    if isinstance(images, Tensor) or not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a list of Tensor[C, H, W], got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is an empty list; expected at least one Tensor[C, H, W]")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            _fail(i, f"expected a Tensor[C, H, W], got {type(image).__name__}")
        if image.dim() != 3:
            _fail(i, f"expected a Tensor[C, H, W] of rank 3, got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            _fail(i, f"expected a floating point image in [0, 1], got dtype {image.dtype}")
        if image.shape[0] != in_chans:
            _fail(i, f"expected {in_chans} channels, got {image.shape[0]} (shape {tuple(image.shape)})")
        if image.shape[1] == 0 or image.shape[2] == 0:
            _fail(i, f"empty image of shape {tuple(image.shape)}")
    # One reduction per image, one host sync for the batch; the pixels are scanned only on failure. A sum is
    # NaN/inf exactly when a pixel is (or when it overflows, which the scan then tells apart) and, unlike
    # isfinite(image).all(), needs no image-sized temporaries (1.3 GiB for an 8000 x 8000 float image).
    finite = torch.isfinite(torch.stack([image.sum().float() for image in images]))
    for i in torch.nonzero(~finite).flatten().tolist():
        bad = int((~torch.isfinite(images[i])).sum())
        if bad:
            _fail(i, f"{bad} of {images[i].numel()} pixel values are NaN/inf")


def _check_target_list(images: Sequence[Tensor], targets: Sequence[dict] | None, *, training: bool) -> bool:
    """Whether there are targets to check; raises if training has none or their count is off."""
    if targets is None:
        if training:
            raise ValueError("targets are required in training mode (model.train()); got None")
        return False
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    return True


def check_detection_targets(
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Tensor]] | None,
    *,
    num_classes: int,
    training: bool,
    require_masks: bool = False,
) -> None:
    """Checks detection targets: ``boxes`` Tensor[G, 4] xyxy (x2 > x1, y2 > y1, finite), ``labels`` int64
    Tensor[G] in 1..num_classes-1, ``masks`` Tensor[G, H, W] of the image size (required when
    ``require_masks`` and ``training``)."""
    if not _check_target_list(images, targets, training=training):
        return
    for i, (image, target) in enumerate(zip(images, targets)):
        if not isinstance(target, dict):
            _fail(i, f"target must be a dict, got {type(target).__name__}")
        for key in ("boxes", "labels"):
            if key not in target:
                _fail(i, f"target is missing '{key}' (keys: {sorted(target)})")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            _fail(i, f"boxes must be a Tensor[G, 4], got {_shape(boxes)}")
        if not boxes.is_floating_point():
            _fail(i, f"boxes must be floating point xyxy pixels, got dtype {boxes.dtype}")
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            _fail(i, f"labels must be a Tensor[G], got {_shape(labels)}")
        if labels.dtype != torch.int64:
            _fail(i, f"labels must be int64, got dtype {labels.dtype}")
        if labels.shape[0] != boxes.shape[0]:
            _fail(i, f"{boxes.shape[0]} boxes but {labels.shape[0]} labels")
        if boxes.numel():
            if not torch.isfinite(boxes).all():
                bad = int(torch.nonzero(~torch.isfinite(boxes).all(dim=1))[0])
                _fail(i, f"box {bad} is not finite: {boxes[bad].tolist()}")
            degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if degenerate.any():
                bad = int(torch.nonzero(degenerate)[0])
                _fail(i, f"box {bad} is degenerate (needs x2 > x1 and y2 > y1): {boxes[bad].tolist()}")
            out_of_range = (labels < 1) | (labels >= num_classes)
            if out_of_range.any():
                bad = int(torch.nonzero(out_of_range)[0])
                _fail(i, f"label {int(labels[bad])} of object {bad} is outside 1..{num_classes - 1}")
        if "masks" in target:
            masks = target["masks"]
            if not isinstance(masks, Tensor) or masks.dim() != 3:
                _fail(i, f"masks must be a Tensor[G, H, W], got {_shape(masks)}")
            if masks.shape[0] != boxes.shape[0]:
                _fail(i, f"{boxes.shape[0]} boxes but {masks.shape[0]} masks")
            if tuple(masks.shape[-2:]) != tuple(image.shape[-2:]):
                _fail(i, f"masks are {tuple(masks.shape[-2:])} but the image is {tuple(image.shape[-2:])}")
        elif require_masks and training:
            _fail(i, "target is missing 'masks' (Tensor[G, H, W] uint8), required to train Mask R-CNN")


def check_sem_seg_targets(
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Tensor]] | None,
    *,
    num_classes: int,
    ignore_index: int,
    training: bool,
) -> None:
    """Checks semantic targets: ``sem_seg`` integer Tensor[H, W] of the image size, values in 0..K-1 or
    ``ignore_index``."""
    if not _check_target_list(images, targets, training=training):
        return
    for i, (image, target) in enumerate(zip(images, targets)):
        if not isinstance(target, dict) or "sem_seg" not in target:
            keys = sorted(target) if isinstance(target, dict) else type(target).__name__
            _fail(i, f"target must be a dict with 'sem_seg', got {keys}")
        sem_seg = target["sem_seg"]
        if not isinstance(sem_seg, Tensor) or sem_seg.is_floating_point() or sem_seg.dtype == torch.bool:
            what = getattr(sem_seg, "dtype", type(sem_seg).__name__)
            _fail(i, f"sem_seg must be an integer Tensor[H, W] of class ids, got {what}")
        if tuple(sem_seg.shape) != tuple(image.shape[-2:]):
            _fail(i, f"sem_seg has shape {tuple(sem_seg.shape)}, expected the image size {tuple(image.shape[-2:])}")
        bad = (sem_seg != ignore_index) & ((sem_seg < 0) | (sem_seg >= num_classes))
        if bool(bad.any()):
            values = sem_seg[bad].unique().tolist()[:10]
            _fail(i, f"sem_seg has labels {values}, expected 0..{num_classes - 1} or {ignore_index} (ignored)")


def validate_inputs(
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Tensor]] | None,
    *,
    num_classes: int,
    in_chans: int,
    training: bool,
    require_masks: bool = False,
) -> None:
    """A detector's inputs: :func:`check_images` then :func:`check_detection_targets`.

    Args:
        images: list of Tensor[C, H, W], floating point in [0, 1].
        targets: per-image dicts with ``boxes``, ``labels`` and, for Mask R-CNN, ``masks``. Required when
            ``training``.
        num_classes: classes including background.
        in_chans: expected C.
        training: whether targets are required.
        require_masks: whether ``masks`` must be present in every target (Mask R-CNN training).
    """
    check_images(images, in_chans=in_chans)
    check_detection_targets(images, targets, num_classes=num_classes, training=training, require_masks=require_masks)
