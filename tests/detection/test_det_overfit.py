"""Overfit check: the ViLD student, trained by the engine on 2 images, must detect the objects of
those 2 images, so a student that learns nothing (a loss that returns zero, a head whose gradients
never arrive, a broken label / vocabulary mapping) fails here.

The data: two 64 x 64 images of grey noise with one red, one green and one blue rectangle each
(16-28 px a side, one per quadrant), all three classes base; the vocabulary is a tiny random
teacher's text embeddings of the three names (``Teacher.encode_text``). Each image also carries 6
distilled proposals (its 3 boxes + 3 random ones) whose targets are random unit vectors: the tiny
random teacher embeds every crop alike (mean cosine 0.92), distinct targets make the image
branch's fit measurable. The student is the tests' tiny ViLD (ResNet-18 FPN, random init) with
ViLD-text, ViLD-image (``image_head: separate``) and the RPN / box losses.

Scores, each against a reference computed here:
- base AP50 on the 2 images from pycocotools' COCOeval (text inference). The untrained student
  scores 0.00 - 0.03 (seeds 0, 1, 2): random boxes rarely reach IoU 0.5. Threshold 0.5;
- top-1 of the text branch on the 6 ground-truth boxes (the student's region embedding against
  the 3 text embeddings): chance 1/3; threshold 5/6;
- mean cosine of the image branch's embedding of the 12 proposals with their targets: chance
  0 +- 0.07 (random unit vectors in 16 dimensions); threshold 0.4.

Seeds 0, 1, 2 (data, init and engine seed together; 100 steps, adamw 1e-3 cosine, as the shapes
config trains) gave AP50 0.945 / 0.835 / 1.000, top-1 6/6 each, image cosine 0.61 / 0.79 / 0.74
(untrained: AP50 0.00 / 0.00 / 0.03, top-1 2/6 / 2/6 / 1/6, cosine 0.04 / -0.02 / -0.05), in
25-37 s of training each on one CPU thread of a loaded 2-core machine. The test uses seed 0.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F

from distill.config import TrainConfig
from distill.detection.build import build_vild_detector
from distill.engine.train import make_loader, train

from test_vild import D, tiny_det  # noqa: E402  (same folder)

SEED = 0
STEPS = 100
NAMES = ["red square", "green square", "blue square"]
COLORS = [(230, 30, 30), (30, 200, 40), (40, 60, 230)]  # label i is NAMES[i]


def two_images(seed: int, size: int = 64) -> list[tuple[torch.Tensor, dict]]:
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    items = []
    for k in range(2):
        img = rng.integers(90, 140, size=(size, size, 3), dtype=np.uint8)
        boxes = []
        half = size // 2
        for c, slot in enumerate(rng.permutation(4)[:3]):  # one rectangle per quadrant, no overlap
            w, h = (int(v) for v in rng.integers(size // 4, size * 7 // 16 + 1, size=2))
            y = (slot // 2) * half + int(rng.integers(0, half - h + 1))
            x = (slot % 2) * half + int(rng.integers(0, half - w + 1))
            img[y : y + h, x : x + w] = COLORS[c]
            boxes.append([x, y, x + w, y + h])
        boxes = torch.tensor(boxes, dtype=torch.float32)
        xy = torch.rand(3, 2, generator=g) * 40
        props = torch.cat([boxes, torch.cat([xy, (xy + 12 + torch.rand(3, 2, generator=g) * 20).clamp(max=size)], 1)])
        target = {"boxes": boxes, "labels": torch.arange(3), "image_id": k + 1, "proposals": props,
                  "proposal_embeddings": F.normalize(torch.randn(len(props), D, generator=g), dim=1)}
        items.append((torch.from_numpy(img).permute(2, 0, 1).float() / 255.0, target))
    return items


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def coco_ap50(model, items) -> float:
    """AP50 over the 3 classes by pycocotools' COCOeval (the reference implementation)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    with torch.no_grad():
        out = model([im for im, _ in items])
    gt = {"images": [{"id": t["image_id"], "width": 64, "height": 64} for _, t in items],
          "categories": [{"id": c + 1, "name": n} for c, n in enumerate(NAMES)], "annotations": []}
    for _, t in items:
        for b, lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": t["image_id"], "category_id": lab + 1,
                                      "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
    dets = [{"image_id": t["image_id"], "category_id": int(lab) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
            for (_, t), d in zip(items, out) for b, s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())]
    if not dets:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def branch_scores(model, items, text) -> tuple[float, float]:
    """(top-1 of the text branch on the ground-truth boxes, mean cosine of the image branch's
    embeddings of the proposals with their targets)."""
    images = [im for im, _ in items]
    emb = torch.cat(model.region_embeddings(images, [t["boxes"] for _, t in items]))
    labels = torch.cat([t["labels"] for _, t in items])
    top1 = float(((emb @ F.normalize(text, dim=1).T).argmax(1) == labels).float().mean())
    emb_i = torch.cat(model.region_embeddings(images, [t["proposals"] for _, t in items], branch="image"))
    cos = float((emb_i * torch.cat([t["proposal_embeddings"] for _, t in items])).sum(1).mean())
    return top1, cos


def test_vild_overfits_two_images(tmp_path):
    from distill.teacher.clip import build_random_teacher

    teacher = build_random_teacher(embed_dim=D, image_size=32, patch=8, width=32, layers=4, heads=2, seed=0)
    text = teacher.encode_text(NAMES)
    items = two_images(SEED)
    torch.manual_seed(SEED)
    model = build_vild_detector(tiny_det(image_head="separate"), D, text)
    before = (coco_ap50(model, items), *branch_scores(model, items, text))
    assert before[0] < 0.1 and before[2] < 0.2, before  # untrained: what chance gives

    cfg = TrainConfig(max_steps=STEPS, batch_size=2, lr=1e-3, optimizer="adamw", warmup=5, schedule="cosine",
                      checkpoint_period=0, log_period=STEPS, seed=SEED, device="cpu")
    train(model, make_loader(_Items(items), cfg, collate), cfg, tmp_path / "vild", progress=False)

    ap50 = coco_ap50(model, items)
    top1, cos = branch_scores(model, items, text)
    assert ap50 > 0.5 and top1 >= 5 / 6 and cos > 0.4, (
        f"after {STEPS} steps: base AP50 {ap50:.3f}, text top-1 {top1:.3f}, image cosine {cos:.3f} "
        f"(untrained: AP50 {before[0]:.3f}, top-1 {before[1]:.3f}, cosine {before[2]:.3f})")
