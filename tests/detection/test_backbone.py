"""`distill train backbone`: a ResNet pretrained on crops of base-class boxes, loaded by the detector."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.ops import misc as misc_ops

from distill.config import load_config
from distill.detection.backbone import IMAGENET_MEAN, IMAGENET_STD, pretrain_backbone, sample_crops
from distill.detection.build import build_backbone
from distill.errors import DistillError

RED, BLUE, GREEN = (220, 30, 30), (30, 40, 220), (30, 200, 40)


def _coco(tmp_path, novel_only=False):
    """4 images of 64 px: a red square (base), a blue circle (base), a green square (novel) and a
    zero-area red box (skipped)."""
    (tmp_path / "images").mkdir()
    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue circle", "split": "base"},
            {"id": 3, "name": "green square", "split": "novel"}]
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(1, 5):
        im = np.full((64, 64, 3), 110, np.uint8)
        x, y = int(rng.integers(4, 20)), int(rng.integers(4, 20))
        cv2.rectangle(im, (x, y), (x + 15, y + 15), RED, -1)
        cv2.circle(im, (44, 44), 8, BLUE, -1)
        cv2.rectangle(im, (40, 4), (55, 19), GREEN, -1)
        cv2.imwrite(str(tmp_path / "images" / f"{i:03d}.png"), im[..., ::-1])
        images.append({"id": i, "file_name": f"{i:03d}.png", "width": 64, "height": 64})
        boxes = [(1, [x, y, 16, 16]), (2, [36, 36, 17, 17]), (3, [40, 4, 16, 16]), (1, [10, 50, 0, 5])]
        if novel_only:
            boxes = [b for b in boxes if b[0] == 3]
        for c, bb in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": bb, "area": bb[2] * bb[3], "iscrowd": 0})
    p = tmp_path / "train.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return p


def _cfg(tmp_path, js, *extra):
    return load_config("configs/shapes/vild.yaml", [
        f"work_dir={tmp_path}/run", f"data.train_json={js}", f"data.vocab={js}", f"data.image_root={tmp_path}/images",
        "det.backbone_pretrain.batch_size=16", "det.backbone_pretrain.crop_size=32", *extra])


def test_sample_crops_reads_the_box_with_context():
    img = torch.full((3, 64, 64), 110 / 255)
    img[:, 20:36, 10:26] = torch.tensor(RED).view(3, 1, 1) / 255
    x, y = sample_crops([img], [(0, [10.0, 20.0, 26.0, 36.0], 5)], 6, 32, (1.5, 1.5), np.random.default_rng(0))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [5] * 6
    rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    centre, corner = rgb[:, :, 14:18, 14:18].mean((0, 2, 3)), rgb[:, :, :3, :3].mean((0, 2, 3))
    torch.testing.assert_close(centre, torch.tensor(RED) / 255, atol=0.02, rtol=0)  # the box in the middle
    torch.testing.assert_close(corner, torch.full((3,), 110 / 255), atol=0.02, rtol=0)  # context around it


def test_pretrain_learns_base_classes_and_the_detector_loads_it(tmp_path):
    js = _coco(tmp_path)
    m = pretrain_backbone(_cfg(tmp_path, js, "det.backbone_pretrain.steps=30"), progress=False)
    assert m["classes"] == 2 and m["boxes"] == 8  # base only; the zero-area box skipped
    assert m["train_acc_last100"] > 0.9  # red square vs blue circle
    out = tmp_path / "run" / "backbone" / "base_crops.pth"
    assert m["out"] == str(out) and (out.parent / "metrics.json").is_file()
    sd = torch.load(out, weights_only=True)
    assert not any(k.startswith("fc.") for k in sd)
    bb = build_backbone("resnet18_fpn", str(out), 32, (2, 3, 4), freeze=False)
    torch.testing.assert_close(bb.body.conv1.weight, sd["conv1.weight"])
    assert all(p.requires_grad for p in bb.parameters())
    assert not any(isinstance(mod, misc_ops.FrozenBatchNorm2d) for mod in bb.modules())
    frozen = build_backbone("resnet18_fpn", str(out), 32, (2, 3, 4), freeze=True)  # torchvision's recipe
    assert isinstance(frozen.body.bn1, misc_ops.FrozenBatchNorm2d) and not frozen.body.conv1.weight.requires_grad
    assert frozen.body.layer2[0].conv1.weight.requires_grad
    rand = build_backbone("resnet18_fpn", "", 32, (2, 3, 4))
    assert isinstance(rand.body.bn1, nn.BatchNorm2d) and rand.body.conv1.weight.requires_grad


def test_bad_input(tmp_path):
    js = _coco(tmp_path, novel_only=True)
    with pytest.raises(DistillError, match="no base-class boxes"):
        pretrain_backbone(_cfg(tmp_path, js, "det.backbone_pretrain.steps=2"), progress=False)
    with pytest.raises(DistillError, match="ResNet FPN"):
        pretrain_backbone(_cfg(tmp_path, js, "det.backbone=mobilenet_v3_large_fpn"), progress=False)
    for bad in ("[1.5,1.2]", "[1.5]"):
        with pytest.raises(DistillError, match="context"):
            pretrain_backbone(_cfg(tmp_path, js, f"det.backbone_pretrain.context={bad}"), progress=False)


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_short_pretraining_runs(tmp_path, steps):
    """The quick pipeline pretrains for 10 steps: every short schedule runs (OneCycleLR's warm-up
    phase must not be empty)."""
    js = _coco(tmp_path)
    m = pretrain_backbone(_cfg(tmp_path, js, f"det.backbone_pretrain.steps={steps}", "det.backbone_pretrain.batch_size=4"), progress=False)
    assert m["steps"] == steps and (tmp_path / "run" / "backbone" / "base_crops.pth").is_file()


def test_killed_backbone_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The backbone pretraining runs on the training loop: killed after its step-3 checkpoint and
    resumed, it writes the weights of the uninterrupted run (the crop sampler's numpy generator is
    in the checkpoint); metrics.jsonl in base_crops_train/."""
    import functools

    import distill.detection.backbone as B
    from distill.config import TrainConfig

    js = _coco(tmp_path)
    monkeypatch.setattr(B, "TrainConfig", functools.partial(TrainConfig, checkpoint_period=3, log_period=1))
    steps = ("det.backbone_pretrain.steps=5", "det.train.device=cpu")
    m1 = pretrain_backbone(_cfg(tmp_path, js, *steps, f"work_dir={tmp_path}/a"), progress=False)
    draw = B.sample_crops
    calls = []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return draw(*a, **k)

    monkeypatch.setattr(B, "sample_crops", killed)
    cfg = _cfg(tmp_path, js, *steps, f"work_dir={tmp_path}/b")
    with pytest.raises(KeyboardInterrupt):
        pretrain_backbone(cfg, progress=False)
    monkeypatch.setattr(B, "sample_crops", draw)
    m2 = pretrain_backbone(cfg, progress=False, resume=True)
    a, b = torch.load(m1["out"], weights_only=True), torch.load(m2["out"], weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m1["final_loss"] == m2["final_loss"]
    rows = [json.loads(line) for line in (tmp_path / "b" / "backbone" / "base_crops_train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss_cls"] == m2["final_loss"]
