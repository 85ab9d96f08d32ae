"""Input transform of the detectors: normalize, resize, pad into a batch; map results back.

Numerics follow torchvision's ``GeneralizedRCNNTransform`` exactly (the same resized sizes, computed in
float64 as ``F.interpolate``'s ``recompute_scale_factor`` does, and the same interpolation), so a resdet
detector and a torchvision one see bit-identical input tensors.

The same code runs under ``torch.jit.trace`` / ONNX export: sizes are Python ints in eager mode and
traced 0-dim tensors there (:mod:`resdet.layers.tracing`); the two places that would freeze them (the
resize arithmetic and the batch padding) have a tracing branch.

Shape shorthand:
    N   images in the batch
    H, W      original size of one image
    h, w      size after resizing (shortest side ``min_size``, longest at most ``max_size``)
    Hp, Wp    padded batch size (max over the batch of h, w, rounded up to ``size_divisible``)
    D   detections of one image
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resdet.layers.tracing import is_tracing

__all__ = [
    "DetectionTransform", "ImageBatcher", "resize_boxes", "resized_size", "min_sizes", "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def min_sizes(min_size: int | Sequence[int] | None, max_size: int | None) -> tuple[int, ...] | None:
    """Checks the resize options of a transform; returns ``min_size`` as a tuple (None stays None)."""
    sizes = None if min_size is None else ((min_size,) if isinstance(min_size, int) else tuple(min_size))
    if sizes is not None and (not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes)):
        raise ValueError(f"min_size must be a positive int or a non-empty sequence of them, got {min_size!r}")
    if max_size is not None and max_size <= 0:
        raise ValueError(f"max_size must be positive, got {max_size}")
    return sizes


def resized_size(height: int | Tensor, width: int | Tensor, min_size: int, max_size: int | None) -> tuple:
    """``(h, w)`` of an image of ``height`` × ``width`` resized so its shortest side is ``min_size`` and its
    longest at most ``max_size`` (None: no cap).

    ``h = floor(height * scale)`` with ``scale = min(min_size / min(H, W), max_size / max(H, W))`` in
    float64, as ``F.interpolate(scale_factor=scale, recompute_scale_factor=True)`` sizes its output.
    Python ints give Python ints; traced 0-dim int64 sizes give 0-dim int64 tensors, by the same float64
    arithmetic in torch ops.
    """
    if isinstance(height, Tensor):  # traced sizes: keep them symbolic
        hf, wf = height.to(torch.float64), width.to(torch.float64)
        scale = min_size / torch.minimum(hf, wf)
        if max_size is not None:
            scale = torch.minimum(scale, max_size / torch.maximum(hf, wf))
        return torch.floor(hf * scale).to(torch.int64), torch.floor(wf * scale).to(torch.int64)
    scale = min_size / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scales ``boxes`` (Tensor[D, 4], xyxy) from an image of ``original_size`` (h, w) to ``new_size``.

    Sizes are ints, or traced 0-dim tensors (they stay symbolic)."""
    # Ratios computed as float32 tensors, as torchvision does, so rounding is identical.
    def ratio(new: int | Tensor, old: int | Tensor) -> Tensor:
        f32 = dict(dtype=torch.float32, device=boxes.device)
        return torch.as_tensor(new, **f32) / torch.as_tensor(old, **f32)

    ratio_h, ratio_w = ratio(new_size[0], original_size[0]), ratio(new_size[1], original_size[1])
    return boxes * torch.stack((ratio_w, ratio_h, ratio_w, ratio_h))


