"""Training and test pipelines on albumentations, applied jointly to image, boxes, masks and semantic map.

A pipeline is a callable ``(image np.uint8 [H, W, 3], numpy target) -> (image, target)`` (see
``resdet.data.base`` for the target layout); datasets convert the result to tensors. Normalization stays in
the model. Instances whose box leaves the image or shrinks below ``min_box_size`` are dropped together with
their labels, masks and other per-instance entries, so all per-instance arrays stay index-aligned.

Semantic maps travel through albumentations shifted by one (255 → 0) so that padding with 0 pads with
"ignore"; they come back unshifted.
"""
from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch.utils.data

from .base import IGNORE_LABEL, masks_to_boxes, select_instances

__all__ = ["ResizeShortestEdge", "DetectionTransforms", "build_transforms", "ClassificationTransforms",
           "build_classification_transforms"]


class ResizeShortestEdge(A.DualTransform):
    """Resizes so the shorter side equals one of ``min_sizes`` (chosen at random per call), unless that
    makes the longer side exceed ``max_size``, in which case the longer side becomes ``max_size``.

    Built on albumentations' public ``DualTransform`` only (image bilinear, masks nearest; boxes travel in
    albumentations' normalised coordinates, which a resize leaves unchanged).

    Args:
        min_sizes: candidate shorter-side lengths, or None to only cap the longer side (never upscaling).
        max_size: cap on the longer side, or None.
    """

    def __init__(self, min_sizes: Sequence[int] | None, max_size: int | None = None, *, p: float = 1.0) -> None:
        if min_sizes is None and max_size is None:
            raise ValueError("ResizeShortestEdge needs min_sizes or max_size")
        super().__init__(p=p)
        self.min_sizes = None if min_sizes is None else list(min_sizes)
        self.max_size = max_size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        scale = 1.0 if self.min_sizes is None else self.py_random.choice(self.min_sizes) / min(height, width)
        if self.max_size is not None and scale * max(height, width) > self.max_size:
            scale = self.max_size / max(height, width)
        # cv2 takes (width, height); int() truncates as albumentations' own scale transforms do.
        return {"size": (max(1, int(width * scale)), max(1, int(height * scale)))}

    def apply(self, img: np.ndarray, size: tuple[int, int] = (0, 0), **params: Any) -> np.ndarray:
        return img if img.shape[1::-1] == size else cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int] = (0, 0), **params: Any) -> np.ndarray:
        return mask if mask.shape[1::-1] == size else cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)

    def apply_to_masks(self, masks: np.ndarray, size: tuple[int, int] = (0, 0), **params: Any) -> np.ndarray:
        return np.stack([self.apply_to_mask(m, size) for m in masks]) if len(masks) else masks

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalised coordinates

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_sizes", "max_size")


