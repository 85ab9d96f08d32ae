"""3×3 stride-1 convolutions by Winograd's algorithm on CPU, where it is faster than oneDNN's direct kernels.

PyTorch ships NNPACK but uses it only for convolutions oneDNN cannot take. NNPACK's single-image
inference kernel computes a 3×3 convolution by the Winograd transform F(6×6, 3×3): about 5× fewer
multiplications than direct convolution. On the project's 2-core AVX-512 machine it takes 0.35–0.7× of
oneDNN's time for 3×3 stride-1 convolutions with at least 128 channels on maps of 48×64 pixels and more
(the FPN output convs and the RPN conv on P2/P3, ResNet stages 2–3 at detection sizes, the mask head's
RoIs laid out on one grid), for a relative error of about 1e-5 of the largest output (float32
rounding in the transforms).

Training (:class:`_WinogradConv3x3`):
    * the input gradient of a stride-1, padding-1 3×3 convolution is the same convolution of the output
      gradient with the filters flipped and transposed, so it runs through NNPACK too;
    * the weight gradient of 256-channel convolutions on mid-size maps (P3/P4 and ResNet stage 3 at
      training sizes) is computed in the F(4×4, 3×3) Winograd domain by :func:`_winograd_weight_grad`
      (four small matrix products and one batched one: 0.6–0.75× oneDNN's time); elsewhere it is oneDNN's.

Used only where it pays and is exact enough to keep parity with torchvision's detectors (:func:`_plan`):
    * CPU, float32 input and weights, outside autocast (bf16 runs take oneDNN's bf16 kernels);
    * eager mode (TorchScript, tracing, FX, ONNX export and ``torch.compile`` see a plain convolution);
    * kernel 3×3, stride 1, padding 1, dilation 1, groups 1, zero padding;
    * NNPACK: images of at least :data:`MIN_PIXELS` pixels and :data:`MIN_CHANNELS` channels, or smaller
      images (RoI features) with :data:`GRID_MIN_CHANNELS` channels and :data:`GRID_MIN_PIXELS` pixels in
      all; below that oneDNN's batched kernel is as fast.

NNPACK sizes its thread pool from ``torch.get_num_threads()`` at its first call in the process: set the
thread count before running a model. ``set_winograd(False)`` (or ``RESDET_WINOGRAD=0`` in the environment)
turns all of this off: every convolution is then PyTorch's own, bit for bit.

Shapes: N images, C input and O output channels, H×W map (equal in and out at stride 1).
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GRID_MIN_CHANNELS", "GRID_MIN_PIXELS", "MIN_CHANNELS", "MIN_PIXELS", "WGRAD_MAX_PIXELS",
    "PLAIN_CONVS", "Conv2d", "conv2d", "eager_mode", "set_winograd", "use_winograd", "winograd_enabled",
]

MIN_CHANNELS = 128
MIN_PIXELS = 48 * 64
GRID_MIN_CHANNELS = 256
GRID_MIN_PIXELS = 2 * 48 * 64
WGRAD_MAX_PIXELS = 128 * 128

# torch >= 2.8 names it is_fx_symbolic_tracing (is_fx_tracing logs a warning on first use).
_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)
_enabled = os.environ.get("RESDET_WINOGRAD", "1").strip().lower() not in ("0", "false", "no", "off")
_nnpack: bool | None = None


def set_winograd(enabled: bool) -> None:
    """Turns the NNPACK Winograd path on or off for every resdet convolution (process-wide)."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def use_winograd(enabled: bool) -> Iterator[None]:
    """Context manager: :func:`set_winograd` inside the block, the previous setting after it."""
    global _enabled
    previous = _enabled
    _enabled = bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


def winograd_enabled() -> bool:
    """Whether the Winograd path is on and NNPACK is usable in this PyTorch build."""
    global _nnpack
    if not _enabled:
        return False
    if _nnpack is None:
        # Also initializes NNPACK: its convolutions fail until this has run once in the process.
        _nnpack = bool(torch.backends.nnpack.is_available())
    return _nnpack


