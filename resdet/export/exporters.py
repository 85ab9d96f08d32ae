"""Export a resdet model to ONNX or TorchScript, then check the file against the PyTorch model.

Both formats trace the model's own eval-mode inference (``model([image])[0]``, through
:class:`OneImageModel`): the transform, RPN, RoI heads and post-processing keep every size symbolic
while traced (:mod:`resdet.layers.tracing`), so the recorded graph is valid for any H×W. ONNX is
written by PyTorch's TorchScript-based exporter (``dynamo=False``; detection post-processing has
data-dependent shapes — top-k, NMS, per-class filtering — which it records as ONNX ops, as
torchvision's detectors are exported), TorchScript by ``torch.jit.trace``.

The exported model takes one image ``image`` float Tensor[3, H, W] in [0, 1], any H×W unless
``input_size`` fixes it, and returns ``boxes`` Tensor[D, 4] (xyxy, original pixels), ``labels`` int64
Tensor[D], ``scores`` Tensor[D] (+ ``masks`` Tensor[D, 1, H, W] probabilities for Mask R-CNN), or
``sem_seg`` int64 Tensor[H, W] for the semantic FPN.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["ExportError", "CheckReport", "OneImageModel", "exportable", "to_onnx", "to_torchscript",
           "check_outputs", "check_opset", "example_image", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17
MIN_OPSET = 11  # padding to a computed (dynamic) size is an ONNX Pad with input pads from opset 11 on


def _max_opset() -> int:
    """The highest opset torch's TorchScript-based exporter supports (above it torch only warns)."""
    try:  # private constant, read only; 20 from torch 2.4 to 2.14 when it moves
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except ImportError:
        return 20
    return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def check_opset(opset: int) -> int:
    """``opset`` when resdet's models export at it with this torch (``MIN_OPSET`` up to the exporter's
    highest); else a one-line ``ValueError`` before anything is traced (torch would print the whole graph)."""
    top = _max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ValueError(f"--opset {opset!r}: resdet models export to ONNX opsets {MIN_OPSET} to {top} with this torch "
                         f"(default {DEFAULT_OPSET})")
    return opset


class ExportError(RuntimeError):
    """The model cannot be exported: an op it runs (the message names the op and the module that runs it),
    or the kind of model."""


