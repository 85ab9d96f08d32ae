"""Panoptic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", 2019): Mask R-CNN and the semantic
FPN branch on one ResNet-FPN, trained jointly, their outputs combined into a panoptic segmentation.

Shape shorthand:
    N   images;  H, W  original size of one image
    D   detections of one image;  T thing classes;  S stuff classes

Labels. Detector labels are ``1..T`` (0 background, ``num_classes = T + 1``). The semantic branch predicts
``S + 1`` classes: 0 = "any thing", ``1..S`` the stuff classes (detectron2's convention; void/unlabelled
pixels are ``ignore_index``). A panoptic segment's ``category_id`` is a model label: ``1..T`` for things, ``T + s``
for stuff class ``s``, so that ``model.label_space`` (``T + S`` entries, things first) maps every segment to
its dataset category id.

The combination is detectron2's (after panopticapi's ``combine_semantic_and_instance_predictions.py``):
instances in decreasing score order down to ``combine_score_thresh``; an instance more than
``combine_overlap_thresh`` of whose (mask ≥ 0.5) pixels are already taken is dropped, else it takes its
free pixels; then each stuff class of the semantic map fills the pixels still free, dropped when that
leaves fewer than ``combine_stuff_area_thresh`` pixels; pixels left are void (0).

The state dict holds ``backbone.*``, ``rpn.*``, ``roi_heads.*`` (a Mask R-CNN's keys) and ``sem_seg_head.*``
(a semantic FPN's), so either kind of checkpoint initialises its half.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from resdet.heads.semantic_head import SemanticFPNHead

from .builders import faster_rcnn, mask_rcnn
from .panoptic_transform import PanopticTransform
from .registry import register_arch
from .validation import check_sem_seg_targets, validate_inputs

__all__ = ["PanopticFPN", "combine_panoptic", "panoptic_fpn"]


def combine_panoptic(masks: Tensor, scores: Tensor, labels: Tensor, sem_seg: Tensor, *, num_things: int,
                     overlap_thresh: float = 0.5, stuff_area_thresh: int = 4096,
                     score_thresh: float = 0.5) -> tuple[Tensor, list[dict[str, Any]]]:
    """Combines one image's instances and semantic map into a panoptic segmentation.

    Args:
        masks: Tensor[D, H, W] bool instance masks.
        scores, labels: Tensor[D] instance scores and labels (1..T).
        sem_seg: Tensor[H, W] semantic classes (0 = thing, 1..S stuff).
        num_things: T; stuff class s becomes label T + s.
        overlap_thresh, stuff_area_thresh, score_thresh: see the module docstring.

    Returns:
        ``(panoptic_seg Tensor[H, W] int32, 0 = void, segments_info)``; each segment ``{"id", "category_id",
        "isthing", "area"}`` plus ``"score"`` and ``"instance_id"`` (its detection index) for things.
    """
    panoptic = torch.zeros(sem_seg.shape, dtype=torch.int32, device=sem_seg.device)
    taken = torch.zeros(sem_seg.shape, dtype=torch.bool, device=sem_seg.device)
    segments: list[dict[str, Any]] = []
    for index in torch.argsort(-scores, stable=True).tolist():
        score = float(scores[index])
        if score < score_thresh:
            break
        mask = masks[index]
        area = int(mask.sum())
        if area == 0:
            continue
        overlap = int((mask & taken).sum())
        if overlap / area > overlap_thresh:
            continue
        if overlap:
            mask = mask & ~taken
        segments.append({"id": len(segments) + 1, "category_id": int(labels[index]), "isthing": True,
                         "score": score, "area": area - overlap, "instance_id": index})
        panoptic[mask] = len(segments)
        taken |= mask
    for stuff in torch.unique(sem_seg).tolist():
        if stuff == 0:  # the "any thing" class
            continue
        mask = (sem_seg == stuff) & ~taken
        area = int(mask.sum())
        if area < stuff_area_thresh:
            continue
        segments.append({"id": len(segments) + 1, "category_id": num_things + int(stuff), "isthing": False,
                         "area": area})
        panoptic[mask] = len(segments)
        taken |= mask
    return panoptic, segments


class PanopticFPN(nn.Module):
    """Mask R-CNN plus the semantic FPN branch on the same FPN, with the input transform inside.

    Train mode: ``model(images, targets)`` with torchvision detection targets (``boxes``, ``labels``,
    ``masks``) plus ``sem_seg`` Tensor[H, W] (0 thing, 1..S stuff, ``ignore_index`` void) returns the Mask
    R-CNN losses and ``loss_sem_seg`` (already weighted by the head's ``loss_weight``); their sum is the
    training loss. Eval mode: per image ``boxes``, ``labels``, ``scores``, ``masks`` Tensor[D, 1, H, W]
    probabilities, ``sem_seg`` Tensor[H, W] int64, ``panoptic_seg`` Tensor[H, W] int32 and ``segments_info``
    (see :func:`combine_panoptic`), all in original pixels.

    Args:
        backbone: ``BackboneWithFPN`` (p2..p6).
        rpn: ``RegionProposalNetwork``.
        roi_heads: ``RoIHeads`` with the mask branch.
        sem_seg_head: ``SemanticFPNHead`` reading p2..p5, ``S + 1`` classes.
        transform: :class:`PanopticTransform`.
        num_classes: detector classes T + 1.
        combine_overlap_thresh, combine_stuff_area_thresh, combine_score_thresh: see :func:`combine_panoptic`.
    """

    def __init__(self, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module, sem_seg_head: SemanticFPNHead,
                 transform: PanopticTransform, *, num_classes: int, combine_overlap_thresh: float = 0.5,
                 combine_stuff_area_thresh: int = 4096, combine_score_thresh: float = 0.5) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.sem_seg_head = sem_seg_head
        self.num_classes = num_classes
        self.combine_overlap_thresh = combine_overlap_thresh
        self.combine_stuff_area_thresh = combine_stuff_area_thresh
        self.combine_score_thresh = combine_score_thresh

    @property
    def num_stuff_classes(self) -> int:
        """S: the semantic branch's classes less the "any thing" class."""
        return self.sem_seg_head.num_classes - 1

    @property
    def has_masks(self) -> bool:
        return True

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Any]]:
        """See the class docstring; ``images`` are Tensor[C, H, W] float in [0, 1], any sizes."""
        validate_inputs(images, targets, num_classes=self.num_classes, in_chans=self.transform.in_chans,
                        training=self.training, require_masks=True)
        if self.training:
            check_sem_seg_targets(images, targets, num_classes=self.sem_seg_head.num_classes,
                                  ignore_index=self.sem_seg_head.ignore_index, training=True)
        else:
            targets = None
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, image_sizes, det_targets, sem_targets = self.transform(images, targets)
        features = self.backbone(batch)
        proposals, rpn_losses = self.rpn(batch, image_sizes, features, det_targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_sizes, det_targets)
        logits, sem_losses = self.sem_seg_head(features, sem_targets)
        if self.training:
            return {**rpn_losses, **roi_losses, **sem_losses}
        detections = self.transform.postprocess_detections(detections, image_sizes, original_sizes)
        semantic = self.transform.postprocess_semantic(logits, image_sizes, original_sizes)
        results = []
        for det, sem_logits in zip(detections, semantic):
            sem_seg = sem_logits.argmax(dim=0)  # [K, H, W] -> [H, W]
            panoptic, segments = combine_panoptic(
                det["masks"][:, 0] >= 0.5, det["scores"], det["labels"], sem_seg, num_things=self.num_classes - 1,
                overlap_thresh=self.combine_overlap_thresh, stuff_area_thresh=self.combine_stuff_area_thresh,
                score_thresh=self.combine_score_thresh)
            results.append({**det, "sem_seg": sem_seg, "panoptic_seg": panoptic, "segments_info": segments})
        return results


