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


@pytest.fixture(autouse=True)
def _reset_resdet_logger():
    """A Trainer's ``setup_logger`` detaches the ``resdet`` logger from the root (no double printing in a
    real run) and points it at that test's output folder; undo it so later tests' ``caplog`` sees records."""
    yield
    import logging

    logger = logging.getLogger("resdet")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
