"""Mask post-processing: paste [R, 1, M, M] RoI mask probabilities into full-size images.

Shape shorthand:
    R  masks (detections of one image)
    M  mask size (28);  Mp = M + 2 * padding
    H, W  image size the masks are pasted into

Numerics are torchvision's ``paste_masks_in_image`` (pad, enlarge the box, round it toward zero,
bilinear ``F.interpolate`` to the box, write into a zero image), bit for bit. resdet keeps its own
loop for speed: torchvision zero-fills one full image per mask and then stacks them (three passes over
the R x H x W result); here the result is zero-filled once and each resized mask is copied into its
box's in-image part only. :func:`iter_pasted_masks` gives each pasted mask as its window alone, for code
that never needs R full-size images at once (drawing and RLE encoding of a huge image in ``tools/infer.py``).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["iter_pasted_masks", "paste_masks"]


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Boxes scaled by ``scale`` about their centres."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)


def iter_pasted_masks(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int],
                      padding: int = 1) -> Iterator[tuple[int, int, int, Tensor]]:
    """Each mask pasted into the in-image window of its box, one at a time: ``(index, top, left, window)``
    with ``window`` Tensor[h, w] equal to ``paste_masks(...)[index, 0, top:top + h, left:left + w]`` (the
    rest of that full-size mask is zero). A box wholly outside the image yields nothing.

    Args:
        masks: Tensor[R, 1, M, M] probabilities.
        boxes: Tensor[R, 4] in the pixels of the target image.
        image_shape: ``(H, W)``.
        padding: zero border added to the masks before resizing.
    """
    im_h, im_w = int(image_shape[0]), int(image_shape[1])
    num = masks.shape[0]
    if num == 0:
        return
    if masks.dim() != 4 or masks.shape[1] != 1 or boxes.shape != (num, 4):
        raise ValueError(
            f"paste_masks expects masks [R, 1, M, M] and boxes [R, 4], got {tuple(masks.shape)} and "
            f"{tuple(boxes.shape)}"
        )
    size = masks.shape[-1]
    padded = F.pad(masks[:, 0].contiguous(), (padding,) * 4)  # [R, Mp, Mp]
    mp = size + 2 * padding
    boxes = _expand_boxes(boxes, float(mp) / size).to(torch.int64)
    bx0, by0, bx1, by1 = boxes.unbind(1)
    w = (bx1 - bx0 + 1).clamp(min=1)
    h = (by1 - by0 + 1).clamp(min=1)
    # In-image part of each box: [x0, x1) x [y0, y1).
    x0, x1 = bx0.clamp(min=0), torch.minimum(bx1 + 1, torch.full_like(bx1, im_w))
    y0, y1 = by0.clamp(min=0), torch.minimum(by1 + 1, torch.full_like(by1, im_h))
    rows = zip(*(v.tolist() for v in (bx0, by0, w, h, x0, y0, x1, y1)))
    for i, (bx, by, bw, bh, left, top, right, bottom) in enumerate(rows):
        if right <= left or bottom <= top:
            continue  # box wholly outside the image
        # [Mp, Mp] -> [1, 1, Mp, Mp] for interpolate; keep the box's in-image rows and columns.
        resized = F.interpolate(padded[i][None, None], size=(bh, bw), mode="bilinear", align_corners=False)
        yield i, top, left, resized[0, 0, top - by : bottom - by, left - bx : right - bx]


def paste_masks(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], padding: int = 1) -> Tensor:
    """Paste RoI masks into full images, numerically as torchvision's ``paste_masks_in_image``.

    Each mask is padded by ``padding`` zeros, its box enlarged to match, the box rounded toward zero to
    integer pixels, the mask bilinearly resized to the box and its in-image part written into a zero
    image.

    Args:
        masks: Tensor[R, 1, M, M] probabilities.
        boxes: Tensor[R, 4] in the pixels of the target image.
        image_shape: ``(H, W)``.
        padding: zero border added to the masks before resizing.

    Returns:
        Tensor[R, 1, H, W] in the dtype of ``masks``.
    """
    im_h, im_w = int(image_shape[0]), int(image_shape[1])
    out = masks.new_zeros((masks.shape[0], im_h, im_w))
    for i, top, left, window in iter_pasted_masks(masks, boxes, image_shape, padding):
        out[i, top : top + window.shape[0], left : left + window.shape[1]] = window
    return out[:, None]
