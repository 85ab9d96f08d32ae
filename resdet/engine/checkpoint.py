"""Atomic checkpoint files, the last N kept, a pointer to the latest, and RNG state capture.

Layout in the output directory::

    model_0000500.pth  model_0001000.pth  ...   periodic, the last ``keep_last`` kept
    model_best.pth                              best by the configured metric
    model_final.pth                             end of training
    last_checkpoint                             text: file name of the newest checkpoint

Every file is written to ``<name>.tmp`` in the same directory, flushed, fsynced and renamed with
``os.replace``, so a kill at any moment leaves either the old file or the complete new one.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_save",
    "atomic_write_text",
    "CheckpointManager",
    "capture_rng_state",
    "restore_rng_state",
    "unwrap_model",
]

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a small text file atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel
    ) else model


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds checkpoints in one directory.

    Args:
        directory: output directory (created).
        keep_last: periodic checkpoints kept; older ones are deleted (best/final are never deleted).
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], name: str, *, update_latest: bool = True) -> Path:
        """Write ``state`` as ``<name>.pth`` atomically, point ``last_checkpoint`` at it (unless
        ``update_latest`` is False, as for the best checkpoint) and prune old periodic ones."""
        path = self.directory / f"{name}.pth"
        atomic_save(state, path)
        if update_latest:
            atomic_write_text(path.name, self.directory / "last_checkpoint")
        self._prune()
        return path

    def periodic_name(self, iteration: int) -> str:
        """File stem for a periodic checkpoint after ``iteration`` optimizer steps."""
        return f"model_{iteration:07d}"

    def _prune(self) -> None:
        periodic = sorted(p for p in self.directory.iterdir() if _PERIODIC.match(p.name))
        for old in periodic[: -self.keep_last]:
            old.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        """Path of the newest checkpoint, or None."""
        pointer = self.directory / "last_checkpoint"
        if pointer.is_file():
            path = self.directory / pointer.read_text().strip()
            if path.is_file():
                return path
        periodic = sorted(p for p in self.directory.iterdir() if _PERIODIC.match(p.name))
        return periodic[-1] if periodic else None

    @staticmethod
    def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Read a checkpoint written by :meth:`save` (a full training state)."""
        return torch.load(path, map_location=map_location, weights_only=False)
