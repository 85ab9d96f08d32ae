"""Helpers shared by test modules: they import from here (or get fixtures from ``conftest.py``), never from
one another.

* :func:`load_tool`: ``main`` of a ``tools/*.py`` script (the tools are scripts, not part of the package);
* :func:`resdet_ops`: which of resdet's registered ops (``torch.ops.resdet.*``) a block called;
* data written in the real layouts (:mod:`.datasets`): :func:`write_coco`, :func:`write_voc`,
  :func:`write_cityscapes`; panoptic data (:mod:`.panoptic`);
* small configs and tool arguments (:mod:`.configs`): :func:`tiny_cfg`, :func:`detection_overrides`,
  :func:`semantic_overrides`.
"""
from __future__ import annotations

import contextlib
import importlib.util
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

REPO = str(Path(__file__).resolve().parents[2])  # the repository root
TOOLS = Path(REPO) / "tools"


def load_tool_module(name: str):
    """``tools/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str) -> Callable[..., int]:
    """``main`` of ``tools/<name>.py``."""
    return load_tool_module(name).main


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


from .configs import SEMANTIC_CONFIG, detection_overrides, semantic_overrides, tiny_cfg  # noqa: E402
from .datasets import (  # noqa: E402
    CITYSCAPES_ID,
    SPARSE,
    coco_arrays,
    coco_rle,
    write_cityscapes,
    write_coco,
    write_voc,
    write_voc_png,
)

__all__ = [
    "CITYSCAPES_ID", "REPO", "SEMANTIC_CONFIG", "SPARSE", "TOOLS", "coco_arrays", "coco_rle", "detection_overrides",
    "load_tool", "load_tool_module", "resdet_ops", "semantic_overrides", "tiny_cfg", "write_cityscapes", "write_coco",
    "write_voc", "write_voc_png",
]
