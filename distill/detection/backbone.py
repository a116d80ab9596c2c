"""``distill train backbone``: pretrain the detector's ResNet on crops of BASE-class boxes.

ViLD (Gu et al. 2022, section 4) starts its Faster R-CNN from an ImageNet-pretrained ResNet, as
torchvision's detection recipes do. Nothing can be downloaded here, so the shapes world's stand-in
is a classifier trained on the run's own data: crops of the training split's base-class ground
truth boxes (``data.train_json`` filtered to the vocabulary's base classes, so no novel label is
ever seen), one class per crop, cross entropy. Each crop is a square of ``context`` times the
box's longer side (jittered), read with RoIAlign at ``crop_size`` px and flipped at random.

The saved file is the torchvision classification state_dict without ``fc`` (what
``det.pretrained_backbone`` loads). Train the detector with ``det.freeze_backbone=false``: the
torchvision recipe (frozen BatchNorm statistics, stem and first stage fixed) suits ImageNet
statistics, not ones gathered on object crops (docs/experiments.md has the runs).

Output ``det.backbone_pretrain.out`` (+ ``metrics.json`` beside it: steps, last-100-step training
accuracy, wall time). The training loop is distill/engine/train.py (resume, DDP, the non-finite
guard); its ``metrics.jsonl`` and, while it runs, its checkpoints are in ``<out>_train/``.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from distill.config import TrainConfig, config_hash
from distill.engine.device import conv_memory_format, get_device
from distill.engine.distributed import get_rank, is_main
from distill.engine.hooks import Hook
from distill.engine.train import DrawnBatches, micro_batch_size, run_dir, train
from distill.errors import DistillError
from distill.files import atomic_path, is_output_of, write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _base_crops(cfg, vocab) -> tuple[list[torch.Tensor], list[tuple[int, list[float], int]]]:
    """Images (3, H, W) uint8 (held in memory: 74 MB for the shapes world's 1,500) and
    ``(image index, box XYXY, base class index)`` of every base box."""
    from distill.data.coco import CocoDetection

    ds = CocoDetection(cfg.data.train_json, cfg.data.image_root, vocab, skip_unknown=True)
    base = {full: k for k, full in enumerate(vocab.base_indices)}
    images, boxes = [], []
    for i in range(len(ds)):
        img, t = ds[i]
        keep = [(b.tolist(), base[int(l)]) for b, l in zip(t["boxes"], t["labels"]) if int(l) in base]
        keep = [(b, c) for b, c in keep if b[2] - b[0] >= 1 and b[3] - b[1] >= 1]  # zero-area boxes: skipped
        if keep:
            boxes += [(len(images), b, c) for b, c in keep]
            images.append(img.mul(255).round_().to(torch.uint8))
    if not boxes:
        raise DistillError(f"{cfg.data.train_json}: no base-class boxes to pretrain the backbone on")
    return images, boxes


def sample_crops(images, boxes, n: int, size: int, context: tuple[float, float], rng: np.random.Generator):
    """``n`` random crops ``(n, 3, size, size)`` normalised with ImageNet's mean / std, and labels.
    images: (3, H, W) uint8 or float in [0, 1]; boxes: ``(image index, box XYXY, label)``."""
    idx = rng.integers(0, len(boxes), n)
    lo, hi = context
    rois, labels, owners = [], [], []
    for k, j in enumerate(idx):
        i, (x0, y0, x1, y1), c = boxes[j]
        w, h = x1 - x0, y1 - y0
        s = max(w, h) * rng.uniform(lo, hi)
        cx = (x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * w
        cy = (y0 + y1) / 2 + rng.uniform(-0.1, 0.1) * h
        rois.append([k, cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])
        labels.append(c)
        owners.append(i)
    # one RoIAlign call over a stack of the owning images (equal sizes), else one per crop
    shapes = {tuple(images[i].shape) for i in owners}
    r = torch.tensor(rois, dtype=torch.float32)

    def as_float(t: torch.Tensor) -> torch.Tensor:
        return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()

    if len(shapes) == 1:
        x = torchvision.ops.roi_align(as_float(torch.stack([images[i] for i in owners])), r, (size, size), 1.0, 2, True)
    else:
        x = torch.cat([torchvision.ops.roi_align(as_float(images[i][None]), torch.cat([torch.zeros(1, 1), r[k : k + 1, 1:]], 1),
                                                 (size, size), 1.0, 2, True) for k, i in enumerate(owners)])
    flip = torch.from_numpy(rng.random(n) < 0.5)
    x[flip] = x[flip].flip(-1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(labels)


def backbone_readers(cfg) -> tuple[str, ...]:
    """The students (``"det"``, ``"seg"``) whose ``pretrained_backbone`` is the file ``distill
    train backbone`` writes (``det.backbone_pretrain.out``); the pipeline's backbone stage runs
    for them, before them."""

    out = cfg.det.backbone_pretrain.out
    seg = cfg.seg.pretrained_backbone if (cfg.seg.arch, cfg.seg.backbone) == ("lseg", "resnet18") else ""  # other encoders ignore it
    return tuple(s for s, v in (("det", cfg.det.pretrained_backbone), ("seg", seg)) if is_output_of(v, out))


def uses_pretrained_backbone(cfg) -> bool:
    """True when the detector starts from ``distill train backbone``'s weights (the file the
    pipeline's backbone stage writes) rather than random init or an external file such as
    ImageNet's."""
    return "det" in backbone_readers(cfg)


class CropClassifier(torch.nn.Module):
    """A classifier trained on crops (the training loop's model contract): ``(x, labels)`` ->
    ``{"loss_cls": cross entropy}``; keeps (correct, seen) of its last 100 training batches."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=100)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        self.recent.append((int((logits.argmax(1) == y).sum()), len(y)))
        return {"loss_cls": F.cross_entropy(logits, y)}

    def accuracy(self) -> float:
        correct, seen = (sum(c) for c in zip(*self.recent)) if self.recent else (0, 0)
        return correct / max(seen, 1)


class _LastLoss(Hook):
    """The last step's loss."""

    value = float("nan")

    def after_step(self, loop) -> None:
        self.value = loop.step_losses["loss"]


def _check(cfg) -> None:
    p = cfg.det.backbone_pretrain
    name = cfg.det.backbone
    if not (name.startswith("resnet") and name.endswith("_fpn")):
        raise DistillError(f"det.backbone: {name!r}: backbone pretraining supports the ResNet FPN backbones (resnet18_fpn ...)")
    if p.steps < 1 or p.batch_size < 1 or p.crop_size < 16:
        raise DistillError(f"det.backbone_pretrain: expected steps >= 1, batch_size >= 1, crop_size >= 16 (got {p.steps}, {p.batch_size}, {p.crop_size})")
    if len(p.context) != 2 or not (0 < p.context[0] <= p.context[1]):
        raise DistillError(f"det.backbone_pretrain.context: expected [low, high] with 0 < low <= high, got {list(p.context)}")
    if not p.out:
        raise DistillError("det.backbone_pretrain.out: expected an output file path")


def pretrain_backbone(cfg, progress: bool = True, resume: bool = False) -> dict:
    """Train ``det.backbone`` (a ResNet) on base-box crops on ``det.train.device``; write
    ``det.backbone_pretrain.out``. ``resume`` continues a killed run from its last checkpoint
    (``<out without .pth>_train/checkpoints``)."""
    from distill.vocab import resolve_vocab

    _check(cfg)
    p = cfg.det.backbone_pretrain
    name = cfg.det.backbone
    vocab = resolve_vocab(cfg.data, need_base=True)
    images, boxes = _base_crops(cfg, vocab)
    torch.manual_seed(p.seed)
    rng = np.random.default_rng(p.seed + get_rank())  # rank 0: the single-process draws
    dev = get_device(cfg.det.train.device)
    model = conv_memory_format(CropClassifier(getattr(torchvision.models, name[: -len("_fpn")])(weights=None, num_classes=len(vocab.base_indices))).to(dev), dev)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=1e-4)
    # 10% warm-up; short runs (the quick pipeline's 10 steps) need >= 1.5 steps of it, or
    # OneCycleLR divides by a zero-length phase
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=p.steps, pct_start=min(0.75, max(0.1, 2.5 / p.steps)))
    tcfg = TrainConfig(max_steps=p.steps, batch_size=p.batch_size, lr=p.lr, optimizer="adamw", seed=p.seed, device=str(dev))
    B = micro_batch_size(tcfg)
    batches = DrawnBatches(lambda: sample_crops(images, boxes, B, p.crop_size, tuple(p.context), rng), {"numpy": rng})
    out = Path(p.out)
    t0 = time.time()
    last = _LastLoss()
    train(model, batches, tcfg, run_dir(out), resume=resume, device=dev, progress=progress, optimizer=opt, scheduler=sched,
          final_checkpoint=False, extra={"config": config_hash(p)}, hooks=[last], hint="lower det.backbone_pretrain.lr")
    metrics = {"backbone": name, "steps": p.steps, "boxes": len(boxes), "classes": len(vocab.base_indices),
               "train_acc_last100": model.accuracy(), "final_loss": last.value,
               "wall_s": round(time.time() - t0, 1), "out": str(out)}
    if is_main():
        state = {k: v.to("cpu") for k, v in model.net.state_dict().items() if not k.startswith("fc.")}
        with atomic_path(out) as tmp:
            torch.save(state, tmp)
        write_json(out.parent / "metrics.json", metrics)
    return metrics
