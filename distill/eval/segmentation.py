"""Semantic segmentation evaluation: a streaming confusion matrix, mIoU over base / novel / all
classes (the zero-shot segmentation literature's seen / unseen) and their harmonic mean (hIoU).

Class index space = the semantic PNG values: 0 = background (a base class), ``c`` = category id
``c``; 255 in the ground truth is ignored. hIoU = 2 * S * U / (S + U) with S, U the base and
novel mIoU, as in the zero-shot segmentation literature (ZS3Net, Bucher et al. NeurIPS 2019,
section 4; SPNet, Xian et al. CVPR 2019, section 4.1).

Memory does not grow with the number of images: each image adds to a fixed
``(C, C + 1)`` int64 matrix (``torch.bincount``). Row = ground-truth class, column = predicted
class; the last column counts pixels whose prediction is outside ``0..C-1`` (for example 255,
"no label"): they are misses for the ground-truth class and false positives of no class.

Metric names: ``miou/base``, ``miou/novel``, ``miou/all``, ``miou/hiou``, ``pixel_acc``, and
``iou/<name>`` per class. Values are fractions in [0, 1]; a class absent from both the ground truth
and the predictions has no IoU and is left out of the means (and of ``iou/...``); a mean over no
class is ``-1`` (undefined, as COCO reports it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from distill.data.semseg import read_label_png
from distill.errors import DistillError
from distill.files import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["SemSegEvaluator", "evaluate_semseg_dirs", "semseg_classes", "read_label_png"]


class SemSegEvaluator:
    """reset / process(pred, gt) / evaluate() over a streaming confusion matrix.

    Under torch.distributed, evaluate() sums the matrices of all ranks (every rank gets the
    metrics).

    Args:
        num_classes: C; labels are 0..C-1.
        base: the base class indices (background 0 included by the caller); the rest are novel.
        ignore_index: ground-truth value that is not evaluated.
        names: C class names for ``iou/<name>`` (default: the index).
        gather: sum the matrices over ranks under torch.distributed (False when one rank alone
            evaluates the whole set, as the training engine's rank-0 evaluation does: gathering
            there waits forever for the other ranks).
    """

    def __init__(self, num_classes: int, base: Sequence[int], ignore_index: int = 255, names: Sequence[str] | None = None, gather: bool = True) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        base = sorted({int(c) for c in base})
        if any(c < 0 or c >= num_classes for c in base):
            raise ValueError(f"base classes {base} outside 0..{num_classes - 1}")
        if names is not None and len(names) != num_classes:
            raise ValueError(f"{len(names)} names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.base = base
        self.novel = [c for c in range(num_classes) if c not in set(base)]
        self.ignore_index = ignore_index
        self.names = list(names) if names is not None else [str(c) for c in range(num_classes)]
        self.gather = gather  # False: this rank saw the whole set (e.g. the engine's rank-0 eval)
        self.reset()

    def reset(self) -> None:
        self.conf = torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.int64)

    @torch.no_grad()
    def process(self, pred, gt) -> None:
        """Add predictions and ground truth of the same shape: (H, W) or (B, H, W) integer
        tensors or arrays (``pred`` may also be (B, C, H, W) logits: argmax over C)."""
        pred = torch.as_tensor(np.asarray(pred) if not torch.is_tensor(pred) else pred)
        gt = torch.as_tensor(np.asarray(gt) if not torch.is_tensor(gt) else gt)
        if pred.is_floating_point():
            if pred.dim() != gt.dim() + 1:
                raise ValueError(f"float predictions must be (B, C, H, W) logits for gt {tuple(gt.shape)}")
            pred = pred.argmax(dim=-3)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != ground truth shape {tuple(gt.shape)}")
        C = self.num_classes
        gt = gt.reshape(-1).to(torch.int64)
        pred = pred.reshape(-1).to(gt.device, torch.int64)
        # No boolean indexing (the slow part): ignored pixels go to one extra bin that is dropped.
        ignored = gt == self.ignore_index
        bad = ~ignored & ((gt < 0) | (gt >= C))
        if bool(bad.any()):
            v = gt[bad][0].item()
            raise ValueError(f"ground-truth value {v} outside 0..{C - 1} (and not ignore {self.ignore_index})")
        pred = torch.where((pred < 0) | (pred >= C), C, pred)
        idx = torch.where(ignored, C * (C + 1), gt * (C + 1) + pred)
        counts = torch.bincount(idx, minlength=C * (C + 1) + 1)[: C * (C + 1)]
        self.conf += counts.reshape(C, C + 1).cpu()

    def _total_conf(self) -> torch.Tensor:
        """The confusion matrix summed over ranks under torch.distributed (a copy; self.conf
        keeps this rank's counts, so evaluate() can be called twice)."""
        import torch.distributed as dist

        if not (self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.conf
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        conf = self.conf.to(dev, copy=True)
        dist.all_reduce(conf)
        return conf.cpu()

    def ious(self, conf: torch.Tensor | None = None) -> np.ndarray:
        """Per-class IoU, NaN for a class absent from both ground truth and predictions."""
        conf = (self.conf if conf is None else conf).double()
        tp = torch.diagonal(conf[:, : self.num_classes])
        gt_count = conf.sum(dim=1)  # includes predictions outside the class range
        pred_count = conf[:, : self.num_classes].sum(dim=0)
        union = gt_count + pred_count - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        return iou.numpy()

    def evaluate(self) -> dict[str, float]:
        """``miou/base``, ``miou/novel``, ``miou/all``, ``miou/hiou``, ``pixel_acc``, ``iou/<name>``."""
        conf = self._total_conf()
        iou = self.ious(conf)

        def mean(idx: list[int]) -> float:
            v = iou[idx] if idx else np.array([])
            v = v[~np.isnan(v)]
            return float(v.mean()) if v.size else -1.0

        s, u = mean(self.base), mean(self.novel)
        if s < 0 or u < 0:
            h = -1.0  # undefined without both base and novel classes
        else:
            h = 2 * s * u / (s + u) if (s + u) > 0 else 0.0
        total = int(conf.sum())
        correct = int(torch.diagonal(conf[:, : self.num_classes]).sum())
        m = {
            "miou/base": s,
            "miou/novel": u,
            "miou/all": mean(list(range(self.num_classes))),
            "miou/hiou": h,
            "pixel_acc": correct / total if total else -1.0,
        }
        for c, name in enumerate(self.names):
            if not np.isnan(iou[c]):
                m[f"iou/{name}"] = float(iou[c])
        return m

    def save_confusion(self, path: str | os.PathLike) -> None:
        """Write the (C, C + 1) confusion matrix as .npy (atomically)."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.conf.numpy())


def semseg_classes(vocab) -> tuple[int, list[int], list[str]]:
    """From a vocabulary: (num_classes = max id + 1, base = [0] + base ids, names with
    "background" at 0; ids without a class are named by their number and count as base)."""
    C = max(vocab.ids) + 1
    names = [str(i) for i in range(C)]
    names[0] = "background"
    novel = set()
    for cid, n, sp in zip(vocab.ids, vocab.names, vocab.split):
        if cid <= 0:
            raise DistillError(f"{vocab.source or 'vocabulary'}: category id {cid}: expected ids >= 1 (0 is background)")
        names[cid] = n
        if sp == "novel":
            novel.add(cid)
    base = [c for c in range(C) if c not in novel]
    return C, base, names


LEGEND_JSON, LEGEND_PNG = "legend.json", "legend.png"  # what `distill label --format png` writes beside its PNGs


def _label_pngs(folder: Path) -> dict[str, Path]:
    """The label PNGs under ``folder`` (sub-folders too; the extension in any case), by their
    path relative to ``folder`` without the extension. A ``legend.png`` beside a ``legend.json``
    is the labeler's colour legend, not a label map, and is left out."""
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() != ".png" or not p.is_file():
            continue
        if p.name == LEGEND_PNG and (p.parent / LEGEND_JSON).is_file():
            continue
        key = p.relative_to(folder).with_suffix("").as_posix()
        if key in out:
            raise DistillError(f"{p}: two label PNGs for one image ({out[key].name} and {p.name}; expected one)")
        out[key] = p
    return out


def _legend_lut(folder: Path, vocab, C: int, role: str) -> np.ndarray | None:
    """The labeler's ``legend.json`` in ``folder`` (``[{"value", "name"}, ...]``, 0 = background)
    as a lookup table from the PNG values to this evaluation's classes (category ids), matched by
    class name: a labeler run whose vocabulary numbered its classes otherwise is read as it meant.
    None without a legend, or where every value already is its class's id.

    A value not in the legend stays as it is. A legend class that is not one of the evaluation's
    classes is an error in the ground truth; in the predictions its pixels are "no class" (misses
    of the true class), with a one-line note."""
    path = folder / LEGEND_JSON
    if not path.is_file():
        return None
    data = read_json(path, "label legend")
    if not isinstance(data, list) or not all(isinstance(e, dict) and isinstance(e.get("value"), int) and not isinstance(e.get("value"), bool)
                                             and isinstance(e.get("name"), str) for e in data):
        raise DistillError(f"{path}: expected a list of {{'value': int, 'name': str}} (the legend distill label writes)")
    mapping: dict[int, int] = {}
    unknown: list[str] = []
    for e in data:
        v, n = e["value"], e["name"]
        if not 0 <= v < 65535:
            raise DistillError(f"{path}: value {v} ({n!r}): expected 0..65534")
        if v == 0:  # background
            mapping[v] = 0
            continue
        try:
            mapping[v] = vocab.ids[vocab.index(n)]
        except DistillError:
            if role == "ground-truth":
                raise DistillError(f"{path}: class {n!r} (value {v}) is not a class of {vocab.source or 'the vocabulary'} "
                                   "(expected the ground truth's classes)") from None
            mapping[v] = C  # "no class": a miss of the ground-truth class
            unknown.append(n)
    if unknown:
        log.warning("%s: %d class(es) are not classes of %s, their pixels count as misses: %s", path, len(unknown),
                    vocab.source or "the vocabulary", ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
    if all(k == v for k, v in mapping.items()):
        return None
    lut = np.arange(65536, dtype=np.int64)
    for k, v in mapping.items():
        lut[k] = v
    log.info("%s: %s PNG values read as the category ids of the same class names", path, role)
    return lut


def evaluate_semseg_dirs(
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    vocab=None,
    gt_json: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    ignore_index: int = 255,
) -> dict[str, float]:
    """Evaluate every ``gt_dir/<name>.png`` against ``pred_dir/<name>.png``.

    ``<name>`` is a path relative to the folder (sub-folders are searched, as ``distill label``
    mirrors its input folders), the extension in any case (``a.PNG`` pairs with ``a.png``). The
    labeler's ``legend.png`` is not a label map; its ``legend.json`` says which class each PNG
    value is, and values are read through it by class name (see :func:`_legend_lut`), so the
    ``semantic/`` folder of ``distill label --format png`` evaluates as it is.

    Classes, names and the base/novel split come from ``vocab`` (a Vocabulary or a vocabulary
    file) or from ``gt_json`` (a COCO file whose categories carry ``split``). Writes
    ``metrics.json`` and ``confusion.npy`` into ``out_dir`` when given.
    """
    from distill.vocab import Vocabulary, load_vocab

    if vocab is None and gt_json is None:
        raise DistillError("evaluate_semseg_dirs: give a vocabulary or a COCO ground-truth json (for class names and split)")
    if vocab is None:
        vocab = load_vocab(Path(gt_json))
    elif not isinstance(vocab, Vocabulary):
        vocab = load_vocab(vocab)
    C, base, names = semseg_classes(vocab)
    if ignore_index == 255 and len(vocab) > 254:  # 16-bit label PNGs (distill label): 255 is a class, 65535 = ignore
        ignore_index = 65535
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise DistillError(f"{d}: {what} folder not found")
    gts = _label_pngs(gt_dir)
    if not gts:
        raise DistillError(f"{gt_dir}: no .png ground-truth masks in this folder (looked in sub-folders too, any case of .png)")
    preds = _label_pngs(pred_dir)
    gt_lut = _legend_lut(gt_dir, vocab, C, "ground-truth")
    pred_lut = _legend_lut(pred_dir, vocab, C, "prediction")
    if not (pred_dir / LEGEND_JSON).is_file():
        # Nothing says what the values mean: a labeler's PNGs copied without their legend.json
        # number the classes as its vocabulary did, which may not be these ids.
        log.warning("%s: no %s: its PNG values are read as the category ids of %s (0 = background); give the "
                    "labeler's %s beside its PNGs if they number the classes otherwise", pred_dir, LEGEND_JSON,
                    vocab.source or "the vocabulary", LEGEND_JSON)
    ev = SemSegEvaluator(C, base, ignore_index=ignore_index, names=names)
    for key, g in gts.items():
        p = preds.get(key)
        if p is None:
            rel = g.relative_to(gt_dir).with_suffix(".png")
            raise DistillError(f"{pred_dir / rel}: prediction missing (expected one PNG per ground-truth mask {g.relative_to(gt_dir)})")
        gt = read_label_png(g)
        pred = read_label_png(p)
        if gt_lut is not None:
            gt = np.where(gt == ignore_index, gt, gt_lut[gt.clip(0, 65535)])
        if pred_lut is not None:
            pred = pred_lut[pred.clip(0, 65535)]
        if pred.shape != gt.shape:
            raise DistillError(f"{p}: size {pred.shape[1]}x{pred.shape[0]} (WxH), expected {gt.shape[1]}x{gt.shape[0]} like {g}")
        try:
            ev.process(pred, gt)
        except ValueError as e:
            raise DistillError(f"{g}: {e}") from None
    metrics = ev.evaluate()
    metrics["num_images"] = len(gts)
    if out_dir is not None:
        ev.save_confusion(Path(out_dir) / "confusion.npy")
        write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics
