"""Channels-last vs contiguous weights for the CNN students' training steps, side by side in one
run (what :func:`distill.engine.device.conv_memory_format` chooses on CPU):

- ``crops``: the backbone stage's ResNet-18 crop classifier (det.backbone_pretrain: batch 128,
  48 px crops);
- ``lseg``: the seg stage's LSeg student with pixel distillation (configs/shapes/lseg.yaml,
  batch 8, 128 px, a random distill-tiny-vit teacher: step time does not depend on weights);
- ``vild``: the ViLD detector (configs/shapes/vild.yaml, batch 8, 256 px), left contiguous.

    python bench/conv_layout.py [--device cpu] [--repeats 5]

Steps are interleaved (contiguous, channels-last, contiguous, ...) so machine load hits both
alike; prints the median seconds per step and the speed-up of channels-last per model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _crops(dev):
    import torchvision

    from distill.detection.backbone import CropClassifier

    model = CropClassifier(torchvision.models.resnet18(weights=None, num_classes=28)).to(dev).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 3, 48, 48, generator=g).to(dev), torch.randint(28, (128,), generator=g).to(dev)
    return model, lambda m: m(x, y)


def _lseg(dev):
    from distill.config import load_config
    from distill.segmentation.build import build_segmenter
    from distill.segmentation.train import teacher_pixel_fn
    from distill.teacher import build_teacher

    cfg = load_config(ROOT / "configs/shapes/lseg.yaml", ["teacher.pretrained=", "teacher.dense_tower=", "seg.pretrained_backbone=", "seg.distill_weight=1.0"])
    teacher = build_teacher(cfg.teacher, device=dev)
    torch.manual_seed(0)
    model = build_segmenter(cfg.seg, teacher).to(dev).train()
    model.set_vocabulary(F.normalize(torch.randn(28, teacher.embed_dim), dim=-1).to(dev), list(range(1, 29)))
    model.set_distill_teacher(teacher_pixel_fn(teacher))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 128, 128, generator=g).to(dev), torch.randint(0, 29, (8, 128, 128), generator=g).to(dev)
    return model, lambda m: m(x, {"masks": y})


def _vild(dev):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_vild_step", Path(__file__).resolve().with_name("vild_step.py"))
    vild_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vild_step)
    _batch = vild_step._batch
    from distill.config import load_config
    from distill.detection.build import build_vild_detector

    det = load_config(ROOT / "configs/shapes/vild.yaml", ["det.pretrained_backbone="]).det
    torch.manual_seed(0)
    model = build_vild_detector(det, 64, F.normalize(torch.randn(20, 64), dim=1)).to(dev).train()
    images, targets = _batch(det.train.batch_size, 64, det.num_image_distill, det.min_size)
    images = [im.to(dev) for im in images]
    targets = [{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return model, lambda m: m(images, targets)


def main(device: str = "cpu", repeats: int = 5) -> dict:
    dev = torch.device(device)
    res: dict = {"device": str(dev), "repeats": repeats, "threads": torch.get_num_threads()}
    for name, make in (("crops", _crops), ("lseg", _lseg), ("vild", _vild)):
        model, loss_of = make(dev)
        models = {"contiguous": model, "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last)}
        opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-4) for k, m in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        for i in range(repeats + 1):  # the first round is the warm-up
            for k, m in models.items():
                t0 = time.perf_counter()
                loss = sum(v for n, v in loss_of(m).items() if n.startswith("loss"))
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        res[f"{name}_contiguous_step_s"] = round(med["contiguous"], 4)
        res[f"{name}_channels_last_step_s"] = round(med["channels_last"], 4)
        res[f"{name}_channels_last_speedup"] = round(med["contiguous"] / med["channels_last"], 3)
        print(f"{name:6s} contiguous {med['contiguous']:.3f} s   channels-last {med['channels_last']:.3f} s   speed-up {res[f'{name}_channels_last_speedup']:.2f}x", flush=True)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    main(a.device, a.repeats)
