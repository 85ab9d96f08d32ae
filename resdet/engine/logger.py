"""Training logs: ``metrics.jsonl`` (one JSON object per logged step or evaluation), TensorBoard when
installed, a tqdm progress bar with iteration, loss, lr and ETA, and a text line every ``log_period``
iterations on stdout and in ``log.txt`` (bar or no bar). Only rank 0 writes."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["setup_logger", "MetricsWriter", "ProgressBar", "format_progress"]


def setup_logger(output_dir: str | os.PathLike | None = None, *, rank: int = 0, name: str = "resdet") -> logging.Logger:
    """A logger printing to stdout on rank 0 (warnings only elsewhere) and to ``output_dir/log.txt``."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(output_dir) / "log.txt")
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


class MetricsWriter:
    """Appends metric dicts to ``metrics.jsonl`` and mirrors scalars to TensorBoard if available.

    Args:
        output_dir: directory of ``metrics.jsonl`` (and TensorBoard event files).
        enabled: False on ranks other than 0.
        tensorboard: try ``torch.utils.tensorboard`` (silently skipped when not installed).
    """

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional
                self._tb = None

    def write(self, iteration: int, metrics: dict[str, Any], *, kind: str = "train") -> None:
        """Record ``metrics`` at ``iteration``; ``kind`` is ``train`` or ``eval``."""
        if not self.enabled:
            return
        row = {"iteration": iteration, "kind": kind, "time": time.time(), **metrics}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as err:  # a full disk: name the file (the OS error alone does not)
            if err.filename is not None:
                raise
            raise OSError(err.errno, err.strerror, str(self.path)) from err
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, iteration)

    def truncate(self, iteration: int) -> int:
        """Drop rows a resumed run redoes: every row after ``iteration`` and the evaluation rows at it
        (that evaluation is re-run). Returns the number of rows dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                dropped += 1
                continue
            it = row.get("iteration", 0)
            if it > iteration or (it == iteration and row.get("kind") != "train"):
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        return dropped

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tb is not None:
            self._tb.close()


class ProgressBar:
    """tqdm over optimizer steps showing loss and lr; tqdm itself shows rate and ETA.

    Args:
        total: last iteration.
        initial: iteration to start from (after a resume).
        enabled: False on ranks other than 0 or when disabled by the config.
    """

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True) -> None:
        self._bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train",
                         mininterval=1.0)

    def update(self, loss: float, lr: float) -> None:
        """Advance one step."""
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Close the bar."""
        self._bar.close()


def format_progress(iteration: int, max_iter: int, losses: dict[str, float], *, lr: float, per_iter: float) -> str:
    """One progress line: ``iter 20/800  loss 1.234 (loss_classifier 0.5, ...)  lr 2.0e-02  0.71 s/it  ETA 9m16s``."""
    eta = int(per_iter * (max_iter - iteration))
    h, rest = divmod(eta, 3600)
    eta_text = f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"
    parts = ", ".join(f"{k} {v:.4g}" for k, v in losses.items() if k != "loss")
    total = f"loss {losses['loss']:.4g} ({parts})" if "loss" in losses else parts
    return f"iter {iteration}/{max_iter}  {total}  lr {lr:.3g}  {per_iter:.3f} s/it  ETA {eta_text}"
