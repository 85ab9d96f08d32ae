"""Region Proposal Network: shared conv head on every FPN level, anchor matching, proposal filtering.

Shape shorthand:
    N  images in the batch
    C  feature channels (256 for an FPN)
    L  feature levels (p2..p6)
    A  anchors per location
    Hl, Wl  size of level l;  Al = Hl * Wl * A anchors of level l;  A_total = sum of Al
    M  ground-truth boxes of one image
    P  proposals of one image (<= post_nms_top_n)

Numerics follow torchvision's ``RegionProposalNetwork`` (same parameter names, same random draws), but
only the pre-NMS top-k anchors are decoded and only sampled positives are encoded.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from resdet.layers.box_ops import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from resdet.layers.conv import Conv2d
from resdet.layers.tracing import at_most

from .anchors import AnchorGenerator

__all__ = ["RPNHead", "RegionProposalNetwork"]


class RPNHead(nn.Module):
    """Shared 3x3 conv(s) + ReLU, then per-anchor objectness logits and box deltas.

    Args:
        in_channels: C of every level.
        num_anchors: A, anchors per location.
        conv_depth: number of 3x3 conv + ReLU layers before the predictors.

    Parameter names are torchvision's: ``conv.{i}.0``, ``cls_logits``, ``bbox_pred``; checkpoints with the
    old single-conv name ``conv.weight`` load too.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        if conv_depth < 1:
            raise ValueError(f"RPNHead conv_depth must be >= 1, got {conv_depth}")
        self.conv = nn.Sequential(
            *[
                nn.Sequential(Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
                for _ in range(conv_depth)
            ]
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    # State-dict layout version, torchvision's: 1 (torchvision < 0.13) named the single shared conv ``conv``.
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if local_metadata.get("version", 1) < 2:
            for kind in ("weight", "bias"):
                old = f"{prefix}conv.{kind}"
                if old in state_dict:
                    state_dict[f"{prefix}conv.0.0.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level ``(Tensor[N, A, Hl, Wl] logits, Tensor[N, A * 4, Hl, Wl] deltas)``, as two lists.

        Both 1×1 predictors run as one matrix product over the pixels of each level (the same result as
        the two convolutions up to summation order, on every device and in exported graphs): CPU
        convolution kernels are slow for 3 or 12 output channels.
        """
        a = self.cls_logits.out_channels
        # Both predictors as one [5A, C] weight and [5A] bias.
        weight = torch.cat([self.cls_logits.weight, self.bbox_pred.weight]).flatten(1)
        bias = torch.cat([self.cls_logits.bias, self.bbox_pred.bias])
        logits, deltas = [], []
        for feature in features:
            y = _pointwise(self.conv(feature), weight, bias)  # [N, 5A, Hl, Wl]
            logits.append(y[:, :a])
            deltas.append(y[:, a:])
        return logits, deltas


def _pointwise(t: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A 1×1 convolution [N, C, H, W] -> [N, O, H, W] (``weight`` [O, C], ``bias`` [O]) as a matrix product,
    in the layout ``t`` has: [O, C] × [C, H*W] per image (NCHW), or [N*H*W, C] × [C, O] (channels-last)."""
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        # Channels-last [N, C, H, W] is [N*H*W, C] in memory; the result [N*H*W, O] viewed back channels-last.
        y = torch.addmm(bias, t.permute(0, 2, 3, 1).reshape(n * h * w, c), weight.t())
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)
    # [O, C] @ [N, C, H*W] + [O, 1] -> [N, O, H*W] -> [N, O, H, W]
    return torch.baddbmm(bias[None, :, None], weight.expand(n, -1, -1), t.reshape(n, c, h * w)).view(n, -1, h, w)


def _flatten_levels(per_level: list[Tensor], channels: int) -> Tensor:
    """[N, A * channels, Hl, Wl] per level -> [N, A_total, channels] ordered (level, y, x, anchor)."""
    flat = []
    for x in per_level:
        n, _, h, w = x.shape
        # [N, A, channels, Hl, Wl] -> [N, Hl, Wl, A, channels] -> [N, Hl * Wl * A, channels].
        flat.append(x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels))
    return torch.cat(flat, dim=1)


class RegionProposalNetwork(nn.Module):
    """Proposes object boxes from anchors; in training also returns its losses.

    Args:
        anchor_generator: anchors of every level.
        head: module mapping a list of level features to (objectness, deltas), e.g. :class:`RPNHead`.
        fg_iou_thresh: anchors with IoU >= this with a gt are positives.
        bg_iou_thresh: anchors with IoU < this with every gt are negatives.
        batch_size_per_image: anchors sampled per image for the losses.
        positive_fraction: largest fraction of positives in that sample.
        pre_nms_top_n_train: per level, anchors kept by objectness before NMS (training).
        pre_nms_top_n_test: same at test time.
        post_nms_top_n_train: proposals kept per image after NMS (training).
        post_nms_top_n_test: same at test time.
        nms_thresh: IoU threshold of the per-level NMS.
        score_thresh: proposals with objectness probability below this are dropped.
        min_size: proposals with a side shorter than this (pixels) are dropped.
        smooth_l1_beta: beta of the smooth-L1 box loss (torchvision: 1/9).
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: nn.Module,
        *,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_train: int = 2000,
        post_nms_top_n_test: int = 1000,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
        min_size: float = 1e-3,
        smooth_l1_beta: float = 1.0 / 9,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n_train = pre_nms_top_n_train
        self.pre_nms_top_n_test = pre_nms_top_n_test
        self.post_nms_top_n_train = post_nms_top_n_train
        self.post_nms_top_n_test = post_nms_top_n_test
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size
        self.smooth_l1_beta = smooth_l1_beta

    def pre_nms_top_n(self) -> int:
        """Per-level pre-NMS count of the current mode."""
        return self.pre_nms_top_n_train if self.training else self.pre_nms_top_n_test

    def post_nms_top_n(self) -> int:
        """Per-image post-NMS count of the current mode."""
        return self.post_nms_top_n_train if self.training else self.post_nms_top_n_test

    def filter_proposals(
        self,
        anchors: Tensor,
        objectness: Tensor,
        deltas: Tensor,
        image_sizes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Top-k per level, decode, clip, drop small and low-scoring boxes, per-level NMS, top-k.

        Args:
            anchors: Tensor[A_total, 4].
            objectness: Tensor[N, A_total] logits (detached here).
            deltas: Tensor[N, A_total, 4] (detached here).
            image_sizes: per image ``(h, w)`` before padding (ints, or traced 0-dim tensors).
            num_anchors_per_level: Al for every level (likewise).

        Returns:
            Per image the proposals Tensor[P, 4] and their objectness probabilities Tensor[P].
        """
        objectness = objectness.detach().float()  # scores, decoding and NMS in float32 under autocast
        deltas = deltas.detach().float()
        num_images = objectness.shape[0]
        top_idx, level_ids, offset = [], [], 0
        # Level sizes are ints, or traced 0-dim tensors (k and the offsets then stay symbolic).
        for level, ob in enumerate(objectness.split(num_anchors_per_level, dim=1)):
            idx = ob.topk(at_most(ob.shape[1], self.pre_nms_top_n()), dim=1).indices  # [N, k]
            top_idx.append(idx + offset)
            level_ids.append(torch.full_like(idx[0], level))
            offset += ob.shape[1]
        top_idx = torch.cat(top_idx, dim=1)  # [N, K_total]
        levels = torch.cat(level_ids)  # [K_total]
        batch_idx = torch.arange(num_images, device=objectness.device)[:, None]
        scores = torch.sigmoid(objectness[batch_idx, top_idx])  # [N, K_total]
        # Decoding is elementwise: decoding only the selected anchors gives the same boxes.
        boxes = self.box_coder.decode(deltas[batch_idx, top_idx], anchors[top_idx])  # [N, K_total, 4]

        final_boxes, final_scores = [], []
        for boxes_i, scores_i, image_size in zip(boxes, scores, image_sizes):
            boxes_i = clip_boxes_to_image(boxes_i, image_size)
            keep = remove_small_boxes(boxes_i, self.min_size)
            boxes_i, scores_i, lvl = boxes_i[keep], scores_i[keep], levels[keep]
            keep = torch.where(scores_i >= self.score_thresh)[0]
            boxes_i, scores_i, lvl = boxes_i[keep], scores_i[keep], lvl[keep]
            keep = batched_nms(boxes_i, scores_i, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes_i[keep])
            final_scores.append(scores_i[keep])
        return final_boxes, final_scores

    def compute_loss(
        self, anchors: Tensor, objectness: Tensor, deltas: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Objectness BCE over sampled anchors and smooth-L1 over sampled positives / number sampled.

        Args:
            anchors: Tensor[A_total, 4].
            objectness: Tensor[N, A_total] logits.
            deltas: Tensor[N, A_total, 4].
            targets: per image dict with ``boxes`` Tensor[M, 4] (M may be 0: all anchors negative).
        """
        num_anchors = anchors.shape[0]
        labels, matched_gt_boxes = [], []
        for target in targets:
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:  # background image: every anchor is a negative
                labels.append(torch.zeros(num_anchors, dtype=torch.float32, device=anchors.device))
                matched_gt_boxes.append(gt_boxes.new_zeros((1, 4)).expand(num_anchors, 4))
                continue
            matched_idxs = self.proposal_matcher(box_iou(gt_boxes, anchors))
            labels_i = (matched_idxs >= 0).to(torch.float32)
            labels_i[matched_idxs == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(labels_i)
            matched_gt_boxes.append(gt_boxes[matched_idxs.clamp(min=0)])
        pos_masks, neg_masks = self.fg_bg_sampler(labels)

        # Flat indices into the [N * A_total] concatenation of all images, ascending as torchvision's.
        pos_inds = torch.where(torch.cat(pos_masks))[0]
        neg_inds = torch.where(torch.cat(neg_masks))[0]
        sampled_inds = torch.cat([pos_inds, neg_inds])
        pos_anchor = pos_inds % num_anchors
        target_boxes = torch.cat(
            [gt[mask] for gt, mask in zip(matched_gt_boxes, pos_masks)]
        )  # [num_pos, 4], same order as pos_inds
        regression_targets = self.box_coder.encode(target_boxes, anchors[pos_anchor])
        box_loss = F.smooth_l1_loss(
            deltas.reshape(-1, 4)[pos_inds], regression_targets, beta=self.smooth_l1_beta, reduction="sum"
        ) / sampled_inds.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.reshape(-1)[sampled_inds], torch.cat(labels)[sampled_inds]
        )
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        features: dict[str, Tensor],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals for every image, and the RPN losses in training.

        Args:
            images: Tensor[N, 3, Hp, Wp], the padded batch (only its size is used).
            image_sizes: per image ``(h, w)`` before padding.
            features: ordered level features Tensor[N, C, Hl, Wl] (all levels are used, e.g. p2..p6).
            targets: per image dict with ``boxes`` Tensor[M, 4]; required in training.

        Returns:
            ``(proposals, losses)``: per image Tensor[P, 4]; losses ``loss_objectness`` and
            ``loss_rpn_box_reg`` in training, else an empty dict.
        """
        if self.training and targets is None:
            raise ValueError("RegionProposalNetwork in training mode needs targets (list of dicts with 'boxes')")
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"got {len(image_sizes)} image_sizes for a batch of {images.shape[0]} images")
        feature_list = list(features.values())
        logits, bbox_deltas = self.head(feature_list)
        anchors = self.anchor_generator(tuple(images.shape[-2:]), feature_list)
        num_anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in logits]
        objectness = _flatten_levels(logits, 1).squeeze(-1)  # [N, A_total]
        deltas = _flatten_levels(bbox_deltas, 4)  # [N, A_total, 4]
        boxes, _ = self.filter_proposals(anchors, objectness, deltas, image_sizes, num_anchors_per_level)
        losses: dict[str, Tensor] = {}
        if self.training:
            losses = self.compute_loss(anchors, objectness, deltas, targets)
        return boxes, losses
