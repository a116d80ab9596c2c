"""Shared test setup: offline, seeded, ONE thread, CUDA-only tests skipped without CUDA.

Threads are pinned (not just defaulted): a float reduction split over a machine-dependent number
of threads sums in a machine-dependent order, so a test comparing two runs, or a run against a
reference, would otherwise depend on the machine and its load. ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` are set before torch is imported here, and every subprocess a test starts
inherits them through ``os.environ`` (``tests/reliability/_fixtures.py::env`` sets them too).
"""

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(THREADS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set (or inter-op work already ran) in this process
    pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _pinned_threads():
    """Every test starts with one intra-op thread and the pinned environment, whatever the test
    before it changed (``distill.engine.device.torch_threads`` restores, a crash may not)."""
    torch.set_num_threads(1)
    os.environ.update(THREADS)
    yield
