"""How a label source's raw predictions become labels: score thresholds (global and per class),
minimum area, class-wise NMS and top-k (:func:`filter_predictions`, options in
:class:`FilterOptions`; ``label.class_thresh`` read by :func:`parse_class_thresh`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torchvision

from distill.errors import DistillError
from distill.labels.candidates import BoxMasks
from distill.vocab import Vocabulary, name_key


# label.score_thresh / label.nms when the config leaves them empty: per source, else DEFAULT.
# vlplm: VL-PLM's threshold on the fused score and its class-wise NMS (github xiaofeng94/VL-PLM,
# tools/gen_PLs.py ``--thres`` 0.8 and ``--nms_thres`` 0.6, applied by tools/utils.py
# ``detection_postprocessing``: scores > thres, then torchvision ``batched_nms`` over the classes;
# here >= as for every source, the same but at a score of exactly 0.8).
DEFAULT_THRESH = (0.3, 0.5)
SOURCE_THRESH = {"vlplm": (0.8, 0.6)}


def source_thresholds(source: str, score_thresh: float | None, nms: float | None) -> tuple[float, float]:
    """(score threshold, NMS IoU) of ``label.score_thresh`` / ``label.nms``, the source's
    defaults (:data:`SOURCE_THRESH`) where a value is None."""
    d_score, d_nms = SOURCE_THRESH.get(source, DEFAULT_THRESH)
    return (d_score if score_thresh is None else float(score_thresh)), (d_nms if nms is None else float(nms))


@dataclass(frozen=True)
class FilterOptions:
    """How raw predictions become labels (recorded in the output's ``info``).

    ``class_thresh`` maps vocabulary index -> score threshold (overrides ``score_thresh``);
    ``nms`` is the class-wise IoU threshold in [0, 1] (0 or 1 = off); ``min_area`` in pixels (mask area
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


def _split_class_thresh(text: str) -> list[str]:
    """``"cat, domestic=0.5, dog=0.2"`` -> ``["cat, domestic=0.5", "dog=0.2"]``: a comma ends an
    entry only after its ``=threshold``, so a class name may hold commas (one class a line in a
    .txt vocabulary); a trailing part without ``=`` is returned as it is (an error for the caller)."""
    out: list[str] = []
    cur: list[str] = []
    for seg in text.split(","):
        cur.append(seg)
        if "=" in seg:
            out.append(",".join(cur).strip())
            cur = []
    if cur and ",".join(cur).strip():
        out.append(",".join(cur).strip())
    return [p for p in out if p]


def _class_index(name: str, vocab: Vocabulary, where: str) -> int:
    """The vocabulary index of ``name`` (a class or a synonym); spaces around commas do not count
    (``cat,domestic`` is ``cat, domestic``: a config override's list loses them)."""
    try:
        return vocab.index(name)
    except DistillError as e:
        def squeeze(x: str) -> str:
            return re.sub(r"\s*,\s*", ",", name_key(x))

        key = squeeze(name)
        for i, (n, syn) in enumerate(zip(vocab.names, vocab.synonyms)):
            if squeeze(n) == key or key in (squeeze(x) for x in syn):
                return i
        raise DistillError(f"{where}: {e}") from None


def parse_class_thresh(items: Sequence[str], vocab: Vocabulary, where: str = "label.class_thresh") -> tuple[tuple[int, float], ...]:
    """``["red star=0.5", "blue circle=0.2"]`` (or one comma-separated string) -> ((index, thr), ...).

    A comma separates two entries only after a threshold, so a class whose name holds commas
    (``"cat, domestic=0.5"``) gets its own. A prompt that maps onto a class (a synonym) names
    that class."""
    out: dict[int, float] = {}
    for part in _split_class_thresh(",".join(str(x) for x in items)):
        if "=" not in part:
            raise DistillError(f"{where}: {part!r}: expected 'class name=threshold'")
        name, val = (x.strip() for x in part.rsplit("=", 1))
        try:
            thr = float(val)
        except ValueError:
            raise DistillError(f"{where}: {part!r}: threshold {val!r} is not a number") from None
        if not 0.0 <= thr <= 1.0:
            raise DistillError(f"{where}: {part!r}: threshold must be in [0, 1]")
        i = _class_index(name, vocab, where)
        if i in out:
            raise DistillError(f"{where}: class {vocab.names[i]!r} is given twice ({out[i]} and {thr}); keep one")
        out[i] = thr
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
