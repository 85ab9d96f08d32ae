"""Helpers shared by test modules (test modules import from here or get fixtures from ``conftest.py``,
never from one another)."""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from torch.utils._python_dispatch import TorchDispatchMode


class _OpRecorder(TorchDispatchMode):
    def __init__(self, calls: Counter) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("resdet."):
            self.calls[name.split(".", 1)[1]] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def resdet_ops() -> Iterator[Counter]:
    """Counts the ``torch.ops.resdet.*`` calls inside the block by op name (``conv3x3``, ``roi_align``, ...)."""
    calls: Counter = Counter()
    with _OpRecorder(calls):
        yield calls
