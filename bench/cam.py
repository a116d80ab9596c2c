"""CAM speed: our batched CLIP-ES path against a per-class pytorch-grad-cam loop, in one run.

Teacher: a random ViT with the shapes teacher's architecture (``distill-tiny-vit``: width 128,
4 blocks, patch 8, class-token pooling) at the shapes CAM config's size, 256 px (32x32 tokens);
images with 3 present classes each (the shapes world averages about 3.5), 15 background words;
the image embedding is the model's own (``cam.pool=model``; configs/shapes/pipeline.yaml now reads the
mean patch token of the dense tower, ``cam.pool=mean``, whose last block runs on every token).

- ``ours``: blocks 1..L-1 once per batch of images (no grad), the last block once on a batch with
  one row per (image, class), at the class token only (all the pooled embedding reads), one
  backward for all of them (softmax Grad-CAM), then CAA;
- ``ours_gradcam``: the same without CAA (exactly the work the loop does);
- ``loop``: ``pytorch_grad_cam.GradCAM`` at ``resblocks[-1].ln_1``, one call per (image, class),
  each a full forward + backward, as the library is normally used.

The maps are checked to agree (max abs difference) before the timings are trusted. Prints a table
and the with-CAA ratio (``ratio (ours + CAA)/loop speedup: Y.YYx``, more work on our side) on its own
line, then ends with the like-for-like ratio alone: ``ratio ours/loop speedup: X.XXx`` (softmax
Grad-CAM both sides).

    .venv/bin/python bench/cam.py [cpu|cuda]
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

N_IMAGES = 8
N_CLASSES = 36
PER_IMAGE = 3
N_BG = 15
REPEATS = 2
SIZE = 256
POOL = "model"


def _teacher(device: str):
    from distill.teacher import build_random_teacher

    return build_random_teacher(embed_dim=64, image_size=64, patch=8, width=128, layers=4, heads=4,
                                text_width=32, text_layers=1, seed=0, dense_image_size=128, device=device)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(device: str = "cpu") -> dict:
    from distill.cam import gradcam
    from distill.cam import refine
    from distill.cam import run as cam_run

    torch.manual_seed(0)
    teacher = _teacher(device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(N_IMAGES, 3, SIZE, SIZE, generator=g).to(device)
    text = F.normalize(torch.randn(N_CLASSES, 64, generator=g), dim=-1).to(device)
    bg = F.normalize(torch.randn(N_BG, 64, generator=g), dim=-1).to(device)
    labels = [sorted(torch.randperm(N_CLASSES, generator=g)[:PER_IMAGE].tolist()) for _ in range(N_IMAGES)]
    scale = 10.0  # a random teacher saturates the softmax at 100; the work is the same

    def ours(caa: bool):
        return cam_run.clip_es_cams(teacher, images, labels, text, bg, logit_scale=scale, caa=caa, pool=POOL)

    def loop():
        out = []
        for b, ks in enumerate(labels):
            t_all = torch.cat([text[ks], bg])
            out.append(gradcam.pytorch_gradcam(teacher, images[b], t_all, list(range(len(ks))), logit_scale=scale, softmax=True,
                                         pool=POOL))
        return out

    # agreement (softmax Grad-CAM, at SIZE px)
    mine, ref = ours(False), loop()
    diff = 0.0
    for m, r in zip(mine, ref):
        up = refine.upsample_cams(m.gradcam.numpy(), (SIZE, SIZE))
        up = up - up.min(axis=(1, 2), keepdims=True)
        up = up / (1e-7 + up.max(axis=(1, 2), keepdims=True))
        diff = max(diff, float(np.abs(up - r).max()))

    t_ours = _best(lambda: ours(True), REPEATS)
    t_ours_gc = _best(lambda: ours(False), REPEATS)
    t_loop = _best(loop, REPEATS)
    n = N_IMAGES
    res = {
        "images": n,
        "classes_per_image": PER_IMAGE,
        "tokens": f"{SIZE // 8}x{SIZE // 8}",
        "pool": POOL,
        "ours_images_per_s": round(n / t_ours, 2),
        "ours_gradcam_images_per_s": round(n / t_ours_gc, 2),
        "loop_images_per_s": round(n / t_loop, 2),
        # like for like: the loop computes softmax Grad-CAM only, no CAA
        "speedup": round(t_loop / t_ours_gc, 2),
        "speedup_with_caa": round(t_loop / t_ours, 2),
        "max_abs_diff": diff,
        "device": device,
    }
    print(f"{'path':<34}{'images/s':>10}")
    print(f"{'ours (softmax Grad-CAM + CAA)':<34}{res['ours_images_per_s']:>10.2f}")
    print(f"{'ours (softmax Grad-CAM only)':<34}{res['ours_gradcam_images_per_s']:>10.2f}")
    print(f"{'pytorch-grad-cam per-class loop':<34}{res['loop_images_per_s']:>10.2f}")
    print(f"maps agree to {diff:.2e} (max abs, {SIZE}x{SIZE})")
    print(f"ratio (ours + CAA)/loop speedup: {res['speedup_with_caa']:.2f}x (ours does more work: CAA on top)")
    print(f"ratio ours/loop speedup: {res['speedup']:.2f}x (the same work: softmax Grad-CAM both sides)")
    return res


if __name__ == "__main__":
    import sys

    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
