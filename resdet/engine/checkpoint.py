"""Atomic checkpoint files, the last N kept, a pointer to the latest, and RNG state capture.

Layout in the output directory::

    model_0000500.pth  model_0001000.pth  ...   periodic, the last ``keep_last`` kept
    model_best.pth                              best by the configured metric (weights only)
    model_final.pth                             end of training (weights only)
    last_checkpoint                             text: file name of the newest resumable checkpoint

Periodic checkpoints are *resumable* (model, optimizer, scheduler, scaler, RNG states); the best and final
ones hold the model, config and label metadata only. Every file is written to ``<name>.tmp`` in the same
directory, flushed, fsynced and renamed with ``os.replace``, so a kill at any moment leaves either the old
file or the complete new one; leftover ``*.tmp`` files of a killed run are removed at start. SIGINT/SIGTERM
arriving while a file is written are held until it is renamed into place (:func:`signals_deferred`), then
delivered once: a signal never cuts a checkpoint in half. A write that fails (a full disk) raises
:class:`CheckpointError` naming the file and the system's reason, and leaves the previous file as it was.

Everything is stored as tensors and plain Python types so that every load uses ``weights_only=True``: a
crafted checkpoint cannot run code when it is read.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "atomic_save",
    "load_checkpoint_file",
    "load_model_state",
    "mismatch_summary",
    "atomic_write_text",
    "signals_deferred",
    "CheckpointManager",
    "capture_rng_state",
    "restore_rng_state",
    "unwrap_model",
]

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, empty, truncated, corrupt, unsafe or does not fit the model; the
    message names the file and what is wrong, in one line."""


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    Raises:
        CheckpointError: missing, empty, truncated/corrupt, or holding objects other than tensors and
            plain types (refused: loading them could run code).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "Unsupported global" in line or "GLOBAL" in line),
                      first[0] if first else "")
        if "Weights only load failed" in str(err):
            raise CheckpointError(f"checkpoint {path!r} holds objects other than tensors and plain types; "
                                  f"refused to load it (it could run code): {detail}") from None
        raise CheckpointError(f"checkpoint {path!r} is corrupt ({size} bytes): {detail}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt ({size} bytes): {detail}") from None


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_deferring = threading.local()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs; afterwards deliver the first one that arrived (once) to the
    handler that was in place.

    Python runs signal handlers in the main thread between bytecodes, so a handler that raises (Ctrl-C's
    ``KeyboardInterrupt``, the trainer's stop) could otherwise cut ``torch.save`` mid-file. Nested blocks
    defer to the outermost one; outside the main thread (where handlers cannot be set) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread() or getattr(_deferring, "active", False):
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, hold) for s in _STOP_SIGNALS}
    _deferring.active = True
    try:
        yield
    finally:
        _deferring.active = False
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:  # two Ctrl-C 50 ms apart during one write count as one
            signal.raise_signal(received[0])


def _write_error(err: BaseException, path: Path) -> CheckpointError | None:
    """A one-line :class:`CheckpointError` for an OS-level write failure (e.g. a full disk) anywhere in
    ``err``'s chain (torch.save reports it as ``RuntimeError: ... unexpected pos`` with the ``OSError`` chained);
    None when the failure is not an ``OSError``."""
    seen = err
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    reason = seen.strerror or str(seen) or type(seen).__name__
    return CheckpointError(f"cannot write {str(path)!r}: {reason} (the previous file, if any, is kept)")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``; SIGINT/SIGTERM wait
    until the rename is done.

    Raises:
        CheckpointError: the file could not be written (a full disk, a read-only folder); names ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with signals_deferred():
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            failure = _write_error(err, path)
            if failure is None:
                raise
            raise failure from err
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a small text file atomically (SIGINT/SIGTERM wait until it is in place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with signals_deferred():
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise _write_error(err, path) from err
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel
    ) else model


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain types."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RESUMABLE_KEYS = ("model", "optimizer", "scheduler", "scaler", "iteration", "batches_done", "rng")


