"""RoIAlign on CPU as one sparse linear map from channels-last pixels to the bins.

Numerically torchvision's ``roi_align`` (same sample points, same boundary rules, same bilinear
weights; sums may differ in the last bits because of summation order), but forward and backward
are each one multi-threaded sparse x dense product instead of a scalar loop per RoI:

* every output bin ``b`` of every RoI is ``sum_j w[b, j] * X[p[b, j]]`` where ``X`` is the feature
  map flattened channels-last to ``[P, C]`` and ``(p, w)`` are at most ``4 * gh * gw`` pixel indices
  and bilinear weights (``gh x gw`` sample points per bin, 4 corners each, divided by the count);
* the weights depend only on the boxes, so they are built once per call with vectorised torch ops
  (no Python loop over RoIs), in float32 whatever the feature dtype;
* forward is ``F.embedding_bag(p, X, mode="sum", per_sample_weights=w)`` (a parallel gather-sum),
  backward the transposed map: the ``(bin, weight)`` pairs grouped by pixel, again one
  ``embedding_bag`` from the output gradient to the ``[P, C]`` input gradient (pixels no RoI touches
  get exact zeros).

Several feature levels (the FPN case) are pooled by one map over all levels concatenated: each RoI
names its level, the level's scale and size, so four levels cost one product, not four.

Torchvision's rules, kept here: sample ``(y, x)`` with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W``
contributes 0; otherwise ``y, x`` are clamped to ``>= 0`` and the low corner to ``H - 1`` / ``W - 1``;
without ``aligned`` a RoI is at least 1x1 pixel; with ``sampling_ratio <= 0`` a RoI samples
``ceil(roi_h / Sh) x ceil(roi_w / Sw)`` points per bin; each bin averages its samples.

Shape shorthand:
    N  images;  C  channels;  Hl, Wl  level l size;  P = sum over levels of N * Hl * Wl pixels
    R  RoIs;  Sh, Sw  output size;  B = R * Sh * Sw bins;  L  (pixel, weight) pairs per bin
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["roi_align", "multi_level_roi_align", "bilinear_map"]


def _axis(coord: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis, torchvision's rules.

    Args:
        coord: sample coordinates (float32, any shape).
        size: the axis length (int64, broadcastable to ``coord``).

    Returns:
        ``(low, high, w_low, w_high)``: int64 pixel indices and float32 weights; samples outside
        ``[-1, size]`` get zero weights (and index 0).
    """
    valid = (coord >= -1.0) & (coord <= size)
    c = coord.clamp(min=0.0)
    low = c.to(torch.int64)  # c >= 0: truncation is floor
    last = (size - 1).expand_as(low)
    at_edge = low >= last
    low = torch.where(at_edge, last, low)
    high = torch.where(at_edge, last, low + 1)
    c = torch.where(at_edge, low.to(c.dtype), c)
    lw = c - low.to(c.dtype)
    hw = 1.0 - lw
    zero = torch.zeros((), dtype=c.dtype)
    w_low = torch.where(valid, hw, zero)
    w_high = torch.where(valid, lw, zero)
    low = torch.where(valid, low, 0)
    high = torch.where(valid, high, 0)
    return low, high, w_low, w_high


