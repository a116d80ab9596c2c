"""Teacher region embeddings: ``crop`` (ViLD 3.2: each box cropped at 1x and 1.5x, both crops
encoded, summed) vs ``dense`` (RoIAlign on the MaskCLIP patch map of one forward per image), side
by side in one run, at two settings:

- ``shapes``, the pipeline's sizes: the teacher of configs/shapes/vild.yaml (``distill-tiny-vit``,
  64 px crops, dense map at 128 px = 16 x 16 patches) with its pretrained weights
  ``<work dir>/teacher/teacher.safetensors`` when they exist, else randomly initialised by the same
  builder (``build_teacher`` with ``teacher.pretrained`` empty); ``det.num_image_distill`` (100)
  proposals per image, the boxes the regions stage embeds; 128 px images: the val split's when the
  shapes world exists, else random ones.
- ``real``, real scale: a randomly initialised open_clip ViT-B-32 with the teacher settings of
  configs/coco/pipeline_ovcoco.yaml (224 px crops, dense map at 224 px = 7 x 7 patches),
  ``det.num_image_distill`` (300) proposals per image, random 480 x 640 images (COCO's usual size).
  Nothing is downloaded: the weights are random, so this setting measures speed only.

Both modes run through ``distill.teacher.regions.region_embeddings`` as the regions stage calls it:
8 images per call, the precision of ``regions.precision`` (else ``teacher.precision``; ``auto`` =
bf16 only where the device runs it natively). Proposals are random boxes inside each image (both
modes cost the same whatever the boxes' positions). Timing: one untimed warm-up call (the first
image, its first 32 boxes), then one timed pass over all images per mode.

Accuracy beside speed: with the pretrained shapes teacher, zero-shot top-1 on the ground-truth boxes
of the same val images (``ZeroShotRegions``: ``ens`` = crop mode, ``dense``). Random weights have
no accuracy (``n/a``); for every setting the table is followed by the mean cosine between the dense
and the crop embedding of the same proposal (how far dense is from standing in for the crops).

The last line is the speed ratio, dense over crop, of each setting measured.

    .venv/bin/python bench/region_embeddings.py                      # both settings, defaults
    .venv/bin/python bench/region_embeddings.py --device cuda --images 100 --real-images 8
    .venv/bin/python bench/region_embeddings.py --settings real --real-images 2 --real-proposals 300

Arguments: ``--images`` (shapes images, default 100), ``--proposals`` (shapes proposals per image,
default the config's 100), ``--real-images`` (default 3: a ViT-B/32 embeds 600 crops per image, tens
of seconds on a small CPU), ``--real-proposals`` (default the config's 300), ``--real-model``
(default ViT-B-32), ``--work-dir`` (the shapes run, default runs/shapes under the repository root),
``--settings`` (shapes, real or both).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from distill.config import load_config
from distill.engine.device import resolve_precision
from distill.teacher import build_teacher
from distill.teacher.regions import region_embeddings

ROOT = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = "configs/shapes/vild.yaml"
REAL_CONFIG = "configs/coco/pipeline_ovcoco.yaml"
IMAGES_PER_CALL = 8  # the regions stage's batch (embed_regions_sharded's images_per_batch)
WARMUP_BOXES = 32
REAL_HW = (480, 640)


def _regions_teacher(cfg, tcfg, device: str):
    """``build_teacher(tcfg)`` at the precision the regions stage uses (detection/proposals.py
    ``embed_proposals``): ``regions.precision`` when set, else the teacher's own."""
    teacher = build_teacher(tcfg, device=device)
    precision = resolve_precision(cfg.regions.precision, teacher.device) if cfg.regions.precision else teacher.precision
    return dataclasses.replace(teacher, precision=precision) if precision != teacher.precision else teacher


