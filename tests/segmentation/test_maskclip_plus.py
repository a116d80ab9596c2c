"""MaskCLIP+ zero-shot pseudo-labels (MaskCLIP 3.3; the reference's maskclip_plus_head.py
assign_label): suppressed pixels take MaskCLIP's arg-max over the unseen classes during the
CLIP-guided steps, then the student's own arg-max over them; seen and ignored pixels are kept."""

import logging

import torch
import torch.nn.functional as F

from distill.config import load_config
from distill.segmentation.losses import IGNORE, remap_masks
from distill.segmentation.maskclip_plus import MaskClipPlusLabels
from distill.segmentation.train import train_seg
from distill.teacher.dense import maskclip_scores


class _Loop:
    def __init__(self, step):
        self.step = step


def _case(tiny_teacher):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, 4:12, 4:12] = 1  # seen
    masks[:, 16:28, 10:30] = 4  # unseen (suppressed)
    masks[:, 0, :] = IGNORE
    ids = torch.tensor([1, 2, 3, 4])  # the whole vocabulary: channel 1 + i
    text = F.normalize(torch.randn(4, tiny_teacher.embed_dim), dim=1)
    unseen_text = F.normalize(torch.randn(2, tiny_teacher.embed_dim), dim=1)  # two unseen classes, ids 4 and 3
    lab = MaskClipPlusLabels(tiny_teacher, unseen_text, [4, 3], [4, 3], clip_steps=5)
    return images, masks, remap_masks(masks, ids), text, unseen_text, lab


def test_clip_guided_then_self_training(tiny_teacher):
    images, masks, target, _, unseen_text, lab = _case(tiny_teacher)
    sup = masks == 4
    assert torch.equal(target[sup], torch.full_like(target[sup], 4))  # remapped, the id would leak as its label
    logits = torch.randn(2, 5, 32, 32)
    lab.before_train(_Loop(0))
    got = lab(images, masks, target, logits)
    want = torch.tensor([4, 3])[maskclip_scores(tiny_teacher, images, unseen_text, out_size=(32, 32)).argmax(1)]
    assert torch.equal(got[sup], want[sup])  # MaskCLIP's arg-max over the unseen classes only
    assert torch.equal(got[~sup], target[~sup])  # seen pixels and the ignored row are untouched
    assert bool((got[:, 0] == IGNORE).all())
    assert len(set(want[sup].tolist())) == 2  # the case really exercises both unseen classes
    lab.after_step(_Loop(5))  # past the CLIP-guided steps: the student labels itself
    got = lab(images, masks, target, logits)
    own = torch.tensor([4, 3])[logits[:, [4, 3]].argmax(1)]
    assert lab.phase == "self" and torch.equal(got[sup], own[sup]) and torch.equal(got[~sup], target[~sup])
    assert lab.suppressed_pixels == 2 * int(sup.sum())


def test_no_suppressed_pixels_leaves_the_target(tiny_teacher):
    images, masks, target, _, _, lab = _case(tiny_teacher)
    masks = masks.masked_fill(masks == 4, 0)
    t = remap_masks(masks, torch.tensor([1, 2, 3, 4]))
    assert torch.equal(lab(images, masks, t, torch.randn(2, 5, 32, 32)), t)


def test_train_seg_maskclip_plus(tiny_world, tiny_teacher, overrides, caplog):
    """Through train_seg: on masks that keep the unseen id the labeler fills pixels; on the
    base-only masks (unseen pixels already 255) it finds none and says so."""
    root, data = tiny_world
    for masks, warned in ((str(data / "semantic" / "train"), False), ("", True)):
        cfg = load_config("configs/shapes/lseg.yaml", overrides(root, data, **{"seg.maskclip_plus": "true", "seg.train_masks": masks,
                                                                                "seg.maskclip_plus_clip_fraction": 0.5}))
        with caplog.at_level(logging.WARNING, logger="distill"):
            caplog.clear()
            m = train_seg(cfg, teacher=tiny_teacher, progress=False)
        assert 0.0 <= m["miou/novel"] <= 1.0
        assert any("seg.maskclip_plus: no training mask held an unseen class id" in r.message for r in caplog.records) == warned
