"""Pseudo-labels: label any image folder with any vocabulary, in resumable shards.

>>> summary = label(cfg)     # cfg.label.images / vocab / model / source / out ...

Sources (``cfg.label.source``), each a callable ``source(images) -> list[dict]`` on a list of
(3, H, W) uint8 CPU tensors, returning per image ``boxes`` (N, 4) float XYXY absolute pixels,
``scores`` (N,), ``labels`` (N,) int64 vocabulary indices and optionally ``masks`` (N, H, W) bool:

- ``teacher`` (zero-shot, :class:`TeacherSource`): class-agnostic boxes scored by the frozen
  teacher's crop embeddings (ViLD, Gu et al. 2022, section 3.2: 1x and 1.5x crops, summed and
  normalised, in :func:`distill.teacher.regions.region_embeddings`) against the class text
  embeddings, softmax over the classes plus optional background prompts. When no detector is
  given, boxes come from :func:`component_proposals`: connected components of saturated colour,
  split into hue bins at two offsets (so a hue near a bin edge is whole in one of them), each with
  its component mask; ``windows`` adds multi-scale sliding windows (mask = the box). This box
  generator suits images of coloured objects on muted backgrounds (the shapes world); for photos
  use ``proposals=rpn`` with a ViLD checkpoint, or windows;
- ``vild`` and ``seg``: the students (see :func:`build_source`).

Working resolution (teacher source): an image whose longer side exceeds ``label.max_side`` is
decoded at that size (:func:`~distill.data.images.load_image_scaled`; a JPEG is never decoded at
full size); candidates (kept as boxes + box-limited masks, :class:`BoxMasks`, the top
``max_proposals`` chosen before any mask is cut out) and the teacher's crops come from it, and
:func:`to_full_size` maps boxes and masks to the full image, so COCO / YOLO / PNG outputs are in
full-image pixels and peak memory is bounded by the working size, not the photo's (full-size
arrays: the semantic PNG and one mask at a time while it is RLE-encoded or painted). Candidate
``min_area`` is in working pixels; the filter's ``min_area`` in full-image pixels. Images within
``max_side`` take exactly the full-size path.

Work is split into shards of ``shard_size`` consecutive images of the sorted list; under torchrun
rank ``r`` of ``W`` takes shards ``r, r + W, ...`` (rank-strided shards rather than strided
images, so a rerun with a different world size reuses every finished shard). Each shard is written
atomically to ``<out>/shards/shard-NNNNN.json`` with a key of everything that determines it; a
rerun skips shards whose key matches, so a killed run resumes and the merged result equals an
uninterrupted run's (batches never cross shard boundaries, so each shard sees the same batches).
Rank 0 then streams the shards into ``<out>/labels.json`` (COCO), ``<out>/yolo/`` and
``<out>/failures.txt``; semantic PNGs are written per image with the shard (a shard whose PNGs were
deleted is labeled again on rerun). ``<out>/skipped.txt`` names what the folder listing left out
(hidden entries, links to folders, GIFs and other non-images), counted in the summary.

The output folder is the labeler's (:func:`check_output`): it must not nest with the image folder,
a non-empty folder it did not write is refused, and ``<out>/manifest.json`` lists what the last
complete run wrote; files of an earlier run that this one does not write (another image folder's
PNG / YOLO files, another format) are removed when the run completes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from distill.data.images import SKIP_FOLDER_LINK, SKIP_HIDDEN, SKIP_UNSUPPORTED, load_image, load_image_scaled, relative_names, scan_images
from distill.errors import DistillError
from distill.files import atomic_path, safe_join, sha256_json, write_json, write_text
from distill.labels import formats
from distill.vocab import Vocabulary, load_vocab

log = logging.getLogger(__name__)

FORMATS = ("coco", "yolo", "png")
SOURCES = ("vild", "seg", "teacher")
PROPOSALS = ("auto", "components", "windows", "components+windows", "rpn")
LABELS_JSON = "labels.json"
SHARD_VERSION = 1
# The output folder is the labeler's (see :func:`check_output`): what a run writes there, by name.
MANIFEST = "manifest.json"
SKIPPED_TXT = "skipped.txt"
OUTPUT_FILES = (LABELS_JSON, "failures.txt", SKIPPED_TXT, "summary.json", "metrics.json", "config.yaml", MANIFEST)
OUTPUT_DIRS = ("shards", "semantic", "yolo")
MANIFEST_TOOL = "distill label"


# ------------------------------------------------------------------------------------ filtering


@dataclass(frozen=True)
class FilterOptions:
    """How raw predictions become labels (recorded in the output's ``info``).

    ``class_thresh`` maps vocabulary index -> score threshold (overrides ``score_thresh``);
    ``nms`` is the class-wise IoU threshold (0 or >= 1 = off); ``min_area`` in pixels (mask area
    when masks exist, else box area); ``top_k`` per image after NMS (0 = all).
    """

    score_thresh: float = 0.3
    class_thresh: tuple[tuple[int, float], ...] = ()
    top_k: int = 100
    nms: float = 0.5
    min_area: float = 16.0

    def info(self, vocab: Vocabulary) -> dict:
        return {
            "score_thresh": self.score_thresh,
            "class_thresh": {vocab.names[i]: t for i, t in self.class_thresh},
            "top_k": self.top_k,
            "nms": self.nms,
            "min_area": self.min_area,
        }


def parse_class_thresh(items: Sequence[str], vocab: Vocabulary, where: str = "label.class_thresh") -> tuple[tuple[int, float], ...]:
    """``["red star=0.5", "blue circle=0.2"]`` (or one comma-separated string) -> ((index, thr), ...).

    A prompt that maps onto a class (a synonym) names that class."""
    out: dict[int, float] = {}
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise DistillError(f"{where}: {part!r}: expected 'class name=threshold'")
            name, val = (x.strip() for x in part.rsplit("=", 1))
            try:
                thr = float(val)
            except ValueError:
                raise DistillError(f"{where}: {part!r}: threshold {val!r} is not a number") from None
            if not 0.0 <= thr <= 1.0:
                raise DistillError(f"{where}: {part!r}: threshold must be in [0, 1]")
            try:
                idx = vocab.index(name)
            except DistillError as e:
                raise DistillError(f"{where}: {e}") from None
            out[idx] = thr
    return tuple(sorted(out.items()))


def filter_predictions(pred: dict, opts: FilterOptions, num_classes: int) -> dict:
    """Thresholds (global / per class), minimum area, class-wise NMS, top-k; sorted by score.

    ``pred``: ``boxes`` (N, 4) XYXY, ``scores`` (N,), ``labels`` (N,) int64, optional ``masks``
    (N, H, W) bool (or :class:`BoxMasks`). One boolean keep-mask is applied to every field (SAM's ``MaskData.filter``).
    """
    boxes = pred["boxes"].float().reshape(-1, 4)
    scores = pred["scores"].float().reshape(-1)
    labels = pred["labels"].long().reshape(-1)
    n = scores.numel()
    thr = torch.full((num_classes,), float(opts.score_thresh))
    for i, t in opts.class_thresh:
        thr[i] = t
    keep = scores >= thr[labels] if n else torch.zeros(0, dtype=torch.bool)
    masks = pred.get("masks")
    if isinstance(masks, BoxMasks):
        area = masks.areas() if n else torch.zeros(0)
    elif masks is not None:
        area = masks.reshape(n, -1).sum(1).float() if n else torch.zeros(0)
    else:
        area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep &= area >= opts.min_area
    idx = torch.nonzero(keep).flatten()
    if idx.numel() and 0.0 < opts.nms < 1.0:
        k = torchvision.ops.batched_nms(boxes[idx], scores[idx], labels[idx], opts.nms)
        idx = idx[k]
    # Deterministic order: score descending, ties by original index.
    idx = idx.sort().values
    sel = idx[torch.sort(-scores[idx], stable=True).indices]
    if opts.top_k > 0:
        sel = sel[: opts.top_k]
    out = {"boxes": boxes[sel], "scores": scores[sel], "labels": labels[sel]}
    if masks is not None:
        out["masks"] = masks[sel]
    return out


# ------------------------------------------------------------------------------------ proposals


class BoxMasks:
    """Instance masks kept box-limited: mask ``i`` is ``parts[i]``, a ``(y1 - y0, x1 - x0)`` bool
    array at the integer box ``boxes[i]`` of an image of ``size`` (h, w) (where it was made), read
    at ``out_size`` (H, W; default ``size``): an output pixel takes the value of the pixel its centre
    falls in (nearest neighbour). A full (H, W) mask is only made on request, one at a time
    (``masks[i]``, :meth:`rle`); areas are exact in output pixels without making it.

    Behaves like an (N, H, W) bool array where the labeler needs one: ``masks[i]`` (an int) is
    mask ``i`` as an (H, W) numpy array, ``masks[idx]`` (indices) a subset, ``.numpy()`` itself."""

    def __init__(self, boxes, parts: list[np.ndarray], size: tuple[int, int], out_size: tuple[int, int] | None = None) -> None:
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        self.parts = list(parts)
        self.size = (int(size[0]), int(size[1]))
        self.out_size = (int(out_size[0]), int(out_size[1])) if out_size is not None else self.size

    @classmethod
    def from_dense(cls, masks) -> "BoxMasks":
        """(N, H, W) bool -> box-limited (each part cut to its mask's bounding box)."""
        m = np.asarray(masks, dtype=bool)
        boxes, parts = [], []
        for x in m:
            ys, xs = np.nonzero(x.any(1))[0], np.nonzero(x.any(0))[0]
            if len(ys) == 0:
                boxes.append([0, 0, 0, 0])
                parts.append(np.zeros((0, 0), bool))
                continue
            y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
            boxes.append([x0, y0, x1, y1])
            parts.append(x[y0:y1, x0:x1].copy())
        return cls(np.asarray(boxes).reshape(-1, 4), parts, m.shape[1:3])

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), *self.out_size)

    def numpy(self) -> "BoxMasks":
        return self

    def at(self, out_size: tuple[int, int]) -> "BoxMasks":
        """The same masks read at another output size (the full image's)."""
        return BoxMasks(self.boxes, self.parts, self.size, out_size)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.ndim == 0):
            return self.full(int(idx))
        if isinstance(idx, slice):
            sel = list(range(len(self)))[idx]
        else:
            sel = [int(i) for i in (idx.tolist() if hasattr(idx, "tolist") else idx)]
        return BoxMasks(self.boxes[sel] if sel else np.zeros((0, 4), np.int64), [self.parts[i] for i in sel], self.size, self.out_size)

    @staticmethod
    def _axis(a0: int, a1: int, n: int, N: int) -> tuple[int, int, np.ndarray]:
        """Output range [A0, A1) whose pixel centres fall in input [a0, a1) (n -> N pixels) and
        the input index (relative to a0) of each."""
        if n == N:
            return a0, a1, np.arange(a1 - a0)
        # centre (A + 0.5) * n / N in [a0, a1)  <=>  (2A + 1) n >= 2 a0 N  and  < 2 a1 N
        A0 = -((n - 2 * a0 * N) // (2 * n))
        A1 = -((n - 2 * a1 * N) // (2 * n))
        A0, A1 = max(0, min(N, A0)), max(0, min(N, A1))
        src = ((2 * np.arange(A0, A1, dtype=np.int64) + 1) * n) // (2 * N) - a0
        return A0, A1, np.clip(src, 0, max(0, a1 - a0 - 1))

    def _mapped(self, i: int) -> tuple[int, int, int, int, np.ndarray]:
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        (h, w), (H, W) = self.size, self.out_size
        Y0, Y1, ry = self._axis(y0, y1, h, H)
        X0, X1, rx = self._axis(x0, x1, w, W)
        part = self.parts[i]
        if part.size and (len(ry) != part.shape[0] or len(rx) != part.shape[1] or self.size != self.out_size):
            part = part[np.ix_(ry, rx)]
        return Y0, Y1, X0, X1, part

    def area(self, i: int) -> int:
        """Pixels of mask ``i`` at the output size."""
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        part = self.parts[i]
        if self.size == self.out_size or not part.size:
            return int(part.sum())
        (h, w), (H, W) = self.size, self.out_size
        _, _, ry = self._axis(y0, y1, h, H)
        _, _, rx = self._axis(x0, x1, w, W)
        rows = np.bincount(ry, minlength=part.shape[0]).astype(np.int64)  # output rows per input row
        cols = np.bincount(rx, minlength=part.shape[1]).astype(np.int64)
        return int(rows @ part.astype(np.int64) @ cols)

    def areas(self) -> torch.Tensor:
        return torch.tensor([float(self.area(i)) for i in range(len(self))], dtype=torch.float32)

    def full(self, i: int, dtype=bool, order: str = "C") -> np.ndarray:
        """Mask ``i`` as an (H, W) array at the output size."""
        m = np.zeros(self.out_size, dtype, order=order)
        Y0, Y1, X0, X1, part = self._mapped(i)
        if part.size:
            m[Y0:Y1, X0:X1] = part
        return m

    def rle(self, i: int) -> dict:
        """COCO RLE of mask ``i`` at the output size (as :func:`formats.mask_to_rle`)."""
        from pycocotools import mask as mask_utils

        r = mask_utils.encode(self.full(i, np.uint8, "F"))
        return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def component_candidates(
    image: np.ndarray,
    *,
    min_area: float = 16.0,
    max_boxes: int = 100,
    sat_min: float = 0.4,
    val_min: float = 0.45,
    hue_bin: float = 20.0,
    windows: bool = False,
) -> tuple[np.ndarray, BoxMasks]:
    """:func:`component_proposals` with box-limited masks (:class:`BoxMasks`): every component is
    first kept as its box, area and where it came from; the ``max_boxes`` kept after the
    duplicate removal are the only masks ever cut out (one pass over their hue bins again), so
    memory is the image's own (a few arrays of its size) whatever the number of components."""
    h, w = image.shape[:2]
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)  # H, S, V in 0..255
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    chroma = (hsv[..., 1] >= sat_min * 255) & (hsv[..., 2] >= val_min * 255)
    del hsv
    kernel = np.ones((3, 3), np.uint8)
    nbins = max(1, int(round(360.0 / hue_bin)))
    offsets = (0.0, hue_bin / 2)

    def labels_of(o: int, b: int, bins: np.ndarray | None = None):
        if bins is None:
            bins = (((hue + offsets[o]) % 360.0) // hue_bin).astype(np.int32) % nbins
        m = (chroma & (bins == b)).astype(np.uint8)
        if int(m.sum()) < min_area:
            return None
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel)
        return cv2.connectedComponentsWithStats(m, connectivity=8)

    boxes: list[list[float]] = []
    areas: list[float] = []
    origin: list[tuple[int, int, int]] = []  # (offset, bin, component) or (-1, 0, 0) for a window
    for o in range(len(offsets)):
        bins = (((hue + offsets[o]) % 360.0) // hue_bin).astype(np.int32) % nbins
        for b in range(nbins):
            res = labels_of(o, b, bins)
            if res is None:
                continue
            n, _, stats, _ = res
            for k in range(1, n):
                x, y, bw, bh, area = (int(v) for v in stats[k])
                if area < min_area:
                    continue
                boxes.append([x, y, x + bw, y + bh])
                areas.append(float(area))
                origin.append((o, b, k))
        del bins
    if windows:
        for frac in (0.25, 0.5):
            sw, sh = max(1, int(round(w * frac))), max(1, int(round(h * frac)))
            for y in range(0, max(1, h - sh + 1), max(1, sh // 2)):
                for x in range(0, max(1, w - sw + 1), max(1, sw // 2)):
                    boxes.append([x, y, x + sw, y + sh])
                    # the window's mask is its box, clipped to the image (as the full mask was)
                    areas.append(float((min(h, y + sh) - y) * (min(w, x + sw) - x)))
                    origin.append((-1, 0, 0))
    if not boxes:
        return np.zeros((0, 4), np.float32), BoxMasks(np.zeros((0, 4)), [], (h, w))
    bt = torch.tensor(boxes, dtype=torch.float32)
    keep = torchvision.ops.nms(bt, torch.tensor(areas), 0.9)  # larger first, near-duplicates dropped
    keep = keep[:max_boxes].tolist()
    parts: dict[int, np.ndarray] = {}
    wanted: dict[tuple[int, int], list[int]] = {}
    for i in keep:
        o, b, _ = origin[i]
        if o < 0:
            x0, y0, x1, y1 = boxes[i]
            parts[i] = np.ones((min(h, y1) - y0, min(w, x1) - x0), bool)
        else:
            wanted.setdefault((o, b), []).append(i)
    for (o, b), idx in sorted(wanted.items()):
        _, lab, _, _ = labels_of(o, b)
        for i in idx:
            x0, y0, x1, y1 = boxes[i]
            parts[i] = lab[y0:y1, x0:x1] == origin[i][2]
        del lab
    kept_boxes = np.asarray([boxes[i] for i in keep], np.int64)
    for i, kb in zip(keep, kept_boxes):  # a window clipped at the image edge: its part is the clipped box
        kb[2], kb[3] = kb[0] + parts[i].shape[1], kb[1] + parts[i].shape[0]
    return bt[keep].numpy(), BoxMasks(kept_boxes, [parts[i] for i in keep], (h, w))


def component_proposals(
    image: np.ndarray,
    *,
    min_area: float = 16.0,
    max_boxes: int = 100,
    sat_min: float = 0.4,
    val_min: float = 0.45,
    hue_bin: float = 20.0,
    windows: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Class-agnostic boxes for the zero-shot teacher: connected components of saturated colour.

    ``image``: (H, W, 3) uint8 RGB. Pixels with HSV saturation >= ``sat_min`` and value >=
    ``val_min`` (defaults: above the shapes world's muted backgrounds, S <= 0.25, and its dark
    brown clutter, V <= 0.45; below its least saturated category colour, pink, S ~ 0.45)
    are split into hue bins of ``hue_bin`` degrees at two offsets (0 and half a bin);
    each 8-connected component (after a 3x3 opening) of ``min_area`` pixels or more gives a box and
    its mask. ``windows`` adds sliding windows (sides 1/4, 1/2 of the image, stride half a side;
    mask = the box). Duplicates (IoU > 0.9) are dropped; the ``max_boxes`` largest are kept.

    Returns ``boxes`` (N, 4) float32 XYXY absolute pixels and ``masks`` (N, H, W) bool (the
    labeler uses :func:`component_candidates`, which never makes these full-size masks).
    """
    h, w = image.shape[:2]
    boxes, bm = component_candidates(image, min_area=min_area, max_boxes=max_boxes, sat_min=sat_min, val_min=val_min,
                                     hue_bin=hue_bin, windows=windows)
    if not len(bm):
        return boxes, np.zeros((0, h, w), bool)
    return boxes, np.stack([bm.full(i) for i in range(len(bm))])


# ------------------------------------------------------------------------------------ sources


class TeacherSource:
    """Zero-shot labels from the frozen teacher (see the module docstring).

    Scores: softmax over (class text embeddings, background prompt embeddings) of
    ``logit_scale * cos`` (CLIP's learned scale); a box takes its best class and that class's
    probability; boxes where a background prompt wins keep their (low) class probability and are
    removed by the thresholds.
    """

    def __init__(
        self,
        teacher,
        vocab: Vocabulary,
        *,
        templates=None,
        background: Sequence[str] = (),
        proposals: str = "components",
        max_proposals: int = 100,
        min_area: float = 16.0,
        proposer: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]] | None = None,
        max_side: int = 1024,
    ) -> None:
        from distill.teacher.text import load_templates, text_embeddings

        if proposals not in ("components", "windows", "components+windows") and proposer is None:
            raise DistillError(f"label.proposals: {proposals!r} needs a detector (expected components, windows or components+windows)")
        self.teacher = teacher
        self.vocab = vocab
        self.num_classes = len(vocab)
        text = text_embeddings(teacher, vocab, templates)
        if background:
            bg = text_embeddings(teacher, Vocabulary(tuple(background), source="label.background"), templates)
            text = torch.cat([text, bg])
        self.text = text.float().to(teacher.device)
        self.scale = float(teacher.model.logit_scale.exp().clamp(max=100.0)) if hasattr(teacher.model, "logit_scale") else 100.0
        self.proposals = proposals
        self.max_proposals = max_proposals
        self.min_area = min_area
        self.proposer = proposer
        # Images are decoded with their longer side at most max_side (0 = full size): candidates,
        # crops and masks are made there; the labeler maps them back to the full image.
        self.max_side = int(max_side)
        # Run per image inside the DataLoader workers (decoding + proposals overlap the teacher).
        self.prepare = None
        if proposer is None:
            wins = proposals == "windows" or "windows" in proposals
            self.prepare = functools.partial(
                component_candidates, min_area=min_area, max_boxes=max_proposals, windows=wins,
                **({"sat_min": 2.0} if proposals == "windows" else {}),  # windows only: no colour pixels
            )
        self.fingerprint = sha256_json(
            {"teacher": teacher.fingerprint, "background": list(background), "templates": list(load_templates(templates)), "proposals": proposals,
             "max": max_proposals, "proposer": getattr(proposer, "fingerprint", None), "max_side": self.max_side}
        )[:16]

    def _propose(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        if self.proposer is not None:
            return self.proposer(img)
        return self.prepare(img.permute(1, 2, 0).numpy())

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor], extras: list | None = None) -> list[dict]:
        """images: list of (3, H, W) uint8; extras: per image ``prepare``'s (boxes, masks) when the
        DataLoader computed them."""
        from distill.teacher.regions import region_embeddings

        props = extras if extras is not None else [self._propose(im) for im in images]
        floats = [im.to(self.teacher.device, torch.float32) / 255.0 for im in images]
        boxes = [torch.as_tensor(b, dtype=torch.float32, device=self.teacher.device).reshape(-1, 4) for b, _ in props]
        embs = region_embeddings(self.teacher, floats, boxes, mode="crop")
        out = []
        for (b, m), e in zip(props, embs):
            if e.shape[0] == 0:
                scores, labels = torch.zeros(0), torch.zeros(0, dtype=torch.long)
            else:
                prob = (self.scale * e.float() @ self.text.T).softmax(dim=-1)[:, : self.num_classes]
                scores, labels = prob.max(dim=1)
            d = {"boxes": torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4), "scores": scores.cpu(), "labels": labels.cpu()}
            if isinstance(m, BoxMasks):
                d["masks"] = m
            elif m is not None:
                d["masks"] = torch.from_numpy(np.asarray(m, dtype=bool))
            out.append(d)
        return out


def read_background(items: Sequence[str]) -> tuple[str, ...]:
    """Background prompts: inline strings, or ``.txt`` files of prompts (one a line)."""
    from distill.config import WORDS_EXPECTED
    from distill.files import read_word_items

    return read_word_items(items, "label.background", WORDS_EXPECTED)


def build_source(cfg, vocab: Vocabulary, device: torch.device | None = None):
    """The label source named by ``cfg.label.source`` with its model (``cfg.label.model``):
    ``teacher`` (the model is ``teacher`` or empty: ``cfg.teacher``), ``vild`` or ``seg`` (a
    checkpoint path). Returns ``(source, model_hash)``."""
    lcfg = cfg.label
    if lcfg.source not in SOURCES:
        raise DistillError(f"label.source: {lcfg.source!r} is not one of {', '.join(SOURCES)}")
    if lcfg.proposals not in PROPOSALS:
        raise DistillError(f"label.proposals: {lcfg.proposals!r} is not one of {', '.join(PROPOSALS)}")
    if lcfg.source == "teacher":
        import dataclasses

        from distill.teacher.clip import build_teacher

        if lcfg.model not in ("", "teacher") and lcfg.proposals != "rpn":
            raise DistillError(f"label.model: {lcfg.model!r}: the teacher source uses cfg.teacher (give --model teacher), or proposals=rpn with a ViLD checkpoint")
        teacher = build_teacher(cfg.teacher, device=device)
        if lcfg.proposals == "auto":  # colour components suit the shapes world's teacher only; photos: windows
            lcfg = dataclasses.replace(lcfg, proposals="components" if teacher.name == "distill-tiny-vit" else "windows")
        proposer = None
        if lcfg.proposals == "rpn":
            proposer = _rpn_proposer(cfg, vocab, device)
        src = TeacherSource(
            teacher, vocab, templates=cfg.teacher.templates or None, background=read_background(lcfg.background),
            proposals=lcfg.proposals, max_proposals=lcfg.max_proposals, min_area=lcfg.min_area, proposer=proposer,
            max_side=lcfg.max_side,
        )
        return src, src.fingerprint
    if lcfg.source == "vild":
        return _vild_source(cfg, vocab, device)
    return _seg_source(cfg, vocab, device)


class ViLDSource:
    """Labels from a ViLD student (distill/detection): its per-image detections over the new
    vocabulary (``set_vocabulary``: the text embeddings are inputs, never baked into the
    checkpoint); Mask R-CNN mask probabilities (when built with masks) thresholded at 0.5."""

    def __init__(self, model, device: torch.device, fingerprint: str = "") -> None:
        self.model = model
        self.device = device
        self.fingerprint = fingerprint

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        dets = self.model([im.to(self.device, torch.float32) / 255.0 for im in images])
        out = []
        for d in dets:
            r = {"boxes": d["boxes"].float().cpu(), "scores": d["scores"].float().cpu(), "labels": d["labels"].long().cpu()}
            if "masks" in d:
                m = d["masks"].cpu()
                r["masks"] = (m[:, 0] if m.ndim == 4 else m) >= 0.5
            out.append(r)
        return out


def _novel_mask(vocab: Vocabulary, mcfg, trained_classes: Sequence[str] | None = None) -> list[bool]:
    """Which classes the ViLD ensemble treats as novel: the vocabulary's own split when it has
    novel classes, else every class that was not a training (base) class of the checkpoint (as
    the checkpoint records them; an older one: its training vocabulary)."""
    if vocab.novel_indices:
        return vocab.is_novel
    if trained_classes is not None:
        trained = {n.lower() for n in trained_classes}
        return [n.lower() not in trained for n in vocab.names]
    try:
        from distill.detection.train import det_vocab

        tv = det_vocab(mcfg)
        trained = {tv.names[i].lower() for i in (range(len(tv)) if mcfg.det.train_on_all else tv.base_indices)}
    except DistillError:
        return [False] * len(vocab)
    return [n.lower() not in trained for n in vocab.names]


def load_vild(cfg, vocab: Vocabulary, device: torch.device | None = None):
    """(model, teacher, fingerprint) of the ViLD checkpoint ``cfg.label.model``, set to ``vocab``."""
    from distill.detection.build import build_vild_detector
    from distill.engine.checkpoint import load as load_ckpt
    from distill.files import sha256_file
    from distill.teacher.text import text_embeddings

    ckpt = cfg.label.model
    mcfg, meta = _model_config(cfg, ckpt)
    teacher = _student_teacher(mcfg, meta, ckpt, device)
    tpl = mcfg.teacher.templates or None
    text = text_embeddings(teacher, vocab, tpl).float().cpu()
    model = build_vild_detector(mcfg.det, teacher.embed_dim, None, teacher=teacher, region_mode=mcfg.regions.mode, load_weights=False)
    load_ckpt(ckpt, model)
    model.set_vocabulary(text, torch.tensor(_novel_mask(vocab, mcfg, meta.get("trained_classes"))), list(vocab.names))
    model.to(teacher.device).eval()
    fp = sha256_json({"ckpt": sha256_file(ckpt), "teacher": teacher.fingerprint, "det": str(mcfg.det), "tpl": str(tpl)})[:16]
    return model, teacher, fp


def _vild_source(cfg, vocab, device):
    model, teacher, fp = load_vild(cfg, vocab, device)
    return ViLDSource(model, teacher.device, fp), fp


def _rpn_proposer(cfg, vocab, device):
    """Class-agnostic boxes from the RPN of the ViLD checkpoint ``cfg.label.model`` (top
    ``label.max_proposals`` per image, in input pixels; no masks)."""
    model, teacher, fp = load_vild(cfg, vocab, device)
    k = cfg.label.max_proposals

    @torch.no_grad()
    def propose(img: torch.Tensor):
        x = [img.to(teacher.device, torch.float32) / 255.0]
        il, _ = model.transform(x)
        props, _ = model.rpn(il, model.backbone(il.tensors))
        (h, w), (nh, nw) = tuple(img.shape[-2:]), il.image_sizes[0]
        b = props[0][:k].cpu() * torch.tensor([w / nw, h / nh, w / nw, h / nh])
        return b.numpy(), None

    propose.fingerprint = fp
    return propose


class SegSource:
    """Labels from a segmentation student (LSeg / CLIPSeg, distill/segmentation): semantic logits
    ``(1, 1 + C, H, W)`` (channel 0 = background) for the vocabulary's text embeddings; every
    8-connected component of the argmax map of class c is an instance of c, scored by the mean
    softmax probability of c over the component, with its mask and box."""

    def __init__(self, model, text: torch.Tensor, vocab: Vocabulary, *, window: int = 0, fingerprint: str = "") -> None:
        self.model = model
        self.text = text
        self.vocab = vocab
        self.window = window
        self.fingerprint = fingerprint

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        from distill.segmentation.infer import predict_logits

        dev = self.text.device
        out = []
        for im in images:  # one at a time: sizes may differ
            x = (im.to(dev, torch.float32) / 255.0)[None]
            prob = predict_logits(self.model, x, self.text, self.window).float().softmax(1)[0].cpu()
            out.append(instances_from_semantic(prob))
        return out


def instances_from_semantic(prob: torch.Tensor) -> dict:
    """(1 + C, H, W) class probabilities (channel 0 background) -> instances: connected components
    of the argmax map per class; score = mean probability of the class over the component."""
    lab = prob.argmax(0).numpy()
    boxes, scores, labels, masks = [], [], [], []
    for c in np.unique(lab):
        if c == 0:
            continue
        n, comp, stats, _ = cv2.connectedComponentsWithStats((lab == c).astype(np.uint8), connectivity=8)
        pc = prob[c].numpy()
        for k in range(1, n):
            x, y, w, h, _ = (int(v) for v in stats[k])
            m = comp == k
            boxes.append([x, y, x + w, y + h])
            scores.append(float(pc[m].mean()))
            labels.append(int(c) - 1)
            masks.append(m)
    H, W = lab.shape
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, H, W, dtype=torch.bool),
    }


def _model_config(cfg, ckpt: str):
    """(config, meta) of a student checkpoint: the training config it carries
    (:func:`distill.teacher.clip.student_meta`; an older checkpoint: ``config.yaml`` beside it),
    its teacher located (the recorded absolute path, else ``cfg.teacher.pretrained``) on
    ``cfg.teacher.device``. Anything missing is a one-line error saying how to supply it."""
    import dataclasses

    import yaml

    from distill.config import config_from_dict, load_config
    from distill.engine.checkpoint import read

    p = Path(ckpt)
    if not p.is_file():
        raise DistillError(f"label.model: {p}: checkpoint not found (expected a model_final.pt from distill train)")
    meta = read(p).get("meta") or {}
    if meta.get("config"):
        mcfg = config_from_dict(yaml.safe_load(meta["config"]))
    elif (p.parent / "config.yaml").is_file():
        mcfg = load_config(p.parent / "config.yaml")
    else:
        raise DistillError(f"label.model: {p}: carries no training config and no config.yaml is beside it "
                           f"(a model_final.pt of an older distill: copy its training run's config.yaml beside it)")
    rec = meta.get("teacher") or {}
    tc = mcfg.teacher

    def locate(recorded: str, given: str, key: str, fp: str) -> str:
        if not recorded or recorded.startswith("local-dir:") or os.path.exists(recorded) or not ("/" in recorded or Path(recorded).suffix):
            return recorded
        if given and os.path.exists(given):
            return given
        raise DistillError(f"label.model: {p} was trained with the teacher {recorded}, which is not there; "
                           f"give its location with {key}=PATH" + (f" (its fingerprint {fp} is checked)" if fp else ""))

    pre = locate(rec.get("pretrained") or tc.pretrained, cfg.teacher.pretrained, "teacher.pretrained", rec.get("fingerprint", ""))
    dense = locate(rec.get("dense_pretrained", tc.dense_pretrained), cfg.teacher.dense_pretrained, "teacher.dense_pretrained", rec.get("dense_fingerprint", ""))
    mcfg = dataclasses.replace(mcfg, teacher=dataclasses.replace(tc, pretrained=pre, dense_pretrained=dense, device=cfg.teacher.device or tc.device))
    return mcfg, meta


def _student_teacher(mcfg, meta: dict, ckpt: str, device):
    """The teacher of a student checkpoint, checked against the fingerprint it recorded."""
    from distill.teacher.clip import build_teacher

    teacher = build_teacher(mcfg.teacher, device=device)
    want = (meta.get("teacher") or {}).get("fingerprint")
    if want and teacher.fingerprint != want:
        raise DistillError(f"teacher.pretrained: {mcfg.teacher.pretrained}: not the teacher {ckpt} was trained with "
                           f"(fingerprint {teacher.fingerprint}, the checkpoint's {want})")
    return teacher


def _seg_source(cfg, vocab, device):
    """The segmentation student of ``cfg.label.model`` (the config it carries rebuilds it)."""
    from distill.files import sha256_file
    from distill.segmentation.train import load_seg_model, text_for

    mcfg, meta = _model_config(cfg, cfg.label.model)
    teacher = _student_teacher(mcfg, meta, cfg.label.model, device)
    model = load_seg_model(mcfg, teacher, cfg.label.model).to(teacher.device)
    text = text_for(teacher, vocab, mcfg).to(teacher.device)
    fp = sha256_json({"ckpt": sha256_file(cfg.label.model), "teacher": teacher.fingerprint, "window": mcfg.seg.window})[:16]
    return SegSource(model, text, vocab, window=mcfg.seg.window, fingerprint=fp), fp


# ------------------------------------------------------------------------------------ data


class _Images(Dataset):
    """Global index -> (index, (3, h, w) uint8 tensor or None, error message or None, extra,
    (H, W) of the full image or None).

    With ``max_side`` > 0 an image is decoded with its longer side at most ``max_side``
    (:func:`~distill.data.images.load_image_scaled`; h, w <= H, W), else at full size.
    ``prepare(array (h, w, 3) uint8)`` (a source's per-image CPU work, e.g. proposals) runs here,
    so it runs in the decoding workers."""

    def __init__(self, paths: Sequence[Path], prepare: Callable | None = None, max_side: int = 0):
        self.paths = list(paths)
        self.prepare = prepare
        self.max_side = int(max_side)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            if self.max_side > 0:
                arr, full = load_image_scaled(self.paths[i], self.max_side)
            else:
                arr = load_image(self.paths[i])
                full = arr.shape[:2]
        except DistillError as e:
            return i, None, str(e), None, None
        extra = self.prepare(arr) if self.prepare is not None else None
        return i, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), None, extra, (int(full[0]), int(full[1]))


def to_full_size(pred: dict, size: tuple[int, int], full: tuple[int, int]) -> dict:
    """A source's prediction on an image decoded at ``size`` (h, w) -> the full image's (H, W)
    pixels: boxes scaled, masks read at the full size (box-limited, :class:`BoxMasks`), a
    ``semantic`` map resized (nearest). Unchanged when the sizes are equal."""
    if tuple(size) == tuple(full):
        return pred
    (h, w), (H, W) = size, full
    out = dict(pred)
    out["boxes"] = pred["boxes"].float().reshape(-1, 4) * torch.tensor([W / w, H / h, W / w, H / h])
    masks = pred.get("masks")
    if masks is not None:
        out["masks"] = (masks if isinstance(masks, BoxMasks) else BoxMasks.from_dense(np.asarray(masks))).at((H, W))
    if "semantic" in pred:
        out["semantic"] = cv2.resize(np.asarray(pred["semantic"], np.uint8), (W, H), interpolation=cv2.INTER_NEAREST)
    return out



def _collate_list(batch):
    return batch


def _shard_ranges(n: int, shard_size: int) -> list[range]:
    return [range(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def _rank_world() -> tuple[int, int]:
    try:
        from distill.engine.distributed import get_rank, get_world_size, is_dist

        if is_dist():
            return get_rank(), get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ------------------------------------------------------------------------------------ labeling


@dataclass
class LabelJob:
    """Everything one labeling run needs (built from a Config by :func:`label`)."""

    paths: list[Path]
    names: list[str]
    root: Path
    vocab: Vocabulary
    out: Path
    opts: FilterOptions
    formats: tuple[str, ...] = ("coco",)
    batch_size: int = 8
    num_workers: int = 0
    shard_size: int = 64
    model_hash: str = ""
    source_name: str = "teacher"
    model: str = ""
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, kind, why) the listing left out

    @functools.cached_property
    def stems(self) -> list[str]:
        """Output names (PNG / YOLO) per image, collision-free (formats.output_stems)."""
        return formats.output_stems(self.names)

    def base_key(self) -> dict:
        return {
            "v": SHARD_VERSION,
            "model": self.model_hash,
            "vocab": self.vocab.hash,
            "ids": list(self.vocab.ids),
            "filter": self.opts.info(self.vocab),
            "png": "png" in self.formats,
        }

    def shard_key(self, k: int, r: range) -> str:
        return sha256_json({**self.base_key(), "shard": k, "names": [self.names[i] for i in r], "stems": [self.stems[i] for i in r]})[:20]

    def shard_path(self, k: int) -> Path:
        return self.out / "shards" / f"shard-{k:05d}.json"

    def _read_shard(self, k: int, r: range) -> dict | None:
        """Shard ``k`` when it is written with the current key, else None."""
        p = self.shard_path(k)
        if not p.is_file():
            return None
        try:
            with open(p, "rb") as f:
                head = json.loads(f.read())
        except (OSError, json.JSONDecodeError):
            return None
        return head if isinstance(head, dict) and head.get("key") == self.shard_key(k, r) else None

    def shard_done(self, k: int, r: range) -> bool:
        return self._read_shard(k, r) is not None

    def png_path(self, i: int) -> Path:
        return safe_join(self.out / "semantic", self.stems[i] + ".png")

    def shard_outputs_done(self, k: int, r: range) -> bool:
        """Shard ``k`` is written with the current key and, with PNG output, every image it labeled
        has its semantic PNG (a deleted one makes the shard run again; YOLO files and labels.json
        are rewritten from the shards by every merge)."""
        head = self._read_shard(k, r)
        if head is None:
            return False
        if "png" not in self.formats:
            return True
        return all("error" in rec or self.png_path(int(rec["index"])).is_file() for rec in head.get("records", []))

    def job_key(self) -> dict:
        """What the output folder holds the labels of (recorded in ``manifest.json``)."""
        return {
            "images": str(self.root),
            "names": sha256_json(self.names)[:16],
            "vocab": self.vocab.hash,
            "formats": list(self.formats),
            "source": self.source_name,
            "model": self.model_hash,
            "filter": sha256_json(self.opts.info(self.vocab))[:16],
        }


def _annotations(pred: dict, vocab: Vocabulary, with_masks: bool) -> list[dict]:
    anns = []
    boxes = pred["boxes"].tolist()
    scores = pred["scores"].tolist()
    labels = pred["labels"].tolist()
    masks = pred.get("masks")
    for j, (b, s, l) in enumerate(zip(boxes, scores, labels)):
        xywh = [round(v, 2) for v in formats.xyxy_to_xywh(b)]
        a = {"category_id": int(vocab.ids[l]), "bbox": xywh, "score": round(float(s), 5), "iscrowd": 0}
        if isinstance(masks, BoxMasks) and with_masks:  # full-size RLE, one mask at a time
            a["segmentation"] = masks.rle(j)
            a["area"] = masks.area(j)
        elif masks is not None and with_masks:
            m = masks[j].numpy()
            a["segmentation"] = formats.mask_to_rle(m)
            a["area"] = int(m.sum())
        else:
            a["area"] = round(xywh[2] * xywh[3], 2)
        anns.append(a)
    return anns


def run_labeling(
    job: LabelJob,
    source: Callable[[list[torch.Tensor]], list[dict]],
    *,
    rank: int = 0,
    world_size: int = 1,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Label this rank's pending shards (skipping finished ones); return counts for this rank.

    ``on_shard(k)`` is called after shard ``k`` is written (tests inject a kill there)."""
    n = len(job.paths)
    ranges = _shard_ranges(n, job.shard_size)
    from distill.engine.distributed import rank_shards

    mine = rank_shards(len(ranges), rank, world_size)
    pending = [k for k in mine if not job.shard_outputs_done(k, ranges[k])]  # missing PNGs are redone
    values = formats.semantic_values(job.vocab) if "png" in job.formats else []  # only PNGs have a class-count limit
    batches = [list(ranges[k])[i : i + job.batch_size] for k in pending for i in range(0, len(ranges[k]), job.batch_size)]
    stats = {"shards_total": len(mine), "shards_skipped": len(mine) - len(pending), "images": 0, "failures": 0, "annotations": 0}
    if not batches:
        return stats
    prepare = getattr(source, "prepare", None)
    max_side = int(getattr(source, "max_side", 0) or 0)  # the teacher source works at a bounded size
    loader = DataLoader(
        _Images(job.paths, prepare, max_side), batch_sampler=batches, num_workers=job.num_workers, collate_fn=_collate_list,
        persistent_workers=False, prefetch_factor=2 if job.num_workers > 0 else None,
    )
    shard_of = {i: k for k in pending for i in ranges[k]}
    records: dict[int, dict[int, dict]] = {}
    want_png = "png" in job.formats
    with torch.inference_mode():
        for batch in loader:
            ok = [(i, im, ex, full) for i, im, err, ex, full in batch if im is not None]
            if not ok:
                preds = []
            elif prepare is not None:
                preds = source([im for _, im, _, _ in ok], [ex for _, _, ex, _ in ok])
            else:
                preds = source([im for _, im, _, _ in ok])
            for (i, im, _, full), pred in zip(ok, preds):
                pred = to_full_size(pred, (int(im.shape[1]), int(im.shape[2])), full)  # outputs in full-image pixels
                pred = filter_predictions(pred, job.opts, len(job.vocab))
                h, w = full
                rec = {"index": i, "file_name": job.names[i], "width": w, "height": h,
                       "annotations": _annotations(pred, job.vocab, True)}
                if want_png:
                    if "semantic" in pred:
                        sem = pred["semantic"]
                    elif "masks" in pred:
                        sem = formats.paint_semantic(pred["masks"].numpy(), pred["labels"].numpy(), pred["scores"].numpy(), values, (h, w))
                    else:  # boxes only: paint boxes
                        bm = np.zeros((len(pred["scores"]), h, w), bool)
                        for j, (x0, y0, x1, y1) in enumerate(pred["boxes"].round().long().tolist()):
                            bm[j, max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
                        sem = formats.paint_semantic(bm, pred["labels"].numpy(), pred["scores"].numpy(), values, (h, w))
                    formats.write_semantic_png(job.png_path(i), np.asarray(sem), values)
                records.setdefault(shard_of[i], {})[i] = rec
                stats["images"] += 1
                stats["annotations"] += len(rec["annotations"])
            for i, im, err, *_ in batch:
                if im is None:
                    records.setdefault(shard_of[i], {})[i] = {"index": i, "file_name": job.names[i], "error": err}
                    stats["failures"] += 1
            # A shard is complete when every image has a record (batches never cross shards).
            for k in sorted({shard_of[b[0]] for b in batch}):
                if len(records.get(k, {})) == len(ranges[k]):
                    recs = records.pop(k)
                    write_json(job.shard_path(k), {"key": job.shard_key(k, ranges[k]), "shard": k,
                                                   "records": [recs[i] for i in ranges[k]]}, indent=None)
                    if on_shard is not None:
                        on_shard(k)
    return stats


def _iter_records(job: LabelJob) -> Iterator[dict]:
    for k, r in enumerate(_shard_ranges(len(job.paths), job.shard_size)):
        if not job.shard_done(k, r):
            raise DistillError(f"{job.shard_path(k)}: shard missing or stale; rerun the same command to finish (resume skips finished shards)")
        with open(job.shard_path(k), "rb") as f:
            yield from json.loads(f.read())["records"]


def merge_shards(job: LabelJob, info: dict) -> dict:
    """Stream every shard into ``labels.json`` (COCO), ``yolo/`` and ``failures.txt``.

    Image ids are 1 + the index in the sorted image list, annotation ids 1.. in (image, score)
    order, so the result depends only on the inputs, not on how the run was split or resumed."""
    out = job.out
    cat_to_index = {cid: i for i, cid in enumerate(job.vocab.ids)}
    n_img = n_ann = 0
    failures: list[str] = []
    ok: list[int] = []  # indices of the labeled images (their PNG / YOLO outputs exist)
    with atomic_path(out / LABELS_JSON) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"info": ' + json.dumps(info) + ',\n"licenses": [],\n"categories": ' + json.dumps(job.vocab.categories()) + ',\n"images": [')
            first = True
            for rec in _iter_records(job):
                if "error" in rec:
                    continue
                img = {"id": rec["index"] + 1, "file_name": rec["file_name"], "width": rec["width"], "height": rec["height"]}
                f.write(("\n" if first else ",\n") + json.dumps(img))
                first = False
            f.write('],\n"annotations": [')
            first = True
            for rec in _iter_records(job):
                if "error" in rec:
                    failures.append(f"{rec['file_name']}\t{rec['error']}")
                    continue
                n_img += 1
                ok.append(int(rec["index"]))
                for a in rec["annotations"]:
                    n_ann += 1
                    a = {"id": n_ann, "image_id": rec["index"] + 1, **a}
                    f.write(("\n" if first else ",\n") + json.dumps(a))
                    first = False
                if "yolo" in job.formats:
                    txt = formats.yolo_lines(rec["annotations"], rec["width"], rec["height"], cat_to_index)
                    formats.write_yolo_file(out / "yolo" / "labels", job.stems[rec["index"]], txt)
            f.write("]}\n")
    write_text(out / "failures.txt", "".join(line + "\n" for line in failures))
    if "yolo" in job.formats:
        formats.write_classes(out / "yolo", job.vocab)
    return {"images": n_img, "annotations": n_ann, "failures": len(failures), "ok": ok}


# ------------------------------------------------------------------------------------ output folder
#
# The labeler owns its output folder. ``<out>/manifest.json`` ({"tool": "distill label", "state":
# "running" | "complete", "key": job_key(), "files": [...]}) is written first (state running) and,
# when the run is complete, lists every file the run wrote (paths relative to --out, itself left
# out). A folder is the labeler's when it is new or empty (hidden entries such as .DS_Store aside),
# when it holds its manifest, or (an output of a distill without manifests) when it holds shards/
# and nothing but the labeler's names (OUTPUT_FILES, OUTPUT_DIRS). Anything else is refused before
# anything is written. At the end of a run, files under shards/, semantic/ and yolo/ and the
# top-level OUTPUT_FILES that this run did not write (another image folder's PNGs / YOLO files,
# shards past the end, a format no longer asked for, temporary files of a killed run) are removed;
# other entries (a user's notes beside the labels) are left alone.


def _is_tmp_of(name: str) -> bool:
    """A temporary file of :func:`~distill.files.atomic_path` for one of the labeler's files."""
    return name.startswith(".") and ".tmp" in name and any(name.startswith(f".{n}.") for n in OUTPUT_FILES)


def read_manifest(out: Path) -> dict | None:
    """``<out>/manifest.json`` when it is this labeler's, else None."""
    try:
        m = json.loads((Path(out) / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("tool") == MANIFEST_TOOL else None


def check_output(job: LabelJob) -> None:
    """Refuse, before anything is written, an ``--out`` that is not the labeler's (see above)."""
    out = job.out
    if not out.is_dir():
        return  # new (a file in the way is reported when the folder is created)
    try:
        names = sorted(e.name for e in out.iterdir())
    except OSError as e:
        raise DistillError(f"label.out: cannot read {out} ({e.strerror})") from None
    visible = [n for n in names if not n.startswith(".")]
    if not visible:
        return
    if read_manifest(out) is not None:
        return
    if MANIFEST in visible:
        raise DistillError(f"label.out: {out / MANIFEST} is not a manifest of distill label; give an empty or new --out")
    foreign = [n for n in visible if n not in OUTPUT_FILES and n not in OUTPUT_DIRS]

    def shown(ns: list[str]) -> str:
        return ", ".join(repr(n) for n in ns[:3]) + (f" and {len(ns) - 3} more" if len(ns) > 3 else "")

    if foreign:
        raise DistillError(f"label.out: {out} is not empty and holds files distill label did not write ({shown(foreign)}); "
                           "give an empty or new --out (the labeler owns its output folder)")
    if not (out / "shards").is_dir():
        raise DistillError(f"label.out: {out} is not empty ({shown(visible)}) and holds no {MANIFEST} of a labeling run; "
                           "give an empty or new --out (the labeler owns its output folder)")


def claim_output(job: LabelJob) -> None:
    """Create ``--out`` and mark it as this run's (manifest, state running). When the previous run
    there labeled something else, its final files go now, so a killed run leaves no stale labels.json."""
    out = job.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistillError(f"label.out: cannot create {out} ({e.strerror}: {e.filename})") from None
    old, key = read_manifest(out), job.job_key()
    if old is not None and old.get("key") != key:
        for n in OUTPUT_FILES:
            if n not in (MANIFEST, "config.yaml"):
                _remove(out / n)
    write_json(out / MANIFEST, {"tool": MANIFEST_TOOL, "version": 1, "state": "running", "key": key, "files": []})


def _remove(p: Path) -> None:
    try:
        if p.is_symlink() or p.is_file():
            p.unlink()
    except OSError as e:
        raise DistillError(f"label.out: cannot remove {p} ({e.strerror})") from None


def written_files(job: LabelJob, ok: Sequence[int], extra: Sequence[str] = ()) -> set[str]:
    """Paths (relative to --out) of every file a complete run writes; ``ok``: the labeled images."""
    files = {LABELS_JSON, "failures.txt", SKIPPED_TXT, "summary.json", "config.yaml", *extra}
    files |= {f"shards/shard-{k:05d}.json" for k in range(len(_shard_ranges(len(job.paths), job.shard_size)))}
    if "png" in job.formats:
        files |= {"semantic/legend.json", "semantic/legend.png", *(f"semantic/{job.stems[i]}.png" for i in ok)}
    if "yolo" in job.formats:
        files |= {"yolo/classes.txt", *(f"yolo/labels/{job.stems[i]}.txt" for i in ok)}
    return files


def finalize_output(job: LabelJob, written: set[str]) -> None:
    """Remove the labeler's files that this run did not write; then the manifest (state complete)
    lists what it wrote."""
    root = job.out.resolve()
    for d in OUTPUT_DIRS:
        base = root / d
        if base.is_symlink() or not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base, topdown=False):
            for f in filenames:
                p = Path(dirpath, f)
                if p.relative_to(root).as_posix() not in written:
                    _remove(p)
            for dn in dirnames:
                q = Path(dirpath, dn)
                if q.is_symlink():
                    _remove(q)
                else:
                    try:
                        q.rmdir()  # only when empty
                    except OSError:
                        pass
        if not any(w.startswith(d + "/") for w in written):
            try:
                base.rmdir()
            except OSError:
                pass
    for name in sorted(os.listdir(root)):
        if (name in OUTPUT_FILES and name != MANIFEST and name not in written) or _is_tmp_of(name):
            _remove(root / name)
    write_json(job.out / MANIFEST, {"tool": MANIFEST_TOOL, "version": 1, "state": "complete", "key": job.job_key(),
                                    "files": sorted(written)})


def make_job(cfg, vocab: Vocabulary, model_hash: str = "") -> LabelJob:
    lcfg = cfg.label
    if not lcfg.images:
        raise DistillError("label.images: required (an image folder or a list file)")
    if not lcfg.out:
        raise DistillError("label.out: required (an output folder)")
    fmts = tuple(f.strip().lower() for f in lcfg.format if f.strip())
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise DistillError(f"label.format: {bad[0] if bad else 'empty'!r} is not one of {', '.join(FORMATS)}")
    if "png" in fmts:
        formats.semantic_values(vocab)  # refuses, before anything is written, a vocabulary too large for a PNG
    for key in ("batch_size", "shard_size"):
        if getattr(lcfg, key) < 1:
            raise DistillError(f"label.{key}: expected a positive integer, got {getattr(lcfg, key)}")
    if lcfg.num_workers < 0:
        raise DistillError(f"label.num_workers: expected >= 0, got {lcfg.num_workers}")
    if not 0.0 <= lcfg.score_thresh <= 1.0:
        raise DistillError(f"label.score_thresh: expected a value in [0, 1], got {lcfg.score_thresh}")
    if lcfg.top_k < 0 or lcfg.min_area < 0:
        raise DistillError("label.top_k / label.min_area: expected >= 0")
    # --out and the image folder must not nest: an --out inside the images would be labeled by the
    # next run (its PNGs are images); images inside --out lie in a folder the labeler owns.
    src, out = Path(lcfg.images), Path(lcfg.out)
    out_r = out.resolve()
    if src.is_dir():
        img_r = src.resolve()
        if out_r == img_r or img_r in out_r.parents:
            raise DistillError(f"label.out: {out} is {'the image folder' if out_r == img_r else 'inside the image folder'} "
                               f"label.images {src}: the next run would label its own outputs; give an --out outside the image folder")
        if out_r in img_r.parents:
            raise DistillError(f"label.images: {src} is inside label.out {out}: the labeler owns its output folder and "
                               "would read its own outputs; give an --out outside the image folder")
    paths, skipped = scan_images(lcfg.images)
    inside = next((p for p in paths if out_r in p.parents), None)
    if inside is not None:
        raise DistillError(f"label.images: {src} names {inside}, inside label.out {out}: the labeler owns its output folder "
                           "and would read its own outputs; give an --out that holds none of the images")
    names = relative_names(lcfg.images, paths)
    from distill.data.images import image_root

    opts = FilterOptions(lcfg.score_thresh, parse_class_thresh(lcfg.class_thresh, vocab), lcfg.top_k, lcfg.nms, lcfg.min_area)
    return LabelJob(paths, names, image_root(lcfg.images, paths), vocab, out, opts, fmts, lcfg.batch_size,
                    lcfg.num_workers, lcfg.shard_size, model_hash, lcfg.source, lcfg.model, skipped)


def label_vocab(cfg) -> Vocabulary:
    """``label.vocab``, else ``data.vocab``, else the categories of ``data.train_full_json``
    (with their base/novel split) when that file exists."""
    src = cfg.label.vocab or cfg.data.vocab
    if not src and cfg.data.train_full_json and Path(cfg.data.train_full_json).is_file():
        src = cfg.data.train_full_json
    if not src:
        raise DistillError("label.vocab: required (a vocabulary file or an inline list such as 'red star,crimson star=red star')")
    return load_vocab(src, cfg.data.split_file or None)


def label(cfg, *, source=None, on_shard: Callable[[int], None] | None = None) -> dict:
    """Label ``cfg.label.images`` with ``cfg.label.vocab``; write ``<out>/labels.json`` (+ yolo,
    semantic PNGs, failures.txt, skipped.txt, summary.json, manifest.json, and metrics.json when
    ``cfg.label.gt`` is set).

    ``source`` overrides :func:`build_source` (tests pass a random teacher's source)."""
    from distill.config import save_config
    from distill.engine.device import get_device

    t0 = time.time()
    vocab = label_vocab(cfg)
    job = make_job(cfg, vocab)  # the images, --out and options are checked before the model loads
    check_output(job)  # on every rank, before any rank writes (init_distributed below waits for all)
    if source is None:
        device = get_device(cfg.teacher.device)
        source, model_hash = build_source(cfg, vocab, device)
    else:
        model_hash = getattr(source, "fingerprint", "custom")
    job.model_hash = model_hash
    try:
        from distill.engine.distributed import barrier, init_distributed

        init_distributed()
    except ImportError:  # pragma: no cover
        barrier = lambda: None  # noqa: E731
    rank, world = _rank_world()
    if rank == 0:
        claim_output(job)
        if "png" in job.formats:
            formats.write_legend(job.out / "semantic", vocab)
    stats = run_labeling(job, source, rank=rank, world_size=world, on_shard=on_shard)
    barrier()
    if rank != 0:
        return stats
    info = {
        "description": "distill pseudo-labels",
        "source": job.source_name,
        "model": job.model or "teacher",
        "model_hash": model_hash,
        "vocab_hash": vocab.hash,
        "vocab_source": vocab.source,
        "images_root": str(job.root),
        **job.opts.info(vocab),
        "formats": list(job.formats),
    }
    merged = merge_shards(job, info)
    write_text(job.out / SKIPPED_TXT, "".join(f"{name}\t{why}\n" for name, _, why in job.skipped))
    save_config(cfg, job.out / "config.yaml")
    seconds = time.time() - t0
    kinds = [kind for _, kind, _ in job.skipped]
    summary = {
        "labels/images": merged["images"],
        "labels/annotations": merged["annotations"],
        "labels/failures": merged["failures"],
        # left out by the listing, named with the reason in skipped.txt
        "labels/skipped_hidden": kinds.count(SKIP_HIDDEN),
        "labels/skipped_folder_links": kinds.count(SKIP_FOLDER_LINK),
        "labels/skipped_unsupported": kinds.count(SKIP_UNSUPPORTED),
        "labels/shards_skipped": stats["shards_skipped"],
        "labels/seconds": round(seconds, 3),
        "labels/images_per_s": round(stats["images"] / seconds, 3) if seconds > 0 else 0.0,
    }
    write_json(job.out / "summary.json", summary)
    if cfg.label.gt:
        from distill.labels.quality import label_quality

        metrics = label_quality(job.out / LABELS_JSON, cfg.label.gt)
        write_json(job.out / "metrics.json", metrics)
        summary.update(metrics)
    finalize_output(job, written_files(job, merged["ok"], ["metrics.json"] if cfg.label.gt else []))
    return summary
