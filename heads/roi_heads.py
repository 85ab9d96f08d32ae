"""RoI heads: box head (2fc or 4conv1fc), class-specific box predictor, and the optional mask branch.

Shape shorthand:
    N  images
    R  sampled proposals of the batch in training (R_i per image), all proposals at test time
    C  channels of the pooled features;  S  pooled size (7)
    D  representation size of the box head (1024)
    K  classes, background (0) included
    G  ground-truth boxes of one image
    Q  detections of one image (<= detections_per_img)

Numerics follow torchvision's ``RoIHeads`` (same parameter names and random draws); at test time only
(proposal, class) pairs above ``score_thresh`` are decoded, which gives the same boxes.
"""
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from resdet.layers.blocks import NormSpec, conv_norm_act, init_convs_msra
from resdet.layers.box_ops import BOX_LOSSES, BalancedPositiveNegativeSampler, BoxCoder, Matcher, box_regression_loss

from .mask_head import MaskPredictor, mask_loss, mask_probs
from .poolers import MultiScaleRoIAlign

__all__ = ["TwoMLPHead", "ConvFCHead", "FastRCNNPredictor", "RoIHeads"]


class TwoMLPHead(nn.Module):
    """The "2fc" box head: flatten, fc6 + ReLU, fc7 + ReLU; [R, C, S, S] -> [R, D].

    Args:
        in_channels: C * S * S.
        representation_size: D.
    """

    def __init__(self, in_channels: int, representation_size: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_channels = representation_size

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)  # [R, C * S * S]
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class ConvFCHead(nn.Sequential):
    """The "4conv1fc" box head: 3x3 convs (+ norm) + ReLU, flatten, fcs + ReLU; [R, C, S, S] -> [R, D].

    Args:
        input_size: ``(C, S, S)``.
        conv_layers: output channels of each conv.
        fc_layers: output features of each fc.
        norm: None, ``"gn"``, ``"bn"`` (torchvision's v2 models) or a factory ``channels -> Module``.

    Layout and names are torchvision's ``FastRCNNConvFCHead``: ``{i}.0`` conv, ``{i}.1`` norm, then
    ``Flatten`` and ``Linear``/``ReLU`` pairs.
    """

    def __init__(
        self,
        input_size: tuple[int, int, int],
        conv_layers: Sequence[int] = (256, 256, 256, 256),
        fc_layers: Sequence[int] = (1024,),
        *,
        norm: NormSpec = "gn",
    ) -> None:
        channels, height, width = input_size
        blocks: list[nn.Module] = []
        for out_channels in conv_layers:
            blocks.append(conv_norm_act(channels, out_channels, norm=norm))
            channels = out_channels
        blocks.append(nn.Flatten())  # [R, C' * S * S]
        features = channels * height * width
        for out_features in fc_layers:
            blocks += [nn.Linear(features, out_features), nn.ReLU(inplace=True)]
            features = out_features
        super().__init__(*blocks)
        self.out_channels = features
        init_convs_msra(self)


