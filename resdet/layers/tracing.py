"""Whether a tracer is recording the model, and how inference code keeps sizes symbolic for it.

``torch.jit.trace`` and PyTorch's TorchScript-based ONNX exporter (``torch.onnx.export(..., dynamo=False)``)
run the model once and record the tensor ops. While they do, ``tensor.shape[i]`` is a 0-dim int64 tensor
that the tracer records as ``aten::size``, so sizes computed from it with torch ops (``//``, ``clamp``,
``arange``, ``F.interpolate(size=...)``, ``F.pad``) stay symbolic and the recorded graph is valid for any
input size. ``int()``, ``len()``, ``.tolist()``, Python ``min``/``max`` and ``if`` on such values freeze the
example's numbers into the graph instead.

resdet's inference code therefore has one implementation of each step: eager Python arithmetic on sizes
(the fastest on CPU) with a small branch on :func:`is_tracing` where that arithmetic would freeze a value,
as torchvision's detection models do. Only public PyTorch functions are used here.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["at_most", "is_tracing"]


def is_tracing() -> bool:
    """True while ``torch.jit.trace`` or the TorchScript-based ``torch.onnx.export`` records the model.

    The ONNX exporter records the model with the same tracer, so ``torch.jit.is_tracing()`` answers for
    both (``tests/test_tracing.py`` checks it); ``torch.onnx.is_in_onnx_export()`` is not asked: it
    imports two modules per call (~10 µs), and this runs in every eager forward.
    """
    return torch.jit.is_tracing()


def at_most(size: int | Tensor, limit: int) -> int | Tensor:
    """``min(size, limit)`` of a size that is a Python int (eager) or a traced 0-dim tensor."""
    if isinstance(size, Tensor):
        return torch.clamp(size, max=limit)
    return min(size, limit)
