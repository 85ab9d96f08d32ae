"""Shared pytest setup: deterministic, CPU-only, small thread pool."""
import os

import pytest
import torch

# Tests run on small inputs where thread start-up costs more than it saves, and CI has 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
