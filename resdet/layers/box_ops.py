"""Box utilities shared by the RPN and the RoI heads: box coder, matcher, sampler, box losses.

Shape shorthand:
    R  boxes (anchors or proposals) of one image
    M  ground-truth boxes of one image
    K  classes, background included
    Boxes are ``(x1, y1, x2, y2)`` in pixels; deltas are ``(dx, dy, dw, dh)``.

Numerics follow torchvision's ``models/detection/_utils.py`` operation by operation (same rounding), so
parity with torchvision's detectors holds to float precision. Encoding and decoding are elementwise, so
callers may encode or decode only the boxes they need and get bit-identical values.

Box math runs in float32 whatever the autocast dtype (as detectron2 does): ``encode`` and ``decode``
cast float16/bfloat16 inputs to float32 (float64 stays float64). In bfloat16 (8 mantissa bits) a coordinate near 800
moves in steps of 4 px: a right edge meant to be 802.3 would land at 804.0.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

__all__ = ["BoxCoder", "Matcher", "BalancedPositiveNegativeSampler", "box_regression_loss", "BOX_LOSSES"]

BOX_LOSSES = ("smooth_l1", "l1", "giou")


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class BoxCoder:
    """Encodes boxes as ``(dx, dy, dw, dh)`` offsets from reference boxes and decodes them back.

    Args:
        weights: ``(wx, wy, ww, wh)`` multipliers of the encoded offsets (RPN ``(1, 1, 1, 1)``, box head
            ``(10, 10, 5, 5)``).
        bbox_xform_clip: upper bound of ``dw`` and ``dh`` before ``exp`` when decoding (default
            ``log(1000 / 16)``), so a wild prediction cannot overflow.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must have 4 values (wx, wy, ww, wh), got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, boxes: Tensor, reference_boxes: Tensor) -> Tensor:
        """Offsets that move ``reference_boxes`` onto ``boxes``.

        Args:
            boxes: target boxes, Tensor[..., 4].
            reference_boxes: anchors or proposals, broadcastable to ``boxes``.

        Returns:
            Tensor[..., 4] (float32 at least) of deltas.
        """
        boxes, reference_boxes = _at_least_fp32(boxes), _at_least_fp32(reference_boxes)  # module docstring
        wx, wy, ww, wh = self.weights
        ex_widths = reference_boxes[..., 2] - reference_boxes[..., 0]
        ex_heights = reference_boxes[..., 3] - reference_boxes[..., 1]
        ex_ctr_x = reference_boxes[..., 0] + 0.5 * ex_widths
        ex_ctr_y = reference_boxes[..., 1] + 0.5 * ex_heights

        gt_widths = boxes[..., 2] - boxes[..., 0]
        gt_heights = boxes[..., 3] - boxes[..., 1]
        gt_ctr_x = boxes[..., 0] + 0.5 * gt_widths
        gt_ctr_y = boxes[..., 1] + 0.5 * gt_heights

        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, reference_boxes: Tensor) -> Tensor:
        """Boxes obtained by applying ``deltas`` to ``reference_boxes``.

        Args:
            deltas: Tensor[..., 4], e.g. [R, 4] or class-specific [R, K, 4].
            reference_boxes: broadcastable to ``deltas``, e.g. [R, 4] or [R, 1, 4].

        Returns:
            Tensor (float32 at least) of ``deltas``' broadcast shape, boxes ``(x1, y1, x2, y2)``.
        """
        deltas, reference_boxes = _at_least_fp32(deltas), _at_least_fp32(reference_boxes)  # module docstring
        wx, wy, ww, wh = self.weights
        widths = reference_boxes[..., 2] - reference_boxes[..., 0]
        heights = reference_boxes[..., 3] - reference_boxes[..., 1]
        ctr_x = reference_boxes[..., 0] + 0.5 * widths
        ctr_y = reference_boxes[..., 1] + 0.5 * heights

        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        # Clamp before exp so that a wild prediction cannot overflow.
        dw = torch.clamp(deltas[..., 2] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[..., 3] / wh, max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        return torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1
        )


