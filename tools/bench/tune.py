"""Re-measures the sizes from which resdet's fast kernels pay on this machine (``tools/benchmark.py --tune``).

Times each kernel against PyTorch's op on a small grid of shapes (calls alternating, medians), prints the
ratios, and derives a :class:`resdet.layers.policy.Thresholds` by the rules its docstring gives:

* NNPACK, one image at a time (N = 1): the smallest map from which NNPACK wins at the largest channel count
  tested, then the smallest channel count that wins on every map from there;
* NNPACK on a grid of small maps (14×14 RoIs): the smallest channel count that wins at the largest RoI count
  tested, then the smallest total pixel count where it wins at that channel count;
* the F(4×4, 3×3) weight gradient: the channel count (in = out) with the lowest ratio, if below 1.

Write the result with ``--tune-out FILE`` and point ``RESDET_FAST_PATHS_THRESHOLDS`` at it to use it.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["TuneRow", "format_tune_rows", "tune_thresholds", "write_thresholds"]

SINGLE_CHANNELS = (64, 128, 256)
SINGLE_MAPS = ((24, 32), (48, 64), (96, 128))
GRID_CHANNELS = (128, 256, 512)
GRID_ROIS = (8, 32)
WGRAD_CHANNELS = (128, 256, 512)
WGRAD_SHAPE = (2, 32, 44)


@dataclasses.dataclass
class TuneRow:
    """One shape: fast kernel and PyTorch's op, median ms."""

    kernel: str
    shape: tuple[int, int, int, int]
    fast_ms: float
    torch_ms: float

    @property
    def ratio(self) -> float:
        return self.fast_ms / self.torch_ms


def _medians(fns: list[Callable[[], object]], iters: int) -> list[float]:
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def _conv_row(kernel: str, n: int, c: int, h: int, w: int, iters: int) -> TuneRow:
    from resdet.layers import winograd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(c, c, 3, 3, generator=g)
    if kernel == "wgrad":
        grad = torch.randn(n, c, h, w, generator=g)
        fns = [lambda: winograd._winograd_weight_grad(x, grad),
               lambda: torch.nn.grad.conv2d_weight(x, weight.shape, grad, padding=1)]
    else:
        fns = [lambda: winograd._nnpack_conv3x3(x, weight, None), lambda: F.conv2d(x, weight, None, padding=1)]
    fast, ref = _medians(fns, iters)
    return TuneRow(kernel, (n, c, h, w), fast, ref)


def tune_thresholds(iters: int = 5):
    """Measures on this machine; returns ``(Thresholds, rows)``. Needs a PyTorch with NNPACK for the NNPACK
    rows (without it, those thresholds are left as they are: the kernel never runs there anyway)."""
    from resdet.layers import policy

    current = policy.thresholds()
    rows, values = [], {}
    with torch.no_grad():
        if policy.nnpack_usable():
            single = {(c, h * w): _conv_row("nnpack", 1, c, h, w, iters)
                      for c in SINGLE_CHANNELS for h, w in SINGLE_MAPS}
            grid = {(c, n): _conv_row("nnpack grid", n, c, 14, 14, iters) for c in GRID_CHANNELS for n in GRID_ROIS}
            rows += [*single.values(), *grid.values()]
            pixels = sorted({p for _, p in single})
            top = max(SINGLE_CHANNELS)
            wins = [p for p in pixels if all(single[(top, q)].ratio < 1 for q in pixels if q >= p)]
            if wins:
                values["nnpack_min_pixels"] = wins[0]
                chans = [c for c in SINGLE_CHANNELS if all(single[(c, q)].ratio < 1 for q in pixels if q >= wins[0])]
                values["nnpack_min_channels"] = chans[0] if chans else 1 << 30
            else:
                values["nnpack_min_channels"] = 1 << 30  # never
            chans = [c for c in GRID_CHANNELS if grid[(c, max(GRID_ROIS))].ratio < 1]
            values["grid_min_channels"] = chans[0] if chans else 1 << 30
            if chans:
                values["grid_min_pixels"] = min(n * 196 for n in GRID_ROIS if grid[(chans[0], n)].ratio < 1)
        n, h, w = WGRAD_SHAPE
        wgrad = [_conv_row("wgrad", n, c, h, w, iters) for c in WGRAD_CHANNELS]
        rows += wgrad
        best = min(wgrad, key=lambda r: r.ratio)
        values["wgrad_channels"] = best.shape[1] if best.ratio < 1 else -1
    return dataclasses.replace(current, **values), rows


def format_tune_rows(rows: list[TuneRow], table) -> str:
    """The measurements and the derived table (JSON, what ``RESDET_FAST_PATHS_THRESHOLDS`` reads)."""
    lines = [f"{'kernel':<12} {'N x C x H x W':<20} {'fast ms':>9} {'torch ms':>9} {'ratio':>6}"]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.kernel:<12} {shape:<20} {r.fast_ms:>9.2f} {r.torch_ms:>9.2f} {r.ratio:>6.2f}")
    lines.append("")
    lines.append(json.dumps(dataclasses.asdict(table), indent=1))
    return "\n".join(lines)


def write_thresholds(table, path: str) -> None:
    """The table as the JSON object :func:`resdet.layers.policy.load_thresholds` reads."""
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(table), f, indent=1)
