"""Shared pytest setup: deterministic, CPU-only, small thread pool."""
import os

import pytest
import torch

# CI has 2 cores; honour OMP_NUM_THREADS when the caller set it (e.g. 1 on a loaded machine, where
# spinning worker threads slow small-tensor tests down several times).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
