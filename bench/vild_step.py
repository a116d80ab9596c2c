"""Time a ViLD training step against a plain torchvision Faster R-CNN step on the same batch.

    python bench/vild_step.py [--device cpu] [--repeats 5]

Both detectors share the shapes config's backbone, RPN and RoI settings (configs/shapes/vild.yaml);
ViLD adds the projection + cosine classifier and the ViLD-image pass over the precomputed
proposals (det.num_image_distill per image). A third model, ViLD with torchvision's own
one-thread MultiScaleRoIAlign, measures distill.detection.roi_pool (RoIAlign split over the
intra-op threads). Steps are interleaved (plain, ViLD, ViLD-torchvision-pool, plain, ...) so
machine load hits all alike; the medians and their ratios are printed (target <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _batch(n: int, d: int, num_props: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for i in range(n):
        k = 4
        xy = torch.rand(k, 2, generator=g) * (size - 40)
        wh = 10 + torch.rand(k, 2, generator=g) * 30
        pxy = torch.rand(num_props, 2, generator=g) * (size - 40)
        pwh = 8 + torch.rand(num_props, 2, generator=g) * 40
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh], 1),
                "labels": torch.randint(0, 10, (k,), generator=g),
                "image_id": i,
                "proposals": torch.cat([pxy, (pxy + pwh).clamp(max=size)], 1),
                "proposal_embeddings": F.normalize(torch.randn(num_props, d, generator=g), dim=1),
            }
        )
    return images, targets


def main(device: str = "cpu", repeats: int = 5, batch_size: int = 0, config: str = "configs/shapes/vild.yaml") -> dict:
    """Median seconds per training step of a plain Faster R-CNN and of ViLD, and their ratio."""
    from distill.config import load_config
    from distill.detection.build import build_plain_detector, build_vild_detector

    # step time does not depend on the weights: random init (the same layers and trainable
    # BatchNorm as the config's base-crop backbone with det.freeze_backbone=false)
    cfg = load_config(config, ["det.pretrained_backbone="])
    det = cfg.det
    dev = torch.device(device)
    bs = batch_size or det.train.batch_size
    d, c = 64, 20
    torch.manual_seed(0)
    vild = build_vild_detector(det, d, F.normalize(torch.randn(c, d), dim=1)).to(dev).train()
    import copy

    from torchvision.ops import MultiScaleRoIAlign

    vild_tv = copy.deepcopy(vild)
    vild_tv.roi_heads.box_roi_pool.__class__ = MultiScaleRoIAlign  # same state, torchvision's forward
    torch.manual_seed(0)
    plain = build_plain_detector(det, c).to(dev).train()
    images, targets = _batch(bs, d, det.num_image_distill, det.min_size)
    images = [im.to(dev) for im in images]
    targets = [{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    plain_targets = [{k: v for k, v in t.items() if not k.startswith("proposal")} for t in targets]
    models = {"plain": (plain, plain_targets), "vild": (vild, targets), "vild_tv_pool": (vild_tv, targets)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, (m, _) in models.items()}

    def step(name: str) -> float:
        model, tg = models[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        losses = model(images, tg)
        sum(losses.values()).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, time.process_time() - c

    for name in models:  # warm-up
        step(name)
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name in models:
            w, c = step(name)
            times[name].append(w)
            cpu[name].append(c)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    res = {
        "device": str(dev),
        "batch_size": bs,
        "num_image_distill": det.num_image_distill,
        "repeats": repeats,
        "plain_step_s": round(med["plain"], 4),
        "vild_step_s": round(med["vild"], 4),
        "ratio": round(med["vild"] / med["plain"], 3),
        "vild_tv_pool_step_s": round(med["vild_tv_pool"], 4),
        "roi_pool_speedup": round(med["vild_tv_pool"] / med["vild"], 3),
        # process CPU seconds (all threads): robust to other jobs on a shared machine
        "plain_cpu_s": round(cmed["plain"], 4),
        "vild_cpu_s": round(cmed["vild"], 4),
        "cpu_ratio": round(cmed["vild"] / cmed["plain"], 3),
        "target": 1.15,
    }
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--config", default="configs/shapes/vild.yaml")
    a = ap.parse_args()
    r = main(a.device, a.repeats, a.batch_size, a.config)
    print(f"plain Faster R-CNN step: {r['plain_step_s']:.3f} s   ViLD step: {r['vild_step_s']:.3f} s   ratio: {r['ratio']:.3f} (target <= 1.15)")
    print(f"CPU seconds per step: plain {r['plain_cpu_s']:.3f}   ViLD {r['vild_cpu_s']:.3f}   ratio {r['cpu_ratio']:.3f}")
    print(f"ViLD step with torchvision's one-thread RoIAlign: {r['vild_tv_pool_step_s']:.3f} s; threaded RoIAlign speed-up {r['roi_pool_speedup']:.2f}x")
    print(json.dumps(r))
    sys.exit(0)