class DetectionTransforms:
    """Runs an albumentations pipeline on a numpy (image, target) pair.

    Args:
        transforms: albumentations transforms, applied in order.
        min_box_size: boxes narrower or shorter than this (pixels) after the pipeline are dropped.
        recompute_boxes: after the pipeline, set each box to its mask's tight box (when masks are present),
            as detectron2 does after cropping: a clipped box of a non-convex object can be far larger than
            the visible part of the object.
    """

    def __init__(self, transforms: Sequence[A.BasicTransform], *, min_box_size: float = 1.0,
                 recompute_boxes: bool = False) -> None:
        self.min_box_size = float(min_box_size)
        self.recompute_boxes = recompute_boxes
        # NoOp keeps albumentations' box filtering (min size) running when the pipeline is empty.
        self.compose = A.Compose(list(transforms) or [A.NoOp()], bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["instance_index"], min_width=self.min_box_size,
            min_height=self.min_box_size, clip=True, filter_invalid_bboxes=True))
        self._seeded_worker: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.compose.transforms!r}, min_box_size={self.min_box_size})"

    def set_seed(self, seed: int) -> None:
        """Seeds the random state of every transform."""
        self.compose.set_random_seed(seed % 2**32)

    def _seed_for_worker(self) -> None:
        # Forked DataLoader workers inherit one random state; give each worker its own once.
        info = torch.utils.data.get_worker_info()
        if info is not None and self._seeded_worker != info.id:
            self.set_seed(info.seed)
            self._seeded_worker = info.id

    def __call__(self, image: np.ndarray, target: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        self._seed_for_worker()
        boxes = np.asarray(target.get("boxes", np.zeros((0, 4))), dtype=np.float32).reshape(-1, 4)
        data: dict[str, Any] = {"image": image, "bboxes": boxes, "instance_index": np.arange(len(boxes))}
        masks = target.get("masks")
        if masks is not None and len(masks):
            data["masks"] = np.asarray(masks, dtype=np.uint8)
        sem_seg = target.get("sem_seg")
        if sem_seg is not None:
            if sem_seg.max(initial=0) > IGNORE_LABEL or sem_seg.min(initial=0) < 0:
                raise ValueError(f"sem_seg values must lie in 0..255, got {sem_seg.min()}..{sem_seg.max()}")
            data["mask"] = ((sem_seg + 1) % 256).astype(np.uint8)  # 255 (ignore) -> 0 so padding ignores
        out = self.compose(**data)
        image = out["image"]
        height, width = image.shape[:2]
        keep = np.asarray(out["instance_index"], dtype=np.int64).reshape(-1)
        new = select_instances({k: v for k, v in target.items() if k not in ("masks", "sem_seg")}, keep)
        new["boxes"] = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        if masks is not None:
            new["masks"] = (np.asarray(out["masks"], dtype=np.uint8)[keep] if len(masks)
                            else np.zeros((0, height, width), dtype=np.uint8))
            visible = new["masks"].any(axis=(1, 2))
            if self.recompute_boxes:
                new["boxes"] = masks_to_boxes(new["masks"])
                sizes = new["boxes"][:, 2:] - new["boxes"][:, :2]
                visible &= (sizes >= self.min_box_size).all(axis=1)
            new = select_instances(new, visible)  # an instance whose mask left the image goes too
            if "area" in new:
                new["area"] = new["masks"].sum(axis=(1, 2)).astype(np.float32)
        elif "area" in new:
            b = new["boxes"]
            new["area"] = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float32)
        if sem_seg is not None:
            new["sem_seg"] = (out["mask"].astype(np.int64) - 1) % 256
        return image, new


def _sizes(min_size: int | Sequence[int] | None) -> list[int] | None:
    if min_size is None:
        return None
    sizes = [int(min_size)] if isinstance(min_size, (int, float)) else [int(s) for s in min_size]
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"min_size must be a positive int or a non-empty sequence of them, got {min_size!r}")
    return sizes


def build_transforms(*, train: bool, min_size: int | Sequence[int] | None = None, max_size: int | None = None,
                     hflip_prob: float = 0.5, color_jitter: float = 0.0, random_crop: bool = False,
                     large_scale_jitter: tuple[float, float] | None = None,
                     min_box_size: float = 1.0) -> DetectionTransforms:
    """Builds the train or test pipeline.

    Order: bbox-safe random crop → resize (shortest edge, multi-scale choice, longest-edge cap) or large-scale
    jitter → horizontal flip → colour jitter. At test time only the resize is kept (largest ``min_size``).

    Args:
        train: training pipeline (random ops) or test pipeline (deterministic resize only).
        min_size: shorter-side length, or candidates drawn per image; None keeps the size (the model resizes).
        max_size: cap on the longer side; also the square output side of large-scale jitter.
        hflip_prob: probability of a horizontal flip.
        color_jitter: strength of brightness/contrast/saturation jitter (hue a quarter of it); 0 disables.
        random_crop: with probability 0.5 crop a random region that keeps every box (``BBoxSafeRandomCrop``).
        large_scale_jitter: (low, high) scale range: resize the longer side to the output side times a
            random scale, then pad/crop to a square of that side (boxes cut by the crop are clipped or
            dropped, and boxes recomputed from masks).
        min_box_size: boxes smaller than this (pixels) on either side after the pipeline are dropped.
    """
    sizes = _sizes(min_size)
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must lie in [0, 1], got {hflip_prob}")
    if color_jitter < 0:
        raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
    ops: list[A.BasicTransform] = []
    if not train:
        if sizes is not None or max_size is not None:
            ops.append(ResizeShortestEdge(None if sizes is None else [max(sizes)], max_size))
        return DetectionTransforms(ops, min_box_size=min_box_size)
    if random_crop:
        ops.append(A.BBoxSafeRandomCrop(erosion_rate=0.0, p=0.5))
    if large_scale_jitter is not None:
        low, high = (float(v) for v in large_scale_jitter)
        if not 0 < low <= high:
            raise ValueError(f"large_scale_jitter must be (low, high) with 0 < low <= high, got {large_scale_jitter}")
        side = max_size if max_size is not None else (max(sizes) if sizes else None)
        if side is None:
            raise ValueError("large_scale_jitter needs max_size (or min_size) for the output side")
        ops += [A.LongestMaxSize(max_size=side, p=1.0),
                A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0),
                A.PadIfNeeded(min_height=side, min_width=side, position="top_left",
                              border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0),
                A.RandomCrop(height=side, width=side, p=1.0)]
    elif sizes is not None or max_size is not None:
        ops.append(ResizeShortestEdge(sizes, max_size))
    if hflip_prob > 0:
        ops.append(A.HorizontalFlip(p=hflip_prob))
    if color_jitter > 0:
        ops.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                 hue=min(color_jitter / 4, 0.5), p=0.8))
    return DetectionTransforms(ops, min_box_size=min_box_size,
                               recompute_boxes=random_crop or large_scale_jitter is not None)


