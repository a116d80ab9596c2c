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
  COCO + PNG outputs;
- ``teacher_eval``: ``distill teacher evaluate`` (:func:`distill.teacher.evaluate.evaluate_teacher`,
  a tiny random teacher) on N 640x480 images with 4 boxes each and semantic PNGs, so the crop
  (1x, 1.5x), dense RoIAlign and MaskCLIP rows all run (a split held as float32 is 3.7 MB an
  image); N is at least two evaluation batches of 16 images: the first batch alone peaks some
  20-40 MB lower than any longer run (glibc reuses the heap from the second batch on), which
  would read as growth between N = 16 and 4N;
- ``cam``: ``distill cam`` (:func:`distill.cam.run.run_cam`, CLIP-ES on a tiny random teacher)
  on N 640x480 images with two image labels each, masks + seeds written, 2 panels. A run holding
  its decoded images would add 0.9 MB an image: visible in the work columns rather than in the
  ratio. Its work varies by some +-30 MB from run length to run length without a trend (16 to 512
  images: 127, 144, 186, 162 MB), glibc's heap fragmentation; with ``MALLOC_MMAP_THRESHOLD_=131072``
  it is flat (134 MB at 16 images, 141 MB at 256).

One more job measures size, not count:
- ``label_big``: ``distill label`` (teacher source, default settings: components, ``label.max_side``,
  COCO + PNG; the tiny random teacher) on ONE generated photo-like JPEG (smooth colour gradients,
  noise and a few saturated shapes, so colour components are many) of 1, 12 and 64 megapixels;
  prints the peak per size. Its N is the megapixels of one size (``label_big=12``). The image is
  written by the parent in strips of rows (the 64 MP array is 192 MB). Target: < 1.5 GB at 64 MP
  (full-size candidate masks needed > 5.7 GB at 12 MP and were killed at 21 GB at 64 MP).

    python bench/memory.py                       # every job at the N below: the table and the ratios
    python bench/memory.py teacher_eval cam      # only these jobs
    python bench/memory.py teacher_eval=32       # a job at another N
    python bench/memory.py label_big             # one image of 1, 12 and 64 MP
    python bench/memory.py label_big=12 --limit-mb 6000   # one size, the job's address space capped
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
SIZES = {"eval_semseg": 60, "eval_det": 500, "cache": 64, "label": 16, "teacher_eval": 32, "cam": 32}
BIG_MP = (1, 12, 64)  # label_big: megapixels of the one image
EVAL_COLORS = {1: ("red square", (220, 30, 30)), 2: ("blue square", (30, 70, 225)), 3: ("green square", (30, 170, 40))}


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
    elif job in ("teacher_eval", "cam"):
        _shapes_split(n, d, rng)
    elif job == "label_big":
        (d / "imgs").mkdir()
        photo_jpeg(d / "imgs" / "photo.jpg", n)
        _teacher_dir(d / "teacher")
    else:
        raise ValueError(job)