def _random_boxes(n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """(n, 4) XYXY boxes inside a (height, width) image, sides from 1/16 of the image to all of it."""
    size = torch.tensor([width, height], dtype=torch.float32)
    wh = size * (1 / 16 + (15 / 16) * torch.rand(n, 2, generator=g))
    xy = (size - wh) * torch.rand(n, 2, generator=g)
    return torch.cat([xy, xy + wh], dim=1)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _embed(teacher, images, boxes, mode: str, scales) -> torch.Tensor:
    out = []
    for a in range(0, len(images), IMAGES_PER_CALL):
        out += region_embeddings(teacher, images[a : a + IMAGES_PER_CALL], boxes[a : a + IMAGES_PER_CALL], mode=mode, scales=scales)
    return torch.cat(out)


def _time_modes(teacher, images, boxes, scales) -> dict:
    """Seconds and embeddings of each mode over all images (after an untimed warm-up call)."""
    out = {}
    for mode in ("crop", "dense"):
        region_embeddings(teacher, images[:1], [boxes[0][:WARMUP_BOXES]], mode=mode, scales=scales)
        _sync(teacher.device)
        t0 = time.perf_counter()
        emb = _embed(teacher, images, boxes, mode, scales)
        _sync(teacher.device)
        out[mode] = (time.perf_counter() - t0, emb)
    return out


def _zero_shot(cfg, teacher, vocab, samples) -> dict:
    """Zero-shot top-1 of both modes on the ground-truth boxes of ``samples`` (``ZeroShotRegions``)."""
    from distill.teacher.evaluate import ZeroShotRegions
    from distill.teacher.text import text_embeddings

    ev = ZeroShotRegions(teacher, vocab, text_embeddings(teacher, vocab, cfg.teacher.templates))
    for a in range(0, len(samples), IMAGES_PER_CALL):
        chunk = samples[a : a + IMAGES_PER_CALL]
        ev.process([s[1] for s in chunk], [s[2] for s in chunk], [s[3] for s in chunk])
    r = ev.evaluate()
    return {"crop": r["zeroshot/top1_ens"], "dense": r["zeroshot/top1_dense"], "objects": r["zeroshot/num_objects"]}


def _report(key: str, title: str, teacher, images, boxes, scales, top1: dict | None, figures: dict) -> float:
    """Time both modes, print the setting's table, add its figures; returns dense over crop speed."""
    per_image = int(boxes[0].shape[0])
    n_img, n_box = len(images), sum(int(b.shape[0]) for b in boxes)
    t = _time_modes(teacher, images, boxes, scales)
    (t_crop, e_crop), (t_dense, e_dense) = t["crop"], t["dense"]
    cosine = float((e_crop * e_dense).sum(dim=1).mean())
    ratio = t_crop / t_dense
    h, w = images[0].shape[1:]
    dense_grid = teacher.dense_image_size // teacher.patch_size
    print(f"== {key}: {title}")
    print(f"   {teacher.name}: {teacher.image_size} px crops, dense map at {teacher.dense_image_size} px "
          f"({dense_grid}x{dense_grid} patches), precision {teacher.precision}, device {teacher.device}")
    print(f"   {n_img} images of {h}x{w} px, {per_image} proposals per image = {n_box} boxes")
    acc_head = f"zero-shot top-1 ({top1['objects']} GT boxes)" if top1 else "zero-shot top-1"
    print(f"| mode | images/s | boxes/s | {acc_head} |")
    print("|---|---|---|---|")
    for mode, label, secs in (("crop", "crop 1x+1.5x (ViLD 3.2)", t_crop),
                              ("dense", f"dense @{teacher.dense_image_size} (MaskCLIP RoIAlign)", t_dense)):
        acc = f"{top1[mode]:.3f}" if top1 else "n/a (random weights)"
        print(f"| {label} | {n_img / secs:.2f} | {n_box / secs:.1f} | {acc} |")
    print(f"mean cosine between the dense and the crop embedding of the same box: {cosine:.3f} ({n_box} proposals)")
    print(f"{key}: dense is {ratio:.2f}x the speed of crop")
    figures.update({
        f"{key}_teacher": teacher.name,
        f"{key}_weights": "pretrained" if top1 else "random",
        f"{key}_precision": teacher.precision,
        f"{key}_images": n_img,
        f"{key}_image_size": f"{h}x{w}",
        f"{key}_proposals_per_image": per_image,
        f"{key}_crop_size": teacher.image_size,
        f"{key}_dense_image_size": teacher.dense_image_size,
        f"{key}_crop_images_per_s": n_img / t_crop,
        f"{key}_dense_images_per_s": n_img / t_dense,
        f"{key}_crop_boxes_per_s": n_box / t_crop,
        f"{key}_dense_boxes_per_s": n_box / t_dense,
        f"{key}_crop_top1": top1["crop"] if top1 else None,
        f"{key}_dense_top1": top1["dense"] if top1 else None,
        f"{key}_dense_crop_mean_cosine": cosine,
        f"{key}_dense_over_crop_speed": ratio,
    })
    return ratio


def shapes(device: str, num_images: int, proposals: int | None, work_dir: str | Path, figures: dict) -> float:
    """The pipeline's sizes: the shapes teacher (pretrained if ``work_dir`` has one, else random)."""
    cfg = load_config(ROOT / SHAPES_CONFIG, [f"work_dir={Path(work_dir).resolve()}"])
    per_image = proposals or cfg.det.num_image_distill
    real = Path(cfg.teacher.pretrained).is_file() and Path(cfg.data.val_json).is_file()
    g = torch.Generator().manual_seed(0)
    if real:
        from distill.teacher.evaluate import _load_split

        teacher = _regions_teacher(cfg, cfg.teacher, device)
        vocab, samples = _load_split(cfg, cfg.data.val_json, num_images)
        images = [s[1] for s in samples]
        top1 = _zero_shot(cfg, teacher, vocab, samples)
        title = f"the pipeline's sizes, pretrained {cfg.teacher.pretrained}, val images"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            teacher = _regions_teacher(cfg, dataclasses.replace(cfg.teacher, pretrained="", dense_tower=""), device)
        size = cfg.world.image_size
        images = [torch.rand(3, size, size, generator=g) for _ in range(num_images)]
        top1 = None
        title = f"the pipeline's sizes, random init (no {cfg.teacher.pretrained}), random images"
    boxes = [_random_boxes(per_image, int(im.shape[1]), int(im.shape[2]), g) for im in images]
    return _report("shapes", title, teacher, images, boxes, cfg.regions.scales, top1, figures)


def real_scale(device: str, num_images: int, proposals: int | None, model: str, figures: dict) -> float:
    """Real scale: a random open_clip ``model`` with the OV-COCO teacher settings, 480 x 640 images."""
    cfg = load_config(ROOT / REAL_CONFIG)
    per_image = proposals or cfg.det.num_image_distill
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = _regions_teacher(cfg, dataclasses.replace(cfg.teacher, model=model, pretrained="", dense_tower=""), device)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, *REAL_HW, generator=g) for _ in range(num_images)]
    boxes = [_random_boxes(per_image, *REAL_HW, g) for _ in images]
    return _report("real", f"real scale, {model} random init (speed only), random images", teacher, images, boxes,
                   cfg.regions.scales, None, figures)