class ImageBatcher(nn.Module):
    """What every model's input transform shares: per-channel normalization and padding into a batch.

    Args:
        image_mean: per-channel mean subtracted from images in [0, 1].
        image_std: per-channel standard deviation images are divided by.
        size_divisible: the padded batch height and width are multiples of this.
        channels_last: pad into ``torch.channels_last`` memory format (faster convolutions on CPU with
            oneDNN).
    """

    def __init__(
        self,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        size_divisible: int,
        *,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if len(image_mean) != len(image_std):
            raise ValueError(f"image_mean {tuple(image_mean)} and image_std {tuple(image_std)} differ in length")
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.size_divisible = int(size_divisible)
        self.channels_last = channels_last

    @property
    def in_chans(self) -> int:
        """Number of image channels the normalization expects."""
        return len(self.image_mean)

    def normalize(self, image: Tensor) -> Tensor:
        """(image - mean) / std per channel of a Tensor[C, H, W].

        float64 images (numpy's default, e.g. ``torch.from_numpy(array / 255)``) are computed in
        float32, the precision of the model's weights: the values are valid, only more precise than the
        convolutions take, so the transform converts them instead of failing.
        """
        if image.dtype == torch.float64:
            image = image.float()
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        # [C] -> [C, 1, 1] to broadcast over H, W; in place on the difference: one image-sized temporary
        return (image - mean[:, None, None]).div_(std[:, None, None])

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Pads Tensor[C, h, w] images bottom-right with zeros into one Tensor[N, C, Hp, Wp], Hp and Wp the
        largest h and w rounded up to a multiple of ``size_divisible``."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if is_tracing():
            return self._batch_traced(images).contiguous(memory_format=memory_format)
        c = images[0].shape[0]
        stride = float(self.size_divisible)
        hp = int(math.ceil(max(im.shape[-2] for im in images) / stride) * stride)
        wp = int(math.ceil(max(im.shape[-1] for im in images) / stride) * stride)
        batch = images[0].new_zeros((len(images), c, hp, wp)).contiguous(memory_format=memory_format)
        for i, im in enumerate(images):
            batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        return batch

    def _batch_traced(self, images: list[Tensor]) -> Tensor:
        """:meth:`batch_images` with symbolic sizes: each image padded by ``F.pad``, then stacked."""
        d = self.size_divisible
        hp = functools.reduce(torch.maximum, [im.shape[-2] for im in images])
        wp = functools.reduce(torch.maximum, [im.shape[-1] for im in images])
        hp, wp = (hp + d - 1) // d * d, (wp + d - 1) // d * d
        # Pad amounts (left, right, top, bottom) of the last two dims.
        return torch.stack([F.pad(im, (0, wp - im.shape[-1], 0, hp - im.shape[-2])) for im in images])


class DetectionTransform(ImageBatcher):
    """Normalizes, resizes and pads images (and resizes targets) for a detector.

    Args:
        min_size: target length of the shortest side; a sequence means one value is drawn at random per
            image in training (multi-scale training) and the last one is used in evaluation.
        max_size: cap on the longest side after resizing.
        image_mean: per-channel mean subtracted from images in [0, 1].
        image_std: per-channel standard deviation images are divided by.
        size_divisible: the padded batch height and width are multiples of this.
        channels_last: return the padded batch in ``torch.channels_last`` memory format (faster
            convolutions on CPU with oneDNN).
        paste_masks: paste ``masks`` into full-size images in :meth:`postprocess` (torchvision's
            contract). False keeps the compact form, Tensor[D, 1, M, M] probabilities over each detection's
            box, for code that pastes them itself (``resdet.layers.mask_paste``): D full-size masks of a
            huge image need D × H × W floats. Settable on a built model: ``model.transform.paste_masks``.
    """

    def __init__(
        self,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 32,
        *,
        channels_last: bool = False,
        paste_masks: bool = True,
    ) -> None:
        super().__init__(image_mean, image_std, size_divisible, channels_last=channels_last)
        self.min_size = min_sizes(min_size, max_size)
        self.max_size = int(max_size)
        self.paste_masks = paste_masks

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Returns the padded batch Tensor[N, C, Hp, Wp], the resized sizes (h, w) and resized targets.

        Targets are shallow-copied; the caller's dicts are not modified.
        """
        resized: list[Tensor] = []
        new_targets: list[dict[str, Tensor]] | None = [] if targets is not None else None
        for i, image in enumerate(images):
            image = self.normalize(image)
            size = self._choose_min_size()
            target = dict(targets[i]) if targets is not None else None
            image, target = self.resize(image, size, target)
            resized.append(image)
            if new_targets is not None:
                new_targets.append(target)
        image_sizes = [(im.shape[-2], im.shape[-1]) for im in resized]  # ints (traced: 0-dim tensors)
        return self.batch_images(resized), image_sizes, new_targets

    def _choose_min_size(self) -> int:
        if not self.training or len(self.min_size) == 1:
            return self.min_size[-1]
        # torch's RNG (not Python's) so seeding torch makes multi-scale training reproducible.
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(
        self, image: Tensor, min_size: int, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Resizes one normalized image Tensor[C, H, W] (and its target) so the shortest side is ``min_size``."""
        h, w = image.shape[-2:]
        size = resized_size(h, w, min_size, self.max_size)
        # [C, H, W] -> [1, C, H, W] for interpolate, then back.
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, None
        if "masks" in target:
            masks = target["masks"]
            # [M, H, W] -> [M, 1, H, W] (nearest), then drop the channel again.
            masks = F.interpolate(masks[:, None].float(), size=size)
            target["masks"] = masks[:, 0].byte()
        target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        return image, target

    def postprocess(
        self,
        results: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Maps detections from the resized frame back to original pixels; pastes masks at full size.

        ``masks`` come in as Tensor[D, 1, 28, 28] probabilities and leave as Tensor[D, 1, H, W] (as they
        came, over each box, when ``paste_masks`` is False). Sizes are ints, or traced 0-dim tensors.
        """
        from resdet.layers.mask_paste import paste_masks

        for result, size, original in zip(results, image_sizes, original_sizes):
            boxes = resize_boxes(result["boxes"], size, original)
            result["boxes"] = boxes
            if "masks" in result and self.paste_masks:
                result["masks"] = paste_masks(result["masks"], boxes, original)
        return results

    def extra_repr(self) -> str:
        return (
            f"min_size={self.min_size}, max_size={self.max_size}, mean={self.image_mean}, std={self.image_std}, "
            f"size_divisible={self.size_divisible}, channels_last={self.channels_last}"
        )
