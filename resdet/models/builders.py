"""Builders of resdet's detectors: every setting a keyword option, defaults equal to torchvision's.

``faster_rcnn()`` and ``mask_rcnn()`` reproduce ``torchvision.models.detection.fasterrcnn_resnet50_fpn``
/ ``maskrcnn_resnet50_fpn`` (v1) with ``backbone="resnet50"``; the ``*_v2`` variants are reached with
``rpn_conv_depth=2, box_head="4conv1fc", box_head_norm="bn", mask_head_norm="bn"`` (torchvision's v2
FPN uses BatchNorm, which resdet's FPN does not offer; its ``gn`` option is the detectron2 variant).
As in torchvision, a backbone built from pretrained ``weights`` defaults to frozen BatchNorm with the
stem and ``layer1`` frozen; a random one to trainable BatchNorm everywhere.
An unknown option raises ``TypeError`` naming it.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import nn

from resdet.backbones.fpn import build_resnet_fpn
from resdet.heads.anchors import AnchorGenerator
from resdet.heads.mask_head import MaskHead, MaskPredictor
from resdet.heads.poolers import MultiScaleRoIAlign
from resdet.heads.roi_heads import ConvFCHead, FastRCNNPredictor, RoIHeads, TwoMLPHead
from resdet.heads.rpn import RegionProposalNetwork, RPNHead

from .rcnn import GeneralizedRCNN
from .registry import register_arch
from .transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform

__all__ = ["faster_rcnn", "mask_rcnn"]

_LEVELS = ("p2", "p3", "p4", "p5")


@register_arch("faster_rcnn", task="detection")
def faster_rcnn(
    backbone: str = "resnet34",
    num_classes: int = 91,
    *,
    # backbone (resdet.backbones.ResNet options)
    weights: str | None = None,
    frozen_stages: int | None = None,
    norm: str | None = None,
    norm_eval: bool = False,
    zero_init_residual: bool = False,
    with_cp: bool | Sequence[bool] = False,
    # FPN
    fpn_out_channels: int = 256,
    fpn_norm: str | None = None,
    # input transform
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    size_divisible: int = 32,
    # RPN
    rpn_anchor_sizes: Sequence[Sequence[int]] = ((32,), (64,), (128,), (256,), (512,)),
    rpn_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_conv_depth: int = 1,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_fg_iou_thresh: float = 0.7,
    rpn_bg_iou_thresh: float = 0.3,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    rpn_score_thresh: float = 0.0,
    # RoI box head
    box_head: str = "2fc",
    box_head_norm: str | None = None,
    box_representation_size: int = 1024,
    box_roi_output_size: int = 7,
    box_sampling_ratio: int = 2,
    box_roi_aligned: bool = False,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_fg_iou_thresh: float = 0.5,
    box_bg_iou_thresh: float = 0.5,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
    box_loss: str = "smooth_l1",
    smooth_l1_beta: float = 1.0 / 9,
) -> GeneralizedRCNN:
    """Faster R-CNN with a ResNet-FPN backbone.

    Args:
        backbone: ResNet name (``resnet18`` ... ``resnet152``, ``resnext50_32x4d``, ``wide_resnet50_2``).
        num_classes: classes including background.
        weights: ImageNet checkpoint path for the backbone.
        frozen_stages: ResNet stages frozen (0 none, 1 stem, k stem + k-1 stages); default 2 (stem +
            ``layer1``, torchvision's ``trainable_backbone_layers=3``) with ``weights``, else 0.
        norm: backbone norm (``bn``, ``frozen_bn``, ``sync_bn``, ``gn``); default ``frozen_bn`` with
            ``weights``, else ``bn``.
        fpn_norm: norm inside the FPN (None or ``gn``).
        min_size: shortest side after resizing; a sequence for multi-scale training.
        rpn_conv_depth: 3×3 convs in the RPN head (torchvision v2: 2).
        box_head: ``2fc`` (TwoMLPHead) or ``4conv1fc`` (4 convs + 1 fc, torchvision v2 / GN variants).
        box_head_norm: norm of the ``4conv1fc`` convs (None, ``bn``, ``gn``).
        box_loss: ``smooth_l1``, ``l1`` or ``giou``.

    The remaining options mirror torchvision's ``FasterRCNN`` keyword arguments of the same name.
    """
    return _build(**locals(), mask=None)


@register_arch("mask_rcnn", task="instance", extends=(faster_rcnn,))
def mask_rcnn(
    backbone: str = "resnet34",
    num_classes: int = 91,
    *,
    mask_roi_output_size: int = 14,
    mask_sampling_ratio: int = 2,
    mask_layers: Sequence[int] = (256, 256, 256, 256),
    mask_dilation: int = 1,
    mask_head_norm: str | None = None,
    mask_predictor_channels: int = 256,
    **options,
) -> GeneralizedRCNN:
    """Mask R-CNN: :func:`faster_rcnn` plus a mask branch; ``options`` are :func:`faster_rcnn`'s.

    Args:
        mask_roi_output_size: RoIAlign output size of the mask branch.
        mask_layers: channels of the mask head's 3×3 convs.
        mask_head_norm: norm of the mask head convs (None, ``bn``, ``gn``).
        mask_predictor_channels: channels of the 2× deconvolution before the per-class logits.
    """
    mask = dict(
        roi_output_size=mask_roi_output_size,
        sampling_ratio=mask_sampling_ratio,
        layers=tuple(mask_layers),
        dilation=mask_dilation,
        norm=mask_head_norm,
        predictor_channels=mask_predictor_channels,
    )
    return _build(backbone=backbone, num_classes=num_classes, mask=mask, **_checked(options))


def _checked(options: dict) -> dict:
    """Fills :func:`faster_rcnn`'s defaults into ``options``; unknown names raise ``TypeError``."""
    params = inspect.signature(faster_rcnn).parameters
    known = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; see resdet.models.faster_rcnn / mask_rcnn for the options")
    return {**known, **options}


def _build(*, backbone: str, num_classes: int, mask: dict | None, **o) -> GeneralizedRCNN:
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    body_fpn = build_resnet_fpn(
        backbone,
        weights=o["weights"],
        frozen_stages=o["frozen_stages"],
        norm=o["norm"],
        norm_eval=o["norm_eval"],
        zero_init_residual=o["zero_init_residual"],
        with_cp=o["with_cp"],
        out_channels=o["fpn_out_channels"],
        fpn_norm=o["fpn_norm"],
    )
    channels = body_fpn.out_channels

    sizes = tuple(tuple(s) for s in o["rpn_anchor_sizes"])
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(o["rpn_aspect_ratios"]),) * len(sizes))
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=o["rpn_conv_depth"]),
        fg_iou_thresh=o["rpn_fg_iou_thresh"],
        bg_iou_thresh=o["rpn_bg_iou_thresh"],
        batch_size_per_image=o["rpn_batch_size_per_image"],
        positive_fraction=o["rpn_positive_fraction"],
        pre_nms_top_n_train=o["rpn_pre_nms_top_n_train"],
        pre_nms_top_n_test=o["rpn_pre_nms_top_n_test"],
        post_nms_top_n_train=o["rpn_post_nms_top_n_train"],
        post_nms_top_n_test=o["rpn_post_nms_top_n_test"],
        nms_thresh=o["rpn_nms_thresh"],
        score_thresh=o["rpn_score_thresh"],
    )

    res = o["box_roi_output_size"]
    box_pool = MultiScaleRoIAlign(
        featmap_names=list(_LEVELS), output_size=res, sampling_ratio=o["box_sampling_ratio"],
        aligned=o["box_roi_aligned"],
    )
    rep = o["box_representation_size"]
    if o["box_head"] == "2fc":
        if o["box_head_norm"] is not None:
            raise ValueError(f"box_head_norm={o['box_head_norm']!r} needs box_head='4conv1fc'; '2fc' has no convs")
        head: nn.Module = TwoMLPHead(channels * res * res, rep)
    elif o["box_head"] == "4conv1fc":
        head = ConvFCHead((channels, res, res), [256] * 4, [rep], norm=o["box_head_norm"])
    else:
        raise ValueError(f"box_head must be '2fc' or '4conv1fc', got {o['box_head']!r}")

    mask_parts: dict[str, nn.Module] = {}
    if mask is not None:
        mask_parts = dict(
            mask_roi_pool=MultiScaleRoIAlign(
                featmap_names=list(_LEVELS), output_size=mask["roi_output_size"],
                sampling_ratio=mask["sampling_ratio"], aligned=o["box_roi_aligned"],
            ),
            mask_head=MaskHead(channels, mask["layers"], mask["dilation"], norm=mask["norm"]),
            mask_predictor=MaskPredictor(mask["layers"][-1], mask["predictor_channels"], num_classes),
        )
    roi_heads = RoIHeads(
        box_pool,
        head,
        FastRCNNPredictor(rep, num_classes),
        fg_iou_thresh=o["box_fg_iou_thresh"],
        bg_iou_thresh=o["box_bg_iou_thresh"],
        batch_size_per_image=o["box_batch_size_per_image"],
        positive_fraction=o["box_positive_fraction"],
        bbox_reg_weights=tuple(o["bbox_reg_weights"]),
        score_thresh=o["box_score_thresh"],
        nms_thresh=o["box_nms_thresh"],
        detections_per_img=o["box_detections_per_img"],
        box_loss=o["box_loss"],
        smooth_l1_beta=o["smooth_l1_beta"],
        **mask_parts,
    )
    transform = DetectionTransform(
        o["min_size"], o["max_size"], o["image_mean"], o["image_std"], o["size_divisible"]
    )
    return GeneralizedRCNN(body_fpn, rpn, roi_heads, transform, num_classes=num_classes)
