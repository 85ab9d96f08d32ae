"""What the command-line tools share: known errors become one line and a non-zero exit (``--debug`` shows
the traceback instead), SIGTERM outside training stops like Ctrl-C, and the closing summary line."""
from __future__ import annotations

import signal
import sys
from typing import Any, Callable

__all__ = ["EXIT_CONFIG", "EXIT_ERROR", "add_debug_flag", "final_line", "run_guarded"]

EXIT_ERROR = 1
EXIT_CONFIG = 2


def add_debug_flag(parser: Any) -> None:
    """``--debug``: show Python tracebacks instead of one-line errors."""
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the trainer: unwinds like Ctrl-C, exits 143."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from resdet.data.image_io import ImageReadError

    from .checkpoint import CheckpointError

    # ValueError covers ConfigError, validation errors and malformed json (json.JSONDecodeError); OSError
    # covers missing files, permissions, a path that is a file where a folder is expected and a full disk
    return (CheckpointError, ImageReadError, ValueError, OSError)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:  # "[Errno 28] No space left on device" names no file
        text = f"{err.strerror}: {str(err.filename)!r}" if err.filename is not None else err.strerror
        if err.filename2 is not None:
            text += f" -> {str(err.filename2)!r}"
        return text
    return " ".join(str(err).split()) or type(err).__name__


def run_guarded(fn: Callable[[], int], *, debug: bool = False) -> int:
    """Run ``fn`` (a tool's body); turn known errors into one line on stderr and an exit code.

    Exit codes: 2 config errors, 1 other known errors and a non-finite loss, 128 + signal number after
    SIGINT/SIGTERM (130 / 143).
    """
    from resdet.config import ConfigError

    from .trainer import TrainingInterrupted

    def _term(signum: int, frame: Any) -> None:  # SIGTERM outside the trainer's own handler: stop like Ctrl-C
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, _term) if signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL, None) else None
    try:
        return fn()
    except TrainingInterrupted as err:
        if debug:
            raise
        print(_one_line(err), file=sys.stderr)
        return 128 + int(err.signum)
    except _Terminated:
        if debug:
            raise
        print("stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (SIGINT)", file=sys.stderr)
        return 128 + signal.SIGINT
    except FloatingPointError as err:
        if debug:
            raise
        print(f"training stopped: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except ConfigError as err:
        if debug:
            raise
        print(f"config error: {_one_line(err)}", file=sys.stderr)
        return EXIT_CONFIG
    except _known_errors() as err:
        if debug:
            raise
        print(f"error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _metric(value: float) -> str:
    return f"{value:.4f}" if value == value else "nan (no valid objects)"  # NaN: the metric is undefined


def final_line(metrics: dict[str, float], output_dir: str) -> str:
    """``final: bbox/AP=0.1234, segm/AP=...; outputs in DIR`` (or a note that nothing was evaluated). An
    undefined metric (NaN: no ground truth it could be measured on) reads ``nan (no valid objects)``."""
    shown = ("panoptic/PQ", "bbox/AP", "segm/AP", "bbox/mAP50", "mIoU", "top1", "top1_error")
    keys = [k for k in shown if k in metrics]
    if not keys:
        return f"done, no evaluation (eval.evaluator=none or no metric); outputs in {output_dir}"
    return "final: " + ", ".join(f"{k}={_metric(metrics[k])}" for k in keys) + f"; outputs in {output_dir}"
