"""When resdet's fast kernels run: the one place that decides, per call.

resdet has two fast kernels, each a registered op (``torch.ops.resdet.*``) with PyTorch's own op as the
fallback:

* ``"winograd"`` (:mod:`.winograd`): 3×3 stride-1 convolutions on CPU by NNPACK's Winograd F(6×6, 3×3)
  (forward and input gradient) and an F(4×4, 3×3) weight gradient; fallback ``F.conv2d`` and
  ``torch.nn.grad``.
* ``"roi_align"`` (:mod:`.roi_align`): multi-level RoIAlign as one sparse linear map; fallback
  ``torchvision.ops.roi_align``, one call per level.

A call takes its fast kernel only when all of these hold:

* the kernel is switched on: ``with resdet.fast_paths(False): ...`` turns every kernel off inside the
  block (``fast_paths(False, "winograd")`` only the one named; ``fast_paths(True)`` turns them back on),
  per thread and per asyncio task (a :class:`contextvars.ContextVar`). Outside any such block the
  environment decides: ``RESDET_FAST_PATHS=0`` turns every kernel off, ``RESDET_FAST_PATHS=-winograd``
  (comma-separated) the ones named; ``RESDET_WINOGRAD=0`` (deprecated) is ``-winograd``;
* the call is not being scripted, traced (``torch.jit.trace``, ``torch.fx``) or exported to ONNX: those
  record PyTorch's ops. ``torch.compile`` and ``torch.export`` record the registered op, whose kernel
  decides the rest at run time;
* device, dtype and sizes are those where the kernel was measured faster (:class:`Thresholds`), outside
  autocast for the convolution (bf16 runs take oneDNN's bf16 kernels);
* for NNPACK: PyTorch was built with it (``torch.backends.nnpack.is_available()``) and has it switched on
  (``torch.backends.nnpack.flags(enabled=False)`` means no NNPACK call is made).

A fast kernel that raises at run time is reported by one warning per process and is not tried again;
the call, and every later one, computes PyTorch's op instead.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import threading
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .tracing import is_tracing

__all__ = [
    "KERNELS", "Thresholds", "fast_path_enabled", "fast_paths", "kernel_failed", "load_thresholds", "nnpack_usable",
    "set_thresholds", "thresholds", "tracing",
]

KERNELS = ("winograd", "roi_align")

_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Sizes from which a fast kernel pays, in one table.

    The defaults were measured on this project's 2-core AMD EPYC machine (AVX-512), torch 2.x, float32,
    2 threads, by timing each kernel against oneDNN's convolution (``tools/benchmark.py --tune`` repeats
    the measurement and prints the table for the machine it runs on):

    * NNPACK forward / input gradient, one image at a time: 0.35–0.7× oneDNN's time for maps of at least
      48×64 pixels from 128 channels (``nnpack_min_pixels``, ``nnpack_min_channels``);
    * smaller maps (RoI features) laid out on one grid image: from 256 channels and ~6k pixels in all
      (``grid_min_channels``, ``grid_min_pixels``);
    * the F(4×4, 3×3) weight gradient: 0.6–0.75× oneDNN's at 256 channels on maps of 2.5k–16k pixels in
      all, sides of at least 24 (``wgrad_channels``, ``wgrad_max_pixels``, ``wgrad_min_side``); at 512
      channels, on 14×14 RoIs and on larger maps it measured ~0.9× for ~9× the input in transient
      buffers, so those stay with oneDNN.
    """

    nnpack_min_channels: int = 128
    nnpack_min_pixels: int = 48 * 64
    grid_min_channels: int = 256
    grid_min_pixels: int = 2 * 48 * 64
    wgrad_channels: int = 256
    wgrad_max_pixels: int = 128 * 128
    wgrad_min_side: int = 24


_thresholds = Thresholds()
_thresholds_from_env = False


def thresholds() -> Thresholds:
    """The table in use: :func:`set_thresholds`'s, else the JSON file ``RESDET_FAST_PATHS_THRESHOLDS``
    names (what ``tools/benchmark.py --tune`` writes), else the defaults."""
    global _thresholds, _thresholds_from_env
    if not _thresholds_from_env:
        _thresholds_from_env = True
        path = os.environ.get("RESDET_FAST_PATHS_THRESHOLDS")
        if path:
            _thresholds = load_thresholds(path)
    return _thresholds


