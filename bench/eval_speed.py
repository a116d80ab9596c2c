"""Evaluation speed: faster-coco-eval vs pycocotools vs the streaming box evaluator
(:mod:`distill.eval.coco_stream`) on the same 5,000-image files, and the streaming
semantic-segmentation evaluator's peak memory at N and 4N images.

The three COCO backends run in this process on the same GT + results (random boxes, ~5 GT and
~20 detections per image, 20 categories with a base/novel split); their metrics must be identical.
The semseg memory is measured in fresh subprocesses (peak RSS is a per-process high-water mark).

Prints a table and ends with ``ratio faster/pycocotools speedup: X.XXx``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_IMAGES = 5000
N_CATS = 20
SEMSEG_N = 50  # images of SEMSEG_HW at N; 4N for the second measurement
SEMSEG_HW = (256, 256)


def make_files(root: Path, n_images: int = N_IMAGES, seed: int = 0) -> tuple[Path, Path]:
    """GT (about 5 boxes per image) and results (jittered GT + false positives, about 20 per image)."""
    rng = np.random.default_rng(seed)
    W, H = 640, 480
    cats = [{"id": k + 1, "name": f"class {k + 1}", "split": "novel" if k % 4 == 3 else "base"} for k in range(N_CATS)]
    images, anns, res = [], [], []
    for i in range(n_images):
        images.append({"id": i + 1, "file_name": f"{i + 1:06d}.png", "height": H, "width": W})
        n_gt = int(rng.integers(3, 8))
        wh = rng.uniform(10, 200, (n_gt, 2))
        xy = rng.uniform(0, 1, (n_gt, 2)) * (np.array([W, H]) - wh)
        cls = rng.integers(1, N_CATS + 1, n_gt)
        for b in range(n_gt):
            bb = [float(xy[b, 0]), float(xy[b, 1]), float(wh[b, 0]), float(wh[b, 1])]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cls[b]), "bbox": bb,
                         "area": bb[2] * bb[3], "iscrowd": 0})
            if rng.random() < 0.9:
                j = rng.normal(0, 0.08, 4) * np.array([wh[b, 0], wh[b, 1], wh[b, 0], wh[b, 1]])
                c = int(cls[b]) if rng.random() < 0.85 else int(rng.integers(1, N_CATS + 1))
                res.append({"image_id": i + 1, "category_id": c, "score": float(rng.uniform(0.2, 1.0)),
                            "bbox": [bb[0] + j[0], bb[1] + j[1], max(1.0, bb[2] + j[2]), max(1.0, bb[3] + j[3])]})
        n_fp = 20 - n_gt
        wh = rng.uniform(10, 200, (n_fp, 2))
        xy = rng.uniform(0, 1, (n_fp, 2)) * (np.array([W, H]) - wh)
        for b in range(n_fp):
            res.append({"image_id": i + 1, "category_id": int(rng.integers(1, N_CATS + 1)), "score": float(rng.uniform(0.0, 0.9)),
                        "bbox": [float(xy[b, 0]), float(xy[b, 1]), float(wh[b, 0]), float(wh[b, 1])]})
    gt_path, res_path = root / "gt.json", root / "results.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    res_path.write_text(json.dumps(res))
    return gt_path, res_path


def _peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec,
    so a child started by a big parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _semseg_rss(n: int) -> dict:
    """In a fresh process: stream n random images through SemSegEvaluator; peak RSS in MiB."""
    import torch

    from distill.eval.segmentation import SemSegEvaluator

    ev = SemSegEvaluator(N_CATS + 1, base=list(range(16)))
    g = torch.Generator().manual_seed(0)
    pairs = []  # 8 distinct images, cycled: the loop measures the evaluator, not the generator
    for _ in range(8):
        gt = torch.randint(0, N_CATS + 1, SEMSEG_HW, generator=g, dtype=torch.uint8)
        gt[:8] = 255
        pred = torch.where(torch.rand(SEMSEG_HW, generator=g) < 0.7, gt, torch.randint(0, N_CATS + 1, SEMSEG_HW, generator=g, dtype=torch.uint8))
        pairs.append((pred, gt))
    ev.process(*pairs[0])  # warm up: one image's temporaries are part of the baseline
    ev.reset()
    base = _peak_rss_mib()
    t0 = time.perf_counter()
    for i in range(n):
        ev.process(*pairs[i % len(pairs)])
    dt = time.perf_counter() - t0
    ev.evaluate()
    peak = _peak_rss_mib()
    return {"peak_mib": peak, "base_mib": base, "images_per_s": n / dt}


def semseg_memory(n: int = SEMSEG_N) -> dict:
    out = {}
    for k in (n, 4 * n):
        p = subprocess.run([sys.executable, __file__, "--semseg-rss", str(k)], capture_output=True, text=True, check=True)
        out[k] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def main(device: str = "cpu") -> dict:
    from distill.eval.detection import evaluate_detection
    from distill.eval.gt import load_gt
    from distill.eval.precision import metrics_from_precision, run_coco, run_stream
    from distill.eval.results import load_results

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gt_path, res_path = make_files(Path(tmp))
        t_make = time.perf_counter() - t0
        gt, _ = load_gt(gt_path)
        res, _ = load_results(res_path, gt)
        cats = sorted(gt["categories"], key=lambda c: c["id"])
        names, split = [c["name"] for c in cats], [c["split"] for c in cats]
        times, metrics = {}, {}
        for backend in ("faster", "pycocotools", "stream"):
            dets = [dict(r) for r in res]  # the loaders modify the dicts they get
            t0 = time.perf_counter()
            if backend == "stream":
                prec, thr = run_stream(gt, dets, 100)
            else:
                prec, thr = run_coco(gt, dets, "bbox", 100, backend)
            times[backend] = time.perf_counter() - t0
            metrics[backend] = metrics_from_precision(prec, thr, names, split, "bbox")
        t0 = time.perf_counter()
        full = evaluate_detection(gt_path, res_path)  # end to end: read, check, evaluate (auto = stream)
        t_full = time.perf_counter() - t0
    diff = max(abs(metrics["faster"][k] - metrics["pycocotools"][k]) for k in metrics["faster"])
    assert metrics["faster"].keys() == metrics["pycocotools"].keys() == metrics["stream"].keys()
    assert diff <= 1e-9, f"faster-coco-eval and pycocotools disagree by {diff}"
    diff_stream = max(abs(metrics["stream"][k] - metrics[b][k]) for k in metrics["stream"] for b in ("faster", "pycocotools"))
    assert diff_stream <= 1e-9, f"the streaming evaluator and the COCO backends disagree by {diff_stream}"
    assert max(abs(full[k] - metrics["stream"][k]) for k in full) <= 1e-12
    ratio = times["pycocotools"] / times["faster"]

    mem = semseg_memory()
    (n1, m1), (n4, m4) = sorted(mem.items())
    rss_ratio = m4["peak_mib"] / m1["peak_mib"]
    growth = (m4["peak_mib"] - m4["base_mib"]) - (m1["peak_mib"] - m1["base_mib"])

    m = metrics["faster"]
    print(f"COCO bbox eval: {N_IMAGES} images, {len(gt['annotations'])} GT, {len(res)} detections, {N_CATS} categories (files made in {t_make:.1f} s)")
    print("| backend | seconds | AP | AP50 | AP_base | AP_novel |")
    print("|---|---|---|---|---|---|")
    for b in ("faster", "pycocotools", "stream"):
        mb = metrics[b]
        print(f"| {b} | {times[b]:.2f} | {mb['bbox/AP']:.4f} | {mb['bbox/AP50']:.4f} | {mb['bbox/AP_base']:.4f} | {mb['bbox/AP_novel']:.4f} |")
    print(f"| evaluate_detection (auto = stream, end to end) | {t_full:.2f} | {full['bbox/AP']:.4f} | {full['bbox/AP50']:.4f} | {full['bbox/AP_base']:.4f} | {full['bbox/AP_novel']:.4f} |")
    print(f"max |faster - pycocotools| over {len(m)} metrics: {diff:.2e}; max |stream - either|: {diff_stream:.2e}")
    print()
    print(f"SemSegEvaluator, {SEMSEG_HW[0]}x{SEMSEG_HW[1]} images, {N_CATS + 1} classes:")
    print("| images | peak RSS MiB | RSS before images MiB | images/s |")
    print("|---|---|---|---|")
    for n, v in ((n1, m1), (n4, m4)):
        print(f"| {n} | {v['peak_mib']:.1f} | {v['base_mib']:.1f} | {v['images_per_s']:.1f} |")
    print(f"semseg peak RSS ratio {n4}/{n1} images: {rss_ratio:.3f} (growth {growth:+.1f} MiB)")
    print(f"stream vs faster-coco-eval: {times['stream'] / times['faster']:.2f}x the time")
    print(f"ratio faster/pycocotools speedup: {ratio:.2f}x")
    return {
        "images": N_IMAGES,
        "detections": len(res),
        "faster_s": round(times["faster"], 3),
        "pycocotools_s": round(times["pycocotools"], 3),
        "stream_s": round(times["stream"], 3),
        "max_stream_diff": diff_stream,
        "end_to_end_s": round(t_full, 3),
        "speedup": round(ratio, 3),
        "max_metric_diff": diff,
        "bbox_AP": m["bbox/AP"],
        "semseg_peak_rss_mib_N": round(m1["peak_mib"], 1),
        "semseg_peak_rss_mib_4N": round(m4["peak_mib"], 1),
        "semseg_rss_ratio_4N_N": round(rss_ratio, 3),
        "semseg_images_per_s": round(m4["images_per_s"], 1),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--semseg-rss":
        print(json.dumps(_semseg_rss(int(sys.argv[2]))))
    else:
        main()
