"""Input transform of Panoptic FPN: resize (optionally rescale and crop in training) images, instance targets
and semantic maps together; map detections and semantic logits back to original pixels.

Shape shorthand:
    N       images in the batch;  C image channels
    H, W    original size of one image;  h, w  its size after resizing (and cropping)
    Hp, Wp  padded batch size (max h, w rounded up to ``size_divisible``)
    G       ground-truth instances of one image;  K semantic classes

Without ``scale_range`` and ``crop_size`` the resize is the detectors' (torchvision's arithmetic: shortest
side ``min_size``, longest at most ``max_size``, one ``min_size`` drawn per training image), so a COCO
recipe sees the same input as Mask R-CNN. With them (Cityscapes crop training) a training image is further
rescaled by a factor drawn from ``scale_range`` and a random ``crop_size`` window is cut; instance boxes are
then recomputed from the cropped masks and instances left without a pixel are dropped, as detectron2 does
after cropping.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from resdet.layers.mask_paste import paste_masks

from .transform import IMAGENET_MEAN, IMAGENET_STD, ImageBatcher, min_sizes, resize_boxes

__all__ = ["PanopticTransform", "boxes_from_masks"]


def boxes_from_masks(masks: Tensor) -> Tensor:
    """Tight xyxy boxes (pixel edges: a one-pixel mask at (x, y) gives [x, y, x+1, y+1]) of masks
    Tensor[G, h, w]; zeros for an empty mask."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [G, h], [G, w]
    h, w = masks.shape[-2:]
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ys, h).min(dim=1).values
    y2 = torch.where(rows, ys, -1).max(dim=1).values + 1
    x1 = torch.where(cols, xs, w).min(dim=1).values
    x2 = torch.where(cols, xs, -1).max(dim=1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(rows.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


class PanopticTransform(ImageBatcher):
    """Normalizes, resizes and pads images with their instance targets and semantic maps.

    Args:
        min_size: shortest side after resizing; a sequence draws one per training image (the last is used
            in evaluation).
        max_size: cap on the longest side.
        scale_range: training only: (low, high) factor drawn per image on top of that resize.
        crop_size: training only: (height, width) of a random crop taken from the rescaled image (an image
            smaller than the crop is kept whole; padding fills semantic maps with ``ignore_index``).
        image_mean, image_std: normalization.
        size_divisible: padded batch height and width are multiples of this.
        ignore_index: semantic value of padding.
    """

    def __init__(self, *, min_size: int | Sequence[int] = 800, max_size: int = 1333,
                 scale_range: Sequence[float] | None = None, crop_size: Sequence[int] | None = None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 size_divisible: int = 32, ignore_index: int = 255) -> None:
        super().__init__(image_mean, image_std, size_divisible)
        sizes = min_sizes(min_size, max_size)
        if sizes is None:
            raise ValueError("min_size is required (use a min_size/max_size pair that keeps the image size, e.g. "
                             "1024/2048 for Cityscapes)")
        if scale_range is not None and (len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]):
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) <= 0):
            raise ValueError(f"crop_size must be (height, width) > 0, got {crop_size!r}")
        self.min_size = sizes
        self.max_size = int(max_size)
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.ignore_index = ignore_index

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        # torch's RNG (not Python's): seeding torch makes training augmentation reproducible.
        return float(torch.empty(1).uniform_(low, high).item())

    def _scale(self, h: int, w: int) -> float:
        if not self.training or len(self.min_size) == 1:
            size = self.min_size[-1]
        else:
            size = self.min_size[int(self._uniform(0.0, float(len(self.min_size))))]
        scale = min(size / min(h, w), self.max_size / max(h, w))
        if self.training and self.scale_range is not None:
            scale *= self._uniform(*self.scale_range)
        return scale

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None, Tensor | None]:
        """Returns the batch Tensor[N, C, Hp, Wp], the resized sizes (h, w), the resized instance targets
        (``boxes``, ``labels``, ``masks``) and the padded semantic targets Tensor[N, Hp, Wp] (None without
        targets). The caller's dicts are not modified."""
        resized, new_targets, maps = [], [], []
        for i, image in enumerate(images):
            target = None if targets is None else targets[i]
            image, target = self._one(image, target)
            resized.append(image)
            if target is not None:
                maps.append(target.pop("sem_seg"))
                new_targets.append(target)
        image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in resized]
        batch = self.batch_images(resized)
        if targets is None:
            return batch, image_sizes, None, None
        sem = torch.full((len(maps), *batch.shape[-2:]), self.ignore_index, dtype=torch.int64, device=batch.device)
        for i, m in enumerate(maps):
            sem[i, : m.shape[-2], : m.shape[-1]].copy_(m)
        return batch, image_sizes, new_targets, sem

    def _one(self, image: Tensor, target: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """One image Tensor[C, H, W] and its target: normalize, rescale, crop (training)."""
        h, w = int(image.shape[-2]), int(image.shape[-1])
        scale = self._scale(h, w)
        image = self.normalize(image)
        target = None if target is None else dict(target)
        if self.training and self.crop_size is not None:
            # Cut the region of the input that maps onto the crop first, so only it gets resized.
            rh, rw = min(h, math.ceil(self.crop_size[0] / scale)), min(w, math.ceil(self.crop_size[1] / scale))
            if (rh, rw) != (h, w):
                y0 = int(self._uniform(0.0, float(h - rh + 1))) if h > rh else 0
                x0 = int(self._uniform(0.0, float(w - rw + 1))) if w > rw else 0
                image = image[:, y0:y0 + rh, x0:x0 + rw]
                if target is not None:
                    target["masks"] = target["masks"][:, y0:y0 + rh, x0:x0 + rw]
                    target["sem_seg"] = target["sem_seg"][y0:y0 + rh, x0:x0 + rw]
        # [C, H, W] -> [1, C, H, W] for interpolate, then back (torchvision's call and rounding).
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]
        if self.training and self.crop_size is not None:  # ceil above can overshoot the crop by a pixel
            image = image[:, : self.crop_size[0], : self.crop_size[1]]
        if target is None:
            return image, None
        size = tuple(image.shape[-2:])
        masks = target["masks"]
        # [G, H, W] -> [G, 1, H, W] nearest, then drop the channel; cut to the (trimmed) image size.
        masks = F.interpolate(masks[:, None].float(), scale_factor=scale, recompute_scale_factor=True)[:, 0]
        target["masks"] = masks[:, : size[0], : size[1]].byte()
        # [H, W] -> [1, 1, H, W]; nearest keeps class ids and ignore_index intact.
        target["sem_seg"] = F.interpolate(target["sem_seg"][None, None].float(), scale_factor=scale,
                                          recompute_scale_factor=True)[0, 0, : size[0], : size[1]].long()
        if self.training and self.crop_size is not None:
            boxes = boxes_from_masks(target["masks"].bool())
            keep = (boxes[:, 2:] > boxes[:, :2]).all(dim=1)  # an instance cut off by the crop goes
            target = {k: (v[keep] if k in ("boxes", "labels", "masks", "iscrowd", "area") and isinstance(v, Tensor)
                          else v) for k, v in target.items()}
            target["boxes"] = boxes[keep]
        else:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
        return image, target

    def postprocess_detections(self, results: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]],
                               original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections from the resized frame to original pixels; masks Tensor[D, 1, M, M] pasted to
        Tensor[D, 1, H, W] probabilities."""
        for result, size, original in zip(results, image_sizes, original_sizes):
            result["boxes"] = resize_boxes(result["boxes"], size, original)
            if "masks" in result:
                result["masks"] = paste_masks(result["masks"], result["boxes"], original)
        return results

    def postprocess_semantic(self, logits: Tensor, image_sizes: list[tuple[int, int]],
                             original_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Padded logits Tensor[N, K, Hp, Wp] → per image Tensor[K, H, W] at the original size."""
        out = []
        for i, ((h, w), original) in enumerate(zip(image_sizes, original_sizes)):
            x = logits[i: i + 1, :, :h, :w]  # [1, K, h, w], padding cropped off
            if (h, w) != tuple(original):
                x = F.interpolate(x, size=tuple(original), mode="bilinear", align_corners=False)
            out.append(x[0])
        return out

    def extra_repr(self) -> str:
        return (f"min_size={self.min_size}, max_size={self.max_size}, scale_range={self.scale_range}, "
                f"crop_size={self.crop_size}, mean={self.image_mean}, std={self.image_std}, "
                f"size_divisible={self.size_divisible}, ignore_index={self.ignore_index}")
