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

from collections.abc import Sequence

from torch import Tensor, nn

from resdet.backbones.fpn import build_resnet_fpn
from resdet.heads.semantic_head import SemanticFPNHead
from resdet.layers.shape_spec import ShapeSpec

from .registry import register_arch
from .semantic import SemanticSegmentor, SemSegTransform
from .transform import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["SemanticFPN", "SemSegTransform", "semantic_fpn"]


class SemanticFPN(SemanticSegmentor):
    """Backbone with FPN → semantic head, with the input transform in front.

    Args:
        backbone: Returns an ordered dict of FPN levels (p2..p5 at least) for a Tensor[N, 3, Hp, Wp].
        sem_seg_head: The semantic head reading those levels.
        transform: Normalizes/resizes/pads input; maps logits back to the original size.
        return_logits: Add ``"sem_seg_logits"`` (Tensor[K, H, W]) to every eval output by default.
        test_crop_size: Evaluate by sliding window of this (height, width); None: whole images.
        test_stride: Step of the sliding window (default two thirds of the window).

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
        test_crop_size: Sequence[int] | None = None,
        test_stride: Sequence[int] | None = None,
    ) -> None:
        super().__init__(transform, ignore_index=sem_seg_head.ignore_index, return_logits=return_logits,
                         test_crop_size=test_crop_size, test_stride=test_stride)
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head

    @property
    def num_classes(self) -> int:
        return self.sem_seg_head.num_classes

    def predict_logits(self, batch: Tensor) -> Tensor:
        """Logits Tensor[N, K, Hp, Wp] of a padded batch."""
        return self.sem_seg_head(self.backbone(batch))[0]

    def compute_losses(self, batch: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``{"loss_sem_seg": scalar}`` against targets Tensor[N, Hp, Wp]."""
        return self.sem_seg_head(self.backbone(batch), targets)[1]


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
    loss_top_k: float = 1.0,
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
    test_crop_size: Sequence[int] | None = None,
    test_stride: Sequence[int] | None = None,
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
        loss_top_k: Fraction of the hardest pixels the cross-entropy averages (1.0: all).
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
        test_crop_size: Evaluate by sliding window of this (height, width), multiples of
            ``size_divisible`` (e.g. (512, 1024) on 1024×2048 Cityscapes images); None: whole images.
        test_stride: Step of the sliding window (default: two thirds of ``test_crop_size``).
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
        loss_top_k=loss_top_k,
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
    return SemanticFPN(body_and_fpn, head, transform, return_logits=return_logits, test_crop_size=test_crop_size,
                       test_stride=test_stride)