class OneImageModel(nn.Module):
    """``model([image])[0]`` as a tuple of tensors, the form tracers record.

    ``forward(image Tensor[3, H, W] in [0, 1])`` returns the eval outputs named ``output_names``, in that
    order. The model is held, not copied: tracing this module traces the model's own code.

    Args:
        model: an eval-mode resdet model.
        output_names: keys of the model's output dict to return.
    """

    def __init__(self, model: nn.Module, output_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names = list(output_names)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.model([image])[0]
        return tuple(out[name] for name in self.output_names)


def exportable(model: nn.Module) -> OneImageModel:
    """The one-image module of a resdet ``GeneralizedRCNN`` or ``SemanticFPN`` that is traced (in eval mode).

    Raises:
        ExportError: any other model (one line naming it), Panoptic FPN included: its combination step
            is a data-dependent loop over detections that a trace would record for one image only.
        ValueError: a semantic FPN whose ``size_divisible`` is not a multiple of 32.
    """
    return OneImageModel(model, _output_names(model)).eval()


def _output_names(model: nn.Module) -> list[str]:
    """The outputs the exported file returns; raises :func:`exportable`'s errors."""
    from resdet.models import GeneralizedRCNN, PanopticFPN, SemanticFPN

    if isinstance(model, GeneralizedRCNN):
        return ["boxes", "labels", "scores"] + (["masks"] if model.has_masks else [])
    if isinstance(model, SemanticFPN):
        divisible = model.transform.size_divisible
        if divisible % 32:  # the semantic head's upsampled levels must meet at every traced size
            raise ValueError(f"export needs size_divisible to be a multiple of 32, got {divisible}")
        return ["sem_seg"]
    if isinstance(model, PanopticFPN):
        raise ExportError("cannot export PanopticFPN: its panoptic combination step is a data-dependent loop over "
                          "detections that a trace would record for one image only; resdet exports Faster/Mask R-CNN "
                          "and semantic FPN models")
    raise ExportError(f"cannot export {type(model).__name__}: resdet exports GeneralizedRCNN (Faster/Mask R-CNN) "
                      f"and SemanticFPN models")


def example_image(height: int = 320, width: int = 427, seed: int = 0) -> Tensor:
    """A deterministic image Tensor[3, H, W] in [0, 1]: smooth blobs plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, max(height // 32, 1), max(width // 32, 1), generator=g)
    img = torch.nn.functional.interpolate(low[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return (img + 0.1 * torch.rand(3, height, width, generator=g)).clamp(0, 1)


def _prepare(model: nn.Module, optimize: bool, channels_last: bool) -> nn.Module:
    model = copy.deepcopy(model).eval()
    if optimize:
        if not hasattr(model, "optimize_for_inference"):
            raise ValueError(f"{type(model).__name__} has no optimize_for_inference(); export without optimize")
        model.optimize_for_inference(channels_last=channels_last)
    return model


def _dispatch_mode() -> type | None:
    """PyTorch's ``TorchDispatchMode``, or None: it lives in a private module, so it is optional here."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:
        return None
    return TorchDispatchMode


def _culprit(wrapper: nn.Module, image: Tensor, op: str) -> str | None:
    """Dotted name (and type) of the first module whose forward runs the ATen op ``op`` ("aten::name");
    None when it cannot be told."""
    mode = _dispatch_mode()
    if mode is None:
        return None
    stack: list[str] = []
    found: list[str] = []
    root = wrapper.model if isinstance(wrapper, OneImageModel) else wrapper  # names as in the user's model
    names = {m: n for n, m in root.named_modules()}

    def enter(module: nn.Module, args: tuple) -> None:
        stack.append(f"{names[module] or 'model'} ({type(module).__name__})")

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        stack.pop()  # returns None: the output is left alone

    hooks = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]

    class Spy(mode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not found and stack and getattr(getattr(func, "_schema", None), "name", None) == op:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), Spy():
            wrapper(image)
    except Exception:  # noqa: BLE001 - best effort: the export error is reported either way
        pass
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def _raise_export_error(err: Exception, wrapper: nn.Module, image: Tensor, what: str) -> None:
    match = re.search(r"'?(\w+::\w+)'?", str(err))
    if match is None:
        raise ExportError(f"{what} failed: {err}") from err
    op = match.group(1)
    module = _culprit(wrapper, image, op)
    where = f"in module {module}" if module else "(module not identified)"
    raise ExportError(f"{what}: op {op} {where} cannot be exported: {str(err).splitlines()[0]}") from err


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    input_size: tuple[int, int] | None = None,
    example: Tensor | None = None,
    optimize: bool = False,
    check: bool = True,
    check_image: Tensor | None = None,
    metadata: dict[str, str] | None = None,
    verbose: bool = True,
) -> CheckReport | None:
    """Export ``model`` to an ONNX file that runs one image (see the module docstring).

    Args:
        model: a resdet detector or semantic FPN (not modified: a copy is exported).
        path: output ``.onnx`` file.
        opset: ONNX opset, ``MIN_OPSET`` (11) to the highest torch's exporter supports (:func:`check_opset`).
        input_size: ``(H, W)`` to fix the input size (for runtimes without dynamic shapes); default:
            height and width are dynamic axes.
        example: image traced (default: :func:`example_image` at ``input_size`` or 320×427).
        optimize: run ``optimize_for_inference(channels_last=False)`` first (BatchNorm folded).
        check: run the file with onnxruntime on ``check_image`` and compare with ``model``.
        check_image: image of the check (default: :func:`example_image` of another size than
            ``example``, so the dynamic axes are exercised; ``input_size`` when fixed).
        verbose: print the check's report.

    Returns:
        The check's :class:`CheckReport`, or None without ``check``.

    Raises:
        ExportError: an op cannot be exported (names the op and the module running it).
    """
    check_opset(opset)
    _output_names(model)  # the model is exportable, before it is copied and optimized
    size = input_size or (320, 427)
    example = example_image(*size) if example is None else example
    wrapper = exportable(_prepare(model, optimize, channels_last=False))
    names = wrapper.output_names
    dynamic_axes = None
    if input_size is None:
        dynamic_axes = {"image": {1: "height", 2: "width"}}
        for name in names:
            dynamic_axes[name] = {0: "height", 1: "width"} if name == "sem_seg" else {0: "detections"}
        if "masks" in names:
            dynamic_axes["masks"].update({2: "height", 3: "width"})
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about constants are expected and handled
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=names, dynamic_axes=dynamic_axes)
    except Exception as err:  # noqa: BLE001 - re-raised with the op and module named
        _raise_export_error(err, wrapper, example, f"ONNX export (opset {opset})")
    if metadata:
        import onnx

        proto = onnx.load(str(path))
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(path))
    if not check:
        return None
    from .runtime import OnnxPredictor

    image = check_image if check_image is not None else (example if input_size else example_image(480, 640, seed=1))
    report = check_outputs(model, OnnxPredictor(path), image, label=f"onnxruntime vs PyTorch ({os.fspath(path)})")
    if verbose:
        print(report)
    return report


