"""Losses of the segmentation students: pure functions of tensors, finite on empty input.

- :func:`seg_ce_loss` LSeg's per-pixel cross entropy (LSeg section 3), ignore index 255;
- :func:`clipseg_bce_loss` CLIPSeg's per-query binary cross entropy (CLIPSeg section 3);
- :func:`pixel_distill_loss` pulls the student's per-pixel embeddings toward the teacher's MaskCLIP
  pixel embeddings over all pixels, labeled or not (the dense analogue of ViLD-image, ViLD 3.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.errors import DistillError

IGNORE = 255


def remap_masks(masks: torch.Tensor, class_ids: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Semantic ids -> channel indices: 0 -> 0 (background), ``class_ids[i]`` -> 1 + i, everything
    else (novel classes absent from the training vocabulary, 255) -> ``ignore_index``.

    masks: (B, H, W) int64; class_ids: (C,) int64 semantic-mask value of each vocabulary row.
    """
    lut = torch.full((256,), ignore_index, dtype=torch.long, device=masks.device)
    lut[0] = 0
    ids = class_ids.to(masks.device).long()
    if ids.numel():
        if int(ids.min()) < 1 or int(ids.max()) > 254:
            raise DistillError(f"class ids must be in 1..254 (0 = background, 255 = ignore), got {ids.tolist()[:10]}")
        lut[ids] = torch.arange(1, ids.numel() + 1, device=masks.device)
    m = masks.long()
    if m.numel() and (int(m.min()) < 0 or int(m.max()) > 255):
        raise DistillError(f"masks: values must be in 0..255, got {int(m.min())}..{int(m.max())}")
    return lut[m]


def seg_ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean cross entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored.

    logits: (B, K, H, W); target: (B, H, W) channel indices in [0, K) or ``ignore_index``.
    """
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def clipseg_bce_loss(logits: torch.Tensor, masks: torch.Tensor, class_ids: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Binary cross entropy of each query's mask (CLIPSeg section 3), ignored pixels excluded.

    logits: (B, Q, H, W) one mask logit map per query; masks: (B, H, W) semantic ids;
    class_ids: (Q,) or (B, Q) the semantic id each query stands for. The target of query q is
    ``masks == class_ids[q]``. Returns 0 (with a graph) when every pixel is ignored.
    """
    ids = class_ids.to(masks.device).long()
    ids = ids.view(1 if ids.ndim == 1 else ids.shape[0], -1, 1, 1)
    target = (masks.unsqueeze(1) == ids).float()
    valid = (masks != ignore_index).unsqueeze(1).expand_as(target)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return loss[valid].mean()


def pixel_distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between L2-normalised student and teacher per-pixel embeddings, over all pixels.

    student: (B, D, H, W); teacher: (B, D, h, w), resized (bilinear) to (H, W) and re-normalised;
    kind: ``cosine`` (mean of 1 - cos) or ``l1`` (mean over pixels of the L1 distance summed over D,
    as ViLD-image's L1 on embeddings). ``valid``: optional (B, H, W) bool of pixels to use (e.g.
    padding excluded). The teacher is detached: no gradient ever reaches it.
    """
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[:2] != teacher.shape[:2]:
        raise DistillError(f"pixel distillation: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be (B, D, H, W) with equal B, D")
    t = teacher.detach().float()
    if t.shape[-2:] != student.shape[-2:]:
        t = F.interpolate(t, size=student.shape[-2:], mode="bilinear", align_corners=False)
    t = F.normalize(t, dim=1)
    s = F.normalize(student.float(), dim=1)
    if kind == "cosine":
        per_pixel = 1.0 - (s * t).sum(1)
    elif kind == "l1":
        per_pixel = (s - t).abs().sum(1)
    else:
        raise DistillError(f"seg.distill_loss: {kind!r} is not one of cosine, l1")
    if valid is not None:
        per_pixel = per_pixel[valid]
    if per_pixel.numel() == 0:
        return student.sum() * 0.0
    return per_pixel.mean()