def set_thresholds(table: Thresholds | None = None, **values: int) -> Thresholds:
    """Replaces the table process-wide (``None``: the defaults), with ``values`` changed; returns the old one."""
    global _thresholds, _thresholds_from_env
    old = thresholds()
    _thresholds = dataclasses.replace(table if table is not None else Thresholds(), **values)
    _thresholds_from_env = True
    return old


def load_thresholds(path: str | os.PathLike) -> Thresholds:
    """A :class:`Thresholds` from a JSON object of its fields (unknown keys are an error)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return Thresholds(**data)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{os.fspath(path)}: not a resdet thresholds file ({err}); expected a JSON object "
                         f"with keys among {[f.name for f in dataclasses.fields(Thresholds)]}") from None


# --------------------------------------------------------------------------------------------------
# the switch

_disabled: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("resdet_fast_paths", default=None)
_env_disabled: frozenset[str] | None = None


def _check_kernels(kernels: Sequence[str], where: str) -> None:
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"{where}: unknown fast path {unknown[0]!r}; expected one of {', '.join(KERNELS)}")


def _from_environment() -> frozenset[str]:
    """Kernels the environment turns off (read once per process)."""
    global _env_disabled
    if _env_disabled is None:
        text = os.environ.get("RESDET_FAST_PATHS", "").strip().lower()
        if text in _OFF:
            off = set(KERNELS)
        elif text in _ON:
            off = set()
        else:
            names = [n.strip() for n in text.split(",") if n.strip()]
            if not all(n.startswith("-") for n in names):
                raise ValueError(f"RESDET_FAST_PATHS={text!r}: expected 0, 1 or a comma-separated list of fast "
                                 f"paths to turn off such as -winograd (fast paths: {', '.join(KERNELS)})")
            off = {n[1:] for n in names}
            _check_kernels(sorted(off), f"RESDET_FAST_PATHS={text!r}")
        legacy = os.environ.get("RESDET_WINOGRAD")
        if legacy is not None:
            warnings.warn("RESDET_WINOGRAD is deprecated: use RESDET_FAST_PATHS=-winograd (or RESDET_FAST_PATHS=0 "
                          "for every fast path)", FutureWarning, stacklevel=2)
            if legacy.strip().lower() in _OFF:
                off.add("winograd")
        _env_disabled = frozenset(off)
    return _env_disabled


def _off() -> frozenset[str]:
    scoped = _disabled.get()
    return _from_environment() if scoped is None else scoped


def fast_path_enabled(kernel: str) -> bool:
    """Whether ``kernel`` (one of :data:`KERNELS`) is switched on here (scoped switch, else environment)."""
    return kernel not in _off()


@contextlib.contextmanager
def fast_paths(enabled: bool = True, *kernels: str) -> Iterator[None]:
    """Switches resdet's fast kernels on or off inside the block (all of them, or the ones named).

    Thread- and task-safe: the setting belongs to the current thread / asyncio task and nests; outside
    every block the environment (``RESDET_FAST_PATHS``) decides. A compiled model (``torch.compile``)
    recompiles for a changed setting.

    Example::

        with resdet.fast_paths(False):
            out = model(images)  # PyTorch's and torchvision's ops only
    """
    _check_kernels(kernels, "fast_paths")
    names = frozenset(kernels or KERNELS)
    token = _disabled.set(_off() - names if enabled else _off() | names)
    try:
        yield
    finally:
        _disabled.reset(token)


# --------------------------------------------------------------------------------------------------
# failures and PyTorch's capabilities

_failed: set[str] = set()
_failed_lock = threading.Lock()


def kernel_failed(kernel: str, err: BaseException) -> None:
    """Records that ``kernel`` raised: one warning per process, and the kernel is not used again."""
    with _failed_lock:
        first = kernel not in _failed
        _failed.add(kernel)
    if first:
        warnings.warn(f"resdet: the {kernel} fast kernel failed ({type(err).__name__}: {err}); PyTorch's op runs "
                      "instead, for the rest of this process", RuntimeWarning, stacklevel=3)


def _usable(kernel: str) -> bool:
    return kernel not in _failed and fast_path_enabled(kernel)


def nnpack_usable() -> bool:
    """Whether a call may use NNPACK: built into this PyTorch, switched on (``torch.backends.nnpack.flags``),
    and its kernel has not failed in this process. The private entry points it needs are looked up here,
    per call, so a PyTorch without them just takes PyTorch's convolution."""
    if "nnpack" in _failed or not hasattr(torch, "_nnpack_spatial_convolution"):
        return False
    if not torch.backends.nnpack.is_available():  # also initialises NNPACK: its calls fail before that
        return False
    enabled = getattr(torch._C, "_get_nnpack_enabled", None)  # the flag torch.backends.nnpack.flags() sets
    return bool(enabled()) if callable(enabled) else False


