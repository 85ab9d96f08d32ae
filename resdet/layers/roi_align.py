"""RoIAlign on CPU as one sparse linear map from channels-last pixels to the bins, as registered ops.

Numerically torchvision's ``roi_align`` (same sample points, same boundary rules, same bilinear
weights; sums may differ in the last bits because of summation order), but forward and backward
are each one multi-threaded sparse x dense product instead of a scalar loop per RoI:

* every output bin ``b`` of every RoI is ``sum_j w[b, j] * X[p[b, j]]`` where ``X`` is the feature
  map flattened channels-last to ``[P, C]`` and ``(p, w)`` are at most ``4 * gh * gw`` pixel indices
  and bilinear weights (``gh x gw`` sample points per bin, 4 corners each, divided by the count);
* the weights depend only on the boxes, so they are built once per call with vectorised torch ops
  (no Python loop over RoIs), in float32 whatever the feature dtype, and kept for the backward pass;
* forward is ``F.embedding_bag(p, X, mode="sum", per_sample_weights=w)`` (a parallel gather-sum),
  backward the transposed map: the ``(bin, weight)`` pairs grouped by pixel, again one
  ``embedding_bag`` from the output gradient to the ``[P, C]`` input gradient (pixels no RoI touches
  get exact zeros).

Several feature levels (the FPN case) are pooled by one map over all levels concatenated: each RoI
names its level, the level's scale and size, so four levels cost one product, not four.

Torchvision's rules, kept here: sample ``(y, x)`` with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W``
contributes 0 and reads no pixel (it points at a zero row after the pixels, so a non-finite feature
elsewhere cannot leak in as ``0 * inf``); otherwise ``y, x`` are clamped to ``>= 0`` and the low corner
to ``H - 1`` / ``W - 1``; without ``aligned`` a RoI is at least 1x1 pixel; with ``sampling_ratio <= 0``
a RoI samples ``ceil(roi_h / Sh) x ceil(roi_w / Sw)`` points per bin; each bin averages its samples.

Memory: the map is built in pieces of at most :data:`_CHUNK_PAIRS` pairs (or one bin, if larger), so a
huge RoI at a fine scale (``sampling_ratio <= 0`` samples ~one point per pixel) costs bounded transient
memory; the whole map is kept for the backward pass only up to :data:`_KEEP_PAIRS` pairs, beyond that
the backward pass rebuilds it piece by piece.

Registered ops (fake kernels and autograd formulas included, so ``torch.compile``, ``torch.export``, double
backward and ``torch.func.grad`` see them):

* ``resdet::roi_align_table(levels) -> [P + 1, C]``: the levels as one float32 pixel table (a zero row last);
* ``resdet::roi_align(table, rois, level, ...) -> (out [B, C], index, weight, offsets)``: the pooled bins and,
  when asked, the map itself (saved for the backward pass);
* ``resdet::roi_align_backward(grad, rois, level, ..., index, weight, offsets) -> [P + 1, C]``.

:func:`multi_level_roi_align` and :func:`roi_align` take them where :func:`resdet.layers.policy.use_sparse_roi_align`
says so, and torchvision's ``roi_align`` (one call per level) everywhere else.

Shape shorthand:
    N  images;  C  channels;  Hl, Wl  level l size;  P = sum over levels of N * Hl * Wl pixels
    R  RoIs;  Sh, Sw  output size;  B = R * Sh * Sw bins;  T  (pixel, weight) pairs of the map
"""
import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from . import policy
from .tracing import is_tracing

__all__ = ["multi_level_roi_align", "roi_align"]

