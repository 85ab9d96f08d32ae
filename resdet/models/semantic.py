"""What resdet's semantic models share: the input transform, whole-image or sliding-window inference,
the per-pixel loss and the model contract.

Shape shorthand:
    N       images in the batch
    K       semantic classes
    H, W    original size of one image
    h, w    size after the (optional) resize
    Hp, Wp  padded batch size (max h, w over the batch rounded up to ``size_divisible``)
    Hc, Wc  sliding-window size (``test_crop_size``, at most Hp, Wp)

Contract of every :class:`SemanticSegmentor` (semantic FPN, DeepLabV3/V3+, FCN): ``model(images, targets)``
in train mode with ``images`` a list of Tensor[3, H, W] in [0, 1] and ``targets[i]["sem_seg"]`` Tensor[H, W]
int64 (class ids 0..K-1, ``ignore_index`` ignored) returns a dict of losses; ``model(images)`` in eval mode
returns per image ``{"sem_seg": Tensor[H, W] int64}`` (plus ``"sem_seg_logits"`` Tensor[K, H, W] when
asked) at the original image size. The model normalizes, resizes and pads its own input.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resdet.layers.sem_seg_loss import sem_seg_cross_entropy
from resdet.layers.tracing import is_tracing

from .transform import IMAGENET_MEAN, IMAGENET_STD, ImageBatcher, min_sizes, resized_size
from .validation import check_images, check_sem_seg_targets

__all__ = ["SemSegTransform", "SemanticSegmentor", "sem_seg_cross_entropy", "sliding_window_logits"]


class SemSegTransform(ImageBatcher):
    """Normalizes, resizes and pads images and semantic maps into a batch; in training optionally
    rescales at random and takes random crops (Cityscapes / VOC crop training).

    Args:
        min_size: Shortest side after resizing; a sequence draws one value per image in training and
            uses the last in evaluation. None: no base resize (the input scale is kept, e.g. full
            1024×2048 Cityscapes images in evaluation).
        max_size: Cap on the longest side after that resize (None: no cap). Only used with ``min_size``.
        scale_range: Training only: (low, high), a factor drawn uniformly per image on top of the base
            resize (mmseg's ``ratio_range``, detectron2's ResizeScale).
        crop_size: Training only: (height, width) of a random crop taken after rescaling; images smaller
            than the crop are kept whole (batch padding fills with ``ignore_index``).
        image_mean: Per-channel mean subtracted from images in [0, 1].
        image_std: Per-channel standard deviation images are divided by.
        size_divisible: Padded batch height and width are multiples of this.
        ignore_index: Value padded semantic maps are filled with.
    """

    def __init__(
        self,
        *,
        min_size: int | Sequence[int] | None = None,
        max_size: int | None = None,
        scale_range: Sequence[float] | None = None,
        crop_size: Sequence[int] | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 32,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(image_mean, image_std, size_divisible)
        sizes = min_sizes(min_size, max_size)
        if scale_range is not None and (len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]):
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) <= 0):
            raise ValueError(f"crop_size must be (height, width) > 0, got {crop_size!r}")
        self.min_size = sizes
        self.max_size = max_size
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.ignore_index = ignore_index

    def forward(
        self, images: list[Tensor], sem_segs: list[Tensor] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], Tensor | None]:
        """Returns the image batch Tensor[N, C, Hp, Wp], resized sizes (h, w), and targets Tensor[N, Hp, Wp]."""
        resized, maps = [], []
        for i, image in enumerate(images):
            sem_seg = sem_segs[i] if sem_segs is not None else None
            image, sem_seg = self._resize_and_crop(image, sem_seg)
            resized.append(self.normalize(image))
            if sem_seg is not None:
                maps.append(sem_seg.long())
        image_sizes = [(im.shape[-2], im.shape[-1]) for im in resized]  # ints (traced: 0-dim tensors)
        batch = self.batch_images(resized)
        hp, wp = batch.shape[-2:]
        targets = None
        if sem_segs is not None:
            targets = torch.full((len(maps), hp, wp), self.ignore_index, dtype=torch.int64, device=batch.device)
            for i, m in enumerate(maps):
                targets[i, : m.shape[-2], : m.shape[-1]].copy_(m)
        return batch, image_sizes, targets

    def _resize_and_crop(self, image: Tensor, sem_seg: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """One image Tensor[C, H, W] (and map Tensor[H, W]): base resize, training rescale and crop."""
        if is_tracing() and not self.training and self.min_size is not None:
            # The eval resize below with symbolic sizes (the same sizes: floor(H * scale) in float64).
            size = resized_size(image.shape[-2], image.shape[-1], self.min_size[-1], self.max_size)
            return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0], None
        scale = self._scale(image.shape[-2:])
        if self.training and self.scale_range is not None:
            scale = (1.0 if scale is None else scale) * self._uniform(*self.scale_range)
        crop = self.crop_size if self.training else None
        if crop is not None:
            # Crop the region of the input that maps onto the crop first, so only it gets resized.
            s = 1.0 if scale is None else scale
            h, w = int(image.shape[-2]), int(image.shape[-1])
            rh, rw = min(h, math.ceil(crop[0] / s)), min(w, math.ceil(crop[1] / s))
            y0 = int(self._uniform(0.0, float(h - rh + 1))) if h > rh else 0
            x0 = int(self._uniform(0.0, float(w - rw + 1))) if w > rw else 0
            image = image[:, y0 : y0 + rh, x0 : x0 + rw]
            sem_seg = None if sem_seg is None else sem_seg[y0 : y0 + rh, x0 : x0 + rw]
        if scale is not None and scale != 1.0:
            # [C, H, W] -> [1, C, H, W] for interpolate, then back.
            image = F.interpolate(
                image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
            )[0]
            if sem_seg is not None:
                # [H, W] -> [1, 1, H, W]; nearest keeps class ids (and ignore_index) intact.
                sem_seg = F.interpolate(sem_seg[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0]
        if crop is not None:  # ceil above can overshoot the crop by a pixel
            image = image[:, : crop[0], : crop[1]]
            sem_seg = None if sem_seg is None else sem_seg[: crop[0], : crop[1]]
        return image, sem_seg

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        # torch's RNG (not Python's) so that seeding torch makes training augmentation reproducible.
        return float(torch.empty(1).uniform_(low, high).item())

    def _scale(self, size: Sequence[int]) -> float | None:
        if self.min_size is None:
            return None
        if not self.training or len(self.min_size) == 1:
            min_size = self.min_size[-1]
        else:
            min_size = self.min_size[int(self._uniform(0.0, float(len(self.min_size))))]
        h, w = int(size[0]), int(size[1])
        scale = min_size / min(h, w)
        if self.max_size is not None:
            scale = min(scale, self.max_size / max(h, w))
        return scale

    def postprocess(
        self, logits: Tensor, image_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Crops padded logits Tensor[N, K, Hp, Wp] and resizes each to Tensor[K, H, W] at original size.

        Sizes are ints, or traced 0-dim tensors."""
        out = []
        for i, ((h, w), original) in enumerate(zip(image_sizes, original_sizes)):
            x = logits[i : i + 1, :, :h, :w]  # [1, K, h, w], padding cropped off
            # A trace cannot compare sizes: it resizes whenever the transform does (eval: min_size set).
            resize = self.min_size is not None if is_tracing() else (h, w) != tuple(original)
            if resize:
                x = F.interpolate(x, size=tuple(original), mode="bilinear", align_corners=False)
            out.append(x[0])
        return out

    def extra_repr(self) -> str:
        return (
            f"min_size={self.min_size}, max_size={self.max_size}, scale_range={self.scale_range}, "
            f"crop_size={self.crop_size}, mean={self.image_mean}, std={self.image_std}, "
            f"size_divisible={self.size_divisible}, ignore_index={self.ignore_index}"
        )


