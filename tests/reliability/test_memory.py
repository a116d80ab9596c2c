"""Peak RSS stays flat as the images grow, measured by bench/memory.py in fresh subprocesses
(VmHWM). A cheap version of ``python bench/memory.py``.

Two checks per job: the whole-process peak ratio (target <= 1.2, as in the issue) and a per-image
slope: the memory the work adds above the process's own baseline (imports and setup), at N and at
k x N images, must grow by less than HALF of what a leak holding every image would add (``leak``
below: the image as the job decodes it, the smallest form a leak could keep). The sizes make that
margin, (k - 1) x N x leak / 2, several times the run-to-run noise of the peak (a few MB:
allocator and arena reuse), so the flat job passes and a leaking one fails whatever the machine;
the fixed cost of importing torch, which would hide a leak in the ratio, cancels in the slope.
"""

from __future__ import annotations

import importlib.util

import pytest

from ._fixtures import REPO

pytestmark = pytest.mark.slow


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "bench" / "memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _assert_flat(r: dict, leak_kb: float, fraction: float = 0.5) -> None:
    """Ratio <= 1.2, and the work's growth per extra image below ``fraction`` of a leaked image."""
    slope_kb = (r["growth_big_mb"] - r["growth_mb"]) * 1024 / (r["n_big"] - r["n"])
    limit = fraction * leak_kb
    print(f"slope {slope_kb:.1f} KB/image (a leak of every image: {leak_kb:.0f}; fails above {limit:.0f}, "
          f"i.e. {limit * (r['n_big'] - r['n']) / 1024:.1f} MB of growth over {r['n_big'] - r['n']} extra images)")
    assert r["ratio"] <= 1.2, r
    assert slope_kb < limit, (slope_kb, r)


# job, N, k, KB a leak keeps per image, the fraction of it allowed per image. Measured slopes
# (2 cores): eval_semseg 13 of 128 KB, cache 54-67 of 300 KB, label 18 of 48 KB from N = 64 on.
# The labeler's 18 KB an image (0.37 of one) is a real, unexplained growth (7 MB over 400 images):
# its bound is 0.75 of an image, which a leak of every image (>= 1.0 + 0.37) still exceeds by
# 0.6 x 48 KB x 384 = 11 MB, and N starts past its first shards, whose warm-up adds ~5 MB at once.
JOBS = [
    ("eval_semseg", 16, 8, 2 * 256 * 256 / 1024, 0.5),  # a ground-truth and a predicted 256 x 256 label PNG (uint8)
    ("cache", 32, 4, 300 * 256 * 4 / 1024, 0.5),  # 300 regions x 256 float32 embeddings
    ("label", 64, 7, 128 * 128 * 3 / 1024, 0.75),  # one 128 x 128 RGB image
]


@pytest.mark.parametrize("job, n, k, leak_kb, fraction", JOBS, ids=[j[0] for j in JOBS])
def test_streaming_jobs_keep_peak_rss_flat(job, n, k, leak_kb, fraction):
    r = _bench().compare(job, n, factor=k)
    print(job, r)
    _assert_flat(r, leak_kb, fraction)


def test_detection_evaluation_peak_rss_flat():
    """COCO box AP from files with the streaming evaluator: the GT as flat arrays, the results
    parsed one by one, about 20 bytes kept per detection (faster-coco-eval and pycocotools hold
    every box as Python objects: about 80 KB more per image of 10 GT + 30 detections). A leak of
    every image's 40 parsed boxes as dicts is >= 16 KB an image (~400 bytes a dict)."""
    r = _bench().compare("eval_det", 100)
    print("eval_det", r)
    _assert_flat(r, 16.0)


def test_teacher_evaluation_peak_rss_flat():
    """``distill teacher evaluate`` streams its split: 32 then 128 images of 640x480 (3.7 MB each
    as float32; the whole-split implementation held them all: +675 MB of work at 128), crops,
    dense RoIAlign and MaskCLIP, two or more batches of 16 at both sizes."""
    r = _bench().compare("teacher_eval", 32)
    print("teacher_eval", r)
    # a leak keeps each image as the teacher reads it, 640 x 480 x 3 float32 (3.5 MB): failing
    # above half of it is 169 MB over the 96 extra images, where the allocator's noise is a few
    # tens of MB at most (measured +6 MB)
    _assert_flat(r, 640 * 480 * 3 * 4 / 1024)


def test_teacher_labeling_memory_bounded_by_working_size():
    """``distill label --model teacher`` on ONE 12 MP photo-like JPEG (4000 x 3000) with default
    settings: candidates, crops and masks at ``label.max_side`` (1024), labels in full-image
    pixels. Peak RSS 1.09 GB (the process's imports are ~0.89 GB of it) where full-size candidate
    masks needed more than 5.7 GB (here: MemoryError under the 6 GB address-space cap, so the old
    path fails this test without eating the machine); about 20 s including the image."""
    r = _bench().measure("label_big", 12, limit_mb=6000)
    print("label_big 12 MP", r)
    annotations, failures, width, height = r["check"]
    assert failures == 0 and annotations > 0 and (width, height) == (4000, 3000), r
    assert r["peak_kb"] / 1024 < 1536, r  # (no wall-time bound: on a loaded machine it would fail by chance)
