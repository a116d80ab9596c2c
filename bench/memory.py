"""Peak memory (VmHWM) of evaluation, the embedding cache and labeling at N and 4N images.

Each measurement runs in a FRESH subprocess (``python bench/memory.py --run JOB --n N --dir D``),
so the peak resident set size read from ``/proc/self/status`` (VmHWM) is that job's alone; the
inputs are generated beforehand by the parent. A job that streams keeps its peak flat as the
images grow: the target is ``peak(4N) / peak(N) <= 1.2``. Besides the ratio, the growth above
the process's own baseline (after imports and setup, before the work) is printed in MB, which is
what would show a leak that the large fixed cost of importing torch hides in the ratio.

Jobs (sizes chosen so that a job holding everything in memory would exceed the target):
- ``eval_semseg``: :func:`distill.eval.segmentation.evaluate_semseg_dirs` over N 256x256 PNG pairs;
- ``eval_det``: :func:`distill.eval.detection.evaluate_detection` (default backend: the streaming
  box evaluator) on N images with 10 boxes and 30 detections each (faster-coco-eval and
  pycocotools keep every box as a Python object: about 80 KB more per image);
- ``cache``: :class:`distill.teacher.cache.EmbeddingCache` write then stream-read of N images x
  300 regions x 256 float32 (300 KB an image, shards of 32 images);
- ``label``: ``distill label`` (teacher source, a tiny random teacher) on N 128x128 images, with
  COCO + PNG outputs.

    python bench/memory.py                 # N as below, prints the table and the ratios
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SIZES = {"eval_semseg": 60, "eval_det": 500, "cache": 64, "label": 16}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


# ------------------------------------------------------------------------------------------- inputs
def _prepare(job: str, n: int, d: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    if job == "eval_semseg":
        (d / "gt").mkdir()
        (d / "pred").mkdir()
        for i in range(n):
            gt = rng.integers(0, 6, size=(256, 256), dtype=np.uint8)
            pred = np.where(rng.random((256, 256)) < 0.7, gt, rng.integers(0, 6, size=(256, 256))).astype(np.uint8)
            Image.fromarray(gt).save(d / "gt" / f"{i:06d}.png")
            Image.fromarray(pred).save(d / "pred" / f"{i:06d}.png")
        (d / "vocab.json").write_text(json.dumps([{"id": c, "name": f"class {c}", "split": "novel" if c == 5 else "base"} for c in range(1, 6)]))
    elif job == "eval_det":
        images, anns, dets = [], [], []
        for i in range(1, n + 1):
            images.append({"id": i, "file_name": f"{i}.png", "width": 256, "height": 256})
            for _ in range(10):
                x, y, w, h = (float(v) for v in rng.uniform([0, 0, 8, 8], [200, 200, 56, 56]))
                c = int(rng.integers(1, 6))
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
                dets.append({"image_id": i, "category_id": c, "bbox": [x + rng.normal(0, 2), y + rng.normal(0, 2), w, h], "score": float(rng.random())})
            for _ in range(20):
                x, y, w, h = (float(v) for v in rng.uniform([0, 0, 8, 8], [200, 200, 56, 56]))
                dets.append({"image_id": i, "category_id": int(rng.integers(1, 6)), "bbox": [x, y, w, h], "score": float(rng.random())})
        cats = [{"id": c, "name": f"class {c}", "split": "novel" if c == 5 else "base"} for c in range(1, 6)]
        (d / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        (d / "dets.json").write_text(json.dumps(dets))
    elif job == "cache":
        pass  # the job makes its own tensors (seeded) and writes the cache it measures
    elif job == "label":
        (d / "imgs").mkdir()
        cols = [(220, 30, 30), (30, 70, 225), (30, 170, 40)]
        for i in range(n):
            img = rng.integers(90, 150, size=(128, 128, 3), dtype=np.uint8)
            for _ in range(3):
                y, x = rng.integers(0, 100, 2)
                s = int(rng.integers(10, 28))
                img[y : y + s, x : x + s] = cols[int(rng.integers(3))]
            Image.fromarray(img).save(d / "imgs" / f"{i:05d}.png")
        _teacher_dir(d / "teacher")
    else:
        raise ValueError(job)


def _teacher_dir(folder: Path) -> None:
    """A seeded random open_clip ViT as a ``local-dir:`` folder (config json + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))


