"""glibc allocator settings for processes resdet owns (``tools/train.py``, ``tools/test.py``).

glibc's ``malloc`` serves large blocks with fresh ``mmap`` pages and hands them back to the kernel on
``free``. A detector allocates and frees the same large activations every iteration, so every iteration
page-faults its whole working set in again (README, "Measured"). :func:`tune_malloc` makes glibc keep
freed memory in the heap for reuse instead: no ``mmap`` for large blocks (``M_MMAP_MAX=0``), no trimming
of the heap top below 2 GiB (``M_TRIM_THRESHOLD``), and heap growth in 64 MiB steps (``M_TOP_PAD``). The
process then holds on to its peak memory until it exits, which a training or evaluation process reaches
again at the next iteration anyway. ``RESDET_TUNE_MALLOC=0`` turns it off.

It is never applied on import: the tools call it as their first action when run as scripts (not when
their ``main()`` is imported), because it changes the allocator of the whole process.
"""
from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MALLOPT_SETTINGS", "tune_malloc"]

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4

MALLOPT_SETTINGS: dict[str, int] = {
    "M_MMAP_MAX": 0,
    "M_TRIM_THRESHOLD": 2**31 - 1,
    "M_TOP_PAD": 64 * 2**20,
}
"""What :func:`tune_malloc` sets (glibc's environment variables ``MALLOC_MMAP_MAX_`` etc. do the same)."""

_PARAMS = {"M_MMAP_MAX": _M_MMAP_MAX, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD, "M_TOP_PAD": _M_TOP_PAD}


def tune_malloc(environ: dict[str, str] | None = None) -> bool:
    """Applies :data:`MALLOPT_SETTINGS` to this process's glibc allocator; True when applied.

    Does nothing (False) on other C libraries, when ``RESDET_TUNE_MALLOC=0``, or when any ``MALLOC_*``
    variable is set in the environment (the user's own allocator settings win).
    """
    env = os.environ if environ is None else environ
    if env.get("RESDET_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(key.startswith("MALLOC_") for key in env):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(_PARAMS[name], value) == 1 for name, value in MALLOPT_SETTINGS.items())
