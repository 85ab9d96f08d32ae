"""Plumbing of ``tools/benchmark.py``: argument types and the peak-memory child process."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from .harness import Row

__all__ = ["memory_rows_in_child", "size", "train_step", "without_measure", "write_rows"]


def size(text: str) -> tuple[int, ...]:
    """``"800x1066"`` -> ``(800, 1066)`` (an argparse type)."""
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers joined by 'x' (HxW or BxHxW), got {text!r}") from None


def train_step(text: str) -> tuple[int, int, int]:
    """``"2x512x683"`` -> ``(2, 512, 683)``: batch, height, width (an argparse type)."""
    value = size(text)
    if len(value) != 3:
        raise argparse.ArgumentTypeError(f"training step must look like BATCHxHEIGHTxWIDTH, got {text!r}")
    return value


def without_measure(argv: list[str]) -> list[str]:
    """argv minus ``--measure`` and its values (the memory child gets its own)."""
    out, skipping = [], False
    for a in argv:
        if a == "--measure":
            skipping = True
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


def memory_rows_in_child(script: str, argv: list[str]) -> list[Row]:
    """The peak-memory rows, measured by ``script`` in a child process whose allocator maps every large
    tensor (so freed memory leaves the process and peak RSS tracks live memory). Timings stay in this
    process, under the allocator users run with."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        subprocess.run([sys.executable, script, *argv, "--measure", "memory", "--rows-json", out], env=env, check=True)
        with open(out) as f:
            return [Row(**r) for r in json.load(f)]


def write_rows(rows: list[Row], path: str) -> None:
    """The memory child's answer to :func:`memory_rows_in_child`."""
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f)