def _windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Start/end of windows of length ``crop`` every ``stride`` covering ``0..size`` (the last one flush
    with the end); one window of ``size`` when the crop is larger."""
    if size <= crop:
        return [(0, size)]
    count = math.ceil((size - crop) / stride) + 1
    return [(min(i * stride, size - crop), min(i * stride, size - crop) + crop) for i in range(count)]


def sliding_window_logits(
    predict: Callable[[Tensor], Tensor], batch: Tensor, crop_size: Sequence[int], stride: Sequence[int]
) -> Tensor:
    """Logits of a padded batch computed window by window, averaged where windows overlap (mmseg's
    ``slide`` inference), so that large images (1024×2048 Cityscapes) fit in memory.

    Args:
        predict: Maps a batch Tensor[N, C, Hc, Wc] to logits Tensor[N, K, Hc, Wc].
        batch: Normalized, padded Tensor[N, C, Hp, Wp].
        crop_size: Window (height, width); a window is cut to the batch where the batch is smaller.
        stride: Step (height, width) between windows; the last window of a row or column is placed flush
            with the batch's edge.

    Returns:
        Logits Tensor[N, K, Hp, Wp].
    """
    hp, wp = int(batch.shape[-2]), int(batch.shape[-1])
    logits: Tensor | None = None
    count = batch.new_zeros((1, 1, hp, wp))
    for y0, y1 in _windows(hp, int(crop_size[0]), int(stride[0])):
        for x0, x1 in _windows(wp, int(crop_size[1]), int(stride[1])):
            out = predict(batch[:, :, y0:y1, x0:x1])  # [N, K, y1 - y0, x1 - x0]
            if logits is None:
                logits = out.new_zeros((batch.shape[0], out.shape[1], hp, wp))
            logits[:, :, y0:y1, x0:x1] += out
            count[:, :, y0:y1, x0:x1] += 1
    assert logits is not None
    return logits / count


class SemanticSegmentor(nn.Module):
    """Base of the semantic models: checks inputs, runs the transform, predicts whole images or by sliding
    window, maps logits back to the original pixels. See the module docstring for the contract.

    Subclasses implement :meth:`predict_logits` and :meth:`compute_losses` on the padded batch.

    Args:
        transform: Normalizes/resizes/pads input; maps logits back to the original size.
        ignore_index: Target value excluded from the loss.
        return_logits: Add ``"sem_seg_logits"`` (Tensor[K, H, W]) to every eval output by default.
        test_crop_size: Evaluation by sliding window of this (height, width), multiples of the
            transform's ``size_divisible``; None: whole images.
        test_stride: Step of the sliding window (default: two thirds of ``test_crop_size``).
    """

    def __init__(
        self,
        transform: SemSegTransform,
        *,
        ignore_index: int = 255,
        return_logits: bool = False,
        test_crop_size: Sequence[int] | None = None,
        test_stride: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.ignore_index = ignore_index
        self.return_logits = return_logits
        self.test_crop_size: tuple[int, int] | None = None
        self.test_stride: tuple[int, int] | None = None
        self.set_sliding_window(test_crop_size, test_stride)

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def set_sliding_window(self, crop_size: Sequence[int] | None, stride: Sequence[int] | None = None) -> None:
        """Evaluate by windows of ``crop_size`` (height, width) every ``stride``; None: whole images."""
        if crop_size is None:
            if stride is not None:
                raise ValueError("test_stride needs test_crop_size")
            self.test_crop_size = self.test_stride = None
            return
        div = self.transform.size_divisible
        if len(crop_size) != 2 or any(int(c) <= 0 or int(c) % div for c in crop_size):
            raise ValueError(f"test_crop_size must be (height, width), positive multiples of size_divisible={div}, "
                             f"got {crop_size!r}")
        crop = (int(crop_size[0]), int(crop_size[1]))
        step = (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3)) if stride is None else tuple(int(s) for s in stride)
        if len(step) != 2 or any(s <= 0 or s > c for s, c in zip(step, crop)):
            raise ValueError(f"test_stride must be (height, width) in 1..test_crop_size={crop} (larger steps leave "
                             f"pixels unseen), got {stride!r}")
        self.test_crop_size, self.test_stride = crop, (step[0], step[1])

    def predict_logits(self, batch: Tensor) -> Tensor:
        """Logits Tensor[N, K, Hp, Wp] of a normalized, padded batch Tensor[N, C, Hp, Wp]."""
        raise NotImplementedError

    def compute_losses(self, batch: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Training losses of a batch Tensor[N, C, Hp, Wp] against targets Tensor[N, Hp, Wp]."""
        raise NotImplementedError

    def inference_logits(self, batch: Tensor) -> Tensor:
        """:meth:`predict_logits` on the whole batch, or window by window when a test crop is set."""
        if self.test_crop_size is None:
            return self.predict_logits(batch)
        assert self.test_stride is not None
        return sliding_window_logits(self.predict_logits, batch, self.test_crop_size, self.test_stride)

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        *,
        return_logits: bool | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training, per-image class maps in evaluation (see the module docstring)."""
        check_images(images, in_chans=self.transform.in_chans)
        check_sem_seg_targets(images, targets, num_classes=self.num_classes, ignore_index=self.ignore_index,
                              training=self.training)
        if self.training:
            assert targets is not None
            batch, _, padded_targets = self.transform(images, [t["sem_seg"] for t in targets])
            assert padded_targets is not None
            return self.compute_losses(batch, padded_targets)
        original_sizes = [(im.shape[-2], im.shape[-1]) for im in images]  # ints (traced: 0-dim tensors)
        batch, image_sizes, _ = self.transform(images)
        logits = self.inference_logits(batch)
        want_logits = self.return_logits if return_logits is None else return_logits
        results = []
        for x in self.transform.postprocess(logits, image_sizes, original_sizes):
            result = {"sem_seg": x.argmax(dim=0)}  # [K, H, W] -> [H, W] int64
            if want_logits:
                result["sem_seg_logits"] = x
            results.append(result)
        return results

    def extra_repr(self) -> str:
        if self.test_crop_size is None:
            return "test: whole images"
        return f"test: sliding window {self.test_crop_size}, stride {self.test_stride}"