_CHUNK_PAIRS = 1 << 20
"""Pairs per piece of the map (~50 bytes of transient memory each while it is built)."""
_KEEP_PAIRS = 1 << 23
"""Largest map (12 bytes per pair) kept from the forward pass for the backward pass."""
_BACKWARD_CHUNK_BYTES = 1 << 26
"""Transient gradient rows per piece when the backward pass rebuilds the map."""


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """The kernels compute in float32 even when called under autocast."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
        else contextlib.nullcontext()


def _axis(coord: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis, torchvision's rules.

    Args:
        coord: sample coordinates (float32, any shape).
        size: the axis length (int64, broadcastable to ``coord``).

    Returns:
        ``(low, high, w_low, w_high, valid)``: int64 pixel indices, float32 weights and whether the sample
        lies inside ``[-1, size]`` (outside: zero weights, index 0; the caller points them at the zero row).
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
    return low, high, w_low, w_high, valid


class _Geometry(NamedTuple):
    """Per RoI (Tensor[R] each): start and bin size in level pixels, level size, first pixel of its image
    in the table, sample grid; plus the index of the zero row."""

    start_h: Tensor
    start_w: Tensor
    bin_h: Tensor
    bin_w: Tensor
    height: Tensor
    width: Tensor
    base: Tensor
    grid_h: Tensor
    grid_w: Tensor
    zero_row: int


def _geometry(
    rois: Tensor, level: Tensor, level_shapes: Sequence[int], scales: Sequence[float], out_size: tuple[int, int],
    sampling_ratio: int, aligned: bool,
) -> _Geometry:
    dev = rois.device
    rois = rois.to(torch.float32)
    shapes = [tuple(level_shapes[i:i + 3]) for i in range(0, len(level_shapes), 3)]  # (N, Hl, Wl) per level
    sizes = torch.tensor([[h, w] for _, h, w in shapes], dtype=torch.int64, device=dev)  # [levels, 2]
    level_start = [0]
    for n, h, w in shapes:
        level_start.append(level_start[-1] + n * h * w)
    starts = torch.tensor(level_start[:-1], dtype=torch.int64, device=dev)
    scale = torch.tensor(list(scales), dtype=torch.float32, device=dev)[level]
    height, width = sizes[level, 0], sizes[level, 1]
    base = starts[level] + rois[:, 0].to(torch.int64) * height * width
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * scale - offset
    start_h = rois[:, 2] * scale - offset
    roi_w = (rois[:, 3] * scale - offset) - start_w
    roi_h = (rois[:, 4] * scale - offset) - start_h
    if not aligned:  # malformed RoIs become 1x1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(base, sampling_ratio)
    else:
        grid_h = torch.ceil(roi_h / out_size[0]).to(torch.int64).clamp(min=0)
        grid_w = torch.ceil(roi_w / out_size[1]).to(torch.int64).clamp(min=0)
    return _Geometry(start_h, start_w, roi_h / out_size[0], roi_w / out_size[1], height, width, base, grid_h, grid_w,
                     level_start[-1])


def _fixed_map(geo: _Geometry, out_size: tuple[int, int], grid: int) -> tuple[Tensor, Tensor, None]:
    """(index, weight, None) of RoIs that all sample grid x grid points per bin: Tensor[B, L] each, one bag of
    L = 4 * grid**2 pairs per bin."""
    sh, sw = out_size
    dev = geo.start_h.device
    g = torch.tensor(float(grid), device=dev)
    frac = (torch.arange(grid, device=dev, dtype=torch.float32) + 0.5)
    bin_h, bin_w = geo.bin_h[:, None, None], geo.bin_w[:, None, None]
    # [R, Sh, gh] sample rows, [R, Sw, gw] sample columns; torchvision's operation order.
    ys = (geo.start_h[:, None, None] + torch.arange(sh, device=dev)[None, :, None] * bin_h) + (
        frac[None, None, :] * bin_h) / g
    xs = (geo.start_w[:, None, None] + torch.arange(sw, device=dev)[None, :, None] * bin_w) + (
        frac[None, None, :] * bin_w) / g
    y0, y1, wy0, wy1, y_ok = _axis(ys, geo.height[:, None, None])
    x0, x1, wx0, wx1, x_ok = _axis(xs, geo.width[:, None, None])
    width, base = geo.width[:, None, None, None], geo.base[:, None, None, None]
    rows = torch.stack([y0, y1], dim=-1) * width + base  # [R, Sh, gh, 2]
    wy = torch.stack([wy0, wy1], dim=-1) / float(max(grid * grid, 1))
    cols = torch.stack([x0, x1], dim=-1)  # [R, Sw, gw, 2]
    wx = torch.stack([wx0, wx1], dim=-1)
    outside = not (bool(y_ok.all()) and bool(x_ok.all()))
    if outside:  # samples outside the map: the zero row's index along their axis (clamped to it below)
        rows = torch.where(y_ok[..., None], rows, geo.zero_row)
        cols = torch.where(x_ok[..., None], cols, geo.zero_row)
    r = rows.shape[0]
    # [R, Sh, Sw, gh, 2, gw, 2] -> [B, L]: bins row-major, then (sample row, corner row, sample col, corner col).
    index = rows[:, :, None, :, :, None, None] + cols[:, None, :, None, None, :, :]
    if outside:
        index.clamp_(max=geo.zero_row)  # valid pairs lie below the zero row, every other pair at or past it
    weight = wy[:, :, None, :, :, None, None] * wx[:, None, :, None, None, :, :]
    pairs = 4 * grid * grid
    return index.reshape(r * sh * sw, pairs), weight.reshape(r * sh * sw, pairs), None


def _adaptive_map(geo: _Geometry, out_size: tuple[int, int], b0: int, b1: int) -> tuple[Tensor, Tensor, Tensor]:
    """(index, weight, offsets) of bags (bins, RoI-major then row-major) ``b0`` to ``b1``: flat Tensor[T]
    pairs and Tensor[b1 - b0] bag starts, RoI r sampling ``grid_h[r] x grid_w[r]`` points per bin."""
    sh, sw = out_size
    dev = geo.start_h.device
    roi_ids = torch.arange(geo.start_h.shape[0], device=dev)

    def taps(start: Tensor, bin_size: Tensor, grid: Tensor, n_bins: int, size: Tensor) -> tuple[Tensor, ...]:
        # One entry per (RoI, bin, sample) along this axis, RoI-major: [sum_r n_bins * grid[r]].
        per_roi = grid * n_bins
        first = torch.cumsum(per_roi, 0) - per_roi
        owner = torch.repeat_interleave(roi_ids, per_roi)
        j = torch.arange(owner.shape[0], device=dev) - first[owner]
        gr = grid[owner]
        k, i = j // gr, j % gr
        gf = gr.to(torch.float32)
        coord = (start[owner] + k.to(torch.float32) * bin_size[owner]) + (
            (i.to(torch.float32) + 0.5) * bin_size[owner]) / gf
        low, high, w_low, w_high, valid = _axis(coord, size[owner])
        return torch.stack([low, high], -1), torch.stack([w_low, w_high], -1), valid, first

    rows, wy, y_ok, y_first = taps(geo.start_h, geo.bin_h, geo.grid_h, sh, geo.height)  # [Ty, 2]
    cols, wx, x_ok, x_first = taps(geo.start_w, geo.bin_w, geo.grid_w, sw, geo.width)  # [Tx, 2]
    per_y = geo.grid_h * sh
    rows = rows * geo.width.repeat_interleave(per_y)[:, None] + geo.base.repeat_interleave(per_y)[:, None]
    outside = not (bool(y_ok.all()) and bool(x_ok.all()))
    if outside:  # samples outside the map: the zero row's index along their axis (clamped to it below)
        rows = torch.where(y_ok[:, None], rows, geo.zero_row)
        cols = torch.where(x_ok[:, None], cols, geo.zero_row)
    count = (geo.grid_h * geo.grid_w).clamp(min=1).to(torch.float32)
    wy = wy / count.repeat_interleave(per_y)[:, None]
    # Bags b0..b1; the bag of a bin of RoI r holds 4 * grid_h[r] * grid_w[r] pairs.
    bag = torch.arange(b0, b1, device=dev)
    bag_roi, bag_k = bag // (sh * sw), bag % (sh * sw)
    bag_size = (4 * geo.grid_h * geo.grid_w)[bag_roi]
    offsets = torch.cumsum(bag_size, 0) - bag_size
    owner = torch.repeat_interleave(torch.arange(bag.shape[0], device=dev), bag_size)
    e = torch.arange(owner.shape[0], device=dev) - offsets[owner]
    o_roi = bag_roi[owner]
    gw = geo.grid_w[o_roi]
    # e -> (sample row iy, corner row cy, sample col ix, corner col cx), the fixed map's order.
    per_row = 4 * gw
    iy, rest = e // per_row, e % per_row
    cy, rest = rest // (2 * gw), rest % (2 * gw)
    ix, cx = rest // 2, rest % 2
    k = bag_k[owner]
    yi = y_first[o_roi] + (k // sw) * geo.grid_h[o_roi] + iy
    xi = x_first[o_roi] + (k % sw) * gw + ix
    index = rows[yi, cy] + cols[xi, cx]
    if outside:
        index.clamp_(max=geo.zero_row)
    weight = wy[yi, cy] * wx[xi, cx]
    return index, weight, offsets


def _map_pieces(
    geo: _Geometry, out_size: tuple[int, int], sampling_ratio: int, max_pairs: int
) -> Iterator[tuple[int, int, tuple[Tensor, Tensor, Optional[Tensor]]]]:
    """The map in pieces ``(b0, b1, (index, weight, offsets))`` over consecutive bags, each of at most
    ``max_pairs`` pairs (or one bag): [B, L] pairs without offsets (fixed sampling), or flat pairs and
    offsets relative to the piece (adaptive)."""
    bins = out_size[0] * out_size[1]
    num_bags = geo.start_h.shape[0] * bins
    if sampling_ratio > 0:
        per_roi = bins * 4 * sampling_ratio**2
        step = max(1, max_pairs // per_roi)
        for r0 in range(0, geo.start_h.shape[0], step):
            part = _Geometry(*(t[r0:r0 + step] for t in geo[:-1]), geo.zero_row)
            yield r0 * bins, min(r0 + step, geo.start_h.shape[0]) * bins, _fixed_map(part, out_size, sampling_ratio)
        return
    bag_pairs = (4 * geo.grid_h * geo.grid_w).repeat_interleave(bins)
    ends = torch.cumsum(bag_pairs, 0)  # pairs up to and including each bag
    b0, start = 0, 0
    while b0 < num_bags:
        b1 = max(int(torch.searchsorted(ends, start + max_pairs, right=True)), b0 + 1)
        yield b0, b1, _adaptive_map(geo, out_size, b0, b1)
        start, b0 = int(ends[b1 - 1]), b1


def _join(pieces: list[tuple[Tensor, Tensor, Optional[Tensor]]]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One map from consecutive pieces (offsets shifted)."""
    if len(pieces) == 1:
        return pieces[0]
    index, weight = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
    if pieces[0][2] is None:
        return index, weight, None
    shift, offsets = 0, []
    for piece, _, off in pieces:
        offsets.append(off + shift)
        shift += piece.shape[0]
    return index, weight, torch.cat(offsets)