@register_arch("panoptic_fpn", task="panoptic", extends=(mask_rcnn, faster_rcnn))
def panoptic_fpn(
    backbone: str = "resnet50",
    num_classes: int = 81,
    *,
    num_stuff_classes: int = 53,
    sem_seg_loss_weight: float = 0.5,
    sem_seg_conv_dims: int = 128,
    sem_seg_norm: str | None = "gn",
    sem_seg_common_stride: int = 4,
    ignore_index: int = 255,
    combine_overlap_thresh: float = 0.5,
    combine_stuff_area_thresh: int = 4096,
    combine_score_thresh: float = 0.5,
    scale_range: Sequence[float] | None = None,
    crop_size: Sequence[int] | None = None,
    **options: Any,
) -> PanopticFPN:
    """Panoptic FPN: :func:`mask_rcnn` (whose keyword options ``options`` are) plus the semantic branch.

    Defaults are detectron2's COCO recipe: 80 things (+ background) and 53 stuff classes, semantic loss
    weight 0.5, the semantic head of Panoptic FPN (128 channels, GroupNorm, meeting at stride 4), and the
    combination thresholds 0.5 / 0.5 / 4096 pixels.

    Args:
        backbone: ResNet name.
        num_classes: detector classes, things + background (T + 1).
        num_stuff_classes: S; the semantic branch predicts S + 1 classes (0 = any thing).
        sem_seg_loss_weight: factor on the semantic cross-entropy (the instance losses keep weight 1).
        sem_seg_conv_dims, sem_seg_norm, sem_seg_common_stride: the semantic head's width, norm and stride.
        ignore_index: semantic target value left out of the loss (void).
        combine_overlap_thresh: an instance is dropped when more than this fraction of it is already taken.
        combine_stuff_area_thresh: stuff regions smaller than this (pixels, original image) are dropped.
        combine_score_thresh: instances scoring below this do not enter the panoptic output.
        scale_range: training-time random rescale factor on top of the ``min_size`` resize, e.g. (0.5, 2.0).
        crop_size: training-time random crop (height, width), e.g. (512, 1024) for Cityscapes.
    """
    if num_stuff_classes < 0:
        raise ValueError(f"num_stuff_classes must be >= 0, got {num_stuff_classes}")
    detector = mask_rcnn(backbone, num_classes, **options)
    shapes = detector.backbone.output_shape()
    head = SemanticFPNHead({name: shapes[name] for name in ("p2", "p3", "p4", "p5")},
                           num_classes=num_stuff_classes + 1, conv_dims=sem_seg_conv_dims, norm=sem_seg_norm,
                           common_stride=sem_seg_common_stride, loss_weight=sem_seg_loss_weight,
                           ignore_index=ignore_index)
    t = detector.transform
    transform = PanopticTransform(min_size=t.min_size, max_size=t.max_size, scale_range=scale_range,
                                  crop_size=crop_size, image_mean=t.image_mean, image_std=t.image_std,
                                  size_divisible=t.size_divisible, ignore_index=ignore_index)
    return PanopticFPN(detector.backbone, detector.rpn, detector.roi_heads, head, transform,
                       num_classes=num_classes, combine_overlap_thresh=combine_overlap_thresh,
                       combine_stuff_area_thresh=combine_stuff_area_thresh, combine_score_thresh=combine_score_thresh)