def to_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example: Tensor | None = None,
    optimize: bool = False,
    check: bool = True,
    check_image: Tensor | None = None,
    verbose: bool = True,
) -> CheckReport | None:
    """Trace ``model``'s one-image inference to a TorchScript file (``torch.jit.load`` runs it).

    The loaded module is called as ``module(image)`` and returns the output tuple named in the module
    docstring (names in the file's ``output_names`` extra file). Arguments are :func:`to_onnx`'s;
    ``optimize`` runs ``optimize_for_inference()`` (BatchNorm folded, channels-last).
    """
    _output_names(model)
    example = example_image() if example is None else example
    wrapper = exportable(_prepare(model, optimize, channels_last=True))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings, and torch.jit's deprecation notice
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"output_names": ",".join(wrapper.output_names)})
    except Exception as err:  # noqa: BLE001
        _raise_export_error(err, wrapper, example, "TorchScript trace")
    if not check:
        return None
    from .runtime import TorchScriptPredictor

    image = example_image(480, 640, seed=1) if check_image is None else check_image
    label = f"TorchScript vs PyTorch ({os.fspath(path)})"
    report = check_outputs(model, TorchScriptPredictor(path), image, label=label)
    if verbose:
        print(report)
    return report


@dataclass
class CheckReport:
    """Exported-model outputs against PyTorch's on one image.

    Attributes:
        label: what was compared.
        image_size: (H, W) of the image.
        counts: per output name, (PyTorch, exported) number of rows (detections; pixels for ``sem_seg``).
        max_diff: per output name, the largest absolute difference (``masks``: of the probabilities;
            ``labels``/``sem_seg``: number of differing entries), over the common rows.
    """

    label: str
    image_size: tuple[int, int]
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    max_diff: dict[str, float] = field(default_factory=dict)

    @property
    def same_count(self) -> bool:
        return all(a == b for a, b in self.counts.values())

    def __str__(self) -> str:
        n = self.counts.get("boxes") or self.counts.get("sem_seg")
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in self.max_diff.items())
        status = "" if self.same_count else f" — DIFFERENT COUNTS {self.counts}"
        what = "pixels" if "sem_seg" in self.counts else "detections"
        return (f"check {self.label}: image {self.image_size[0]}x{self.image_size[1]}, {n[0]} {what} in PyTorch, "
                f"{n[1]} exported; largest difference: {diffs}{status}")


def check_outputs(model: nn.Module, predictor, image: Tensor, *, label: str = "exported vs PyTorch") -> CheckReport:
    """Compare ``predictor(image)`` (dict of named outputs) with ``model([image])[0]``."""
    with torch.no_grad():
        ref = model.eval()([image])[0]
    out = predictor.predict(image)
    report = CheckReport(label, (int(image.shape[-2]), int(image.shape[-1])))
    for name, value in out.items():
        expected = ref[name]
        if name == "sem_seg":
            report.counts[name] = (expected.numel(), value.numel())
            report.max_diff[name] = float((expected != value).sum()) if expected.shape == value.shape else float("inf")
            continue
        report.counts[name] = (len(expected), len(value))
        k = min(len(expected), len(value))
        if k == 0:
            report.max_diff[name] = 0.0
        elif name == "labels":
            report.max_diff[name] = float((expected[:k] != value[:k]).sum())
        else:
            report.max_diff[name] = float((expected[:k].float() - value[:k].float()).abs().max())
    return report
