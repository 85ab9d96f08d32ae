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

Under ``torch.jit.trace`` / ONNX export (:mod:`resdet.layers.tracing`) the per-box loop, whose sizes
are data, cannot be recorded; there the same boxes and the same bilinear weights are applied as two
batched matrix products with per-box weight matrices (the resize is separable), giving the loop's
values to float rounding with a graph valid for any number of masks and any image size.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .tracing import is_tracing

__all__ = ["iter_pasted_masks", "paste_masks"]


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Boxes scaled by ``scale`` about their centres."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)


def _pad_and_place(masks: Tensor, boxes: Tensor, padding: int) -> tuple[Tensor, Tensor]:
    """Masks zero-padded to Tensor[R, Mp, Mp], and their boxes enlarged to match and rounded toward zero
    to integer pixels, Tensor[R, 4] int64 (a mask covers ``x0..x1``, ``y0..y1`` inclusive)."""
    size = masks.shape[-1]  # M is fixed by the mask head: a constant, also in a trace
    padded = F.pad(masks[:, 0].contiguous(), (padding,) * 4)  # [R, Mp, Mp]
    return padded, _expand_boxes(boxes, float(size + 2 * padding) / size).to(torch.int64)


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
    padded, boxes = _pad_and_place(masks, boxes, padding)
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
        image_shape: ``(H, W)``: ints, or traced 0-dim int64 tensors while tracing.
        padding: zero border added to the masks before resizing.

    Returns:
        Tensor[R, 1, H, W] in the dtype of ``masks``.
    """
    if is_tracing():
        return _paste_masks_traced(masks, boxes, image_shape[0], image_shape[1], padding)
    im_h, im_w = int(image_shape[0]), int(image_shape[1])
    out = masks.new_zeros((masks.shape[0], im_h, im_w))
    for i, top, left, window in iter_pasted_masks(masks, boxes, image_shape, padding):
        out[i, top : top + window.shape[0], left : left + window.shape[1]] = window
    return out[:, None]


def _axis_weights(start: Tensor, end: Tensor, out_size: Tensor, in_size: int) -> Tensor:
    """Bilinear (align_corners=False) resize of ``in_size`` samples to the box ``start[r]..end[r]``
    (inclusive, at least one sample) on an axis of ``out_size`` pixels, as a matrix Tensor[R, out_size,
    in_size]; rows of pixels outside the box are zero. Source positions and weights are computed as
    ``F.interpolate``'s CPU kernel does (float32, source index clamped at 0)."""
    length = (end - start + 1).clamp(min=1)  # samples the mask is resized to
    j = torch.arange(out_size, device=start.device)[None, :] - start[:, None]  # [R, out] position in the box
    ratio = in_size / length.to(torch.float32)
    src = torch.clamp(ratio[:, None] * (j.to(torch.float32) + 0.5) - 0.5, min=0.0)
    i0 = torch.clamp(torch.floor(src), max=float(in_size - 1))
    l1 = torch.clamp(src - i0, min=0.0, max=1.0)
    i1 = torch.clamp(i0 + 1, max=float(in_size - 1))
    inside = ((j >= 0) & (j <= (end - start)[:, None])).to(torch.float32)  # an inverted box covers nothing
    grid = torch.arange(in_size, dtype=torch.float32, device=start.device)  # [in]
    w0 = (i0[..., None] == grid).to(torch.float32) * ((1.0 - l1) * inside)[..., None]
    w1 = (i1[..., None] == grid).to(torch.float32) * (l1 * inside)[..., None]
    return w0 + w1  # [R, out, in]


def _paste_masks_traced(masks: Tensor, boxes: Tensor, height: Tensor, width: Tensor, padding: int) -> Tensor:
    """:func:`paste_masks` with symbolic sizes: ``Wy @ mask @ Wx^T`` per mask, no loop, no data-dependent
    shape. ``height`` and ``width`` are traced 0-dim int64 tensors."""
    padded, boxes = _pad_and_place(masks, boxes, padding)
    mp = padded.shape[-1]
    wx = _axis_weights(boxes[:, 0], boxes[:, 2], width, mp).to(padded.dtype)  # [R, W, Mp]
    wy = _axis_weights(boxes[:, 1], boxes[:, 3], height, mp).to(padded.dtype)  # [R, H, Mp]
    # Along x, then y: [R, Mp, Mp] @ [R, Mp, W] -> [R, Mp, W]; [R, H, Mp] @ that -> [R, H, W].
    return torch.matmul(wy, torch.matmul(padded, wx.transpose(1, 2)))[:, None]
