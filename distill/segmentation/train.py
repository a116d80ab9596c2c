"""``distill train seg``: data and the training entry point of the segmentation students (LSeg,
CLIPSeg; built by :mod:`distill.segmentation.build`), on the shared engine (distill/engine/train.py).

Data: an image folder and a mask folder paired by file stem (``images/train/000001.png`` with
``semantic/train_base/000001.png``); masks are single-channel PNGs of semantic ids (0 =
background, c = category id of the vocabulary, 255 = ignore). ``data.masks`` replaces the training
mask folder (e.g. CAM pseudo-masks); images without a mask are skipped.

Outputs, in ``{work_dir}/seg/{seg.name}/``: ``config.yaml``, ``metrics.jsonl``, checkpoints,
``model_final.pt`` (student weights only: no vocabulary, no teacher), ``metrics.json`` (val mIoU
base / novel / all, hIoU, pixel accuracy).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.config import Config, save_config
from distill.errors import DistillError
from distill.files import write_json
from distill.segmentation.build import build_segmenter
from distill.vocab import resolve_vocab

log = logging.getLogger(__name__)

MASK_SUFFIX = ".png"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A single-channel label PNG -> (H, W) int64 (palette PNGs give their indices)."""
    from distill.eval.segmentation import read_label_png

    return read_label_png(Path(path))