def photo_jpeg(path: Path, megapixels: float, seed: int = 0, strip: int = 256) -> tuple[int, int]:
    """A 4:3 photo-like JPEG of ``megapixels``: slowly varying colour gradients (hue and saturation
    drift across the frame, so much of it is near the labeler's saturation threshold), pixel noise
    and a few saturated discs and rectangles. Rows are made in strips (float32 work per strip
    only); returns (width, height)."""
    from PIL import Image

    W = max(8, int(round((megapixels * 1e6 * 4 / 3) ** 0.5)))
    H = max(6, int(round(W * 3 / 4)))
    rng = np.random.default_rng(seed)
    shapes = []
    cols = [(220, 30, 30), (30, 70, 225), (30, 170, 40), (230, 200, 20), (200, 40, 200), (20, 200, 210)]
    for k in range(12):
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        r = rng.uniform(0.02, 0.12) * min(W, H)
        shapes.append((k % 2, cx, cy, r, cols[k % len(cols)]))
    img = np.empty((H, W, 3), np.uint8)
    x = np.arange(W, dtype=np.float32)[None, :] / W
    for y0 in range(0, H, strip):
        y1 = min(H, y0 + strip)
        y = np.arange(y0, y1, dtype=np.float32)[:, None] / H
        f = np.empty((y1 - y0, W, 3), np.float32)
        f[..., 0] = 128 + 90 * np.sin(6.3 * x + 2.0 * y)
        f[..., 1] = 120 + 80 * np.sin(4.1 * y - 3.0 * x + 1.0)
        f[..., 2] = 110 + 70 * np.sin(5.2 * (x + y) + 2.0)
        for kind, cx, cy, r, col in shapes:
            yy = np.arange(y0, y1, dtype=np.float32)[:, None]
            xx = np.arange(W, dtype=np.float32)[None, :]
            inside = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if kind == 0 else ((np.abs(xx - cx) < r) & (np.abs(yy - cy) < 0.6 * r))
            f[inside] = col
        f += np.random.default_rng(seed * 100003 + y0).normal(0, 10, f.shape).astype(np.float32)
        img[y0:y1] = np.clip(f, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return W, H


def _shapes_split(n: int, d: Path, rng: np.random.Generator, size: tuple[int, int] = (480, 640)) -> None:
    """N 640x480 PNGs under ``images/val`` with 4 coloured squares each (clipped at the border
    sometimes), their COCO json (category 3 novel), semantic PNGs under ``semantic/val`` and
    image-level labels (the first two categories present)."""
    from PIL import Image

    H, W = size
    (d / "images" / "val").mkdir(parents=True)
    (d / "semantic" / "val").mkdir(parents=True)
    images, anns, labels = [], [], []
    for i in range(1, n + 1):
        img = np.empty((H, W, 3), np.uint8)
        img[:] = rng.integers(90, 150, size=3, dtype=np.uint8)
        img[::7] = 60  # a striped background
        sem = np.zeros((H, W), np.uint8)
        present = []
        for _ in range(4):
            c = int(rng.integers(1, 4))
            s = int(rng.integers(24, 200))
            y, x = (int(v) for v in rng.integers(-s // 4, [H - s // 2, W - s // 2]))
            y0, x0, y1, x1 = max(0, y), max(0, x), min(H, y + s), min(W, x + s)
            img[y0:y1, x0:x1] = EVAL_COLORS[c][1]
            sem[y0:y1, x0:x1] = c
            sem[y0:y1, x0 : x0 + 2] = 255  # an ignored border column
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
            present.append(c)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(d / "images" / "val" / name, compress_level=1)
        Image.fromarray(sem).save(d / "semantic" / "val" / name, compress_level=1)
        images.append({"id": i, "file_name": name, "width": W, "height": H})
        labels.append({"image_id": i, "file_name": f"val/{name}", "category_ids": sorted(set(present))[:2]})
    cats = [{"id": c, "name": name, "split": "novel" if c == 3 else "base"} for c, (name, _) in EVAL_COLORS.items()]
    (d / "instances_val.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (d / "image_labels_val.json").write_text(json.dumps(labels))
    (d / "vocab.json").write_text(json.dumps(cats))


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
    elif job == "label_big":
        from distill.config import load_config
        from distill.labels.pseudo import label

        cfg = load_config(None, [
            f"label.images={d / 'imgs'}", f"label.out={d / 'out'}", "label.vocab=red disc, blue square, green disc, yellow square",
            "label.source=teacher", f"teacher.model=local-dir:{d / 'teacher'}", "teacher.pretrained=", "teacher.templates=",
            f"teacher.device={device}", "teacher.dense_image_size=32",
        ])
        base = _status_kb("VmRSS")
        s = label(cfg)
        im = json.loads((d / "out" / "labels.json").read_text())["images"][0]
        check = [s["labels/annotations"], s["labels/failures"], im["width"], im["height"]]
    elif job == "teacher_eval":
        from distill.config import load_config
        from distill.teacher import build_random_teacher
        from distill.teacher.evaluate import evaluate_teacher

        cfg = load_config(None, [
            f"work_dir={d / 'run'}", f"data.image_root={d / 'images' / 'val'}", f"data.val_json={d / 'instances_val.json'}",
            f"data.semantic_root={d / 'semantic'}", "teacher.templates=", "teacher.eval_dense_sizes=[64]",
        ])
        teacher = build_random_teacher(seed=0, dense_image_size=64, device=device)
        base = _status_kb("VmRSS")
        m = evaluate_teacher(cfg, teacher=teacher, out_dir=d / "out")
        check = [m["zeroshot/num_objects"], m["zeroshot/top1_ens"], m["zeroshot/top1_dense"], m["maskclip/miou_all"]]
    elif job == "cam":
        from distill.config import load_config
        from distill.cam.run import run_cam
        from distill.teacher import build_random_teacher

        cfg = load_config(None, [
            f"work_dir={d / 'run'}", f"data.image_root={d / 'images'}", f"data.image_labels={d / 'image_labels_{split}.json'}",
            f"data.vocab={d / 'vocab.json'}", "teacher.templates=", "cam.image_size=64", "cam.num_panels=2", "cam.batch_size=16",
        ])
        teacher = build_random_teacher(seed=0, dense_image_size=64, device=device)
        base = _status_kb("VmRSS")
        s = run_cam(cfg, "val", teacher=teacher)
        check = [s["processed"], s["ignored_fraction"]]
    else:
        raise ValueError(job)
    return {"job": job, "n": n, "peak_kb": _status_kb("VmHWM"), "baseline_kb": base, "check": check}


def measure(job: str, n: int, device: str = "cpu", root: Path | None = None, limit_mb: int = 0) -> dict:
    """Prepare inputs for ``n`` images (``label_big``: megapixels), then measure ``job`` in a fresh
    subprocess; ``limit_mb`` > 0 caps its address space (RLIMIT_AS), so a job that would eat the
    machine fails instead (a RuntimeError naming the limit)."""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        d = Path(tmp) / f"{job}_{n}"
        _prepare(job, n, d)
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

        def cap() -> None:
            if limit_mb > 0:
                import resource

                resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", job, "--n", str(n), "--dir", str(d), "--device", device],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=900, preexec_fn=cap if limit_mb > 0 else None)
        if r.returncode != 0:
            lim = f" (address space capped at {limit_mb} MB)" if limit_mb > 0 else ""
            raise RuntimeError(f"memory job {job} n={n} failed{lim}:\n{r.stderr[-3000:]}")
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


def big(megapixels=BIG_MP, device: str = "cpu", limit_mb: int = 0) -> dict:
    """``label_big`` at each size: {megapixels: measure's result (``peak_mb`` added), or
    ``{"failed": reason}`` when the job fails (e.g. under ``limit_mb``)}; prints a table."""
    out: dict = {}
    print(f"{'label_big':12s} {'MP':>5s} {'size':>11s} {'peak MB':>9s} {'work MB':>9s} {'seconds':>8s}", flush=True)
    for mp in megapixels:
        try:
            r = measure("label_big", int(mp), device, limit_mb=limit_mb)
        except RuntimeError as e:
            last = str(e).strip().splitlines()[-1][:120]
            out[mp] = {"failed": last}
            print(f"{'label_big':12s} {mp:5d} {'':>11s} {'failed':>9s}  {last}", flush=True)
            continue
        r["peak_mb"] = round(r["peak_kb"] / 1024, 1)
        r["work_mb"] = round((r["peak_kb"] - r["baseline_kb"]) / 1024, 1)
        out[mp] = r
        size = f"{r['check'][2]}x{r['check'][3]}"
        print(f"{'label_big':12s} {mp:5d} {size:>11s} {r['peak_mb']:9.1f} {r['work_mb']:9.1f} {r['seconds']:8.1f}", flush=True)
    return out


def _select(jobs: list[str]) -> dict[str, int]:
    """``["cam", "teacher_eval=32"]`` -> ``{"cam": 32, "teacher_eval": 32}`` (N from SIZES unless given)."""
    out = {}
    for item in jobs:
        name, _, n = item.partition("=")
        if name == "label_big":
            if n and not n.isdigit():
                raise SystemExit(f"bench/memory.py: {item!r}: expected label_big=MEGAPIXELS")
            out.setdefault(name, [])
            out[name] += [int(n)] if n else list(BIG_MP)
            continue
        if name not in SIZES:
            raise SystemExit(f"bench/memory.py: unknown job {name!r}; jobs: {', '.join(SIZES)}, label_big")
        if n and not n.isdigit():
            raise SystemExit(f"bench/memory.py: {item!r}: expected JOB=N with N a positive integer")
        out[name] = int(n) if n else SIZES[name]
    return out


def main(device: str = "cpu", sizes: dict[str, int] | None = None, jobs: list[str] | None = None, limit_mb: int = 0) -> dict:
    """Measure ``jobs`` (``JOB`` or ``JOB=N``; default all) or the ``sizes`` given, print the table."""
    sizes = _select(jobs) if jobs else dict(SIZES, **(sizes or {}), label_big=list(BIG_MP))
    out: dict = {}
    mps = sizes.pop("label_big", None)
    if mps:
        out["label_big"] = big(mps, device, limit_mb)
    if not sizes:
        return out
    print(f"{'job':12s} {'N':>5s} {'4N':>5s} {'peak N MB':>10s} {'peak 4N MB':>11s} {'ratio':>6s} {'work N MB':>10s} {'work 4N MB':>11s}")
    for job, n in sizes.items():
        r = compare(job, n, device)
        out[job] = r
        print(f"{job:12s} {r['n']:5d} {r['n_big']:5d} {r['peak_mb']:10.1f} {r['peak_big_mb']:11.1f} {r['ratio']:6.3f} {r['growth_mb']:10.1f} {r['growth_big_mb']:11.1f}", flush=True)
    ratios = {k: v for k, v in out.items() if k != "label_big"}
    worst = max(ratios.values(), key=lambda r: r["ratio"])
    out["max_ratio"] = worst["ratio"]
    print(f"peak RSS ratio 4N/N: max {out['max_ratio']:.3f} (target <= 1.2): "
          + ", ".join(f"{k} {v['ratio']:.3f}" for k, v in ratios.items()))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit-mb", type=int, default=0, help="cap each measured job's address space (MB; 0 = none)")
    ap.add_argument("jobs", nargs="*", metavar="JOB[=N]", help=f"jobs to measure (default: all of {', '.join(SIZES)}, label_big)")
    args = ap.parse_args()
    if args.run:
        print(json.dumps(_run(args.run, args.n, Path(args.dir), args.device)))
    else:
        main(args.device, jobs=args.jobs or None, limit_mb=args.limit_mb)
