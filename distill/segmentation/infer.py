"""Inference for the segmentation students on any vocabulary: whole-image or sliding-window
logits, label maps, PNG output and streaming mIoU evaluation.

Every student here maps ``(images (B, 3, H, W) in [0, 1], text (C, D))`` to semantic logits
``(B, 1 + C, H, W)`` whose channel 0 is background and channel ``1 + i`` is vocabulary class ``i``
(LSeg: scaled cosine; CLIPSeg: mask logits + a constant background logit). Labels written to PNGs
are semantic ids: 0 = background, ``class_ids[i]`` for channel ``1 + i``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import DistillError


def model_logits(model: torch.nn.Module, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One forward of an LSeg / CLIPSeg student: (B, 3, H, W), (C, D) -> (B, 1 + C, H, W)."""
    if hasattr(model, "classify"):  # LSeg
        return model.logits(images, text)
    return model.semantic_logits(images, text)  # CLIPSeg


def _windows(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def sliding_window_logits(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, window: int, stride: int = 0
) -> torch.Tensor:
    """Average ``fn``'s logits over overlapping ``window`` x ``window`` crops (as mmseg's
    ``slide_inference``): windows start every ``stride`` pixels (default 2/3 of the window) and
    the last one is aligned to the border; an image smaller than the window is padded (replicate)
    and the padding cropped away. fn: (B, 3, h, w) -> (B, K, h, w). Returns (B, K, H, W)."""
    if window <= 0:
        return fn(images)
    stride = stride or max(1, (window * 2) // 3)
    b, _, h, w = images.shape
    ph, pw = max(0, window - h), max(0, window - w)
    x = F.pad(images, (0, pw, 0, ph), mode="replicate") if (ph or pw) else images
    H, W = x.shape[-2:]
    out = None
    count = torch.zeros(1, 1, H, W, device=images.device)
    for y0 in _windows(H, window, stride):
        for x0 in _windows(W, window, stride):
            crop = x[:, :, y0 : y0 + window, x0 : x0 + window]
            lo = fn(crop)
            if out is None:
                out = torch.zeros(b, lo.shape[1], H, W, device=images.device, dtype=lo.dtype)
            out[:, :, y0 : y0 + window, x0 : x0 + window] += lo
            count[:, :, y0 : y0 + window, x0 : x0 + window] += 1
    return (out / count)[:, :, :h, :w]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, text: torch.Tensor, window: int = 0, stride: int = 0) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1], text (C, D) -> (B, 1 + C, H, W); ``window > 0``: sliding window."""
    if text.ndim != 2 or text.shape[0] == 0:
        raise DistillError(f"vocabulary: expected (C, D) text embeddings with C >= 1, got {tuple(text.shape)}")
    was = model.training
    model.eval()
    try:
        return sliding_window_logits(lambda x: model_logits(model, x, text), images, window, stride)
    finally:
        model.train(was)


def logits_to_labels(logits: torch.Tensor, class_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(B, 1 + C, H, W) -> (B, H, W) int64 semantic ids (argmax; channel 0 -> 0, 1 + i -> ids[i])."""
    ids = torch.as_tensor(list(class_ids) if not torch.is_tensor(class_ids) else class_ids, dtype=torch.long)
    if logits.shape[1] != ids.numel() + 1:
        raise DistillError(f"logits have {logits.shape[1]} channels for {ids.numel()} classes + background")
    lut = torch.cat([torch.zeros(1, dtype=torch.long), ids]).to(logits.device)
    return lut[logits.argmax(1)]


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """(H, W) semantic ids 0..255 -> a single-channel PNG, atomically."""
    from PIL import Image

    from distill.files import atomic_path

    if labels.max(initial=0) > 255 or labels.min(initial=0) < 0:
        raise DistillError(f"{path}: label ids must fit in 0..255 for a PNG")
    with atomic_path(path) as tmp:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(tmp, format="PNG")


@torch.no_grad()
def segment_folder(
    model: torch.nn.Module,
    images: str | os.PathLike,
    text: torch.Tensor,
    class_ids: Sequence[int],
    out_dir: str | os.PathLike,
    window: int = 0,
    stride: int = 0,
    device: torch.device | str | None = None,
) -> list[Path]:
    """Predict every image of a folder / list file (see ``distill.data.images.list_images``) with
    the vocabulary ``text`` (C, D) / ``class_ids`` (C,), writing ``out_dir/<relative name>.png``
    (semantic ids). One image at a time, so sizes may differ. Returns the written paths."""
    from distill.data.images import list_images, load_image, relative_names

    paths = list_images(images)
    names = relative_names(images, paths)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    text = text.to(dev)
    out, written = Path(out_dir), []
    for p, name in zip(paths, names):
        x = _to_tensor(load_image(p))[None].to(dev)
        lab = logits_to_labels(predict_logits(model, x, text, window, stride), class_ids)[0]
        dst = out / (str(Path(name).with_suffix("")) + ".png")
        write_label_png(dst, lab.cpu().numpy())
        written.append(dst)
    return written


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataset,
    text: torch.Tensor,
    class_ids: Sequence[int],
    num_classes: int,
    base: Sequence[int],
    names: Sequence[str] | None = None,
    window: int = 0,
    stride: int = 0,
    batch_size: int = 8,
    max_images: int = 0,
) -> dict[str, float]:
    """Stream ``dataset`` ((image (3, H, W), {"masks": (H, W)}) items) through the model and a
    :class:`~distill.eval.segmentation.SemSegEvaluator`; returns its metrics (mIoU base / novel /
    all, hIoU, pixel accuracy, per-class IoU)."""
    from distill.eval.segmentation import SemSegEvaluator

    ev = SemSegEvaluator(num_classes, base, names=names, gather=False)  # one process evaluates the whole set
    dev = next(model.parameters()).device
    text = text.to(dev)
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    i = 0
    while i < n:
        items = [dataset[j] for j in range(i, min(n, i + batch_size))]
        i += len(items)
        same = len({tuple(im.shape) for im, _ in items}) == 1
        groups = [items] if same else [[it] for it in items]
        for g in groups:
            x = torch.stack([im for im, _ in g]).to(dev)
            labels = logits_to_labels(predict_logits(model, x, text, window, stride), class_ids).cpu()
            for lab, (_, t) in zip(labels, g):
                ev.process(lab, t["masks"])
    return ev.evaluate()