def _transposed_sum(index: Tensor, weight: Tensor, offsets: Optional[Tensor], grad: Tensor, num_rows: int) -> Tensor:
    """``sum over pairs (p, w) of bag b: w * grad[b]`` into row p: Tensor[num_rows, C], the pairs grouped by
    row and summed by one ``embedding_bag``."""
    if offsets is None:  # [B, L]: bag b holds pairs b*L .. (b+1)*L - 1
        bins = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
    else:
        sizes = torch.diff(offsets, append=offsets.new_tensor([index.shape[0]]))
        bins = torch.arange(offsets.shape[0], device=index.device).repeat_interleave(sizes)
    index, weight = index.reshape(-1), weight.reshape(-1)
    key = index.to(torch.int32) if num_rows < 2**31 else index
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(index, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(bins[order], grad, starts, mode="sum", per_sample_weights=weight[order])


# --------------------------------------------------------------------------------------------------
# the registered ops

_ALIGN_ARGS = "SymInt[] level_shapes, float[] scales, int[] output_size, int sampling_ratio, bool aligned"


@torch.library.custom_op("resdet::roi_align_table", mutates_args=(), schema="(Tensor[] levels) -> Tensor")
def _table_op(levels: Sequence[Tensor]) -> Tensor:
    c = levels[0].shape[1]
    num_pixels = sum(x.numel() // c for x in levels)
    table = torch.empty((num_pixels + 1, c), dtype=torch.float32, device=levels[0].device)
    at = 0
    for x in levels:
        n, _, h, w = x.shape
        table[at:at + n * h * w].view(n, h, w, c).copy_(x.permute(0, 2, 3, 1))  # NCHW -> NHWC
        at += n * h * w
    table[num_pixels].zero_()  # what samples outside the map read
    return table


@torch.library.custom_op(
    "resdet::roi_align", mutates_args=(),
    schema=f"(Tensor table, Tensor rois, Tensor level, {_ALIGN_ARGS}, bool keep_map) "
           "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _roi_align_op(
    table: Tensor, rois: Tensor, level: Tensor, level_shapes: Sequence[int], scales: Sequence[float],
    output_size: Sequence[int], sampling_ratio: int, aligned: bool, keep_map: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out_size = (output_size[0], output_size[1])
    with _no_autocast(table.device.type):
        geo = _geometry(rois, level, level_shapes, scales, out_size, sampling_ratio, aligned)
        num_bags = rois.shape[0] * out_size[0] * out_size[1]
        out, kept, total = None, [], 0
        for b0, b1, (index, weight, offsets) in _map_pieces(geo, out_size, sampling_ratio, _CHUNK_PAIRS):
            pooled = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)  # [b1 - b0, C]
            if out is None and b0 == 0 and b1 == num_bags:
                out = pooled
            else:
                if out is None:
                    out = table.new_zeros((num_bags, table.shape[1]))
                out[b0:b1] = pooled
            total += index.numel()
            if keep_map and total <= _KEEP_PAIRS:
                kept.append((index, weight, offsets))
        if out is None:  # no RoIs
            out = table.new_zeros((num_bags, table.shape[1]))
    if keep_map and total <= _KEEP_PAIRS and kept:
        index, weight, offsets = _join(kept)
        return out, index, weight, rois.new_empty((0,), dtype=torch.int64) if offsets is None else offsets
    return (out, *_no_map(rois, table, sampling_ratio))


def _no_map(rois: Tensor, table: Tensor, sampling_ratio: int) -> tuple[Tensor, Tensor, Tensor]:
    """The empty (index, weight, offsets) of a map not kept, of the kept map's rank."""
    shape = (0, 4 * sampling_ratio**2) if sampling_ratio > 0 else (0,)
    return (rois.new_empty(shape, dtype=torch.int64), table.new_empty(shape),
            rois.new_empty((0,), dtype=torch.int64))


@torch.library.custom_op(
    "resdet::roi_align_backward", mutates_args=(),
    schema=f"(Tensor grad, Tensor rois, Tensor level, {_ALIGN_ARGS}, Tensor index, Tensor weight, Tensor offsets) "
           "-> Tensor",
)
def _roi_align_backward_op(
    grad: Tensor, rois: Tensor, level: Tensor, level_shapes: Sequence[int], scales: Sequence[float],
    output_size: Sequence[int], sampling_ratio: int, aligned: bool, index: Tensor, weight: Tensor, offsets: Tensor,
) -> Tensor:
    out_size = (output_size[0], output_size[1])
    num_rows = _num_pixels(level_shapes) + 1
    with _no_autocast(grad.device.type):
        grad = grad.to(torch.float32).contiguous()
        if index.dim() == 2 and index.shape[0] == grad.shape[0]:  # the forward pass kept the map: [B, L] pairs
            return _transposed_sum(index, weight, None, grad, num_rows)
        if index.dim() == 1 and offsets.shape[0] == grad.shape[0]:  # ... adaptive: flat pairs and bag offsets
            return _transposed_sum(index, weight, offsets, grad, num_rows)
        # Rebuilt piece by piece; each piece adds the rows it touches (compacted) to the table gradient.
        geo = _geometry(rois, level, level_shapes, scales, out_size, sampling_ratio, aligned)
        out = grad.new_zeros((num_rows, grad.shape[1]))
        max_pairs = max(1024, _BACKWARD_CHUNK_BYTES // (4 * max(grad.shape[1], 1)))
        for b0, b1, (idx, w, off) in _map_pieces(geo, out_size, sampling_ratio, max_pairs):
            rows, local = torch.unique(idx, return_inverse=True)  # same shape as idx
            out.index_add_(0, rows, _transposed_sum(local, w, off, grad[b0:b1], rows.shape[0]))
        return out


def _num_pixels(level_shapes: Sequence[int]) -> int:
    return sum(level_shapes[i] * level_shapes[i + 1] * level_shapes[i + 2] for i in range(0, len(level_shapes), 3))


@_table_op.register_fake
def _(levels: Sequence[Tensor]) -> Tensor:
    c = levels[0].shape[1]
    return levels[0].new_empty((sum(x.numel() // c for x in levels) + 1, c), dtype=torch.float32)


@_roi_align_op.register_fake
def _(table, rois, level, level_shapes, scales, output_size, sampling_ratio, aligned, keep_map):
    out = table.new_empty((rois.shape[0] * output_size[0] * output_size[1], table.shape[1]))
    if not keep_map:
        return (out, *_no_map(rois, table, sampling_ratio))
    empty = rois.new_empty((0,), dtype=torch.int64)
    ctx = torch.library.get_ctx()  # whether the map is kept, and its length, depend on the boxes
    if sampling_ratio > 0:  # [B, L] pairs, no offsets
        shape = (ctx.new_dynamic_size(), 4 * sampling_ratio**2)
        return out, rois.new_empty(shape, dtype=torch.int64), table.new_empty(shape), empty.clone()
    pairs, bags = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (out, rois.new_empty((pairs,), dtype=torch.int64), table.new_empty((pairs,)),
            rois.new_empty((bags,), dtype=torch.int64))


@_roi_align_backward_op.register_fake
def _(grad, rois, level, level_shapes, scales, output_size, sampling_ratio, aligned, index, weight, offsets):
    return grad.new_empty((_num_pixels(level_shapes) + 1, grad.shape[1]), dtype=torch.float32)


# Autograd. The table's gradient is split back into the levels (channels-last views); the pooling is
# linear in the table, its backward linear in the gradient, each the other's derivative.


def _table_setup(ctx, inputs: tuple, output: Tensor) -> None:
    levels = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)) else inputs
    ctx.shapes = [tuple(x.shape) for x in levels]
    ctx.dtypes = [x.dtype for x in levels]


def _table_grads(ctx, grad_table: Tensor) -> list[Tensor]:
    grads, at = [], 0
    for (n, c, h, w), dtype in zip(ctx.shapes, ctx.dtypes):
        # [n*h*w, C] -> [n, C, h, w] (channels-last strides)
        grads.append(grad_table[at:at + n * h * w].view(n, h, w, c).permute(0, 3, 1, 2).to(dtype))
        at += n * h * w
    return grads


def _align_setup(ctx, inputs: tuple, output: tuple) -> None:
    _, rois, level, *ctx.args, _ = inputs
    ctx.save_for_backward(rois, level, *output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _align_backward(ctx, grad: Tensor, *_unused: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    rois, level, index, weight, offsets = ctx.saved_tensors
    grad_table = roi_align_backward(grad, rois, level, *ctx.args, index, weight, offsets)
    return (grad_table, *[None] * 8)


def _align_backward_setup(ctx, inputs: tuple, output: Tensor) -> None:
    _, rois, level, *args = inputs
    ctx.args = args[:5]
    ctx.save_for_backward(rois, level)


def _align_backward_backward(ctx, gg: Tensor) -> tuple[Optional[Tensor], ...]:
    rois, level = ctx.saved_tensors
    return (_align(gg, rois, level, *ctx.args, False)[0], *[None] * 10)


_table_op.register_autograd(lambda ctx, g: (_table_grads(ctx, g),), setup_context=_table_setup)
_roi_align_op.register_autograd(_align_backward, setup_context=_align_setup)
_roi_align_backward_op.register_autograd(_align_backward_backward, setup_context=_align_backward_setup)


class _Table(torch.autograd.Function):
    """``resdet::roi_align_table`` with its autograd formula, callable under ``torch.func`` transforms."""

    @staticmethod
    def forward(*levels: Tensor) -> Tensor:
        return torch.ops.resdet.roi_align_table(list(levels))

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        _table_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_table: Tensor) -> tuple[Tensor, ...]:
        return tuple(_table_grads(ctx, grad_table))


def _function(name: str, setup_context, backward) -> type[torch.autograd.Function]:
    call = getattr(torch.ops.resdet, name).default
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: call(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })


_Align = _function("roi_align", _align_setup, _align_backward)
_AlignBackward = _function("roi_align_backward", _align_backward_setup, _align_backward_backward)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _align(table: Tensor, rois: Tensor, level: Tensor, *args) -> tuple[Tensor, ...]:
    if _needs_grad(table):
        return _Align.apply(table, rois, level, *args)
    return torch.ops.resdet.roi_align(table, rois, level, *args)


def roi_align_backward(grad: Tensor, rois: Tensor, level: Tensor, *args) -> Tensor:
    """``resdet::roi_align_backward``: the gradient of the pixel table given ``grad`` of the bins [B, C]."""
    if _needs_grad(grad):
        return _AlignBackward.apply(grad, rois, level, *args)
    return torch.ops.resdet.roi_align_backward(grad, rois, level, *args)


def pixel_table(levels: Sequence[Tensor]) -> Tensor:
    """``resdet::roi_align_table``: the float32 Tensor[P + 1, C] the sparse map reads, every level flattened
    channels-last, image-major, levels one after the other, then a zero row (differentiable).

    Pooling several RoI sets from the same levels (the box and mask branches) can share one table: its
    gradient is summed once and split back into the levels once.
    """
    if _needs_grad(*levels):
        return _Table.apply(*levels)
    return torch.ops.resdet.roi_align_table(list(levels))


# --------------------------------------------------------------------------------------------------
# the functions modules call


def _sparse(
    levels: Sequence[Tensor], rois: Tensor, level: Tensor, scales: Sequence[float], output_size: tuple[int, int],
    sampling_ratio: int, aligned: bool, table: Optional[Tensor],
) -> Tensor:
    c = levels[0].shape[1]
    if table is None:
        table = pixel_table(levels)
    level_shapes = [s for x in levels for s in (x.shape[0], x.shape[2], x.shape[3])]
    out = _align(table, rois, level, level_shapes, [float(s) for s in scales], list(output_size), sampling_ratio,
                 aligned, _needs_grad(table))[0]  # [B, C]
    # [R, Sh, Sw, C] -> [R, C, Sh, Sw] (channels-last strides)
    return out.view(rois.shape[0], output_size[0], output_size[1], c).permute(0, 3, 1, 2).to(levels[0].dtype)


def _per_level(
    levels: Sequence[Tensor], rois: Tensor, level: Tensor, scales: Sequence[float], output_size: tuple[int, int],
    sampling_ratio: int, aligned: bool,
) -> Tensor:
    """torchvision's ``roi_align``, one call per level (what scripting, tracing and ONNX export record)."""

    def pool(x: Tensor, r: Tensor, scale: float) -> Tensor:
        if x.dtype != r.dtype:  # torchvision's op takes one dtype: pool in float32, as its autocast kernel does
            pooled = torchvision.ops.roi_align(x.float(), r.float(), output_size, scale, sampling_ratio, aligned)
            return pooled.to(x.dtype)
        return torchvision.ops.roi_align(x, r, output_size, scale, sampling_ratio, aligned)

    if len(levels) == 1:
        return pool(levels[0], rois, scales[0])
    x0 = levels[0]
    result = x0.new_zeros((rois.shape[0], x0.shape[1]) + tuple(output_size))
    for k, (x, scale) in enumerate(zip(levels, scales)):
        idx = torch.where(level == k)[0]
        if is_tracing() or idx.numel() > 0:  # a trace keeps every level: its counts are the example's
            # index_put_, not result[idx] = ...: a trace of that freezes a level holding one RoI.
            result.index_put_((idx,), pool(x, rois[idx], scale).to(result.dtype))
    return result


def multi_level_roi_align(
    levels: Sequence[Tensor], rois: Tensor, level: Tensor, scales: Sequence[float],
    output_size: Union[int, tuple[int, int]], sampling_ratio: int = -1, aligned: bool = False, *,
    impl: str = "auto", tables: Optional[dict] = None, key: object = None,
) -> Tensor:
    """RoIAlign of each RoI on its own level: resdet's sparse ops where :mod:`.policy` says so (all levels
    through one map), else torchvision's ``roi_align`` per level.

    Args:
        levels: Tensor[N, C, Hl, Wl] per level (any memory format).
        rois: Tensor[R, 5] ``(image index, x1, y1, x2, y2)`` in input pixels.
        level: Tensor[R] int64 index into ``levels``.
        scales: per level, input pixels to level pixels.
        output_size: ``S`` or ``(Sh, Sw)``.
        sampling_ratio: as torchvision's ``roi_align``.
        aligned: as torchvision's ``roi_align``.
        impl: ``"auto"`` (sparse for CPU levels), ``"sparse"`` (on any device) or ``"torchvision"``.
        tables: a dict the caller keeps for one forward pass over the same ``levels`` (several poolers):
            the sparse path's pixel table is built once and stored there under ``key``.
        key: the key of these levels in ``tables``.

    Returns:
        Tensor[R, C, Sh, Sw] in the levels' dtype (channels-last strides from the sparse path).
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    output_size = (int(output_size[0]), int(output_size[1]))
    if policy.use_sparse_roi_align(levels, impl):
        table = None if tables is None else tables.get(key)
        if table is None:
            table = pixel_table(levels)
            if tables is not None:
                tables[key] = table
        if torch.compiler.is_compiling():
            return _sparse(levels, rois, level, scales, output_size, sampling_ratio, aligned, table)
        try:
            return _sparse(levels, rois, level, scales, output_size, sampling_ratio, aligned, table)
        except Exception as err:  # noqa: BLE001  (any failure of the fast kernel: torchvision's op instead)
            policy.kernel_failed("roi_align", err)
    return _per_level(levels, rois, level, scales, output_size, sampling_ratio, aligned)


def roi_align(
    input: Tensor, boxes: Union[Tensor, list[Tensor]], output_size: Union[int, tuple[int, int]],
    spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
) -> Tensor:
    """Drop-in for ``torchvision.ops.roi_align``: Tensor[R, C, Sh, Sw], the sparse ops on CPU (float32,
    bfloat16, float16) where the policy allows, torchvision's op otherwise.

    Args:
        input: Tensor[N, C, H, W].
        boxes: Tensor[R, 5] ``(image index, x1, y1, x2, y2)``, or per image Tensor[R_i, 4].
        output_size: ``S`` or ``(Sh, Sw)``.
        spatial_scale: input pixels to feature pixels.
        sampling_ratio: points per bin side; ``<= 0``: adaptive (memory stays bounded for large RoIs).
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