def eager_mode() -> bool:
    """False while scripting, tracing (TorchScript or FX), exporting to ONNX or compiling: those see plain
    PyTorch ops."""
    return not (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or _fx_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def _pays(n: int, pixels: int, channels: int) -> bool:
    # Measured on the 2-core machine (forward, float32): images of >= 48×64 pixels run one by one at 0.4–0.7×
    # oneDNN's time from 128 channels; smaller ones, gridded, pay from 256 channels and ~6k pixels in all.
    if pixels >= MIN_PIXELS:
        return channels >= MIN_CHANNELS
    return channels >= GRID_MIN_CHANNELS and n * pixels >= GRID_MIN_PIXELS


def _eligible(conv: nn.Conv2d, x: Tensor, weight: Tensor) -> bool:
    return (
        eager_mode()
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not torch.is_autocast_enabled("cpu")
        and winograd_enabled()
    )


def _plan(conv: nn.Conv2d, x: Tensor, weight: Tensor) -> tuple[bool, bool]:
    """(NNPACK forward and input gradient, Winograd weight gradient) for this call; (False, False): oneDNN."""
    if not _eligible(conv, x, weight):
        return False, False
    n, _, h, w = x.shape
    out_c, in_c = weight.shape[:2]
    nnpack = _pays(n, h * w, min(out_c, in_c))
    # The F(4×4, 3×3) weight gradient (:func:`_winograd_weight_grad`) measured 0.6–0.75× oneDNN's at 256
    # channels on maps of 2.5k–16k pixels with sides >= 24; 512 channels, 14×14 RoIs and larger maps (0.9×,
    # for ~9× the input size in transient buffers) are left to oneDNN.
    wgrad = (
        min(out_c, in_c) >= GRID_MIN_CHANNELS and max(out_c, in_c) <= GRID_MIN_CHANNELS
        and 10 * in_c <= n * h * w <= WGRAD_MAX_PIXELS and min(h, w) >= 24
        and weight.requires_grad and torch.is_grad_enabled()
    )
    return nnpack, wgrad


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns of the most nearly square grid holding ``n`` tiles."""
    rows = math.ceil(math.sqrt(n))
    return rows, math.ceil(n / rows)


def _tile_view(t: Tensor, rows: int, cols: int, h: int, w: int) -> Tensor:
    """The [rows, cols, C, h, w] tiles of a [1, C, rows*(h+1)-1, cols*(w+1)-1] grid tensor (a view)."""
    hg, wg = t.shape[-2:]
    return t.as_strided((rows, cols, t.shape[1], h, w), ((h + 1) * wg, w + 1, hg * wg, wg, 1), t.storage_offset())


def _to_grid(x: Tensor, rows: int, cols: int) -> Tensor:
    """[N, C, h, w] -> [1, C, rows*(h+1)-1, cols*(w+1)-1]: the images as tiles with one zero row and column
    between neighbours. A 3×3 "same" convolution of the grid is the per-image convolution on every tile,
    since each output pixel reads only its own tile and the zeros around it."""
    n, c, h, w = x.shape
    grid = x.new_empty((1, c, rows * (h + 1) - 1, cols * (w + 1) - 1))
    grid[:, :, h :: h + 1, :] = 0  # separator rows
    grid[:, :, :, w :: w + 1] = 0  # separator columns
    tiles = _tile_view(grid, rows, cols, h, w)
    full = n // cols
    tiles[:full].copy_(x[: full * cols].view(full, cols, c, h, w))
    if full < rows:
        rest = n - full * cols
        tiles[full, :rest].copy_(x[full * cols :])
        tiles[full, rest:].zero_()  # unused tiles: zeros (uninitialised memory could hold NaN)
        tiles[full + 1 :].zero_()
    return grid


def _from_grid(y: Tensor, n: int, rows: int, cols: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_to_grid` for the convolution output: [1, O, Hg, Wg] -> contiguous [N, O, h, w]."""
    tiles = _tile_view(y, rows, cols, h, w)
    out = y.new_empty((n, y.shape[1], h, w))
    full = n // cols
    out[: full * cols].view(full, cols, y.shape[1], h, w).copy_(tiles[:full])
    if full < rows:
        out[full * cols :].copy_(tiles[full, : n - full * cols])
    return out


def _nnpack_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """[N, C, H, W] * [O, C, 3, 3] (+ [O]) -> contiguous [N, O, H, W], padding 1, in one NNPACK call.

    NNPACK's batched entry point is its slower training kernel; its single-image one is the Winograd
    kernel. Large images run one by one; many small ones (RoI features) as one image, laid out on a grid
    (:func:`_to_grid`), so that the filters are transformed once and the 8×8 Winograd tiles are filled.
    """
    weight = weight.contiguous()
    n, _, h, w = x.shape
    if n == 1:
        return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, [1, 1], [1, 1])
    if h * w >= MIN_PIXELS:
        x = x.contiguous()
        out = x.new_empty((n, weight.shape[0], h, w))
        for i in range(n):
            # One image at a time, written straight into its slice of the batch output.
            torch.ops.aten._nnpack_spatial_convolution.out(
                x[i : i + 1], weight, bias, [1, 1], [1, 1], out=out[i : i + 1]
            )
        return out
    rows, cols = _grid(n)
    y = torch._nnpack_spatial_convolution(_to_grid(x, rows, cols), weight, bias, [1, 1], [1, 1])
    return _from_grid(y, n, rows, cols, h, w)


# F(4×4, 3×3) Winograd transforms (Lavin & Gray): input B^T [6, 6], filter G [6, 3], output A^T [4, 6].
_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def _kron_transforms() -> tuple[Tensor, Tensor, Tensor]:
    bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_BT, _G, _AT))
    # Row-major vec(P X Q) = (P ⊗ Q^T) vec(X): the 2-D transforms as [36, 36], [36, 16] and [9, 36] matrices.
    return torch.kron(bt, bt), torch.kron(at.t(), at.t()), torch.kron(g.t(), g.t())