def _read_list(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{p}: image list not found (expected one image stem a line)")
    return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


class SemSegFolder(Dataset):
    """(image (3, H, W) float in [0, 1], {"masks": (H, W) int64, "image_id": int}) pairs.

    Args:
        image_dir: folder of images (any of distill.data.images' extensions), matched by stem.
        mask_dir: folder of ``<stem>.png`` semantic masks; every mask needs an image.
        class_ids: the valid category ids (vocabulary ids); other values except 0 / 255 are an error.
        stems: optional subset (in this order).
        size: training crop size (albumentations: shorter side to ``size``, pad, random crop,
            horizontal flip) when ``augment``; else images are returned as they are.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        mask_dir: str | os.PathLike,
        class_ids: Sequence[int],
        stems: Sequence[str] | None = None,
        size: int = 0,
        augment: bool = False,
    ):
        from distill.data.images import is_image_name

        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for d, what in ((self.image_dir, "image"), (self.mask_dir, "mask")):
            if not d.is_dir():
                raise DistillError(f"{d}: {what} folder not found")
        images = {p.stem: p for p in sorted(self.image_dir.iterdir()) if is_image_name(p.name) and not p.name.startswith(".")}
        masks = {p.stem: p for p in sorted(self.mask_dir.glob("*" + MASK_SUFFIX)) if not p.name.startswith(".")}
        if stems is None:
            stems = sorted(masks)
            missing = [s for s in stems if s not in images]
            if missing:
                raise DistillError(f"{self.image_dir}: no image for mask {masks[missing[0]]} ({len(missing)} masks without an image)")
        else:
            stems = [s for s in stems if s in masks]
            missing = [s for s in stems if s not in images]
            if missing:
                raise DistillError(f"{self.image_dir}: no image for listed stem {missing[0]!r}")
        if not stems:
            raise DistillError(f"{self.mask_dir}: no masks (expected <stem>.png label maps matching images in {self.image_dir})")
        self.items = [(images[s], masks[s]) for s in stems]
        self.valid = np.zeros(256, dtype=bool)
        self.valid[[0, 255]] = True
        ids = [int(c) for c in class_ids]
        if any(c < 1 or c > 254 for c in ids):
            raise DistillError(f"vocabulary: category ids must be in 1..254 for PNG masks, got {ids[:10]}")
        self.valid[ids] = True
        self.size = int(size)
        self.augment = bool(augment)
        self._aug = self._build_aug() if augment and size else None

    def _build_aug(self):
        from distill.data.transforms import segmentation_crop_transforms

        return segmentation_crop_transforms(self.size, ignore_index=255)

    def __len__(self) -> int:
        return len(self.items)

    def image_id(self, i: int) -> int:
        stem = self.items[i][0].stem
        return int(stem) if stem.isdigit() else i

    def __getitem__(self, i: int):
        from distill.data.images import load_image

        ip, mp = self.items[i]
        img = load_image(ip)
        mask = read_mask(mp)
        if mask.shape != img.shape[:2]:
            raise DistillError(f"{mp}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {ip.name} is {img.shape[1]}x{img.shape[0]}")
        if mask.min() < 0 or mask.max() > 255 or not self.valid[mask].all():
            bad = sorted(set(np.unique(mask).tolist()) - set(np.flatnonzero(self.valid).tolist()))
            raise DistillError(f"{mp}: class ids {bad[:5]} are outside the vocabulary (expected 0 = background, 255 = ignore, or a category id)")
        if self._aug is not None:
            img, mask = self._aug(img, mask.astype(np.uint8))
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        return x, {"masks": torch.from_numpy(np.array(mask, dtype=np.int64)), "image_id": self.image_id(i)}


def collate(batch):
    """List of (image, target) -> (images (B, 3, H, W), {"masks": (B, H, W), "image_id": (B,)})."""
    images = torch.stack([b[0] for b in batch])
    masks = torch.stack([b[1]["masks"] for b in batch])
    ids = torch.tensor([b[1]["image_id"] for b in batch])
    return images, {"masks": masks, "image_id": ids}


@dataclass(frozen=True)
class SegPaths:
    train_images: Path
    train_masks: Path
    val_images: Path
    val_masks: Path


def seg_paths(cfg: Config) -> SegPaths:
    """The folders of a config (seg.* paths win; then data.masks; then the world's layout)."""
    s, d = cfg.seg, cfg.data
    return SegPaths(
        Path(s.train_images or Path(d.image_root) / "train"),
        Path(s.train_masks or d.masks or Path(d.semantic_root) / "train_base"),
        Path(s.val_images or Path(d.image_root) / "val"),
        Path(s.val_masks or Path(d.semantic_root) / "val"),
    )


def teacher_pixel_fn(teacher):
    """images (B, 3, H, W) -> the teacher's MaskCLIP pixel embeddings (B, D, H/2, W/2), the LSeg
    decoder's resolution (the distillation loss resizes them if they differ)."""
    from distill.teacher.dense import pixel_embeddings

    def fn(images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        return pixel_embeddings(teacher, images, out_size=(max(1, h // 2), max(1, w // 2))).to(images.device)

    return fn


def text_for(teacher, vocab, cfg: Config) -> torch.Tensor:
    """(C, D) text embeddings of ``vocab`` with ``teacher.templates`` (the templates themselves
    since the config was loaded: a missing template file is an error then; empty = the default
    templates), cached under the run."""
    from distill.teacher.text import text_embeddings

    return text_embeddings(teacher, vocab, cfg.teacher.templates, cache_dir=Path(cfg.work_dir) / "embeddings" / "text")


def maskclip_plus_labeler(cfg: Config, model, teacher, vocab, text: torch.Tensor):
    """MaskCLIP+ (segmentation/maskclip_plus.py): the student classifies over the whole vocabulary;
    the returned hook pseudo-labels the pixels of the unseen classes."""
    from distill.segmentation.maskclip_plus import MaskClipPlusLabels
    from distill.teacher.dense import refinements

    s = cfg.seg
    if s.arch != "lseg":
        raise DistillError(f"seg.maskclip_plus: implemented for seg.arch=lseg (the reference's per-pixel classifier), got {s.arch}")
    if not 0.0 <= s.maskclip_plus_clip_fraction <= 1.0:
        raise DistillError(f"seg.maskclip_plus_clip_fraction: expected a fraction in [0, 1], got {s.maskclip_plus_clip_fraction}")
    novel = vocab.novel_indices
    model.set_vocabulary(text, vocab.ids)
    labeler = MaskClipPlusLabels(teacher, text[novel], [vocab.ids[i] for i in novel], [1 + i for i in novel],
                                 clip_steps=round(s.maskclip_plus_clip_fraction * s.train.max_steps),
                                 **refinements(cfg.teacher))
    model.set_pseudo_labeler(labeler)
    return labeler


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def train_seg(cfg: Config, resume: bool = False, teacher=None, out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Train ``cfg.seg`` on base classes, evaluate on val with the full vocabulary, write
    ``metrics.json``; returns the metrics. ``teacher`` defaults to ``build_teacher(cfg.teacher)``."""
    from distill.engine.device import conv_memory_format, get_device
    from distill.engine.train import make_loader, seed_everything, train
    from distill.eval.segmentation import semseg_classes
    from distill.segmentation.infer import evaluate_model

    s = cfg.seg
    out = Path(out_dir) if out_dir else Path(cfg.work_dir) / "seg" / s.name
    dev = get_device(s.train.device)
    if teacher is None:
        from distill.teacher.clip import build_teacher

        teacher = build_teacher(cfg.teacher, device=dev)
    vocab = resolve_vocab(cfg.data, need_base=True)
    paths = seg_paths(cfg)
    text = text_for(teacher, vocab, cfg).float()
    base = vocab.base_indices
    train_ids = [vocab.ids[i] for i in base]

    seed_everything(s.train.seed)
    model = conv_memory_format(build_segmenter(s, teacher), dev)
    if not s.maskclip_plus:  # MaskCLIP+ classifies over the whole vocabulary (maskclip_plus_labeler sets it)
        model.set_vocabulary(text[base], train_ids)
    if getattr(model, "distill_weight", 0.0) > 0:
        model.set_distill_teacher(teacher_pixel_fn(teacher))
    hooks = []
    if s.maskclip_plus:
        hooks.append(maskclip_plus_labeler(cfg, model, teacher, vocab, text))

    stems = _read_list(s.train_list) if s.train_list else None
    ds = SemSegFolder(paths.train_images, paths.train_masks, vocab.ids, stems, size=s.image_size, augment=s.augment)
    loader = make_loader(ds, s.train, collate_fn=collate, num_workers=cfg.data.num_workers)

    val_stems = _read_list(s.val_list) if s.val_list else None
    val = SemSegFolder(paths.val_images, paths.val_masks, vocab.ids, val_stems) if paths.val_masks.is_dir() else None
    C, base_values, names = semseg_classes(vocab)  # in the PNG value space (0 = background)

    def eval_fn(m: torch.nn.Module) -> dict:
        if val is None:
            return {}
        return evaluate_model(m, val, text, vocab.ids, C, base_values, names, s.window, s.window_stride, s.eval_batch_size, s.max_eval_images)

    from distill.engine.hooks import BeforeTrain
    from distill.teacher.clip import student_meta

    trained = list(vocab.names) if s.maskclip_plus else [vocab.names[i] for i in base]  # MaskCLIP+ names the unseen classes too
    meta = student_meta(cfg, teacher, trained_classes=trained)
    final = train(model, loader, s.train, out, eval_fn=eval_fn if val is not None else None, resume=resume, device=dev, progress=progress, meta=meta,
                  hooks=[BeforeTrain(lambda: save_config(cfg, out / "config.yaml")), *hooks])  # once a --resume checkpoint fits
    if hooks and hooks[0].suppressed_pixels == 0:
        log.warning("seg.maskclip_plus: no training mask held an unseen class id, so nothing was pseudo-labelled "
                    "(point seg.train_masks at masks that keep the unseen ids, e.g. {data.semantic_root}/train)")
    metrics = {k: v for k, v in final.items()}
    write_json(out / "metrics.json", metrics)
    return metrics
