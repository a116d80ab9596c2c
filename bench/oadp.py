"""OADP's costs beside ViLD's, side by side in one run (issue 31):

1. region embeddings: ``oake`` (adaptive square crop, masked object token, the tower's patch stride
   halved: 4x the tokens) vs ``crop`` (ViLD 3.2: 1x + 1.5x crops) on the shapes teacher
   (``distill-tiny-vit``, random weights: speed only), ``--proposals`` random boxes on each of
   ``--images`` 128 px images, through ``region_embeddings`` as the regions stage calls it; one
   untimed warm-up call per mode, then the modes interleaved ``--repeats`` times, medians;
2. a training step of the ViLD student with and without the distillation pyramid (global + block:
   the paper's weights, the block targets of teacher/pyramid.py's blocks at the shapes sizes) on
   the same batch (bench/vild_step.py's), interleaved, medians.

    python bench/oadp.py [--device cpu] [--repeats 3] [--images 8] [--proposals 100]

Prints both ratios (OAKE / crop, ViLD + pyramid / ViLD).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from _timing import interleaved_medians

HERE = Path(__file__).resolve().parent


def _regions(device: str, repeats: int, images: int, proposals: int) -> dict:
    from distill.config import load_config
    from distill.teacher import build_teacher
    from distill.teacher.regions import region_embeddings

    cfg = load_config("configs/shapes/vild.yaml", ["teacher.pretrained="])
    teacher = build_teacher(cfg.teacher, device=device)
    g = torch.Generator().manual_seed(0)
    ims = [torch.rand(3, 128, 128, generator=g) for _ in range(images)]
    xy = [torch.rand(proposals, 2, generator=g) * 100 for _ in range(images)]
    boxes = [torch.cat([p, (p + 8 + 40 * torch.rand(proposals, 2, generator=g)).clamp(max=128)], 1) for p in xy]

    for mode in ("crop", "oake"):  # a small warm-up of each path before interleaved_medians's own
        region_embeddings(teacher, ims[:1], [boxes[0][:16]], mode=mode)
    med = interleaved_medians({mode: (lambda m=mode: region_embeddings(teacher, ims, boxes, mode=m)) for mode in ("crop", "oake")}, repeats, device)
    n = images * proposals
    return {"regions_boxes": n, "crop_boxes_per_s": round(n / med["crop"], 1), "oake_boxes_per_s": round(n / med["oake"], 1),
            "oake_over_crop_time": round(med["oake"] / med["crop"], 3)}


def _steps(device: str, repeats: int) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_vild_step", HERE / "vild_step.py")  # its batch
    vild_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vild_step)
    _batch = vild_step._batch

    from distill.config import load_config
    from distill.detection.build import build_vild_detector
    from distill.teacher.pyramid import block_boxes

    dev = torch.device(device)
    plain_cfg = load_config("configs/shapes/vild.yaml", ["det.pretrained_backbone="])
    pyr_cfg = load_config("configs/shapes/vild.yaml", ["det.pretrained_backbone=", "det.global_weight=0.5", "det.block_weight=128",
                                                        "det.block_relation_weight=8", "det.pyramid_warmup=0"])
    d, c = 64, 20
    torch.manual_seed(0)
    vild = build_vild_detector(plain_cfg.det, d, F.normalize(torch.randn(c, d), dim=1)).to(dev).train()
    torch.manual_seed(0)
    oadp = build_vild_detector(pyr_cfg.det, d, F.normalize(torch.randn(c, d), dim=1)).to(dev).train()
    det = plain_cfg.det
    images, targets = _batch(det.train.batch_size, d, det.num_image_distill, det.min_size)
    images = [im.to(dev) for im in images]
    targets = [{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    g = torch.Generator().manual_seed(1)
    # the shapes world's 128 px images read at det.min_size (256): the teacher's 64 px blocks of a
    # 128 px image (14), in the batch's 256 px coordinates
    blocks = block_boxes(128, 128, 64) * (det.min_size / 128)
    pyr_targets = []
    for t in targets:
        e = F.normalize(torch.randn(len(blocks), d, generator=g), dim=1).to(dev)
        pyr_targets.append({**copy.copy(t), "blocks": blocks.to(dev), "block_embeddings": e, "global_embedding": e[0]})
    models = {"vild": (vild, targets), "oadp": (oadp, pyr_targets)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, (m, _) in models.items()}

    def step(name: str) -> None:
        model, tg = models[name]
        losses = model(images, tg)
        sum(losses.values()).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    med = interleaved_medians({name: (lambda n=name: step(n)) for name in models}, repeats, dev)
    return {"blocks_per_image": len(blocks), "vild_step_s": round(med["vild"], 4), "pyramid_step_s": round(med["oadp"], 4),
            "pyramid_over_vild_step": round(med["oadp"] / med["vild"], 3)}


def main(device: str = "cpu", repeats: int = 3, images: int = 8, proposals: int = 100) -> dict:
    return {"device": device, **_regions(device, repeats, images, proposals), **_steps(device, repeats)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--proposals", type=int, default=100)
    a = ap.parse_args()
    r = main(a.device, a.repeats, a.images, a.proposals)
    print(f"region embeddings: crop {r['crop_boxes_per_s']:.0f} boxes/s, OAKE {r['oake_boxes_per_s']:.0f} boxes/s, OAKE / crop time {r['oake_over_crop_time']:.2f}")
    print(f"training step: ViLD {r['vild_step_s']:.3f} s, + pyramid {r['pyramid_step_s']:.3f} s, ratio {r['pyramid_over_vild_step']:.2f}")
    print(json.dumps(r))
