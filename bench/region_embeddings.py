"""Teacher region embeddings: ``crop`` (ViLD 3.2, 1x + 1.5x crops) vs ``dense`` (RoIAlign on the
MaskCLIP patch map), measured side by side in one run: images/s, the speed ratio, and the
zero-shot top-1 of each on ground-truth boxes of the shapes world's val split.

Uses the pretrained tiny teacher and the world under ``runs/shapes`` when they exist; otherwise a
random tiny teacher on random images and boxes (speed only: accuracy is reported as -1).

    .venv/bin/python bench/region_embeddings.py [--device cpu] [--images 100]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.config import load_config
from distill.teacher import build_random_teacher, build_teacher
from distill.teacher.regions import region_embeddings

ROOT = Path(__file__).resolve().parents[1]


def _samples(cfg, n: int):
    from distill.teacher.evaluate import _load_split

    return _load_split(cfg, cfg.data.val_json, n)


def _timed(fn, repeats: int = 1) -> tuple[float, object]:
    out = fn()  # warm-up (and the result)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats, out


def main(device: str = "cpu", num_images: int = 100, config: str = "configs/shapes/teacher.yaml") -> dict:
    cfg = load_config(ROOT / config)
    ckpt = Path(cfg.teacher.pretrained)
    if not ckpt.is_absolute():
        ckpt = ROOT / ckpt
    val = Path(cfg.data.val_json)
    real = ckpt.is_file() and (ROOT / val if not val.is_absolute() else val).is_file()
    if real:
        import os

        os.chdir(ROOT)
        teacher = build_teacher(cfg.teacher, device=device)
        vocab, samples = _samples(cfg, num_images)
        from distill.teacher.text import text_embeddings

        text = text_embeddings(teacher, vocab, cfg.teacher.templates)
        images = [s[1] for s in samples]
        boxes = [s[2] for s in samples]
        labels = torch.cat([s[3] for s in samples])
    else:
        teacher = build_random_teacher(device=device)
        g = torch.Generator().manual_seed(0)
        images = [torch.rand(3, 128, 128, generator=g) for _ in range(num_images)]
        xy = torch.rand(num_images, 4, 2, generator=g) * 64
        boxes = [torch.cat([p, p + 16 + torch.rand(4, 2, generator=g) * 48], 1) for p in xy]
        text, labels = None, None
    n_boxes = sum(len(b) for b in boxes)
    bs = 16

    def run(mode: str):
        return torch.cat([torch.cat(region_embeddings(teacher, images[i : i + bs], boxes[i : i + bs], mode=mode, scales=tuple(cfg.regions.scales))) for i in range(0, len(images), bs)])

    t_crop, e_crop = _timed(lambda: run("crop"))
    t_dense, e_dense = _timed(lambda: run("dense"))

    def top1(e):
        if text is None:
            return -1.0
        return float(((F.normalize(e, dim=-1) @ text.t()).argmax(1).cpu() == labels).float().mean())

    res = {
        "teacher": "pretrained" if real else "random",
        "device": str(teacher.device),
        "images": len(images),
        "boxes": n_boxes,
        "crop_images_per_s": len(images) / t_crop,
        "dense_images_per_s": len(images) / t_dense,
        "dense_over_crop_speed": t_crop / t_dense,
        "crop_top1": top1(e_crop),
        "dense_top1": top1(e_dense),
        "dense_image_size": teacher.dense_image_size,
    }
    print(f"teacher: {res['teacher']} ({teacher.name}), {len(images)} images, {n_boxes} boxes, device {res['device']}")
    print("| mode | images/s | boxes/s | zero-shot top-1 |")
    print("|---|---|---|---|")
    print(f"| crop 1x+1.5x (ViLD) | {res['crop_images_per_s']:.1f} | {n_boxes / t_crop:.1f} | {res['crop_top1']:.3f} |")
    print(f"| dense @{teacher.dense_image_size} (MaskCLIP RoIAlign) | {res['dense_images_per_s']:.1f} | {n_boxes / t_dense:.1f} | {res['dense_top1']:.3f} |")
    print(f"dense is {res['dense_over_crop_speed']:.2f}x the speed of crop")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=100)
    a = ap.parse_args()
    main(a.device, a.images)
