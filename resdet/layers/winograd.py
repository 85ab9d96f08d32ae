"""3×3 stride-1 "same" convolutions by Winograd's algorithm on CPU, as three registered ops.

PyTorch ships NNPACK but uses it only for convolutions oneDNN cannot take. NNPACK's single-image
inference kernel computes a 3×3 convolution by the Winograd transform F(6×6, 3×3), about 5× fewer
multiplications than direct convolution; where :mod:`.policy` measured it faster (:class:`.policy.Thresholds`:
≥128 channels on maps of ≥48×64 pixels, or many small maps such as RoI features laid out on one grid)
it computes the convolution and its input gradient, for a relative error of ~1e-5 of the largest output
(float32 rounding in the transforms). The weight gradient of 256-channel convolutions on mid-size maps is
computed in the F(4×4, 3×3) Winograd domain (:func:`_winograd_weight_grad`).

The ops, each with a fake (meta) kernel and an autograd formula in terms of the others, so that
``torch.compile``, ``torch.export``, double backward and ``torch.func.grad`` see them as one op each:

* ``resdet::conv3x3(x, weight, bias?)``: ``F.conv2d(x, weight, bias, padding=1)``;
* ``resdet::conv3x3_input_grad(grad, weight)``: its input gradient (``torch.nn.grad.conv2d_input``);
* ``resdet::conv3x3_weight_grad(x, grad)``: its weight gradient (``torch.nn.grad.conv2d_weight``).

Each kernel asks :mod:`.policy` whether its fast kernel runs for this call, and computes PyTorch's op
otherwise (or when the fast kernel raises: one warning per process). Every result is a contiguous NCHW
tensor. NNPACK sizes its thread pool from ``torch.get_num_threads()`` at its first call in the process:
set the thread count before running a model.

Shapes: N images, C input and O output channels, H×W map (equal in and out at stride 1).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import policy

__all__ = ["conv3x3", "conv3x3_input_grad", "conv3x3_weight_grad"]


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


def _nnpack_conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """[N, C, H, W] * [O, C, 3, 3] (+ [O]) -> contiguous [N, O, H, W], padding 1, through NNPACK.

    NNPACK's batched entry point is its slower training kernel; its single-image one is the Winograd
    kernel. Large images run one by one; many small ones (RoI features) as one image, laid out on a grid
    (:func:`_to_grid`), so that the filters are transformed once and the 8×8 Winograd tiles are filled.
    The private entry points are only reached when :func:`.policy.nnpack_usable` found them.
    """
    weight = weight.contiguous()
    n, _, h, w = x.shape
    if n == 1:
        return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, [1, 1], [1, 1])
    if h * w >= policy.thresholds().nnpack_min_pixels:
        x = x.contiguous()
        out = x.new_empty((n, weight.shape[0], h, w))
        for i in range(n):
            # One image at a time, written straight into its slice of the batch output.
            torch.ops.aten._nnpack_spatial_convolution.out(x[i : i + 1], weight, bias, [1, 1], [1, 1],
                                                          out=out[i : i + 1])
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


# --------------------------------------------------------------------------------------------------
# the registered ops


@torch.library.custom_op("resdet::conv3x3", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
def _conv3x3_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if policy.nnpack_conv3x3(x, weight):
        try:
            return _nnpack_conv3x3(x, weight, bias)
        except Exception as err:  # noqa: BLE001  (any failure of the fast kernel: PyTorch's op instead)
            policy.kernel_failed("nnpack", err)
    return F.conv2d(x, weight, bias, padding=1).contiguous()


@torch.library.custom_op("resdet::conv3x3_input_grad", mutates_args=(), schema="(Tensor grad, Tensor weight) -> Tensor")
def _input_grad_op(grad: Tensor, weight: Tensor) -> Tensor:
    if policy.nnpack_conv3x3(grad, weight):  # min(O, C) decides: the same sizes as the flipped filters'
        try:
            # d/dx of a stride-1 "same" 3×3 correlation: correlate the gradient with the filters flipped in
            # space and with in/out channels swapped, [O, C, 3, 3] -> [C, O, 3, 3].
            return _nnpack_conv3x3(grad, weight.transpose(0, 1).flip(2, 3), None)
        except Exception as err:  # noqa: BLE001
            policy.kernel_failed("nnpack", err)
    n, _, h, w = grad.shape
    return torch.nn.grad.conv2d_input((n, weight.shape[1], h, w), weight, grad, padding=1).contiguous()


@torch.library.custom_op("resdet::conv3x3_weight_grad", mutates_args=(), schema="(Tensor x, Tensor grad) -> Tensor")
def _weight_grad_op(x: Tensor, grad: Tensor) -> Tensor:
    if policy.winograd_weight_grad(x, grad):
        try:
            return _winograd_weight_grad(x, grad.contiguous())
        except Exception as err:  # noqa: BLE001
            policy.kernel_failed("winograd", err)
    return torch.nn.grad.conv2d_weight(x, (grad.shape[1], x.shape[1], 3, 3), grad, padding=1).contiguous()


@_conv3x3_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


@_input_grad_op.register_fake
def _(grad: Tensor, weight: Tensor) -> Tensor:
    return grad.new_empty((grad.shape[0], weight.shape[1], grad.shape[2], grad.shape[3]))


@_weight_grad_op.register_fake
def _(x: Tensor, grad: Tensor) -> Tensor:
    return x.new_empty((grad.shape[1], x.shape[1], 3, 3))


# Autograd: each op's derivatives are the other two ops (and a sum), so every order of derivative exists.


def _save_both(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.has_bias = len(inputs) > 2 and inputs[2] is not None


def _conv3x3_backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], ...]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (
        conv3x3_input_grad(grad, weight) if need_x else None,
        conv3x3_weight_grad(x, grad) if need_w else None,
        grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None,
    )


def _input_grad_backward(ctx, gg: Tensor) -> tuple[Optional[Tensor], ...]:
    grad, weight = ctx.saved_tensors  # gx = conv3x3_input_grad(grad, weight)
    need_grad, need_w = ctx.needs_input_grad[:2]
    return conv3x3(gg, weight) if need_grad else None, conv3x3_weight_grad(gg, grad) if need_w else None


def _weight_grad_backward(ctx, gg: Tensor) -> tuple[Optional[Tensor], ...]:
    x, grad = ctx.saved_tensors  # gw = conv3x3_weight_grad(x, grad)
    need_x, need_grad = ctx.needs_input_grad[:2]
    return conv3x3_input_grad(grad, gg) if need_x else None, conv3x3(x, gg) if need_grad else None


def _differentiable(op, backward, name: str) -> type[torch.autograd.Function]:
    """Registers ``backward`` as the op's autograd formula, and returns an ``autograd.Function`` calling
    the op with the same formula: eager calls that need gradients go through it, since an
    ``autograd.Function`` with ``setup_context`` also works under ``torch.func`` transforms."""
    op.register_autograd(backward, setup_context=_save_both)
    call = getattr(torch.ops.resdet, name).default
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: call(*args)),
        "setup_context": staticmethod(_save_both),
        "backward": staticmethod(backward),
    })


_Conv3x3 = _differentiable(_conv3x3_op, _conv3x3_backward, "conv3x3")
_InputGrad = _differentiable(_input_grad_op, _input_grad_backward, "conv3x3_input_grad")
_WeightGrad = _differentiable(_weight_grad_op, _weight_grad_backward, "conv3x3_weight_grad")


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``resdet::conv3x3``: ``F.conv2d(x, weight, bias, padding=1)`` for x [N, C, H, W], weight [O, C, 3, 3],
    NNPACK's Winograd kernel where :mod:`.policy` says it pays; contiguous [N, O, H, W]."""
    if _needs_grad(x, weight, bias):
        return _Conv3x3.apply(x, weight, bias)
    return torch.ops.resdet.conv3x3(x, weight, bias)


def conv3x3_input_grad(grad: Tensor, weight: Tensor) -> Tensor:
    """``resdet::conv3x3_input_grad``: d(loss)/dx [N, C, H, W] of :func:`conv3x3` given ``grad`` [N, O, H, W]."""
    if _needs_grad(grad, weight):
        return _InputGrad.apply(grad, weight)
    return torch.ops.resdet.conv3x3_input_grad(grad, weight)


def conv3x3_weight_grad(x: Tensor, grad: Tensor) -> Tensor:
    """``resdet::conv3x3_weight_grad``: d(loss)/dweight [O, C, 3, 3] of :func:`conv3x3` of ``x`` given ``grad``."""
    if _needs_grad(x, grad):
        return _WeightGrad.apply(x, grad)
    return torch.ops.resdet.conv3x3_weight_grad(x, grad)