def _roi_geometry(
    rois: Tensor, scale: Tensor, out_size: tuple[int, int], aligned: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Start and bin size per RoI (float32 [R] each), in level pixels, plus roi height and width."""
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * scale - offset
    start_h = rois[:, 2] * scale - offset
    roi_w = (rois[:, 3] * scale - offset) - start_w
    roi_h = (rois[:, 4] * scale - offset) - start_h
    if not aligned:  # malformed RoIs become 1x1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    return start_h, start_w, roi_h / out_size[0], roi_w / out_size[1], roi_h, roi_w


def _fixed_map(
    start_h: Tensor, start_w: Tensor, bin_h: Tensor, bin_w: Tensor, height: Tensor, width: Tensor, base: Tensor,
    out_size: tuple[int, int], grid: int,
) -> tuple[Tensor, Tensor]:
    """(index, weight), Tensor[B, L] each with L = 4 * grid**2: every RoI samples grid x grid points per bin."""
    sh, sw = out_size
    dev = start_h.device
    g = torch.tensor(float(grid), device=dev)
    frac = (torch.arange(grid, device=dev, dtype=torch.float32) + 0.5)
    # [R, Sh, gh] sample rows, [R, Sw, gw] sample columns; torchvision's operation order.
    ys = (start_h[:, None, None] + torch.arange(sh, device=dev)[None, :, None] * bin_h[:, None, None]) + (
        frac[None, None, :] * bin_h[:, None, None]) / g
    xs = (start_w[:, None, None] + torch.arange(sw, device=dev)[None, :, None] * bin_w[:, None, None]) + (
        frac[None, None, :] * bin_w[:, None, None]) / g
    y0, y1, wy0, wy1 = _axis(ys, height[:, None, None])
    x0, x1, wx0, wx1 = _axis(xs, width[:, None, None])
    rows = torch.stack([y0, y1], dim=-1) * width[:, None, None, None] + base[:, None, None, None]  # [R, Sh, gh, 2]
    wy = torch.stack([wy0, wy1], dim=-1) / float(max(grid * grid, 1))
    cols = torch.stack([x0, x1], dim=-1)  # [R, Sw, gw, 2]
    wx = torch.stack([wx0, wx1], dim=-1)
    r = rows.shape[0]
    # [R, Sh, Sw, gh, 2, gw, 2] -> [B, L]: bins row-major, then (sample row, corner row, sample col, corner col).
    index = rows[:, :, None, :, :, None, None] + cols[:, None, :, None, None, :, :]
    weight = wy[:, :, None, :, :, None, None] * wx[:, None, :, None, None, :, :]
    pairs = 4 * grid * grid
    return index.reshape(r * sh * sw, pairs), weight.reshape(r * sh * sw, pairs)


def _adaptive_map(
    start_h: Tensor, start_w: Tensor, bin_h: Tensor, bin_w: Tensor, height: Tensor, width: Tensor, base: Tensor,
    out_size: tuple[int, int], grid_h: Tensor, grid_w: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(index, weight, offsets): flat Tensor[sum of bag sizes] pairs and Tensor[B] bag starts, RoI r sampling
    ``grid_h[r] x grid_w[r]`` points per bin."""
    sh, sw = out_size
    dev = start_h.device
    r = start_h.shape[0]
    roi_ids = torch.arange(r, device=dev)

    def taps(start: Tensor, bin_size: Tensor, grid: Tensor, n_bins: int, size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # One entry per (RoI, bin, sample) along this axis, RoI-major: [sum_r n_bins * grid[r]].
        per_roi = grid * n_bins
        first = torch.cumsum(per_roi, 0) - per_roi
        owner = torch.repeat_interleave(roi_ids, per_roi)
        j = torch.arange(owner.shape[0], device=dev) - first[owner]
        gr = grid[owner]
        k, i = j // gr, j % gr
        gf = gr.to(torch.float32)
        coord = (start[owner] + k.to(torch.float32) * bin_size[owner]) + ((i.to(torch.float32) + 0.5) * bin_size[owner]) / gf
        low, high, w_low, w_high = _axis(coord, size[owner])
        return torch.stack([low, high], -1), torch.stack([w_low, w_high], -1), first

    rows, wy, y_first = taps(start_h, bin_h, grid_h, sh, height)  # [Ty, 2]
    cols, wx, x_first = taps(start_w, bin_w, grid_w, sw, width)  # [Tx, 2]
    rows = rows * width[:, None].repeat_interleave(grid_h * sh, 0) + base[:, None].repeat_interleave(grid_h * sh, 0)
    count = (grid_h * grid_w).clamp(min=1).to(torch.float32)
    wy = wy / count.repeat_interleave(grid_h * sh, 0)[:, None]
    # Bags: bins RoI-major then row-major; bag of RoI r holds 4 * grid_h[r] * grid_w[r] pairs.
    bag_roi = roi_ids.repeat_interleave(sh * sw)
    bag_k = torch.arange(sh * sw, device=dev).repeat(r)
    bag_size = (4 * grid_h * grid_w)[bag_roi]
    offsets = torch.cumsum(bag_size, 0) - bag_size
    owner = torch.repeat_interleave(torch.arange(bag_roi.shape[0], device=dev), bag_size)
    e = torch.arange(owner.shape[0], device=dev) - offsets[owner]
    o_roi = bag_roi[owner]
    gw = grid_w[o_roi]
    # e -> (sample row iy, corner row cy, sample col ix, corner col cx), the fixed map's order.
    per_row = 4 * gw
    iy, rest = e // per_row, e % per_row
    cy, rest = rest // (2 * gw), rest % (2 * gw)
    ix, cx = rest // 2, rest % 2
    k = bag_k[owner]
    yi = y_first[o_roi] + (k // sw) * grid_h[o_roi] + iy
    xi = x_first[o_roi] + (k % sw) * gw + ix
    index = rows[yi, cy] + cols[xi, cx]
    weight = wy[yi, cy] * wx[xi, cx]
    return index, weight, offsets


def bilinear_map(
    rois: Tensor, level: Tensor, scales: Sequence[float], shapes: Sequence[tuple[int, int, int]],
    output_size: tuple[int, int], sampling_ratio: int, aligned: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The sparse map from the concatenated channels-last levels to the bins.

    Args:
        rois: Tensor[R, 5] ``(image index, x1, y1, x2, y2)`` in input pixels.
        level: Tensor[R] int64, the level each RoI is pooled from.
        scales: per level, input pixels to level pixels.
        shapes: per level ``(N, Hl, Wl)``; level ``l`` occupies pixels ``[sum_{k<l} N*Hk*Wk, ...)``, image-major.
        output_size: ``(Sh, Sw)``.
        sampling_ratio: points per bin side; ``<= 0``: ``ceil`` of the bin size per RoI.
        aligned: half-pixel offset.

    Returns:
        ``(index, weight, offsets)``: with a fixed ``sampling_ratio`` Tensor[B, L] int64 and float32 and
        ``offsets`` None; adaptive: flat pairs and Tensor[B] bag starts.
    """
    dev = rois.device
    rois = rois.to(torch.float32)
    sizes = torch.tensor([[h, w] for _, h, w in shapes], dtype=torch.int64, device=dev)  # [levels, 2]
    level_start = [0]
    for n, h, w in shapes:
        level_start.append(level_start[-1] + n * h * w)
    starts = torch.tensor(level_start[:-1], dtype=torch.int64, device=dev)
    scale = torch.tensor(list(scales), dtype=torch.float32, device=dev)[level]
    height, width = sizes[level, 0], sizes[level, 1]
    base = starts[level] + rois[:, 0].to(torch.int64) * height * width
    start_h, start_w, bin_h, bin_w, roi_h, roi_w = _roi_geometry(rois, scale, output_size, aligned)
    if sampling_ratio > 0:
        index, weight = _fixed_map(start_h, start_w, bin_h, bin_w, height, width, base, output_size, sampling_ratio)
        return index, weight, None
    grid_h = torch.ceil(roi_h / output_size[0]).to(torch.int64).clamp(min=0)
    grid_w = torch.ceil(roi_w / output_size[1]).to(torch.int64).clamp(min=0)
    return _adaptive_map(start_h, start_w, bin_h, bin_w, height, width, base, output_size, grid_h, grid_w)


def _transpose(index: Tensor, weight: Tensor, offsets: Tensor | None, num_pixels: int) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs grouped by pixel: (bin of each pair, its weight, Tensor[P] pixel bag starts)."""
    flat = index.reshape(-1)
    if offsets is None:
        bins = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
    else:
        sizes = torch.diff(offsets, append=offsets.new_tensor([flat.shape[0]]))
        bins = torch.arange(offsets.shape[0], device=index.device).repeat_interleave(sizes)
    key = flat.to(torch.int32) if num_pixels < 2**31 else flat
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(flat, minlength=num_pixels)
    starts = torch.cumsum(counts, 0) - counts
    return bins[order], weight.reshape(-1)[order], starts


class _PixelTable(torch.autograd.Function):
    """Levels [N, C, Hl, Wl] -> one float32 [P, C] table (channels-last, image-major, level after level);
    backward splits the [P, C] gradient back into the levels (channels-last strides)."""

    @staticmethod
    def forward(ctx, *levels: Tensor) -> Tensor:
        c = levels[0].shape[1]
        num_pixels = sum(x.numel() // c for x in levels)
        table = torch.empty((num_pixels, c), dtype=torch.float32, device=levels[0].device)
        at = 0
        for x in levels:
            n, _, h, w = x.shape
            table[at:at + n * h * w].view(n, h, w, c).copy_(x.permute(0, 2, 3, 1))  # NCHW -> NHWC
            at += n * h * w
        ctx.shapes = [tuple(x.shape) for x in levels]
        ctx.dtypes = [x.dtype for x in levels]
        return table

    @staticmethod
    def backward(ctx, grad_table: Tensor):
        grads = []
        at = 0
        for (n, c, h, w), dtype in zip(ctx.shapes, ctx.dtypes):
            # [n*h*w, C] -> [n, C, h, w] (channels-last strides)
            grads.append(grad_table[at:at + n * h * w].view(n, h, w, c).permute(0, 3, 1, 2).to(dtype))
            at += n * h * w
        return tuple(grads)


def pixel_table(levels: Sequence[Tensor]) -> Tensor:
    """The float32 Tensor[P, C] the sparse map reads: every level flattened channels-last, image-major,
    levels one after the other (differentiable). One channels-last float32 level is a view, not a copy.

    Pooling several RoI sets from the same levels (the box and mask branches) can share one table: its
    gradient is summed once and split back into the levels once.
    """
    x = levels[0]
    if len(levels) == 1 and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view: channels-last is already [P, C]
    with torch.autocast(x.device.type, enabled=False):
        return _PixelTable.apply(*levels)


class _SparseRoIAlign(torch.autograd.Function):
    """Pools [B, C] bins from the [P, C] pixel table through the map; backward is the transposed map."""

    @staticmethod
    def forward(ctx, index: Tensor, weight: Tensor, offsets: Tensor | None, table: Tensor) -> Tensor:
        with torch.autocast(table.device.type, enabled=False):
            out = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)
        ctx.save_for_backward(index, weight, offsets)
        ctx.num_pixels = table.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        index, weight, offsets = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            bins, w_t, starts = _transpose(index, weight, offsets, ctx.num_pixels)
            grad_table = F.embedding_bag(bins, grad_out.to(torch.float32).contiguous(), starts, mode="sum",
                                         per_sample_weights=w_t)  # [P, C]
        return None, None, None, grad_table


def multi_level_roi_align(
    levels: Sequence[Tensor], rois: Tensor, level: Tensor, scales: Sequence[float], output_size: int | tuple[int, int],
    sampling_ratio: int = -1, aligned: bool = False, *, table: Tensor | None = None,
) -> Tensor:
    """RoIAlign of each RoI on its own level, all levels through one sparse map.

    Args:
        levels: Tensor[N, C, Hl, Wl] per level (any memory format; float32 or bfloat16).
        rois: Tensor[R, 5] ``(image index, x1, y1, x2, y2)`` in input pixels.
        level: Tensor[R] int64 index into ``levels``.
        scales: per level, input pixels to level pixels.
        output_size: ``S`` or ``(Sh, Sw)``.
        sampling_ratio: as torchvision's ``roi_align``.
        aligned: as torchvision's ``roi_align``.
        table: ``pixel_table(levels)`` when the caller already has it (shared between poolers).

    Returns:
        Tensor[R, C, Sh, Sw] in the levels' dtype, channels-last strides.
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    output_size = (int(output_size[0]), int(output_size[1]))
    c = levels[0].shape[1]
    r = rois.shape[0]
    index, weight, offsets = bilinear_map(
        rois, level, scales, [(x.shape[0], x.shape[2], x.shape[3]) for x in levels], output_size, sampling_ratio, aligned
    )
    if table is None:
        table = pixel_table(levels)
    out = _SparseRoIAlign.apply(index, weight, offsets, table).to(levels[0].dtype)  # [B, C]
    return out.view(r, output_size[0], output_size[1], c).permute(0, 3, 1, 2)  # [R, Sh, Sw, C] -> [R, C, Sh, Sw]


def roi_align(
    input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int], spatial_scale: float = 1.0,
    sampling_ratio: int = -1, aligned: bool = False,
) -> Tensor:
    """Drop-in for ``torchvision.ops.roi_align`` (CPU; float32/bfloat16): Tensor[R, C, Sh, Sw].

    Args:
        input: Tensor[N, C, H, W].
        boxes: Tensor[R, 5] ``(image index, x1, y1, x2, y2)``, or per image Tensor[R_i, 4].
        output_size: ``S`` or ``(Sh, Sw)``.
        spatial_scale: input pixels to feature pixels.
        sampling_ratio: points per bin side; ``<= 0``: adaptive.
        aligned: half-pixel offset.
    """
    if input.dim() != 4:
        raise ValueError(f"roi_align: input must be Tensor[N, C, H, W], got shape {tuple(input.shape)}")
    if isinstance(boxes, (list, tuple)):
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0
        ) if len(boxes) else input.new_zeros((0, 5))
    else:
        rois = boxes
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_align: boxes must be Tensor[R, 5] or a list of Tensor[R_i, 4], got {tuple(rois.shape)}")
    level = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    return multi_level_roi_align([input], rois, level, [spatial_scale], output_size, sampling_ratio, aligned)
