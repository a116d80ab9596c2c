"""Segmentation losses against brute-force references; finite on all-ignore input."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.segmentation.losses import clipseg_bce_loss, pixel_distill_loss, remap_masks, seg_ce_loss


def test_remap_masks():
    masks = torch.tensor([[0, 2, 7], [255, 5, 2]])
    out = remap_masks(masks, torch.tensor([2, 5]))  # novel 7 -> ignore
    assert out.tolist() == [[0, 1, 255], [255, 2, 1]]
    with pytest.raises(DistillError, match="1..254"):
        remap_masks(masks, torch.tensor([0, 2]))


def test_seg_ce_matches_loop_and_all_ignore():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0] = 255
    ref, n = 0.0, 0
    for b in range(2):
        for y in range(4):
            for x in range(5):
                t = int(target[b, y, x])
                if t == 255:
                    continue
                ref += -float(torch.log_softmax(logits[b, :, y, x].detach(), 0)[t])
                n += 1
    assert seg_ce_loss(logits, target).item() == pytest.approx(ref / n, rel=1e-5)
    z = seg_ce_loss(logits, torch.full_like(target, 255))
    assert z.item() == 0.0 and math.isfinite(z.item())
    z.backward()  # a graph even when empty
    assert logits.grad.abs().sum() == 0


def test_clipseg_bce_matches_loop_and_all_ignore():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    masks = torch.randint(0, 4, (2, 4, 4))
    masks[1, :2] = 255
    ids = torch.tensor([1, 3, 2])
    vals = []
    for b in range(2):
        for q in range(3):
            for y in range(4):
                for x in range(4):
                    if masks[b, y, x] == 255:
                        continue
                    t = float(masks[b, y, x] == ids[q])
                    p = torch.sigmoid(logits[b, q, y, x])
                    vals.append(-(t * torch.log(p) + (1 - t) * torch.log(1 - p)))
    assert clipseg_bce_loss(logits, masks, ids).item() == pytest.approx(float(torch.stack(vals).mean()), rel=1e-5)
    # per-image query ids (B, Q)
    ids2 = torch.tensor([[1, 3, 2], [2, 2, 1]])
    l2 = clipseg_bce_loss(logits, masks, ids2)
    l2_ref = torch.stack([clipseg_bce_loss(logits[b : b + 1], masks[b : b + 1], ids2[b]) * (masks[b] != 255).sum() for b in range(2)]).sum() / (masks != 255).sum()
    assert l2.item() == pytest.approx(l2_ref.item(), rel=1e-5)
    assert clipseg_bce_loss(logits, torch.full_like(masks, 255), ids).item() == 0.0


def test_pixel_distill_cosine_and_l1():
    torch.manual_seed(0)
    s = torch.randn(2, 8, 6, 6)
    t = torch.randn(2, 8, 3, 3)
    tu = F.normalize(F.interpolate(t, size=(6, 6), mode="bilinear", align_corners=False), dim=1)
    sn = F.normalize(s, dim=1)
    cos_ref = (1 - (sn * tu).sum(1)).mean()
    l1_ref = (sn - tu).abs().sum(1).mean()
    assert pixel_distill_loss(s, t, "cosine").item() == pytest.approx(cos_ref.item(), rel=1e-5)
    assert pixel_distill_loss(s, t, "l1").item() == pytest.approx(l1_ref.item(), rel=1e-5)
    assert pixel_distill_loss(s, s * 3.0, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    valid = torch.zeros(2, 6, 6, dtype=torch.bool)
    assert pixel_distill_loss(s, t, "cosine", valid=valid).item() == 0.0
    with pytest.raises(DistillError, match="cosine, l1"):
        pixel_distill_loss(s, t, "l2")
