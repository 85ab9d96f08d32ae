"""resdet.engine.malloc: the glibc settings tools/train.py and tools/test.py apply to their own process."""
import os
import platform
import subprocess
import sys

import pytest

from resdet.engine.malloc import tune_malloc

from helpers import load_tool_module

_CHILD = """
import resource, torch
from resdet.engine.malloc import tune_malloc

def faults_of_a_second_64mib_block():
    torch.empty(2**24).fill_(1.0)  # 64 MiB, freed at once
    fewest = None
    for _ in range(3):  # the same size again; the fewest of three (one CI run saw a single reuse fault)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(2**24).fill_(1.0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        fewest = faults if fewest is None else min(fewest, faults)
    return fewest

default = faults_of_a_second_64mib_block()
print(default, tune_malloc(), faults_of_a_second_64mib_block())
"""


def test_user_settings_and_opt_out_win():
    assert not tune_malloc({"RESDET_TUNE_MALLOC": "0"})
    assert not tune_malloc({"MALLOC_ARENA_MAX": "2"})


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RESDET_TUNE"))}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    default, applied, tuned = out.stdout.split()
    assert applied == "True"
    # glibc's default: a fresh mapping, faulted in page by page (16k pages of 4 KiB, fewer where the kernel backs it
    # with huge pages); tuned: the freed block is reused from the heap, almost without faults.
    assert int(default) >= 10 * max(int(tuned), 1), (default, tuned)


def test_no_glibc_or_no_mallopt_is_a_quiet_no_op(monkeypatch):
    import ctypes

    import resdet.engine.malloc as malloc

    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert not tune_malloc({})
    monkeypatch.undo()

    def no_libc(name):
        raise OSError("no C library handle")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert not tune_malloc({})


@pytest.mark.parametrize("tool", ["train", "test"])
def test_tools_tune_only_their_own_process(tool, monkeypatch):
    # Imported (a notebook, a test, another program): main() leaves the allocator alone; as a script it tunes.
    import resdet.engine.cli as cli
    import resdet.engine.malloc as malloc

    module = load_tool_module(tool)
    calls = []
    monkeypatch.setattr(malloc, "tune_malloc", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "run_guarded", lambda fn, debug=False: 0)
    argv = ["--config", "x.yaml", "--checkpoint", "x.pth"] if tool == "test" else ["--config", "x.yaml"]
    assert module.main(argv) == 0 and calls == []
    assert module.main(argv, own_process=True) == 0 and calls == [1]
