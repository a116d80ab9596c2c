"""How long a run is expected to take on this machine.

The stage times come from a measured run of the same config (``stage_times.json`` next to this
file, written by ``distill report WORK_DIR --stage-times PATH`` from the run's manifests, as
``make demo`` does). They are scaled by this machine's fp32 matmul speed against the measuring
machine's, then, as stages finish, by how the finished stages compared with their estimate.

>>> est = Estimate.for_run(cfg, to_run)
>>> est.total()          # seconds, or None without a measured run of this config
>>> est.remaining({"world": 31.0, "teacher": 900.0})
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from distill.files import read_json, sha256_json, write_json

STAGE_TIMES = Path(__file__).with_name("stage_times.json")


def machine_gflops(seconds: float = 0.3, n: int = 512) -> float:
    """fp32 GFLOP/s of an ``n`` x ``n`` matmul on torch's current threads, best of the repeats
    that fit in ``seconds`` (the best, not the mean: a busy machine slows some repeats)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_end = time.perf_counter() + 0.1
    while time.perf_counter() < t_end:  # warm-up: the first calls allocate, pick kernels, wake cores
        a @ b
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best / 1e9


def config_key(cfg) -> str:
    """What the stage times depend on: the whole config but its work dir (paths under it are
    compared as ``{work_dir}/...``) and world seed (a run on another seed takes as long)."""
    from distill.config.load import to_dict

    work = str(cfg.work_dir)

    def unexpand(v):
        if isinstance(v, dict):
            return {k: unexpand(x) for k, x in v.items()}
        if isinstance(v, list):
            return [unexpand(x) for x in v]
        return v.replace(work, "{work_dir}") if isinstance(v, str) and work else v

    d = to_dict(cfg)
    d.pop("work_dir", None)
    d.pop("pipeline", None)
    d.get("world", {}).pop("seed", None)
    return sha256_json(unexpand(d))[:16]


def read_runs(path: str | Path) -> dict:
    """The measured runs of a stage-times table (``{}`` when ``path`` does not exist); a file that
    is not such a table is a :class:`~distill.errors.DistillError` naming it."""
    from distill.errors import DistillError

    path = Path(path)
    if not path.exists():
        return {}
    table = read_json(path, "stage times")
    runs = table.get("runs") if isinstance(table, dict) else None
    if not isinstance(runs, dict):
        raise DistillError(f"{path}: not a stage-times table (expected a JSON object with \"runs\", as `distill report --stage-times` writes)")
    return runs


def record(cfg, timings: dict[str, float], path: str | Path | None = None, gflops: float | None = None) -> Path:
    """Add (or replace) this config's measured stage times in ``path`` (default
    :data:`STAGE_TIMES`), with the machine's speed."""
    path = Path(path or STAGE_TIMES)
    runs = read_runs(path)
    runs[config_key(cfg)] = {
        "work_dir": str(cfg.work_dir),
        "stages": {k: round(float(v), 1) for k, v in timings.items()},
        "machine": {"fp32_gflops": round(gflops or machine_gflops(), 1), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
    }
    write_json(path, {"about": "wall seconds per stage of measured runs, keyed by distill.pipeline.eta.config_key; written by `distill report --stage-times`", "runs": runs})
    return path


class Estimate:
    """Expected seconds per stage to run (``expected``, empty without a measured run)."""

    def __init__(self, expected: dict[str, float], source: str = ""):
        self.expected = expected
        self.source = source

    @classmethod
    def for_run(cls, cfg, to_run: list[str], path: str | Path | None = None, gflops: float | None = None) -> "Estimate":
        path = Path(path or STAGE_TIMES)
        try:
            run = read_runs(path).get(config_key(cfg))
        except Exception:  # an unreadable table means no estimate, never a failed run
            run = None
        if not run or any(s not in run.get("stages", {}) for s in to_run):
            return cls({})
        ref = float(run.get("machine", {}).get("fp32_gflops") or 0)
        here = gflops or machine_gflops()
        scale = ref / here if ref > 0 and here > 0 else 1.0
        src = f"measured on a {ref:.0f} GFLOP/s machine, this one {here:.0f}"
        return cls({s: float(run["stages"][s]) * scale for s in to_run}, src)

    def total(self) -> float | None:
        return sum(self.expected.values()) if self.expected else None

    def remaining(self, done: dict[str, float]) -> float | None:
        """Seconds left after the stages in ``done`` (name -> actual seconds), the rest scaled by
        how the finished stages compared with their estimate."""
        if not self.expected:
            return None
        exp_done = sum(self.expected[s] for s in done if s in self.expected)
        act_done = sum(t for s, t in done.items() if s in self.expected)
        ratio = act_done / exp_done if exp_done > 0 and act_done > 0 else 1.0
        return ratio * sum(t for s, t in self.expected.items() if s not in done)


def format_seconds(s: float) -> str:
    """``42 s``, ``7 min``, ``1 h 05 min``."""
    if s < 60:
        return f"{s:.0f} s"
    m = round(s / 60)
    return f"{m} min" if m < 60 else f"{m // 60} h {m % 60:02d} min"
