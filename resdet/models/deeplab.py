"""DeepLabV3, DeepLabV3+ and FCN on a dilated ResNet (``model.arch=deeplabv3 / deeplabv3plus / fcn``).

Shape shorthand:
    N       images in the batch
    K       semantic classes
    Hp, Wp  padded batch size (multiples of ``size_divisible``)
    h, w    size of the head's logits (stride 4 for DeepLabV3+, the output stride otherwise)

Parameter names are torchvision's ``torchvision.models.segmentation`` ones: ``backbone.*`` (the ResNet,
``conv1`` ... ``layer4``), ``classifier.*`` (the head), ``aux_classifier.*`` (the FCN head on ``c4``),
so torchvision's ``deeplabv3_resnet50/101`` and ``fcn_resnet50/101`` checkpoints load as they are
(:func:`resdet.models.from_torchvision`, or ``model.weights=`` in a config).

DeepLab trains its backbone at output stride 16 and may evaluate at 8 with the ASPP rates doubled (Chen
et al. 2017, +1-2 mIoU for about 4× the backbone's last-stage cost): ``test_output_stride=8``. The switch
happens in :meth:`DeepLab.train` (the same weights at either stride).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from resdet.backbones.resnet import ResNet, build_resnet
from resdet.heads.deeplab_head import DeepLabV3Head, DeepLabV3PlusHead, FCNHead, aspp_rates

from .registry import register_arch
from .semantic import SemanticSegmentor, SemSegTransform, sem_seg_cross_entropy
from .transform import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DeepLab", "deeplabv3", "deeplabv3plus", "fcn"]


class DeepLab(SemanticSegmentor):
    """A dilated ResNet → segmentation head (and optional auxiliary head), with the input transform in front.

    Args:
        backbone: ResNet returning the levels the heads read (``c5``; ``c2`` for DeepLabV3+; ``c4`` for the
            auxiliary head).
        classifier: :class:`~resdet.heads.DeepLabV3Head`, :class:`~resdet.heads.DeepLabV3PlusHead` or
            :class:`~resdet.heads.FCNHead`: features → logits at its own stride.
        transform: Normalizes/resizes/pads input; maps logits back to the original size.
        aux_classifier: Auxiliary head (an ``FCNHead`` on ``c4``) trained alongside; unused in evaluation.
        loss_weight: Factor on the main cross-entropy.
        aux_loss_weight: Factor on the auxiliary cross-entropy (torchvision's reference: 0.5).
        loss_top_k: Fraction of the hardest pixels the losses average (1.0: plain cross-entropy).
        ignore_index: Target value excluded from the loss.
        test_output_stride: Backbone output stride in eval mode (None: the training one); the ASPP rates
            follow it.
        return_logits: Add ``"sem_seg_logits"`` to every eval output by default.
        test_crop_size: Evaluate by sliding window of this (height, width); None: whole images.
        test_stride: Step of the sliding window (default two thirds of the window).

    Train mode returns ``{"loss_sem_seg"}`` (and ``"loss_aux"`` with an auxiliary head); eval mode per
    image ``{"sem_seg": Tensor[H, W] int64}`` (see :mod:`resdet.models.semantic`).
    """

    def __init__(
        self,
        backbone: ResNet,
        classifier: nn.Module,
        transform: SemSegTransform,
        *,
        aux_classifier: nn.Module | None = None,
        loss_weight: float = 1.0,
        aux_loss_weight: float = 0.5,
        loss_top_k: float = 1.0,
        ignore_index: int = 255,
        test_output_stride: int | None = None,
        return_logits: bool = False,
        test_crop_size: Sequence[int] | None = None,
        test_stride: Sequence[int] | None = None,
    ) -> None:
        super().__init__(transform, ignore_index=ignore_index, return_logits=return_logits,
                         test_crop_size=test_crop_size, test_stride=test_stride)
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.loss_weight = loss_weight
        self.aux_loss_weight = aux_loss_weight
        self.loss_top_k = loss_top_k
        self.train_output_stride = backbone.output_stride
        self.test_output_stride = test_output_stride or backbone.output_stride
        aspp = getattr(classifier, "aspp", None)
        self._train_rates = None if aspp is None else aspp.rates
        self.train(self.training)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def train(self, mode: bool = True) -> "DeepLab":
        """Train/eval mode; the backbone (and ASPP) switch to the training or the test output stride."""
        super().train(mode)
        self.set_output_stride(self.train_output_stride if mode else self.test_output_stride)
        return self

    def set_output_stride(self, output_stride: int) -> None:
        """Backbone output stride (8, 16, 32) with the ASPP rates scaled to match the training ones."""
        if self.backbone.output_stride != output_stride:
            self.backbone.set_output_stride(output_stride)
        aspp = getattr(self.classifier, "aspp", None)
        if aspp is not None and self._train_rates is not None:
            aspp.set_rates([r * self.train_output_stride // output_stride for r in self._train_rates])

    def _logits(self, features: dict[str, Tensor], head: nn.Module, size: tuple[int, int]) -> Tensor:
        # Head logits [N, K, h, w] → [N, K, Hp, Wp] (bilinear, as torchvision and mmseg).
        return F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)

    def predict_logits(self, batch: Tensor) -> Tensor:
        """Logits Tensor[N, K, Hp, Wp] of a padded batch."""
        return self._logits(self.backbone(batch), self.classifier, batch.shape[-2:])

    def compute_losses(self, batch: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``loss_sem_seg`` (and ``loss_aux``) against targets Tensor[N, Hp, Wp]."""
        features = self.backbone(batch)
        size = batch.shape[-2:]
        def ce(head: nn.Module) -> Tensor:
            return sem_seg_cross_entropy(self._logits(features, head, size), targets, ignore_index=self.ignore_index,
                                         top_k=self.loss_top_k)

        losses = {"loss_sem_seg": ce(self.classifier) * self.loss_weight}
        if self.aux_classifier is not None:
            losses["loss_aux"] = ce(self.aux_classifier) * self.aux_loss_weight
        return losses


@register_arch("deeplabv3", task="semantic")
def deeplabv3(
    backbone: str = "resnet50",
    num_classes: int = 21,
    *,
    # backbone (resdet.backbones.ResNet options)
    weights: str | None = None,
    frozen_stages: int = 0,
    norm: str = "bn",
    norm_eval: bool = False,
    zero_init_residual: bool = False,
    output_stride: int = 16,
    test_output_stride: int | None = None,
    with_cp: bool | Sequence[bool] = False,
    # heads
    aspp_channels: int = 256,
    aspp_rates: Sequence[int] | None = None,
    aspp_dropout: float = 0.5,
    separable: bool = False,
    head_norm: str = "bn",
    aux_loss: bool = False,
    aux_loss_weight: float = 0.5,
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
) -> DeepLab:
    """DeepLabV3 (Chen et al. 2017) on a dilated ResNet, laid out as torchvision's ``deeplabv3_resnet50``.

    Unlike the detectors, the backbone trains whole with trainable BatchNorm by default, ImageNet start or
    not (torchvision's segmentation reference and mmsegmentation; ``norm=sync_bn`` across GPUs).

    Args:
        backbone: ResNet name (``resnet18`` ... ``resnet152``, ``resnext50_32x4d``, ...).
        num_classes: Semantic classes K (21 for VOC with background, 19 for Cityscapes).
        weights: ImageNet checkpoint (torchvision/timm) for the ResNet.
        frozen_stages: ResNet stages frozen (0 none, 1 stem, k stem + k-1 stages).
        norm: Backbone norm (``bn``, ``sync_bn``, ``frozen_bn``, ``gn``).
        norm_eval: Keep every backbone norm layer in eval mode under ``train()``.
        zero_init_residual: Zero the last norm's scale in every block.
        output_stride: Backbone output stride in training, 16 or 8.
        test_output_stride: Backbone output stride in evaluation (None: ``output_stride``); e.g. 8 after
            training at 16.
        with_cp: Gradient checkpointing of the blocks.
        aspp_channels: Channels of the ASPP branches and the head convs.
        aspp_rates: ASPP dilations at ``output_stride``; None: (6, 12, 18) at 16, (12, 24, 36) at 8.
        aspp_dropout: Dropout after the ASPP projection.
        separable: Depthwise separable 3×3 convs in the ASPP (and the DeepLabV3+ decoder).
        head_norm: Norm of the head convs.
        aux_loss: Train an auxiliary FCN head on ``c4`` (torchvision's ``aux_loss``).
        aux_loss_weight: Its loss factor.
        loss_weight: Factor on the main cross-entropy.
        loss_top_k: Fraction of the hardest pixels the cross-entropy averages (1.0: all; detectron2's
            DeepLab ``hard_pixel_mining``: 0.2).
        ignore_index: Label excluded from the loss (and used to pad targets).
        min_size: Shortest side the model resizes images to (None: keep the input size).
        max_size: Longest-side cap of that resize.
        scale_range: Training-time random rescale factor range, e.g. (0.5, 2.0).
        crop_size: Training-time random crop (height, width), e.g. (512, 1024).
        image_mean: Normalization mean.
        image_std: Normalization standard deviation.
        size_divisible: Batch padding multiple.
        return_logits: Eval outputs carry ``sem_seg_logits`` by default.
        test_crop_size: Evaluate by sliding window of this (height, width); None: whole images.
        test_stride: Step of the sliding window (default two thirds of ``test_crop_size``).
    """
    return _build("deeplabv3", **locals())


@register_arch("deeplabv3plus", task="semantic", extends=(deeplabv3,))
def deeplabv3plus(
    backbone: str = "resnet50",
    num_classes: int = 21,
    *,
    low_level_channels: int = 48,
    separable: bool = True,
    **options,
) -> DeepLab:
    """DeepLabV3+ (Chen et al. 2018): :func:`deeplabv3`'s ASPP plus a decoder fusing ``c2``.

    Args:
        low_level_channels: Channels of the ``c2`` projection (48 in the paper).
        separable: Depthwise separable 3×3 convs in the ASPP and the decoder, as the paper's final model,
            mmsegmentation and segmentation_models_pytorch build it (False: full 3×3 convs).
        **options: :func:`deeplabv3`'s options (``aspp_channels`` is also the decoder width).
    """
    return _build("deeplabv3plus", backbone=backbone, num_classes=num_classes,
                  low_level_channels=low_level_channels, **_checked({**options, "separable": separable}))


@register_arch("fcn", task="semantic", extends=(deeplabv3,))
def fcn(backbone: str = "resnet50", num_classes: int = 21, **options) -> DeepLab:
    """FCN (Long et al. 2015) as torchvision's ``fcn_resnet50``: an ``FCNHead`` on the dilated ResNet's ``c5``.

    Args:
        **options: :func:`deeplabv3`'s options except the ``aspp_*`` ones and ``separable``; ``output_stride`` defaults
            to 8 as in torchvision.
    """
    aspp = sorted(k for k in options if k.startswith("aspp_") or k == "separable")
    if aspp:
        raise TypeError(f"fcn(): {aspp} are DeepLab options; FCN has no ASPP")
    options.setdefault("output_stride", 8)
    return _build("fcn", backbone=backbone, num_classes=num_classes, **_checked(options))


def _checked(options: dict) -> dict:
    """Fills :func:`deeplabv3`'s defaults into ``options``; unknown names raise ``TypeError``."""
    import inspect

    params = inspect.signature(deeplabv3).parameters
    known = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; see resdet.models.deeplabv3 for the options")
    return {**known, **options}


def _build(kind: str, *, backbone: str, num_classes: int, low_level_channels: int = 48, **o) -> DeepLab:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for key in ("output_stride", "test_output_stride"):
        if o[key] is not None and o[key] not in (8, 16, 32):
            raise ValueError(f"{key} must be 8, 16 or 32, got {o[key]}")
    levels = {"c5"} | ({"c2"} if kind == "deeplabv3plus" else set()) | ({"c4"} if o["aux_loss"] else set())
    body = build_resnet(backbone, out_features=sorted(levels), weights=o["weights"], frozen_stages=o["frozen_stages"],
                        norm=o["norm"], norm_eval=o["norm_eval"], zero_init_residual=o["zero_init_residual"],
                        output_stride=o["output_stride"], with_cp=o["with_cp"])
    shapes = body.output_shape()
    rates = tuple(o["aspp_rates"]) if o["aspp_rates"] is not None else aspp_rates(o["output_stride"])
    head_args = dict(channels=o["aspp_channels"], norm=o["head_norm"], dropout=o["aspp_dropout"],
                     separable=o["separable"])
    if kind == "deeplabv3":
        classifier: nn.Module = DeepLabV3Head(shapes["c5"].channels, num_classes, rates, **head_args)
    elif kind == "deeplabv3plus":
        classifier = DeepLabV3PlusHead(shapes["c5"].channels, shapes["c2"].channels, num_classes, rates,
                                       low_level_project=low_level_channels, **head_args)
    else:
        classifier = FCNHead(shapes["c5"].channels, num_classes, norm=o["head_norm"])
    aux = FCNHead(shapes["c4"].channels, num_classes, in_feature="c4", norm=o["head_norm"]) if o["aux_loss"] else None
    transform = SemSegTransform(
        min_size=o["min_size"], max_size=o["max_size"], scale_range=o["scale_range"], crop_size=o["crop_size"],
        image_mean=o["image_mean"], image_std=o["image_std"], size_divisible=o["size_divisible"],
        ignore_index=o["ignore_index"],
    )
    return DeepLab(body, classifier, transform, aux_classifier=aux, loss_weight=o["loss_weight"],
                   aux_loss_weight=o["aux_loss_weight"], loss_top_k=o["loss_top_k"], ignore_index=o["ignore_index"],
                   test_output_stride=o["test_output_stride"], return_logits=o["return_logits"],
                   test_crop_size=o["test_crop_size"], test_stride=o["test_stride"])
