"""Mask R-CNN mask branch: conv head, deconv predictor, loss, inference, and pasting into the image.

Shape shorthand:
    R  RoIs (positive proposals in training, detections at test time)
    C  channels (256)
    K  classes, background included
    S  pooled size (14);  M = 2 * S mask size (28)
    H, W  image size the masks are pasted into

Numerics are torchvision's (``MaskRCNNHeads``, ``MaskRCNNPredictor``, ``maskrcnn_loss``,
``paste_masks_in_image``); :func:`paste_masks` is batched instead of one interpolate call per box.
"""
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["MaskHead", "MaskPredictor", "mask_loss", "mask_probs", "paste_masks", "make_norm", "conv3x3_norm_relu",
           "init_convs_msra"]


def make_norm(norm: str | Callable[[int], nn.Module] | None, channels: int) -> nn.Module | None:
    """A normalization layer for ``channels``: ``"bn"``, ``"gn"`` (32 groups), a factory, or None."""
    if norm is None:
        return None
    if callable(norm):
        return norm(channels)
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"norm must be None, 'bn', 'gn' or a callable, got {norm!r}")


def conv3x3_norm_relu(in_channels: int, out_channels: int, norm, dilation: int = 1) -> nn.Sequential:
    """``Sequential(conv[, norm], ReLU)`` named like torchvision's ``Conv2dNormActivation`` (conv is ``0``)."""
    norm_layer = make_norm(norm, out_channels)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=norm_layer is None)
    ]
    if norm_layer is not None:
        layers.append(norm_layer)
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def init_convs_msra(module: nn.Module) -> None:
    """MSRA fill (fan_out, ReLU) for every conv in ``module``, zero biases (the R-CNN conv-head init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MaskHead(nn.Sequential):
    """Stack of 3x3 conv (+ norm) + ReLU on the pooled RoI features, [R, C, S, S] -> [R, layers[-1], S, S].

    Args:
        in_channels: C.
        layers: output channels of each conv (default four of 256).
        dilation: conv dilation.
        norm: None (torchvision v1), ``"bn"`` (v2), ``"gn"`` or a factory ``channels -> Module``.

    Parameter names are torchvision's ``MaskRCNNHeads``: ``{i}.0.weight`` (conv), ``{i}.1.*`` (norm);
    the pre-0.13 names ``mask_fcn{i+1}.*`` load too.
    """

    def __init__(
        self,
        in_channels: int = 256,
        layers: Sequence[int] = (256, 256, 256, 256),
        dilation: int = 1,
        *,
        norm: str | Callable[[int], nn.Module] | None = None,
    ) -> None:
        blocks, channels = [], in_channels
        for out_channels in layers:
            blocks.append(conv3x3_norm_relu(channels, out_channels, norm, dilation))
            channels = out_channels
        super().__init__(*blocks)
        self.out_channels = channels
        init_convs_msra(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        for i in range(len(self)):
            for kind in ("weight", "bias"):
                old = f"{prefix}mask_fcn{i + 1}.{kind}"
                if old in state_dict:
                    state_dict[f"{prefix}{i}.0.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
        mask_logits: Tensor[R, K, M, M] for the positive proposals of all images.
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
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]  # [R, M, M]
    return F.binary_cross_entropy_with_logits(logits, targets)


def mask_probs(mask_logits: Tensor, labels: list[Tensor]) -> list[Tensor]:
    """Sigmoid of the predicted class channel, per image Tensor[R_i, 1, M, M]."""
    all_labels = torch.cat(labels)
    index = torch.arange(mask_logits.shape[0], device=all_labels.device)
    probs = mask_logits[index, all_labels][:, None].sigmoid()  # [R, 1, M, M]
    return list(probs.split([len(lab) for lab in labels], dim=0))


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Boxes scaled by ``scale`` about their centres."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)


def _window_weights(out_size: Tensor, in_size: int, length: int, start: Tensor, lo: Tensor, hi: Tensor, dtype):
    """Bilinear (align_corners=False) source indices and weights as ``F.interpolate`` computes them.

    For every box b, a resize of ``in_size`` samples to ``out_size[b]`` samples is evaluated at the output
    positions ``start[b] + j`` for j in [0, length); weights are zero outside ``[lo[b], hi[b])``.
    Returns ``(i0, i1, l0, l1)``, each Tensor[B, length].
    """
    j = torch.arange(length, device=out_size.device)[None, :] + start[:, None]  # [B, length] int64
    ratio = torch.tensor(float(in_size), dtype=torch.float32, device=out_size.device) / out_size.to(torch.float32)
    src = (ratio[:, None] * (j.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().to(torch.int64).clamp(min=0, max=in_size - 1)
    l1 = (src - i0.to(torch.float32)).clamp(0, 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    same = (out_size == in_size)[:, None]  # interpolate copies when the size does not change
    i0 = torch.where(same, j.clamp(0, in_size - 1), i0)
    i1 = torch.where(same, i0, i1)
    l1 = torch.where(same, torch.zeros_like(l1), l1)
    inside = ((j >= lo[:, None]) & (j < hi[:, None])).to(torch.float32)
    return i0, i1, ((1.0 - l1) * inside).to(dtype), (l1 * inside).to(dtype)


def paste_masks(
    masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], padding: int = 1, *, chunk_size: int = 16
) -> Tensor:
    """Paste RoI masks into full images, numerically as torchvision's ``paste_masks_in_image``.

    Each mask is padded by ``padding`` zeros, its box enlarged to match, the box rounded toward zero to
    integer pixels, the mask bilinearly resized to the box and written into a zero image. Boxes are
    processed ``chunk_size`` at a time (sorted by size), each chunk on a crop as large as its largest
    in-image box part; there is no per-box Python loop.

    Args:
        masks: Tensor[R, 1, M, M] probabilities.
        boxes: Tensor[R, 4] in the pixels of the target image.
        image_shape: ``(H, W)``.
        padding: zero border added to the masks before resizing.
        chunk_size: boxes resized together (bounds the temporary memory).

    Returns:
        Tensor[R, 1, H, W] in the dtype of ``masks``.
    """
    im_h, im_w = int(image_shape[0]), int(image_shape[1])
    num = masks.shape[0]
    if num == 0:
        return masks.new_zeros((0, 1, im_h, im_w))
    if masks.dim() != 4 or masks.shape[1] != 1 or boxes.shape != (num, 4):
        raise ValueError(
            f"paste_masks expects masks [R, 1, M, M] and boxes [R, 4], got {tuple(masks.shape)} and "
            f"{tuple(boxes.shape)}"
        )
    size = masks.shape[-1]
    padded = F.pad(masks[:, 0], (padding,) * 4)  # [R, Mp, Mp]
    mp = size + 2 * padding
    boxes = _expand_boxes(boxes, float(mp) / size).to(torch.int64)
    bx0, by0, bx1, by1 = boxes.unbind(1)
    w = (bx1 - bx0 + 1).clamp(min=1)
    h = (by1 - by0 + 1).clamp(min=1)
    # In-image part of each box: [x0, x1) x [y0, y1).
    x0, x1 = bx0.clamp(min=0), torch.minimum(bx1 + 1, torch.full_like(bx1, im_w))
    y0, y1 = by0.clamp(min=0), torch.minimum(by1 + 1, torch.full_like(by1, im_h))
    out = masks.new_zeros((num, im_h, im_w))
    # Boxes of similar size share a crop: sort by in-image area, paint chunks of boxes at a time.
    area = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    for idx in torch.argsort(area).split(chunk_size):
        _paste_chunk(out, padded[idx], idx, (bx0[idx], by0[idx], w[idx], h[idx]), (x0[idx], y0[idx], x1[idx], y1[idx]))
    return out[:, None]


def _paste_chunk(out: Tensor, padded: Tensor, idx: Tensor, box: tuple, part: tuple) -> None:
    """Paint the boxes ``idx`` into ``out`` [R, H, W]; ``box`` = (x, y, w, h) integer boxes, ``part`` = their
    in-image part (x0, y0, x1, y1); ``padded`` [B, Mp, Mp] their padded masks."""
    im_h, im_w = out.shape[-2:]
    bx0, by0, w, h = box
    x0, y0, x1, y1 = part
    num, mp = padded.shape[0], padded.shape[-1]
    crop_w = int((x1 - x0).clamp(min=0).max())
    crop_h = int((y1 - y0).clamp(min=0).max())
    if crop_w == 0 or crop_h == 0:
        return
    # Every box is painted through a crop_h x crop_w window of its own image, moved inside the image
    # where it would overflow; window pixels outside the box get zero weights, so windows write exact zeros
    # there and the writes of one box never collide.
    wx0 = torch.minimum(x0, torch.full_like(x0, im_w - crop_w))
    wy0 = torch.minimum(y0, torch.full_like(y0, im_h - crop_h))
    ix0, ix1, lx0, lx1 = _window_weights(w, mp, crop_w, wx0 - bx0, x0 - bx0, x1 - bx0, out.dtype)
    iy0, iy1, ly0, ly1 = _window_weights(h, mp, crop_h, wy0 - by0, y0 - by0, y1 - by0, out.dtype)
    # Resize along x first, then y, as F.interpolate's bilinear kernel groups its products.
    cols = lx0[:, None, :] * torch.gather(padded, 2, ix0[:, None, :].expand(num, mp, crop_w))
    cols += lx1[:, None, :] * torch.gather(padded, 2, ix1[:, None, :].expand(num, mp, crop_w))  # [B, Mp, cw]
    crop = ly0[:, :, None] * torch.gather(cols, 1, iy0[:, :, None].expand(num, crop_h, crop_w))
    crop += ly1[:, :, None] * torch.gather(cols, 1, iy1[:, :, None].expand(num, crop_h, crop_w))  # [B, ch, cw]
    rows = wy0[:, None] + torch.arange(crop_h, device=out.device)  # [B, crop_h]
    columns = wx0[:, None] + torch.arange(crop_w, device=out.device)  # [B, crop_w]
    out.index_put_((idx[:, None, None], rows[:, :, None], columns[:, None, :]), crop)