# ------------------------------------------------------------------------------------------- jobs
def _run(job: str, n: int, d: Path, device: str) -> dict:
    """Runs in the fresh subprocess: setup, baseline, the work, then VmHWM."""
    import torch

    torch.set_num_threads(1)
    if job == "eval_semseg":
        from distill.eval.segmentation import evaluate_semseg_dirs

        base = _status_kb("VmRSS")
        m = evaluate_semseg_dirs(d / "gt", d / "pred", vocab=str(d / "vocab.json"))
        check = m["miou/all"]
    elif job == "eval_det":
        from distill.eval.detection import evaluate_detection

        base = _status_kb("VmRSS")
        m = evaluate_detection(d / "gt.json", d / "dets.json")
        check = m["bbox/AP50"]
    elif job == "cache":
        from distill.teacher.cache import EmbeddingCache

        base = _status_kb("VmRSS")
        c = EmbeddingCache(d / "cache", {"bench": "memory", "n": n}, dtype="fp32", shard_size=32)
        g = torch.Generator().manual_seed(0)
        for i in range(n):
            c.write([i], [torch.randn(300, 256, generator=g)])
        c.close()
        r = EmbeddingCache(d / "cache", {"bench": "memory", "n": n}, dtype="fp32", readonly=True)
        total = 0.0
        for _, t in r:
            total += float(t[0, 0])
        check = total + float(r.get(n - 1).sum())
    elif job == "label":
        from distill.config import load_config
        from distill.labels.pseudo import label

        cfg = load_config(None, [
            f"label.images={d / 'imgs'}", f"label.out={d / 'out'}", "label.vocab=red square, blue square, green square",
            "label.source=teacher", "label.score_thresh=0", "label.format=[coco, png]", "label.shard_size=8", "label.batch_size=4",
            f"teacher.model=local-dir:{d / 'teacher'}", "teacher.pretrained=", "teacher.templates=", f"teacher.device={device}",
            "teacher.dense_image_size=32",
        ])
        base = _status_kb("VmRSS")
        s = label(cfg)
        check = s["labels/annotations"]
    else:
        raise ValueError(job)
    return {"job": job, "n": n, "peak_kb": _status_kb("VmHWM"), "baseline_kb": base, "check": check}


def measure(job: str, n: int, device: str = "cpu", root: Path | None = None) -> dict:
    """Prepare inputs for ``n`` images, then measure ``job`` in a fresh subprocess."""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        d = Path(tmp) / f"{job}_{n}"
        _prepare(job, n, d)
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", job, "--n", str(n), "--dir", str(d), "--device", device],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"memory job {job} n={n} failed:\n{r.stderr[-3000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out


def compare(job: str, n: int, device: str = "cpu", factor: int = 4) -> dict:
    """Peak RSS at n and factor*n images: ratio, and growth above each run's own baseline."""
    a = measure(job, n, device)
    b = measure(job, factor * n, device)
    return {
        "n": n, "n_big": factor * n,
        "peak_mb": round(a["peak_kb"] / 1024, 1), "peak_big_mb": round(b["peak_kb"] / 1024, 1),
        "ratio": round(b["peak_kb"] / a["peak_kb"], 3),
        "growth_mb": round((a["peak_kb"] - a["baseline_kb"]) / 1024, 1),
        "growth_big_mb": round((b["peak_kb"] - b["baseline_kb"]) / 1024, 1),
    }


def main(device: str = "cpu", sizes: dict[str, int] | None = None) -> dict:
    sizes = dict(SIZES, **(sizes or {}))
    out: dict = {}
    print(f"{'job':12s} {'N':>5s} {'4N':>5s} {'peak N MB':>10s} {'peak 4N MB':>11s} {'ratio':>6s} {'work N MB':>10s} {'work 4N MB':>11s}")
    for job, n in sizes.items():
        r = compare(job, n, device)
        out[job] = r
        print(f"{job:12s} {r['n']:5d} {r['n_big']:5d} {r['peak_mb']:10.1f} {r['peak_big_mb']:11.1f} {r['ratio']:6.3f} {r['growth_mb']:10.1f} {r['growth_big_mb']:11.1f}", flush=True)
    worst = max(out.values(), key=lambda r: r["ratio"])
    out["max_ratio"] = worst["ratio"]
    print(f"peak RSS ratio 4N/N: max {out['max_ratio']:.3f} (target <= 1.2): "
          + ", ".join(f"{k} {v['ratio']:.3f}" for k, v in out.items() if isinstance(v, dict)))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.run:
        print(json.dumps(_run(args.run, args.n, Path(args.dir), args.device)))
    else:
        main(args.device)
