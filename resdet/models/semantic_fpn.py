"""Semantic FPN: ResNet-FPN backbone + Panoptic-FPN semantic branch, with its own input transform.

Shape shorthand:
    N       images in the batch
    K       semantic classes
    H, W    original size of one image
    h, w    size after the (optional) resize
    Hp, Wp  padded batch size (max h, w over the batch rounded up to ``size_divisible``)

The model holds ``self.backbone`` (a ``BackboneWithFPN`` with resdet level names, the same attribute
the detectors use), so ``backbone.body.*`` / ``backbone.fpn.*`` checkpoint keys transfer between a
COCO detector and this model unchanged; ``sem_seg_head.*`` is the task-specific part.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resdet.backbones.fpn import build_resnet_fpn
from resdet.heads.semantic_head import SemanticFPNHead
from resdet.layers.shape_spec import ShapeSpec
from resdet.layers.tracing import is_tracing

from .registry import register_arch
from .transform import IMAGENET_MEAN, IMAGENET_STD, ImageBatcher, min_sizes, resized_size
from .validation import check_images, check_sem_seg_targets

__all__ = ["SemanticFPN", "SemSegTransform", "semantic_fpn"]

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


class SemanticFPN(nn.Module):
    """Backbone with FPN → semantic head, with the input transform in front.

    Args:
        backbone: Returns an ordered dict of FPN levels (p2..p5 at least) for a Tensor[N, 3, Hp, Wp].
        sem_seg_head: The semantic head reading those levels.
        transform: Normalizes/resizes/pads input; maps logits back to the original size.
        return_logits: Add ``"sem_seg_logits"`` (Tensor[K, H, W]) to every eval output by default.

    Train mode: ``model(images, targets)`` with ``targets[i]["sem_seg"]`` Tensor[H, W] int64 (class ids
    0..K-1, ``ignore_index`` ignored) returns ``{"loss_sem_seg": scalar}``. Eval mode: ``model(images)``
    returns per image ``{"sem_seg": Tensor[H, W] int64}`` at the original image size.
    """

    def __init__(
        self,
        backbone: nn.Module,
        sem_seg_head: SemanticFPNHead,
        transform: SemSegTransform,
        *,
        return_logits: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.transform = transform
        self.return_logits = return_logits

    @property
    def num_classes(self) -> int:
        return self.sem_seg_head.num_classes

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        *,
        return_logits: bool | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training, per-image class maps in evaluation (see the class docstring)."""
        check_images(images, in_chans=self.transform.in_chans)
        check_sem_seg_targets(images, targets, num_classes=self.num_classes,
                              ignore_index=self.sem_seg_head.ignore_index, training=self.training)
        sem_segs = [t["sem_seg"] for t in targets] if self.training and targets is not None else None
        original_sizes = [(im.shape[-2], im.shape[-1]) for im in images]  # ints (traced: 0-dim tensors)
        batch, image_sizes, padded_targets = self.transform(images, sem_segs)
        features = self.backbone(batch)
        logits, losses = self.sem_seg_head(features, padded_targets)
        if self.training:
            return losses
        want_logits = self.return_logits if return_logits is None else return_logits
        results = []
        for x in self.transform.postprocess(logits, image_sizes, original_sizes):
            result = {"sem_seg": x.argmax(dim=0)}  # [K, H, W] -> [H, W] int64
            if want_logits:
                result["sem_seg_logits"] = x
            results.append(result)
        return results


@register_arch("semantic_fpn", task="semantic",
               renamed={"fpn_channels": "fpn_out_channels", "backbone_weights": "weights"})
