"""OADP's distillation pyramid on the ViLD student (Wang et al., CVPR 2023, 3.3;
github.com/LutingWang/OADP ``oadp/dp/detectors.py`` ``GlobalHead``, ``roi_heads.py``
``OADPRoIHead.block_forward_train``; weights in ``configs/dp/models/global_.py`` / ``block.py``).

Beside ViLD's object distillation (the region embeddings of proposals), two coarser levels carry
the relations between objects that single objects miss:

- **global**: the last FPN level, mean-pooled, through a linear layer into the teacher's space, is
  pulled to the teacher's embedding of the whole image (MSE summed over the embedding and over the
  reference's 2 images per GPU, weight 0.5);
- **block**: RoIAlign of the image blocks (:mod:`distill.teacher.pyramid`) through a box head of
  the detector's architecture and a linear layer (``fc_cls._linear``), pulled to the teacher's
  block embeddings by L1 (weight 128) and, over all blocks of the batch, by the MSE of their
  cosine-relation matrices (todd ``RKDLoss`` as OADP registers it, weight 8).

Each weight ramps up linearly over ``det.pyramid_warmup`` steps (todd ``WarmupScheduler``). The
global and block heads' multi-label classification losses of the reference (asymmetric loss on
image / block labels) are not part of the distillation and are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REF_IMAGES_PER_GPU = 2  # configs/dp/datasets/ov_coco.py samples_per_gpu: the global MSE sums over them


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the (N, N) cosine-similarity matrices of the student's and the teacher's rows
    (OADP's ``RKDLoss``: ``F.normalize`` each, ``einsum('m c, n c -> m n')``, ``MSELoss``)."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return F.mse_loss(s @ s.t(), t @ t.t())


class PyramidHeads(nn.Module):
    """The global projection and the block head. ``forward(features, block_rois, image_shapes,
    global_targets, block_targets)`` -> dict of the weighted losses (those whose weight is > 0)."""

    def __init__(self, det, box_roi_pool: nn.Module, embed_dim: int, in_channels: int) -> None:
        super().__init__()
        from distill.detection.build import build_box_head

        self.global_weight = float(det.global_weight)
        self.block_weight = float(det.block_weight)
        self.relation_weight = float(det.block_relation_weight)
        self.warmup = int(det.pyramid_warmup)
        self._pool = (box_roi_pool,)  # the detector's own RoIAlign (shared; a tuple: not a second submodule)
        self.global_proj = nn.Linear(in_channels, embed_dim) if self.global_weight > 0 else None
        if self.block_weight > 0 or self.relation_weight > 0:
            self.block_head = build_box_head(det, in_channels)
            self.block_proj = nn.Linear(det.box_head_dim, embed_dim)
        else:
            self.block_head = self.block_proj = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # for the warm-up; saved with the weights

    def ramp(self) -> float:
        return 1.0 if self.warmup <= 0 else min(1.0, float(self.steps) / self.warmup)

    def forward(self, features: dict, blocks: list[torch.Tensor], image_shapes, global_targets: torch.Tensor | None,
                block_targets: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        ramp = self.ramp()
        if self.training:
            self.steps += 1
        losses: dict[str, torch.Tensor] = {}
        if self.global_proj is not None and global_targets is not None:
            last = list(features.values())[-1]  # GlobalHead: feats[-1], mean over h, w
            emb = self.global_proj(last.mean(dim=(2, 3)))
            per_image = ((emb - global_targets.to(emb)) ** 2).sum(dim=1)
            losses["loss_global"] = ramp * self.global_weight * per_image.mean() * REF_IMAGES_PER_GPU
        if self.block_head is not None and block_targets is not None:
            n = sum(len(b) for b in blocks)
            if n == 0:
                zero = sum(p.sum() for p in self.block_proj.parameters()) * 0.0
                losses.update(loss_block=zero, loss_block_relation=zero)
                return losses
            pooled = self._pool[0](features, blocks, image_shapes)
            emb = self.block_proj(self.block_head(pooled))
            target = torch.cat(block_targets).to(emb)
            losses["loss_block"] = ramp * self.block_weight * F.l1_loss(emb, target)
            losses["loss_block_relation"] = ramp * self.relation_weight * relation_loss(emb, target)
        return losses
