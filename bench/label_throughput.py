"""Labeling throughput: images/s at batch 1 vs batched, with 0 vs 2 decoding workers, and peak RSS
at N vs 4N images (must stay flat: shards are flushed, the merge streams), in one run.

The teacher is ``distill-tiny-vit`` with random weights (the same compute as the pretrained one, so
this runs on a fresh clone); images are 128 x 128 PNGs of coloured polygons on muted textures,
made here. Peak RSS is measured in a fresh child process per size (``ru_maxrss``).

    python bench/label_throughput.py --device cpu [--n 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
COLORS = [(220, 30, 30), (245, 130, 20), (235, 215, 30), (30, 170, 40), (30, 70, 225), (150, 40, 190)]


def make_images(folder: Path, n: int, size: int = 128, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img = (rng.uniform(80, 150, (1, 1, 3)) + rng.normal(0, 6, (size, size, 3))).clip(0, 255).astype(np.uint8)
        for _ in range(int(rng.integers(2, 6))):
            c = rng.uniform(15, size - 15, 2)
            r = rng.uniform(6, 24)
            k = int(rng.integers(3, 8))
            ang = rng.uniform(0, 2 * np.pi) + np.arange(k) * 2 * np.pi / k
            pts = np.stack([c[0] + r * np.cos(ang), c[1] + r * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(img, [pts], COLORS[int(rng.integers(len(COLORS)))])
        Image.fromarray(img).save(folder / f"{i:06d}.png")


def _cfg(images: Path, out: Path, device: str, batch: int, workers: int):
    from distill.config import load_config

    return load_config(None, [
        f"label.images={images}", f"label.out={out}", "label.source=teacher", "label.model=teacher",
        "label.vocab=red square,blue circle,green triangle,yellow star,purple hexagon,orange cross",
        f"label.batch_size={batch}", f"label.num_workers={workers}", "label.format=[coco, png]",
        "teacher.pretrained=", "teacher.templates=", f"teacher.device={device}", "label.shard_size=32",
    ])


def run_once(images: Path, out: Path, device: str, batch: int, workers: int) -> float:
    """Seconds to label the folder (teacher built before the clock starts)."""
    from distill.engine.device import get_device
    from distill.labels.pseudo import label
    from distill.vocab import resolve_vocab
    from distill.labels.sources import build_source

    cfg = _cfg(images, out, device, batch, workers)
    src, _ = build_source(cfg, resolve_vocab(cfg.data, cfg.label.vocab, key="label.vocab"), get_device(device))
    t0 = time.perf_counter()
    label(cfg, source=src)
    return time.perf_counter() - t0


def _current_rss_mb() -> float:
    """Resident memory now, after returning freed heap pages to the OS (glibc malloc_trim), so
    the number shows what is still held, not allocator caching."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _child(images: str, out: str, device: str) -> None:
    run_once(Path(images), Path(out), device, 8, 0)
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "end_mb": _current_rss_mb()}))


def _rss(images: Path, out: Path, device: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", str(images), str(out), device],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(device: str = "cpu", n: int = 32) -> dict:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="label_bench_") as tmp:
        tmp = Path(tmp)
        small, big = tmp / "n", tmp / "4n"
        make_images(small, n)
        make_images(big, 4 * n)
        res = {}
        for name, bs, w in (("batch1_w0", 1, 0), ("batch8_w0", 8, 0), ("batch8_w2", 8, 2)):
            sec = run_once(small, tmp / f"out_{name}", device, bs, w)
            res[f"images_per_s/{name}"] = round(n / sec, 2)
        for key, folder in (("N", small), ("4N", big)):
            r = _rss(folder, tmp / f"rss_{key}", device)
            res[f"rss_mb/{key}"] = round(r["peak_mb"], 1)
            res[f"rss_end_mb/{key}"] = round(r["end_mb"], 1)
    res["N"] = n
    res["ratio/batched_vs_batch1"] = round(res["images_per_s/batch8_w0"] / res["images_per_s/batch1_w0"], 2)
    res["ratio/workers2_vs_0"] = round(res["images_per_s/batch8_w2"] / res["images_per_s/batch8_w0"], 2)
    res["ratio/rss_4N_vs_N"] = round(res["rss_mb/4N"] / res["rss_mb/N"], 3)
    res["ratio/rss_end_4N_vs_N"] = round(res["rss_end_mb/4N"] / res["rss_end_mb/N"], 3)
    print(f"labeling {n} images of 128x128 on {device} (teacher distill-tiny-vit, random weights)")
    print(f"  batch 1, 0 workers : {res['images_per_s/batch1_w0']:8.2f} img/s")
    print(f"  batch 8, 0 workers : {res['images_per_s/batch8_w0']:8.2f} img/s   x{res['ratio/batched_vs_batch1']} vs batch 1")
    print(f"  batch 8, 2 workers : {res['images_per_s/batch8_w2']:8.2f} img/s   x{res['ratio/workers2_vs_0']} vs 0 workers")
    print(f"  peak RSS  N={n:4d}  : {res['rss_mb/N']:8.1f} MB")
    print(f"  peak RSS 4N={4 * n:4d}  : {res['rss_mb/4N']:8.1f} MB   x{res['ratio/rss_4N_vs_N']} vs N")
    print(f"  RSS held at the end (after malloc_trim): N {res['rss_end_mb/N']:.1f} MB, 4N {res['rss_end_mb/4N']:.1f} MB   x{res['ratio/rss_end_4N_vs_N']}")
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=32)
    a = ap.parse_args()
    main(a.device, a.n)
