"""Label sources: what scores an image for :func:`distill.labels.pseudo.label`.

Each is a callable ``source(images) -> list[dict]`` on a list of (3, H, W) uint8 CPU tensors,
returning per image ``boxes`` (N, 4) float XYXY absolute pixels, ``scores`` (N,), ``labels`` (N,)
int64 vocabulary indices and optionally ``masks`` (N, H, W) bool (or :class:`BoxMasks`):

- ``teacher`` (zero-shot, :class:`TeacherSource`): class-agnostic boxes scored by the frozen
  teacher's crop embeddings (ViLD, Gu et al. 2022, section 3.2: 1x and 1.5x crops, summed and
  normalised, in :func:`distill.teacher.regions.region_embeddings`) against the class text
  embeddings, softmax over the classes plus optional background prompts. Boxes: a ViLD
  checkpoint's RPN (``proposals=rpn``, :meth:`~distill.detection.build.ViLDDetector.propose`), or
  the colour-component and / or sliding-window candidates of :mod:`distill.labels.candidates`.
  ``proposals=auto`` picks components for the embedded teacher and windows for any other;
- ``vild``: a ViLD student's detections over the new vocabulary (:class:`ViLDSource`);
- ``seg``: a segmentation student's semantic masks, split into instances (:class:`SegSource`);
- ``vlplm``: VL-PLM (Zhao et al. 2022): a base detector's refined boxes, the teacher's crop score
  fused with the RPN objectness (:class:`distill.labels.vlplm.VLPLMSource`).

A student checkpoint carries its training config and its teacher's identity
(:func:`distill.teacher.clip.student_meta`), read by :func:`_model_config`; the ViLD student is
loaded by :func:`distill.detection.build.load_detector`, the segmenter by
:func:`distill.segmentation.build.load_segmenter`.
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

from distill.errors import DistillError
from distill.files import sha256_json
from distill.labels.candidates import BoxMasks, component_candidates
from distill.vocab import Vocabulary, resolve_vocab

log = logging.getLogger(__name__)

SOURCES = ("vild", "seg", "teacher", "vlplm")
PROPOSALS = ("auto", "components", "windows", "components+windows", "rpn")


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
        scales: Sequence[float] = (1.0, 1.5),
        logit_scale: float | None = None,
    ) -> None:
        from distill.teacher.text import templates_key, text_embeddings

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
        if logit_scale is None:  # CLIP's learned scale
            logit_scale = float(teacher.model.logit_scale.exp().clamp(max=100.0)) if hasattr(teacher.model, "logit_scale") else 100.0
        self.scale = float(logit_scale)
        self.scales = tuple(float(x) for x in scales)  # crop scales whose embeddings are summed (region_embeddings)
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
            {"teacher": teacher.fingerprint, "background": list(background), "templates": templates_key(templates), "proposals": proposals,
             "max": max_proposals, "proposer": getattr(proposer, "fingerprint", None), "max_side": self.max_side,
             "scales": list(self.scales), "scale": self.scale}
        )[:16]

    def _propose(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        if self.proposer is not None:
            return self.proposer(img)
        return self.prepare(img.permute(1, 2, 0).numpy())

    @torch.no_grad()
    def score_boxes(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (scores (N,), labels (N,) int64) on the CPU of ``boxes`` (N, 4) XYXY pixels of
        ``images`` ((3, H, W) uint8): the crops at ``scales`` embedded
        (:func:`~distill.teacher.regions.region_embeddings`), softmax of ``scale * cos`` over the
        classes (+ background prompts), the best class and its probability."""
        from distill.teacher.regions import region_embeddings

        floats = [im.to(self.teacher.device, torch.float32) / 255.0 for im in images]
        boxes = [torch.as_tensor(b, dtype=torch.float32, device=self.teacher.device).reshape(-1, 4) for b in boxes]
        out = []
        for e in region_embeddings(self.teacher, floats, boxes, mode="crop", scales=self.scales):
            if e.shape[0] == 0:
                out.append((torch.zeros(0), torch.zeros(0, dtype=torch.long)))
                continue
            prob = (self.scale * e.float() @ self.text.T).softmax(dim=-1)[:, : self.num_classes]
            scores, labels = prob.max(dim=1)
            out.append((scores.cpu(), labels.cpu()))
        return out

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor], extras: list | None = None) -> list[dict]:
        """images: list of (3, H, W) uint8; extras: per image ``prepare``'s (boxes, masks) when the
        DataLoader computed them."""
        props = extras if extras is not None else [self._propose(im) for im in images]
        scored = self.score_boxes(images, [b for b, _ in props])
        out = []
        for (b, m), (scores, labels) in zip(props, scored):
            d = {"boxes": torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4), "scores": scores, "labels": labels}
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
    checkpoint path), ``vlplm`` (the base detector's checkpoint; :mod:`distill.labels.vlplm`).
    Returns ``(source, model_hash)``."""
    lcfg = cfg.label
    if lcfg.source not in SOURCES:
        raise DistillError(f"label.source: {lcfg.source!r} is not one of {', '.join(SOURCES)}")
    if lcfg.proposals not in PROPOSALS:
        raise DistillError(f"label.proposals: {lcfg.proposals!r} is not one of {', '.join(PROPOSALS)}")
    if lcfg.source != "teacher" and lcfg.proposals != "auto":
        raise DistillError(f"label.proposals: --proposals applies to --source teacher (label.source is {lcfg.source!r}: "
                           f"the {'detector' if lcfg.source == 'vlplm' else 'student'} gives its own boxes)")
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
    if lcfg.source == "vlplm":
        from distill.labels.vlplm import build_vlplm_source

        return build_vlplm_source(cfg, vocab, device)
    if not lcfg.model.strip():
        raise DistillError(f"label.model: required (a student checkpoint model_final.pt, or 'teacher'; label.source is {lcfg.source!r})")
    if lcfg.model.strip() == "teacher":
        raise DistillError(f"label.model: 'teacher' with label.source {lcfg.source!r}: the teacher is label.source=teacher "
                           "(--source teacher), a student source needs its checkpoint model_final.pt")
    if lcfg.source == "vild":
        return _vild_source(cfg, vocab, device)
    return _seg_source(cfg, vocab, device)


class ViLDSource:
    """Labels from a detection student (distill/detection: ViLD, or the one-stage student of
    ``det.arch=fcos``, whichever the checkpoint holds): its per-image detections over the new
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
        tv = resolve_vocab(mcfg.data, need_base=True)
        trained = {tv.names[i].lower() for i in (range(len(tv)) if mcfg.det.train_on_all else tv.base_indices)}
    except DistillError:
        return [False] * len(vocab)
    return [n.lower() not in trained for n in vocab.names]


def load_vild(cfg, vocab: Vocabulary, device: torch.device | None = None):
    """(model, teacher, fingerprint) of the ViLD checkpoint ``cfg.label.model``, set to ``vocab``
    (its text embeddings with the templates the student was trained with)."""
    from distill.detection.build import load_detector
    from distill.files import sha256_file
    from distill.teacher.text import text_embeddings

    ckpt = cfg.label.model
    mcfg, meta = _model_config(cfg, ckpt)
    teacher = _student_teacher(mcfg, meta, ckpt, device)
    tpl = mcfg.teacher.templates or None
    text = text_embeddings(teacher, vocab, tpl).float().cpu()
    try:
        model, meta = load_detector(ckpt, mcfg.det, teacher, region_mode=mcfg.regions.mode)
    except DistillError:
        _refuse_segmenter(ckpt)
        raise
    model.set_vocabulary(text, torch.tensor(_novel_mask(vocab, mcfg, meta.get("trained_classes"))), list(vocab.names))
    model.to(teacher.device)
    fp = sha256_json({"ckpt": sha256_file(ckpt), "teacher": teacher.fingerprint, "det": str(mcfg.det), "tpl": str(tpl)})[:16]
    return model, teacher, fp


def _refuse_segmenter(ckpt: str) -> None:
    """A one-line error when ``ckpt`` holds a segmentation student (LSeg / CLIPSeg: a decoder, no
    RoI heads) where a ViLD checkpoint was expected."""
    from distill.engine.checkpoint import read

    keys = list(read(ckpt)["model"])
    if any(k.startswith("decoder.") for k in keys) and not any(k.startswith("roi_heads.") for k in keys):
        raise DistillError(f"label.model: {ckpt}: a segmentation checkpoint: add --source seg") from None


def _vild_source(cfg, vocab, device):
    model, teacher, fp = load_vild(cfg, vocab, device)
    return ViLDSource(model, teacher.device, fp), fp


def _rpn_proposer(cfg, vocab, device):
    """Class-agnostic boxes from the RPN of the ViLD checkpoint ``cfg.label.model`` (top
    ``label.max_proposals`` per image, in input pixels; no masks)."""
    model, teacher, fp = load_vild(cfg, vocab, device)
    if not hasattr(model, "propose"):
        raise DistillError(f"label.proposals: rpn needs a ViLD checkpoint (a region proposal network); {cfg.label.model} is a one-stage student (det.arch=fcos): use --source vild with it")
    k = cfg.label.max_proposals

    def propose(img: torch.Tensor):
        boxes = model.propose([img.to(teacher.device, torch.float32) / 255.0], k)[0]
        return boxes.cpu().numpy(), None

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
        mcfg = config_from_dict(yaml.safe_load(meta["config"]), stored=True)
    elif (p.parent / "config.yaml").is_file():
        mcfg = load_config(p.parent / "config.yaml", stored=True)
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
    dense = locate(rec.get("dense_tower", rec.get("dense_pretrained", tc.dense_tower)), cfg.teacher.dense_tower, "teacher.dense_tower", rec.get("dense_fingerprint", ""))
    mcfg = dataclasses.replace(mcfg, teacher=dataclasses.replace(tc, pretrained=pre, dense_tower=dense, device=cfg.teacher.device or tc.device))
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
    from distill.segmentation.build import load_segmenter
    from distill.segmentation.train import text_for

    mcfg, meta = _model_config(cfg, cfg.label.model)
    teacher = _student_teacher(mcfg, meta, cfg.label.model, device)
    model = load_segmenter(mcfg.seg, teacher, cfg.label.model).to(teacher.device)
    text = text_for(teacher, vocab, mcfg).to(teacher.device)
    fp = sha256_json({"ckpt": sha256_file(cfg.label.model), "teacher": teacher.fingerprint, "window": mcfg.seg.window})[:16]
    return SegSource(model, text, vocab, window=mcfg.seg.window, fingerprint=fp), fp


