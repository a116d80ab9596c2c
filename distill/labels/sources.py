"""Label sources: what scores an image for :func:`distill.labels.pseudo.label`.

Each is a callable ``source(images) -> list[dict]`` on a list of (3, H, W) uint8 CPU tensors,
returning per image ``boxes`` (N, 4) float XYXY absolute pixels, ``scores`` (N,), ``labels`` (N,)
int64 vocabulary indices and optionally ``masks`` (N, H, W) bool (or :class:`BoxMasks`):

- ``teacher`` (zero-shot, :class:`TeacherSource`): class-agnostic boxes scored by the frozen
  teacher's crop embeddings (ViLD, Gu et al. 2022, section 3.2: 1x and 1.5x crops, summed and
  normalised, in :func:`distill.teacher.regions.region_embeddings`) against the class text
  embeddings, softmax over the classes plus optional background prompts. Boxes: a ViLD
  checkpoint's RPN (``proposals=rpn``), or :func:`component_candidates`: connected components of
  saturated colour, split into hue bins at two offsets (so a hue near a bin edge is whole in one
  of them), each with its component mask (the shapes world's flat-coloured objects), and / or
  multi-scale sliding windows (mask = the box; photos). ``proposals=auto`` picks components for
  the embedded teacher and windows for any other;
- ``vild``: a ViLD student's detections over the new vocabulary (:class:`ViLDSource`);
- ``seg``: a segmentation student's semantic masks, split into instances (:class:`SegSource`).

A student checkpoint carries its training config and its teacher's identity
(:func:`distill.teacher.clip.student_meta`), read by :func:`_model_config`.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torchvision

from distill.errors import DistillError
from distill.files import sha256_json
from distill.vocab import Vocabulary

log = logging.getLogger(__name__)

SOURCES = ("vild", "seg", "teacher")
PROPOSALS = ("auto", "components", "windows", "components+windows", "rpn")


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
        if lcfg.proposals == "rpn" and lcfg.model in ("", "teacher"):
            raise DistillError("label.proposals: rpn needs --model <a ViLD checkpoint> (det/vild/model_final.pt: its RPN gives "
                               "the boxes the teacher scores; add --source teacher), or --proposals windows / components with --model teacher")
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
    if not lcfg.model.strip():
        raise DistillError(f"label.model: required (a student checkpoint model_final.pt, or 'teacher'; label.source is {lcfg.source!r})")
    if lcfg.model.strip() == "teacher":
        raise DistillError(f"label.model: 'teacher' with label.source {lcfg.source!r}: the teacher is label.source=teacher "
                           "(--source teacher), a student source needs its checkpoint model_final.pt")
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