class Matcher:
    """Assigns each prediction (anchor, proposal) the ground-truth box it overlaps most.

    Returns per prediction a gt index in ``[0, M)``, ``BELOW_LOW_THRESHOLD`` (-1: background) or
    ``BETWEEN_THRESHOLDS`` (-2: ignored).

    Args:
        high_threshold: quality ``>=`` this is a match.
        low_threshold: quality ``<`` this is background; in between is ignored.
        allow_low_quality_matches: also match, for every gt, the predictions of highest quality with it
            (ties included) even below ``high_threshold`` (used by the RPN).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"Matcher low_threshold={low_threshold} must be <= high_threshold={high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """Match predictions to gt.

        Args:
            match_quality_matrix: Tensor[M, R] of pairwise quality (IoU), M >= 1 and R >= 1.

        Returns:
            Tensor[R] int64 of matched gt indices or negative codes.
        """
        if match_quality_matrix.numel() == 0:
            raise ValueError(
                f"Matcher needs at least one gt and one prediction, got a quality matrix of shape "
                f"{tuple(match_quality_matrix.shape)}; images without gt must be handled by the caller"
            )
        matched_vals, matches = match_quality_matrix.max(dim=0)
        all_matches = matches.clone()
        matches[matched_vals < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[between] = self.BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:
            # For every gt, the predictions of highest quality with it (ties included) keep their best gt.
            best_per_gt = match_quality_matrix.max(dim=1).values
            is_best = (match_quality_matrix == best_per_gt[:, None]).any(dim=0)
            matches = torch.where(is_best, all_matches, matches)
        return matches


class BalancedPositiveNegativeSampler:
    """Samples a fixed number of elements per image with at most a given fraction of positives.

    Random draws are the same ``torch.randperm`` calls as torchvision's sampler, so with the same seed
    both pick the same elements.

    Args:
        batch_size_per_image: elements sampled per image.
        positive_fraction: largest fraction of positives in the sample.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        if batch_size_per_image <= 0 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(
                f"sampler needs batch_size_per_image > 0 and positive_fraction in [0, 1], got "
                f"{batch_size_per_image} and {positive_fraction}"
            )
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Sample per image.

        Args:
            labels: per image Tensor[R]: ``>= 1`` positive, ``0`` negative, ``-1`` ignored.

        Returns:
            ``(positive, negative)``: per image boolean Tensor[R] masks of the sampled elements.
        """
        pos_masks, neg_masks = [], []
        for labels_per_image in labels:
            positive = torch.where(labels_per_image >= 1)[0]
            negative = torch.where(labels_per_image == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            neg_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            pos_mask[pos] = True
            neg_mask[neg] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


def box_regression_loss(
    kind: str,
    box_coder: BoxCoder,
    pred_deltas: Tensor,
    target_boxes: Tensor,
    reference_boxes: Tensor,
    *,
    smooth_l1_beta: float = 1.0 / 9,
) -> Tensor:
    """Summed box regression loss over positives (the caller normalizes).

    Args:
        kind: ``"smooth_l1"`` or ``"l1"`` on encoded deltas, or ``"giou"`` on decoded boxes.
        box_coder: coder that relates deltas and boxes.
        pred_deltas: Tensor[P, 4] predicted deltas of the positives.
        target_boxes: Tensor[P, 4] matched gt boxes.
        reference_boxes: Tensor[P, 4] anchors or proposals the deltas apply to.
        smooth_l1_beta: transition point of smooth-L1 (torchvision: 1/9).

    Returns:
        Scalar tensor, the sum over positives.
    """
    if kind == "giou":
        pred_boxes = box_coder.decode(pred_deltas, reference_boxes)
        return generalized_box_iou_loss(pred_boxes, target_boxes, reduction="sum")
    targets = box_coder.encode(target_boxes, reference_boxes)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred_deltas, targets, beta=smooth_l1_beta, reduction="sum")
    if kind == "l1":
        return F.l1_loss(pred_deltas, targets, reduction="sum")
    raise ValueError(f"box loss {kind!r} is not one of {BOX_LOSSES}")