class CheckpointManager:
    """Saves and finds checkpoints in one directory.

    Args:
        directory: output directory (created); partial ``*.pth.tmp`` files left by a killed run are removed.
        keep_last: periodic checkpoints kept; older ones are deleted (best/final are never deleted).
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3, clean: bool = True) -> None:
        if keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.removed_tmp: list[str] = []
        if clean:
            for tmp in sorted(self.directory.glob("*.tmp")):
                tmp.unlink(missing_ok=True)
                self.removed_tmp.append(tmp.name)

    def save(self, state: dict[str, Any], name: str, *, update_latest: bool = True) -> Path:
        """Write ``state`` as ``<name>.pth`` atomically, point ``last_checkpoint`` at it (unless
        ``update_latest`` is False, as for the best and final checkpoints) and prune old periodic ones."""
        path = self.directory / f"{name}.pth"
        with signals_deferred():  # the file, the pointer to it and the pruning complete together
            atomic_save(state, path)
            if update_latest:
                atomic_write_text(path.name, self.directory / "last_checkpoint")
            self._prune()
        return path

    def link(self, source: str, name: str) -> Path:
        """Make ``<name>.pth`` the same file as ``<source>.pth`` (a hard link; a copy where links fail)
        instead of writing the same bytes again."""
        src, dst = self.directory / f"{source}.pth", self.directory / f"{name}.pth"
        tmp = dst.with_name(dst.name + ".tmp")
        with signals_deferred():
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                try:
                    shutil.copyfile(src, tmp)
                except OSError as err:
                    tmp.unlink(missing_ok=True)
                    raise _write_error(err, dst) from err
            os.replace(tmp, dst)
        return dst

    def periodic_name(self, iteration: int) -> str:
        """File stem for a periodic checkpoint after ``iteration`` optimizer steps."""
        return f"model_{iteration:07d}"

    def _periodic(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if _PERIODIC.match(p.name))

    def _prune(self) -> None:
        for old in self._periodic()[: -self.keep_last]:
            old.unlink(missing_ok=True)

    def candidates(self) -> list[Path]:
        """Resumable checkpoints, newest first: the one ``last_checkpoint`` names, then periodic ones."""
        out: list[Path] = []
        pointer = self.directory / "last_checkpoint"
        if pointer.is_file():
            path = self.directory / pointer.read_text().strip()
            if path.is_file():
                out.append(path)
        out += [p for p in reversed(self._periodic()) if p not in out]
        return out

    def latest(self) -> Path | None:
        """Path of the newest checkpoint, or None."""
        found = self.candidates()
        return found[0] if found else None

    @staticmethod
    def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
             resumable: bool = False) -> dict[str, Any]:
        """Read a checkpoint written by :meth:`save` (``weights_only=True``).

        Args:
            resumable: require a full training state (model, optimizer, scheduler, ..., RNG states).

        Raises:
            CheckpointError: unreadable, or not a resumable training state (the message says which keys lack).
        """
        state = load_checkpoint_file(path, map_location=map_location)
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} is not a resdet training checkpoint "
                                  f"(holds a {type(state).__name__})")
        lacking = [k for k in RESUMABLE_KEYS if k not in state]
        if resumable and lacking:
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} cannot be resumed from: it lacks "
                                  f"{', '.join(lacking)} (best/final checkpoints hold weights only; resume "
                                  f"from a periodic model_NNNNNNN.pth)")
        return state

    def load_newest(self, log: Any = None) -> tuple[Path, dict[str, Any]] | None:
        """The newest resumable checkpoint that reads; unreadable newer ones are skipped and reported
        through ``log`` (a callable taking one line). None when there is no checkpoint at all.

        Raises:
            CheckpointError: checkpoints exist but none of them reads.
        """
        found = self.candidates()
        errors = []
        for path in found:
            try:
                state = self.load(path, resumable=True)
            except CheckpointError as err:
                errors.append(str(err))
                if log is not None:
                    log(f"{err}; falling back to the previous checkpoint")
                continue
            if errors and log is not None:
                log(f"resuming from {path.name} (the newer {len(errors)} checkpoint(s) could not be read)")
            return path, state
        if errors:
            raise CheckpointError(f"no readable checkpoint in {str(self.directory)!r}: {errors[0]}")
        return None


def _describe_arch(config: dict[str, Any] | None) -> str | None:
    model = (config or {}).get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return None
    return f"{model.get('arch')} {model.get('backbone')} num_classes={model.get('num_classes')}"


def _grouped(keys: list[str]) -> str:
    groups: dict[str, int] = {}
    for k in keys:
        g = ".".join(k.split(".")[:2]) + ".*"
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in list(groups.items())[:4]) + (" ..." if len(groups) > 4 else "")


def mismatch_summary(shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]], missing: list[str],
                     unexpected: list[str] = ()) -> str:
    """``"68 tensors differ in shape (e.g. k: checkpoint [..] vs model [..]); 12 model tensors missing from it
    (rpn.head.* (4), ...)"``: how a state dict differs from a model's, in one line."""
    parts = []
    if shapes:
        k, a, b = shapes[0]
        parts.append(f"{len(shapes)} tensors differ in shape (e.g. {k}: checkpoint {list(a)} vs model {list(b)})")
    if missing:
        parts.append(f"{len(missing)} model tensors missing from it ({_grouped(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors the model lacks ({_grouped(list(unexpected))})")
    return "; ".join(parts)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, *,
                     stored_config: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> None:
    """``model.load_state_dict(state)`` strictly, or a one-line :class:`CheckpointError` naming the file and
    what differs (architecture, depth, number of classes, or the first differing keys and shapes).

    Args:
        stored_config: the config dict saved in the checkpoint, if any.
        config: the current config as a dict, to name the architecture difference.
    """
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target and not k.endswith("num_batches_tracked")]
    shapes = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in state.items()
              if k in target and hasattr(v, "shape") and tuple(v.shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        trained, wanted = _describe_arch(stored_config), _describe_arch(config)
        if trained and wanted and trained != wanted:
            what = f"the checkpoint holds a {trained}, the config builds a {wanted}"
        else:
            what = mismatch_summary(shapes, missing, unexpected)
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not fit the model: {what}")
    model.load_state_dict(state)