def main(device: str = "cpu", num_images: int = 100, real_images: int = 3, proposals: int | None = None,
         real_proposals: int | None = None, real_model: str = "ViT-B-32", work_dir: str | Path = ROOT / "runs" / "shapes",
         settings: tuple[str, ...] = ("shapes", "real")) -> dict:
    """Measure the settings named in ``settings`` and return their figures (keys ``<setting>_*``)."""
    figures: dict = {"device": device}
    ratios = {}
    if "shapes" in settings:
        ratios["shapes (pipeline's sizes)"] = shapes(device, num_images, proposals, work_dir, figures)
    if "real" in settings:
        ratios[f"real scale ({real_model})"] = real_scale(device, real_images, real_proposals, real_model, figures)
    print("dense over crop speed: " + ", ".join(f"{v:.2f}x at {k}" for k, v in ratios.items()))
    return figures


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=100, help="shapes setting: images (default 100)")
    ap.add_argument("--proposals", type=int, default=None, help="shapes setting: proposals per image (default det.num_image_distill, 100)")
    ap.add_argument("--real-images", type=int, default=3, help="real setting: images (default 3)")
    ap.add_argument("--real-proposals", type=int, default=None, help="real setting: proposals per image (default det.num_image_distill, 300)")
    ap.add_argument("--real-model", default="ViT-B-32", help="real setting: open_clip model, random init (default ViT-B-32)")
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "shapes"), help="the shapes run whose pretrained teacher and val split are used when they exist")
    ap.add_argument("--settings", nargs="+", choices=("shapes", "real"), default=["shapes", "real"])
    a = ap.parse_args()
    main(a.device, a.images, a.real_images, a.proposals, a.real_proposals, a.real_model, a.work_dir, tuple(a.settings))
