"""The timing loop the side-by-side benchmarks share: one untimed warm-up call each, then the
calls interleaved (a, b, c, a, b, c, ...) ``repeats`` times so machine load hits all alike; the
median wall seconds per call. Imported by the scripts here (``python bench/X.py`` and
``bench/run_all.py`` both put this folder first on the import path)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int, device: str | torch.device = "cpu") -> dict[str, float]:
    """``{name: median seconds of calls[name]()}`` over ``repeats`` interleaved rounds after one
    warm-up call each (CUDA is synchronised before each clock read)."""
    cuda = torch.device(device).type == "cuda"

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for fn in calls.values():
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}
