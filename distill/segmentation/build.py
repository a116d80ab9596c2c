"""Builders of the segmentation students: explicit functions that take the ``seg`` section
(:class:`distill.config.SegConfig`) and the teacher.

- :func:`build_lseg_student` - LSeg (:mod:`distill.segmentation.lseg`);
- :func:`build_clipseg_student` - CLIPSeg (:mod:`distill.segmentation.clipseg`);
- :func:`build_segmenter` - the one ``seg.arch`` names;
- :func:`load_segmenter` - a trained student from its ``model_final.pt``.

Both students take images (B, 3, H, W) float in [0, 1] and return semantic logits (B, 1 + C, H,
W) (channel 0 = background) for the class text embeddings set with ``set_vocabulary``.
"""

from __future__ import annotations

import os

import torch

from distill.config import SegConfig
from distill.errors import DistillError


def _encoder(seg: SegConfig, teacher) -> tuple[int, torch.nn.Module]:
    """(embedding size, image tower) a student of ``seg`` is built on: the teacher's own tower, or
    its dense tower (the CLIPSelf tower) for ``seg.backbone=dense_tower``."""
    dim = seg.embed_dim or teacher.embed_dim
    if dim != teacher.embed_dim:
        raise DistillError(f"seg.embed_dim: {dim} differs from the teacher's text embedding size {teacher.embed_dim} (use 0)")
    if seg.backbone != "dense_tower":
        return dim, teacher.model.visual
    if getattr(teacher, "dense_tower", None) is None:
        raise DistillError("seg.backbone=dense_tower: the teacher has no dense tower (set teacher.dense_tower "
                           "to the file `distill teacher clipself` writes)")
    return dim, teacher.dense_tower


def build_lseg_student(seg: SegConfig, teacher) -> torch.nn.Module:
    """LSeg on the encoder ``seg.backbone`` (the teacher's tower, its dense tower, or a torchvision
    network), with pixel distillation from the teacher when ``seg.distill_weight`` > 0."""
    from distill.segmentation.lseg import build_lseg

    dim, visual = _encoder(seg, teacher)
    return build_lseg(dim, seg.backbone, visual=visual, mean=teacher.mean, std=teacher.std, finetune=seg.finetune_backbone,
                      features=seg.features, pretrained_backbone=seg.pretrained_backbone, distill_weight=seg.distill_weight,
                      distill_loss=seg.distill_loss, logit_scale=seg.logit_scale, head_block=seg.head_block,
                      head_block_depth=seg.head_block_depth, head_block_activation=seg.head_block_activation)


def build_clipseg_student(seg: SegConfig, teacher) -> torch.nn.Module:
    """CLIPSeg: a decoder over the frozen teacher tower (or its dense tower) conditioned on the
    class text embeddings."""
    from distill.segmentation.clipseg import build_clipseg

    dim, visual = _encoder(seg, teacher)
    if seg.distill_weight > 0:
        raise DistillError("seg.distill_weight: pixel distillation applies to arch=lseg (CLIPSeg predicts masks, not embeddings)")
    return build_clipseg(visual, teacher.mean, teacher.std, dim, layers=seg.clipseg_layers, reduce_dim=seg.clipseg_reduce_dim,
                         heads=seg.clipseg_heads, hidden=seg.clipseg_hidden, complex_head=seg.clipseg_complex_head,
                         bg_thresh=seg.bg_thresh, queries_per_image=seg.clipseg_queries)


ARCHS = {"lseg": build_lseg_student, "clipseg": build_clipseg_student}


def build_segmenter(seg: SegConfig, teacher) -> torch.nn.Module:
    """The student ``seg.arch`` names (``lseg`` | ``clipseg``) for this ``teacher``."""
    if seg.arch not in ARCHS:
        raise DistillError(f"seg.arch: {seg.arch!r} is not one of {', '.join(ARCHS)}")
    return ARCHS[seg.arch](seg, teacher)


def load_segmenter(seg: SegConfig, teacher, path: str | os.PathLike) -> torch.nn.Module:
    """The student of ``seg`` with the weights of ``path`` (``model_final.pt`` or a training
    checkpoint, read through :mod:`distill.engine.checkpoint`), in eval mode."""
    from distill.engine import checkpoint

    model = build_segmenter(seg, teacher)
    state = checkpoint.read(path)
    checkpoint.load_model_state(model, state["model"], str(path))
    return model.eval()
