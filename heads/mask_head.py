"""Mask R-CNN mask branch: conv head, deconv predictor, loss and inference (pasting: ``mask_paste``).

Shape shorthand:
    R  RoIs (positive proposals in training, detections at test time)
    C  channels (256)
    K  classes, background included
    S  pooled size (14);  M = 2 * S mask size (28)
    H, W  image size the masks are pasted into

Numerics are torchvision's (``MaskRCNNHeads``, ``MaskRCNNPredictor``, ``maskrcnn_loss``,
``paste_masks_in_image``).
"""
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from resdet.layers.blocks import NormSpec, conv_norm_act, init_convs_msra

__all__ = ["MaskHead", "MaskPredictor", "mask_loss", "mask_probs"]


class MaskHead(nn.Sequential):
    """Stack of 3x3 conv (+ norm) + ReLU on the pooled RoI features, [R, C, S, S] -> [R, layers[-1], S, S].

    Args:
        in_channels: C.
        layers: output channels of each conv (default four of 256).
        dilation: conv dilation.
        norm: None (torchvision v1), ``"bn"`` (v2), ``"gn"`` or any :data:`~resdet.layers.blocks.NormSpec`.

    Parameter names are torchvision's ``MaskRCNNHeads``: ``{i}.0.weight`` (conv), ``{i}.1.*`` (norm);
    the pre-0.13 names ``mask_fcn{i+1}.*`` load too.
    """

    def __init__(
        self,
        in_channels: int = 256,
        layers: Sequence[int] = (256, 256, 256, 256),
        dilation: int = 1,
        *,
        norm: NormSpec = None,
    ) -> None:
        blocks, channels = [], in_channels
        for out_channels in layers:
            blocks.append(conv_norm_act(channels, out_channels, norm=norm, dilation=dilation))
            channels = out_channels
        super().__init__(*blocks)
        self.out_channels = channels
        init_convs_msra(self)

    # State-dict layout version, torchvision's: 1 (torchvision < 0.13) named the convs ``mask_fcn{i+1}``.
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if local_metadata.get("version", 1) < 2:
            for i in range(len(self)):
                for kind in ("weight", "bias"):
                    old = f"{prefix}mask_fcn{i + 1}.{kind}"
                    if old in state_dict:
                        state_dict[f"{prefix}{i}.0.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class MaskPredictor(nn.Sequential):
    """2x deconv + ReLU + 1x1 per-class logits, [R, in_channels, S, S] -> [R, K, M, M].

    Args:
        in_channels: channels out of the mask head.
        dim_reduced: channels of the deconv.
        num_classes: K, background included.

    Parameter names are torchvision's ``MaskRCNNPredictor``: ``conv5_mask``, ``mask_fcn_logits``.
    """

    def __init__(self, in_channels: int = 256, dim_reduced: int = 256, num_classes: int = 91) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("conv5_mask", nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("mask_fcn_logits", nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)),
                ]
            )
        )
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")

    def class_logits(self, x: Tensor, classes: Tensor) -> Tensor:
        """Logits of one class per RoI, [R, in_channels, S, S] -> [R, M, M]; ``classes`` Tensor[R] int64.

        Equals ``self(x)[arange(R), classes]`` (up to summation order) but evaluates the 1×1 logits
        convolution for that class only: K times fewer products there, and the same gradients (the
        other classes' logits take no part in the loss). The 2×2 stride-2 deconvolution runs as one
        matrix product (:meth:`_class_logits_matmul`, on every device and in exported graphs); a
        predictor given another deconvolution runs it as ``ConvTranspose2d``.
        """
        conv = self.mask_fcn_logits
        weight = conv.weight[classes, :, 0, 0]  # [R, D]
        bias = conv.bias[classes]  # [R]
        deconv = self.conv5_mask
        if deconv.kernel_size == deconv.stride == (2, 2) and deconv.padding == (0, 0) \
                and deconv.output_padding == (0, 0) and deconv.groups == 1 and deconv.dilation == (1, 1):
            return self._class_logits_matmul(x, weight, bias)
        x = self.relu(deconv(x))  # [R, D, M, M]
        # Per RoI r: sum over D of weight[r, d] * x[r, d, :, :].
        return torch.einsum("rdhw,rd->rhw", x, weight) + bias[:, None, None]

    def _class_logits_matmul(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """:meth:`class_logits` with the 2×2 stride-2 deconv as one matrix product.

        Such a deconv gives every input pixel its own 2×2 output block, ``y[r, :, 2i+a, 2j+b] =
        W[:, :, a, b]^T x[r, :, i, j] + b``: a [R*S*S, C] × [C, 4*D] product over all RoIs at once, with
        no overlap to sum (CPU kernels for transposed convolutions are slow; README, Measured).
        """
        r, c, s, _ = x.shape
        deconv = self.conv5_mask
        d = deconv.out_channels
        pixels = x.permute(0, 2, 3, 1).reshape(r * s * s, c)  # [R*S*S, C]
        w = deconv.weight.permute(0, 2, 3, 1).reshape(c, 4 * d)  # [C, D, 2, 2] -> [C, (a, b, D)]
        y = pixels @ w if deconv.bias is None else torch.addmm(deconv.bias.repeat(4), pixels, w)
        y = y.relu_()  # [R*S*S, 4*D]
        # Per RoI: [S*S*4, D] @ [D, 1] -> [R, S*S*4], the class logit at every (i, j, a, b).
        logits = torch.bmm(y.view(r, s * s * 4, d), weight.unsqueeze(2)).view(r, s, s, 2, 2)
        # (i, j, a, b) -> output pixel (2i + a, 2j + b): [R, S, 2, S, 2] -> [R, 2S, 2S].
        return logits.permute(0, 1, 3, 2, 4).reshape(r, 2 * s, 2 * s) + bias[:, None, None]


def project_masks(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """Crop-and-resize the matched gt masks to the RoIs: Tensor[R, size, size] in [0, 1].

    Args:
        gt_masks: Tensor[G, H, W] (uint8 or float) of one image.
        boxes: Tensor[R, 4] RoIs.
        matched_idxs: Tensor[R] gt index of each RoI.
        size: M.
    """
    # Only the gt masks that are matched are converted to float and pooled (same numbers, less work).
    used, inverse = torch.unique(matched_idxs, return_inverse=True)
    masks = gt_masks[used][:, None].to(boxes)  # [G_used, 1, H, W]
    rois = torch.cat([inverse.to(boxes)[:, None], boxes], dim=1)
    return roi_align(masks, rois, (size, size), 1.0)[:, 0]


def mask_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    matched_idxs: list[Tensor],
) -> Tensor:
    """Mean per-pixel BCE of the gt class channel against the projected gt masks.

    Args:
        mask_logits: Tensor[R, K, M, M] for the positive proposals of all images, or Tensor[R, M, M]
            already of each RoI's gt class (:meth:`MaskPredictor.class_logits`).
        proposals: per image Tensor[R_i, 4] positive proposals.
        gt_masks: per image Tensor[G_i, H_i, W_i].
        gt_labels: per image Tensor[G_i].
        matched_idxs: per image Tensor[R_i], gt index of each positive.

    Returns:
        Scalar; zero (connected to the graph) without positives.
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([lab[idx] for lab, idx in zip(gt_labels, matched_idxs)])
    targets = torch.cat(
        [project_masks(m, p, i, size) for m, p, i in zip(gt_masks, proposals, matched_idxs)]
    )  # [R, M, M]
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits
    if mask_logits.dim() == 4:  # [R, K, M, M] -> [R, M, M], each RoI's gt class
        logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, targets)


def mask_probs(mask_logits: Tensor, labels: list[Tensor]) -> list[Tensor]:
    """Sigmoid of the predicted class channel, per image Tensor[R_i, 1, M, M].

    ``mask_logits`` is Tensor[R, K, M, M], or Tensor[R, M, M] already of each RoI's predicted class.
    """
    logits = mask_logits
    if mask_logits.dim() == 4:  # [R, K, M, M] -> [R, M, M], each RoI's predicted class
        all_labels = torch.cat(labels)
        logits = mask_logits[torch.arange(mask_logits.shape[0], device=all_labels.device), all_labels]
    probs = logits[:, None].sigmoid()  # [R, 1, M, M]
    if len(labels) == 1:  # no split: one image's count stays symbolic in a trace
        return [probs]
    return list(probs.split([len(lab) for lab in labels], dim=0))
