"""Inference speed of the one-stage student (``det.arch=fcos``, detection/one_stage.py) beside the
ViLD student, side by side in one run (issue 32).

Rows, all with the same backbone, input size and vocabulary: ViLD (``det.inference=text``: its own
embedding, no teacher crops); the one-stage student as its config builds it (``det.head_convs`` 0:
ZSD-YOLO's head, the prediction convs on the FPN levels); the one-stage student with FCOS's 4-conv
towers (``det.head_convs=4``); and the backbone + FPN alone, the floor no head choice goes under (ViLD's time over
it is the most any head change can save). Random weights (speed only; ``det.score_thresh`` 0.05
for all), ``--classes`` random text embeddings of the teacher's size, ``--images`` images; one
untimed warm-up each, then the rows interleaved ``--repeats`` times, medians.

    python bench/one_stage.py [--config shapes|ovcoco] [--device cpu] [--repeats 5] [--images 8]

``shapes``: configs/shapes/{vild,one_stage}.yaml (ResNet-18 FPN, 128 px images read at 256);
``ovcoco``: configs/coco/vild_r50_ovcoco.yaml (ResNet-50 FPN, ViLD's 4conv2fc head, 1000
proposals) at ``--size`` (default 640; the config's 1024 takes minutes a batch on a CPU).
Prints images/s per row and the speed ratios to ViLD (the issue's goal: >= 1.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

CONFIGS = {"shapes": ("configs/shapes/vild.yaml", "configs/shapes/one_stage.yaml", 64, 36, 128),
           "ovcoco": ("configs/coco/vild_r50_ovcoco.yaml", "configs/coco/vild_r50_ovcoco.yaml", 512, 65, 640)}


def main(config: str = "shapes", device: str = "cpu", repeats: int = 5, images: int = 8, size: int = 0) -> dict:
    from distill.config import load_config
    from distill.detection.build import build_detector

    vild_path, os_path, d, classes, default_size = CONFIGS[config]
    size = size or default_size
    dev = torch.device(device)
    over = ["det.pretrained_backbone=", "det.score_thresh=0.05", "det.augment=none", "det.inference=text"]
    if config == "ovcoco":  # the real config read at --size
        over += [f"det.min_size={size}", f"det.max_size={size}"]
    one = [*over, "det.arch=fcos", "det.name=one_stage", "det.box_head=mlp2"]
    cfgs = {"vild": load_config(vild_path, over), "one_stage": load_config(os_path, one),
            "one_stage_fcos_towers": load_config(os_path, [*one, "det.head_convs=4"])}
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(classes, d, generator=g), dim=1)
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_detector(cfg.det, d, text).to(dev).eval()
    image_side = 128 if config == "shapes" else size
    batch = [torch.rand(3, image_side, image_side, generator=g).to(dev) for _ in range(images)]
    vild = models["vild"]

    def backbone(x):  # the transform + backbone + FPN of the ViLD student (the same layers as the one-stage's)
        return vild.backbone(vild.transform(x)[0].tensors)

    calls = {**{k: m for k, m in models.items()}, "backbone": backbone}

    @torch.no_grad()
    def run(name: str) -> float:
        t = time.perf_counter()
        calls[name](batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for name in calls:
        run(name)
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for name in calls:
            times[name].append(run(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": config, "device": device, "images": images, "classes": classes, "input_size": cfgs["vild"].det.min_size,
            **{f"{k}_images_per_s": round(images / v, 2) for k, v in med.items()},
            **{f"{k}_over_vild_speed": round(med["vild"] / med[k], 3) for k in ("one_stage", "one_stage_fcos_towers", "backbone")}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="shapes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=0, help="ovcoco: the input side (default 640)")
    a = ap.parse_args()
    r = main(a.config, a.device, a.repeats, a.images, a.size)
    print(f"inference at {r['input_size']} px, {r['classes']} classes, images/s: ViLD {r['vild_images_per_s']:.2f}, "
          f"one-stage {r['one_stage_images_per_s']:.2f}, one-stage with FCOS's towers {r['one_stage_fcos_towers_images_per_s']:.2f}, "
          f"backbone alone {r['backbone_images_per_s']:.2f}")
    print(f"speed over ViLD: one-stage {r['one_stage_over_vild_speed']:.2f}, with FCOS's towers {r['one_stage_fcos_towers_over_vild_speed']:.2f}, "
          f"backbone alone (the ceiling) {r['backbone_over_vild_speed']:.2f}")
    print(json.dumps(r))