def semantic_fpn(
    backbone: str = "resnet34",
    num_classes: int = 19,
    *,
    # backbone (resdet.backbones.ResNet options), named as in faster_rcnn / mask_rcnn
    weights: str | None = None,
    frozen_stages: int | None = None,
    trainable_layers: int | None = None,
    norm: str | None = None,
    norm_eval: bool = False,
    zero_init_residual: bool = False,
    output_stride: int = 32,
    with_cp: bool | Sequence[bool] = False,
    # FPN
    fpn_out_channels: int = 256,
    fpn_norm: str | None = None,
    # semantic head
    conv_dims: int = 128,
    head_norm: str | None = "gn",
    common_stride: int = 4,
    loss_weight: float = 1.0,
    ignore_index: int = 255,
    # input transform
    min_size: int | Sequence[int] | None = None,
    max_size: int | None = None,
    scale_range: Sequence[float] | None = None,
    crop_size: Sequence[int] | None = None,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    size_divisible: int = 32,
    return_logits: bool = False,
) -> SemanticFPN:
    """Builds a semantic FPN on a ResNet-FPN backbone (Panoptic FPN's semantic branch).

    Backbone and FPN options carry the detectors' names, so ``backbone.*`` checkpoint keys and options
    transfer between them (``fpn_channels`` / ``backbone_weights`` were renamed ``fpn_out_channels`` /
    ``weights``).

    Args:
        backbone: ResNet name (``resnet18`` ... ``resnet152``, ``resnext50_32x4d``, ...).
        num_classes: Semantic classes K (19 for Cityscapes, 21 for VOC with background).
        weights: ImageNet checkpoint (torchvision/timm) for the ResNet body.
        frozen_stages: ResNet stages frozen (0 none, 1 stem, k stem + k-1 stages); default 2 with
            ``weights``, else 0.
        trainable_layers: torchvision's spelling of ``frozen_stages`` (5 trainable = 0 frozen ...
            0 trainable = 5 frozen); give one or the other.
        norm: Backbone norm (``bn``, ``frozen_bn``, ``sync_bn``, ``gn``); default ``frozen_bn`` with
            ``weights``, else ``bn``.
        norm_eval: Keep every backbone norm layer in eval mode under ``train()``.
        zero_init_residual: Zero the last norm's scale in every block.
        output_stride: 32, 16 or 8 (dilated last stages).
        with_cp: Gradient checkpointing of the blocks (one bool, or one per stage).
        fpn_out_channels: FPN output channels.
        fpn_norm: Norm inside the FPN (None or "gn").
        conv_dims: Channels of the semantic head's conv towers.
        head_norm: Norm in the semantic head ("gn" as in Panoptic FPN).
        common_stride: Stride at which the semantic head's towers meet.
        loss_weight: Factor on the semantic cross-entropy.
        ignore_index: Label excluded from the loss (and used to pad targets).
        min_size: Shortest side the model resizes images to (None: keep the input size, the data
            pipeline decides the scale).
        max_size: Longest-side cap of that resize (None: no cap).
        scale_range: Training-time random rescale factor range on top of that, e.g. (0.5, 2.0).
        crop_size: Training-time random crop (height, width), e.g. (512, 1024) for Cityscapes.
        image_mean: Normalization mean.
        image_std: Normalization standard deviation.
        size_divisible: Batch padding multiple.
        return_logits: Eval outputs carry ``sem_seg_logits`` by default.
    """
    if trainable_layers is not None:
        if frozen_stages is not None:
            raise ValueError("give trainable_layers or frozen_stages, not both")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        frozen_stages = 5 - trainable_layers
    body_and_fpn = build_resnet_fpn(
        backbone,
        weights=weights,
        frozen_stages=frozen_stages,
        norm=norm,
        norm_eval=norm_eval,
        zero_init_residual=zero_init_residual,
        output_stride=output_stride,
        with_cp=with_cp,
        out_channels=fpn_out_channels,
        fpn_norm=fpn_norm,
        top_block=None,  # the semantic head reads p2..p5 only; p6 has no parameters, so keys still match
    )
    shapes: dict[str, ShapeSpec] = body_and_fpn.output_shape()
    in_shapes = {name: shapes[name] for name in ("p2", "p3", "p4", "p5")}
    head = SemanticFPNHead(
        in_shapes,
        num_classes=num_classes,
        conv_dims=conv_dims,
        norm=head_norm,
        common_stride=common_stride,
        loss_weight=loss_weight,
        ignore_index=ignore_index,
    )
    transform = SemSegTransform(
        min_size=min_size,
        max_size=max_size,
        scale_range=scale_range,
        crop_size=crop_size,
        image_mean=image_mean,
        image_std=image_std,
        size_divisible=size_divisible,
        ignore_index=ignore_index,
    )
    return SemanticFPN(body_and_fpn, head, transform, return_logits=return_logits)