def tracing(x: object) -> bool:
    """True while scripting, tracing (``torch.jit.trace``, the TorchScript-based ONNX exporter, ``torch.fx``: ``x``
    is a ``Proxy`` then) or exporting to ONNX: those record PyTorch's ops."""
    return torch.jit.is_scripting() or is_tracing() or isinstance(x, torch.fx.Proxy)


# --------------------------------------------------------------------------------------------------
# the 3×3 convolution


def _f32_cpu(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _nnpack_pays(n: int, h: int, w: int, channels: int) -> bool:
    t = thresholds()
    if h * w >= t.nnpack_min_pixels:  # one image at a time
        return channels >= t.nnpack_min_channels
    return channels >= t.grid_min_channels and n * h * w >= t.grid_min_pixels  # small maps on one grid


def _wgrad_pays(n: int, c: int, o: int, h: int, w: int) -> bool:
    t = thresholds()
    return (
        min(o, c) >= t.wgrad_channels >= max(o, c)
        and 10 * c <= n * h * w <= t.wgrad_max_pixels
        and min(h, w) >= t.wgrad_min_side
    )


def nnpack_conv3x3(x: Tensor, weight: Tensor) -> bool:
    """Kernel side: whether ``x`` [N, C, H, W] * ``weight`` [O, C, 3, 3] runs through NNPACK."""
    if not (fast_path_enabled("winograd") and _f32_cpu(x, weight) and x.dim() == 4):
        return False
    n, _, h, w = x.shape
    return _nnpack_pays(n, h, w, min(weight.shape[0], weight.shape[1])) and nnpack_usable()


def winograd_weight_grad(x: Tensor, grad: Tensor) -> bool:
    """Kernel side: whether the weight gradient of ``x`` [N, C, H, W] given ``grad`` [N, O, H, W] is
    computed by the F(4×4, 3×3) product."""
    if not (_usable("winograd") and _f32_cpu(x, grad) and x.dim() == 4):
        return False
    n, c, h, w = x.shape
    return _wgrad_pays(n, c, grad.shape[1], h, w)


def use_conv3x3_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Module side: whether this 3×3 stride-1 "same" convolution goes through ``resdet::conv3x3`` (else
    ``F.conv2d``, exactly PyTorch's). Under ``torch.compile`` / ``torch.export`` every eligible call does
    (the kernel then picks by size at run time); in eager mode only calls where a fast kernel will run."""
    if tracing(x) or not fast_path_enabled("winograd"):
        return False
    if not _f32_cpu(x, weight) or x.dim() != 4 or torch.is_autocast_enabled("cpu"):
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if torch.compiler.is_compiling():
        return True
    n, c, h, w = x.shape
    o = weight.shape[0]
    if _nnpack_pays(n, h, w, min(o, c)) and nnpack_usable():
        return True
    return weight.requires_grad and torch.is_grad_enabled() and _usable("winograd") and _wgrad_pays(n, c, o, h, w)


def winograd_possible(device: torch.device) -> bool:
    """Whether resdet's 3×3 convolutions on ``device`` can take the Winograd path here (what
    ``optimize_for_inference`` reads to keep the NCHW layout NNPACK wants)."""
    return device.type == "cpu" and fast_path_enabled("winograd") and nnpack_usable()


# --------------------------------------------------------------------------------------------------
# RoIAlign

_ROI_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_sparse_roi_align(levels: Sequence[Tensor], impl: str = "auto") -> bool:
    """Module side: whether these levels are pooled by ``resdet::roi_align`` (else torchvision's
    ``roi_align``, one call per level). ``impl``: ``"auto"`` (CPU levels), ``"sparse"`` (any device) or
    ``"torchvision"`` (never)."""
    if impl == "torchvision" or not levels or tracing(levels[0]) or not _usable("roi_align"):
        return False
    if impl == "auto" and any(x.device.type != "cpu" for x in levels):
        return False
    if any(x.dtype not in _ROI_DTYPES for x in levels):
        return False
    return len({x.shape[1] for x in levels}) == 1