class ClassificationTransforms:
    """Runs an albumentations pipeline on the image of a classification item; the target passes unchanged.

    Same interface as :class:`DetectionTransforms` (``set_seed``, per-worker reseeding), so the trainer's
    seeded, resumable data order covers it too.
    """

    def __init__(self, transforms: Sequence[A.BasicTransform]) -> None:
        self.compose = A.Compose(list(transforms) or [A.NoOp()])
        self._seeded_worker: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.compose.transforms!r})"

    def set_seed(self, seed: int) -> None:
        """Seeds the random state of every transform."""
        self.compose.set_random_seed(seed % 2**32)

    def __call__(self, image: np.ndarray, target: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._seeded_worker != info.id:  # forked workers: one random state each
            self.set_seed(info.seed)
            self._seeded_worker = info.id
        return self.compose(image=image)["image"], target


def build_classification_transforms(*, train: bool, augment: str = "pad_crop", crop_size: int = 32, padding: int = 4,
                                    scale: Sequence[float] = (0.08, 1.0), hflip_prob: float = 0.5
                                    ) -> ClassificationTransforms | None:
    """The training pipeline of an image classifier; None at test time (the model resizes and crops its own
    input in evaluation).

    Args:
        train: training pipeline, or None for testing.
        augment: ``pad_crop``: pad ``padding`` zero pixels on each side and take a random ``crop_size`` square
            (He et al.'s CIFAR augmentation: 4 pixels, 32×32); ``random_resized_crop``: a random area
            ``scale`` and aspect ratio 3/4..4/3 resized to ``crop_size`` (torchvision's ImageNet training);
            ``none``: no crop.
        crop_size: side of the training crop.
        padding: ``pad_crop`` padding on each side.
        scale: ``random_resized_crop`` area range, as fractions of the image.
        hflip_prob: probability of a horizontal flip (after the crop).
    """
    if not train:
        return None
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must lie in [0, 1], got {hflip_prob}")
    ops: list[A.BasicTransform] = []
    if augment == "pad_crop":
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if padding:
            ops.append(A.Pad(padding=padding, fill=0, border_mode=cv2.BORDER_CONSTANT))
        ops.append(A.RandomCrop(height=crop_size, width=crop_size, pad_if_needed=True, fill=0))
    elif augment == "random_resized_crop":
        low, high = (float(v) for v in scale)
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {list(scale)}")
        ops.append(A.RandomResizedCrop(size=(crop_size, crop_size), scale=(low, high), ratio=(3 / 4, 4 / 3),
                                       interpolation=cv2.INTER_LINEAR))
    elif augment != "none":
        raise ValueError(f"augment must be 'pad_crop', 'random_resized_crop' or 'none', got {augment!r}")
    if hflip_prob > 0:
        ops.append(A.HorizontalFlip(p=hflip_prob))
    return ClassificationTransforms(ops)