class FastRCNNPredictor(nn.Module):
    """Class scores and class-specific box deltas; [R, D] -> ([R, K], [R, K * 4]).

    Args:
        in_channels: D.
        num_classes: K, background included.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)  # [R, D] (also accepts [R, D, 1, 1])
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Box classification/regression on proposals, and optionally masks.

    Args:
        box_roi_pool: pooler of the box branch (S = 7).
        box_head: [R, C, S, S] -> [R, D], e.g. :class:`TwoMLPHead` or :class:`ConvFCHead`.
        box_predictor: [R, D] -> ([R, K], [R, K * 4]), e.g. :class:`FastRCNNPredictor`.
        fg_iou_thresh: proposals with IoU >= this with a gt are positives.
        bg_iou_thresh: proposals with IoU < this with every gt are negatives.
        batch_size_per_image: proposals sampled per image.
        positive_fraction: largest fraction of positives in the sample.
        bbox_reg_weights: box coder weights.
        score_thresh: test-time minimum class probability.
        nms_thresh: test-time per-class NMS IoU threshold.
        detections_per_img: test-time maximum detections per image.
        box_loss: ``"smooth_l1"`` (torchvision), ``"l1"`` or ``"giou"``.
        smooth_l1_beta: smooth-L1 beta (torchvision: 1/9).
        mask_roi_pool: pooler of the mask branch (S = 14); the mask branch runs when all three mask
            modules are given.
        mask_head: e.g. :class:`~resdet.heads.mask_head.MaskHead`.
        mask_predictor: e.g. :class:`~resdet.heads.mask_head.MaskPredictor`.
    """

    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        box_head: nn.Module,
        box_predictor: nn.Module,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9,
        mask_roi_pool: Optional[MultiScaleRoIAlign] = None,
        mask_head: Optional[nn.Module] = None,
        mask_predictor: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    @property
    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None and self.mask_head is not None and self.mask_predictor is not None

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Add gt boxes to the proposals, match, and sample.

        Returns:
            Per image: sampled proposals Tensor[R_i, 4], matched gt index Tensor[R_i] (0 for background),
            labels Tensor[R_i] (0 background), matched gt boxes Tensor[R_i, 4].
        """
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]
        matched_idxs, labels = [], []
        for props, gt, target in zip(proposals, gt_boxes, targets):
            if gt.numel() == 0:  # background image: every proposal is a negative
                matched_idxs.append(torch.zeros(len(props), dtype=torch.int64, device=props.device))
                labels.append(torch.zeros(len(props), dtype=torch.int64, device=props.device))
                continue
            matches = self.proposal_matcher(box_iou(gt, props))
            labels_i = target["labels"][matches.clamp(min=0)].to(torch.int64)
            labels_i[matches == Matcher.BELOW_LOW_THRESHOLD] = 0
            labels_i[matches == Matcher.BETWEEN_THRESHOLDS] = -1  # ignored by the sampler
            matched_idxs.append(matches.clamp(min=0))
            labels.append(labels_i)
        pos_masks, neg_masks = self.fg_bg_sampler(labels)
        out_props, out_idxs, out_labels, out_gt = [], [], [], []
        for props, idxs, labels_i, gt, pos, neg in zip(proposals, matched_idxs, labels, gt_boxes, pos_masks, neg_masks):
            keep = torch.where(pos | neg)[0]
            out_props.append(props[keep])
            out_idxs.append(idxs[keep])
            out_labels.append(labels_i[keep])
            if gt.numel() == 0:
                gt = gt.new_zeros((1, 4))
            out_gt.append(gt[idxs[keep]])
        return out_props, out_idxs, out_labels, out_gt

    def box_losses(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], labels: list[Tensor],
        matched_gt_boxes: list[Tensor],
    ) -> dict[str, Tensor]:
        """Cross-entropy over sampled proposals; box loss over positives divided by the number sampled."""
        labels_all = torch.cat(labels)
        loss_classifier = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        # [R, K * 4] -> [R, K, 4]; take each positive's gt-class deltas.
        deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels_all[pos]]
        box_loss = box_regression_loss(
            self.box_loss, self.box_coder, deltas, torch.cat(matched_gt_boxes)[pos], torch.cat(proposals)[pos],
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_classifier": loss_classifier, "loss_box_reg": box_loss / labels_all.numel()}

    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Softmax, per-class decode, clip, score threshold, drop tiny boxes, per-class NMS, top detections."""
        class_logits, box_regression = class_logits.float(), box_regression.float()  # float32 under autocast
        num_classes = class_logits.shape[-1]
        scores_all = F.softmax(class_logits, -1)
        deltas_all = box_regression.reshape(box_regression.shape[0], num_classes, 4)  # [R, K, 4]
        if len(proposals) == 1:  # no split: one image's proposal count stays symbolic in a trace
            per_image = [(scores_all, deltas_all)]
        else:
            counts = [len(p) for p in proposals]
            per_image = list(zip(scores_all.split(counts), deltas_all.split(counts)))
        results = []
        for (scores, deltas), props, image_size in zip(per_image, proposals, image_sizes):
            # (proposal, class) pairs above the threshold, background dropped, in proposal-major order.
            prop_idx, cls_idx = torch.where(scores[:, 1:] > self.score_thresh)
            labels = cls_idx + 1
            boxes = self.box_coder.decode(deltas[prop_idx, labels], props[prop_idx])
            boxes = clip_boxes_to_image(boxes, image_size)
            scores = scores[prop_idx, labels]
            keep = remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
        return results

    def _mask_logits(self, pooled: Tensor, classes: Tensor) -> Tensor:
        """Mask logits of each RoI's class: [R, M, M] with a :class:`MaskPredictor` (its ``class_logits``
        computes that class only), else the predictor's full [R, K, M, M]."""
        x = self.mask_head(pooled)
        if isinstance(self.mask_predictor, MaskPredictor):
            return self.mask_predictor.class_logits(x, classes)
        return self.mask_predictor(x)

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Detections (eval) or losses (training).

        Args:
            features: level features by name, Tensor[N, C, Hl, Wl].
            proposals: per image Tensor[P_i, 4] from the RPN.
            image_sizes: per image ``(h, w)`` before padding.
            targets: per image ``boxes`` Tensor[G, 4] float, ``labels`` Tensor[G] int64, and ``masks``
                Tensor[G, H, W] for the mask branch; required in training. G may be 0.

        Returns:
            ``(detections, losses)``. Eval: per image ``boxes`` Tensor[Q, 4], ``labels`` Tensor[Q] int64,
            ``scores`` Tensor[Q], with masks ``masks`` Tensor[Q, 1, M, M] probabilities; losses empty.
            Training: detections empty; losses ``loss_classifier``, ``loss_box_reg`` (+ ``loss_mask``).
        """
        if len(proposals) != len(image_sizes):
            raise ValueError(f"RoIHeads got {len(proposals)} proposal lists for {len(image_sizes)} images")
        if self.training:
            proposals, matched_idxs, labels, matched_gt_boxes = self.select_training_samples(proposals, targets)

        tables: dict = {}  # the box and mask poolers share one pixel table of the levels (sparse RoIAlign)
        box_pooled = _pool(self.box_roi_pool, features, proposals, image_sizes, tables)
        if self.training and self.has_mask:
            # The positives are known before the box head runs: pool them now, so the shared table is
            # freed before either head adds its activations.
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_props = [p[i] for p, i in zip(proposals, pos)]
            pos_idxs = [m[i] for m, i in zip(matched_idxs, pos)]
            pos_labels = torch.cat([lab[i] for lab, i in zip(labels, pos)])
            mask_pooled = _pool(self.mask_roi_pool, features, mask_props, image_sizes, tables)
        if self.training:
            tables.clear()
        class_logits, box_regression = self.box_predictor(self.box_head(box_pooled))
        del box_pooled

        if self.training:
            losses = self.box_losses(class_logits, box_regression, proposals, labels, matched_gt_boxes)
            if self.has_mask:
                mask_logits = self._mask_logits(mask_pooled, pos_labels)
                losses["loss_mask"] = mask_loss(
                    mask_logits, mask_props, [t["masks"] for t in targets], [t["labels"] for t in targets], pos_idxs
                )
            return [], losses

        results = self.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
        if self.has_mask:
            boxes = [r["boxes"] for r in results]
            det_labels = torch.cat([r["labels"] for r in results])
            mask_logits = self._mask_logits(_pool(self.mask_roi_pool, features, boxes, image_sizes, tables), det_labels)
            for r, probs in zip(results, mask_probs(mask_logits, [r["labels"] for r in results])):
                r["masks"] = probs
        return results, {}


def _pool(pooler: nn.Module, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]],
          tables: dict) -> Tensor:
    """``pooler(features, boxes, image_sizes)``, sharing ``tables`` when it is resdet's MultiScaleRoIAlign."""
    if isinstance(pooler, MultiScaleRoIAlign):
        return pooler(features, boxes, image_sizes, tables=tables)
    return pooler(features, boxes, image_sizes)