_KIN, _KOUT, _KW = _kron_transforms()


def _winograd_weight_grad(x: Tensor, grad: Tensor) -> Tensor:
    """Weight gradient [O, C, 3, 3] of a 3×3 stride-1 "same" convolution of x [N, C, H, W] (output
    gradient ``grad`` [N, O, H, W]) by Winograd F(4×4, 3×3): per 4×4 output tile, the gradient of the
    transformed filter is the product of the transformed 6×6 input patch and the transformed output
    gradient (36 positions), summed over all tiles as one [C, N*T] × [N*T, O] product per position,
    then mapped back by G^T · G. 2.25× fewer multiplications than direct; the transforms are four
    small matrix products."""
    n, c, h, w = x.shape
    o = grad.shape[1]
    k_in, k_out, k_w = (k.to(x.dtype) for k in (_KIN, _KOUT, _KW))
    th, tw = -(-h // 4), -(-w // 4)
    t = th * tw
    xp = x.new_zeros((n, c, 4 * th + 2, 4 * tw + 2))
    xp[:, :, 1:h + 1, 1:w + 1] = x
    hp, wp = xp.shape[-2:]
    # 6×6 patches at stride 4, rows ordered (c, n, tile): [C*N*T, 36]; transformed: [36, C, N*T].
    patches = xp.as_strided((c, n, th, tw, 6, 6), (hp * wp, c * hp * wp, 4 * wp, 4, wp, 1)).reshape(c * n * t, 36)
    v = torch.mm(k_in, patches.t()).view(36, c, n * t)
    del xp, patches  # transient buffers go as soon as they are used: the weight gradient's peak memory
    if (h, w) != (4 * th, 4 * tw):
        grad = F.pad(grad, (0, 4 * tw - w, 0, 4 * th - h))
    # 4×4 output-gradient tiles, rows ordered (o, n, tile): [O*N*T, 16]; transformed: [36, O, N*T].
    tiles = grad.reshape(n, o, th, 4, tw, 4).permute(1, 0, 2, 4, 3, 5).reshape(o * n * t, 16)
    z = torch.mm(k_out, tiles.t()).view(36, o, n * t)
    del tiles
    du = torch.bmm(v, z.transpose(1, 2))  # [36, C, O]
    del v, z
    # [9, 36] @ [36, C*O] -> [3, 3, C, O] -> [O, C, 3, 3]
    return torch.mm(k_w, du.view(36, c * o)).view(3, 3, c, o).permute(3, 2, 0, 1).contiguous()


class _WinogradConv3x3(torch.autograd.Function):
    """3×3, stride 1, padding 1 convolution with the fast kernels :func:`_plan` picked: forward and input
    gradient by NNPACK (else oneDNN), weight gradient by F(4×4, 3×3) Winograd (else oneDNN)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, nnpack: bool, wgrad: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.nnpack, ctx.wgrad = nnpack, wgrad
        if nnpack:
            return _nnpack_conv3x3(x, weight, bias)
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        grad_x = grad_w = grad_b = None
        if need_x and ctx.nnpack:
            # d/dx of a stride-1 "same" 3×3 correlation: correlate the gradient with the filters flipped in
            # space and with in/out channels swapped, [O, C, 3, 3] -> [C, O, 3, 3].
            grad_x = _nnpack_conv3x3(grad, weight.transpose(0, 1).flip(2, 3), None)
        if need_w and ctx.wgrad:
            grad_w = _winograd_weight_grad(x, grad.contiguous())
            need_w = False
        if need_b and ctx.wgrad:
            grad_b = grad.sum((0, 2, 3))
            need_b = False
        mask = [need_x and not ctx.nnpack, need_w, need_b]
        if any(mask):
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None,
                [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask,
            )
            grad_x = gx if mask[0] else grad_x
            grad_w = gw if mask[1] else grad_w
            grad_b = gb if mask[2] else grad_b
        return grad_x, grad_w, grad_b, None, None


def conv2d(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv``'s convolution (its stride, padding, dilation, groups) of ``x`` with ``weight`` and ``bias``.

    Takes the Winograd path when the module docstring's conditions hold, else ``conv._conv_forward``.
    """
    nnpack, wgrad = _plan(conv, x, weight)
    if nnpack or wgrad:
        return _WinogradConv3x3.apply(x, weight, bias, nnpack, wgrad)
    return conv._conv_forward(x, weight, bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters and state dict) whose forward goes through :func:`conv2d`."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return self._conv_forward(x, self.weight, self.bias)
        else:
            return conv2d(self, x, self.weight, self.bias)


PLAIN_CONVS = (nn.Conv2d, Conv2d)
"""Convolution types whose forward is a plain convolution of their own weight and bias (what BatchNorm
folding and the 1×1-as-GEMM swap may rewrite)."""
