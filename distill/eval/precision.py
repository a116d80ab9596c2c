"""Precision arrays and the AP numbers read from them, over the base / novel split.

The COCO protocol's precision array ``[T, R, K]`` (IoU thresholds x 101 recall points x
categories, area range "all", the largest maxDets; -1 where a category has no ground truth) comes
from one of three backends: the streaming evaluator (:func:`run_stream`,
:mod:`distill.eval.coco_stream`), faster-coco-eval or pycocotools (:func:`run_coco`). Every
category competes in one run over the whole vocabulary; the base / novel numbers average the
per-category AP over the categories of each split (:func:`metrics_from_precision`), which is the
generalized setting of OVR-CNN (Zareian et al. CVPR 2021, section 4) and ViLD (Gu et al. ICLR
2022, section 4.1). The split comes from the ground truth's categories or a vocabulary naming
them (:func:`categories_split`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Any

import numpy as np

from distill.errors import DistillError
from distill.eval.coco_stream import IOU_THRS, BoxGT, evaluate_arrays
from distill.eval.results import box_results

log = logging.getLogger(__name__)

__all__ = ["run_coco", "run_stream", "image_mask", "empty_precision", "mean_valid", "metrics_from_precision",
           "categories_split", "vocab_classes"]


def run_coco(
    gt: dict, results: list[dict], iou_type: str, max_dets: int, backend: str, img_ids=None
) -> tuple[np.ndarray, np.ndarray]:
    """Run COCOeval once over all categories; return (precision [T, R, K] at area "all" and the
    largest maxDets, IoU thresholds [T])."""
    # Both COCO implementations add keys ("ignore", "rle", RLE segmentations) to the annotation
    # dicts they are given: hand them copies so the caller's ground truth is left as it was.
    # "iscrowd" and "area" are optional in our files; pycocotools needs both (area only matters
    # for the small/medium/large ranges, which are not reported).
    gt = dict(gt)
    gt["annotations"] = [
        {"iscrowd": 0, "area": float(a["bbox"][2]) * float(a["bbox"][3]), **a} for a in gt["annotations"]
    ]
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        coco_gt = COCO(gt)  # shallow copy; the GT dicts are not modified
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=lambda *a, **k: None)
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = copy.copy(gt)
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    ev.params.maxDets = [1, 10, max_dets]
    if img_ids is not None:
        ev.params.imgIds = sorted(img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    prec = np.asarray(ev.eval["precision"], dtype=np.float64)
    a = list(ev.params.areaRngLbl).index("all")
    iou_thrs = np.asarray(ev.params.iouThrs)
    return prec[:, :, :, a, -1], iou_thrs  # [T, R, K]


def run_stream(
    gt: dict | Any, results: list[dict] | tuple, max_dets: int, img_ids=None, gt_name: str = "ground truth"
) -> tuple[np.ndarray, np.ndarray]:
    """The streaming box evaluation (same return as :func:`run_coco` for ``iou_type="bbox"``).

    ``gt``: a COCO dict or a :class:`~distill.eval.coco_stream.BoxGT`; ``results``: COCO results
    (list of dicts) or the arrays of :func:`box_results`. Keeps the top ``max_dets`` of each image.
    """
    box_gt = gt if isinstance(gt, BoxGT) else BoxGT(gt)
    arrays = results if isinstance(results, tuple) else box_results(results, box_gt, gt_name)[0]
    images = image_mask(box_gt, img_ids)
    prec, dropped = evaluate_arrays(box_gt, images, *arrays, max_dets=max_dets)
    if dropped:
        log.info("kept the top %d detections per image (%d dropped)", max_dets, dropped)
    return prec, IOU_THRS.copy()


def image_mask(box_gt, img_ids=None) -> np.ndarray:
    """Bool mask over ``box_gt``'s images: ``img_ids`` (ids not in the GT are ignored) or all."""
    if img_ids is None:
        return np.ones(box_gt.n_images, bool)
    m = np.zeros(box_gt.n_images, bool)
    idx = [box_gt.img_index[i] for i in img_ids if i in box_gt.img_index]
    m[np.asarray(idx, dtype=np.int64)] = True
    return m


def empty_precision(cat_ids: list, has_gt) -> tuple[np.ndarray, np.ndarray]:
    """No detections at all: every category with (non-crowd) ground truth gets precision 0, the
    others stay -1 (excluded), as COCOeval would do. (COCO loaders cannot take an empty list.)"""
    prec = np.full((10, 101, len(cat_ids)), -1.0)
    for k, cid in enumerate(cat_ids):
        if cid in has_gt:
            prec[:, :, k] = 0.0
    return prec, np.linspace(0.5, 0.95, 10)


def mean_valid(x: np.ndarray) -> float:
    v = x[x > -1]
    return float(v.mean()) if v.size else -1.0


def metrics_from_precision(prec: np.ndarray, iou_thrs: np.ndarray, names: list[str], split: list[str], prefix: str) -> dict:
    """AP numbers from a precision array [T, R, K] (-1 = category without ground truth)."""
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    # A category with ground truth has every entry set; one without has every entry -1. So the
    # mean over valid entries equals the mean of per-category APs over categories with GT.
    ap_k = np.array([mean_valid(prec[:, :, k]) for k in range(prec.shape[2])])
    ap50_k = np.array([mean_valid(prec[t50, :, k]) for k in range(prec.shape[2])])

    def avg(vals: np.ndarray, sel: list[bool]) -> float:
        v = vals[np.array(sel, dtype=bool) & (vals > -1)]
        return float(v.mean()) if v.size else -1.0

    every = [True] * len(split)
    base = [s == "base" for s in split]
    novel = [s == "novel" for s in split]
    m = {
        f"{prefix}/AP": mean_valid(prec),
        f"{prefix}/AP50": mean_valid(prec[t50]),
        f"{prefix}/AP75": mean_valid(prec[t75]),
        f"{prefix}/AP_base": avg(ap_k, base),
        f"{prefix}/AP_novel": avg(ap_k, novel),
        f"{prefix}/AP50_base": avg(ap50_k, base),
        f"{prefix}/AP50_novel": avg(ap50_k, novel),
    }
    assert abs(avg(ap_k, every) - m[f"{prefix}/AP"]) < 1e-9 or m[f"{prefix}/AP"] == -1.0
    for k, name in enumerate(names):
        if ap50_k[k] > -1:
            m[f"{prefix}/AP50/{name}"] = float(ap50_k[k])
    return m


def categories_split(gt: dict, gt_name: str, vocab=None) -> tuple[list[int], list[str], list[str]]:
    """Sorted category ids (COCOeval's order), their names, and 'base'/'novel' per category."""
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in cats]
    if vocab is not None:
        idx = vocab_classes(cats, gt_name, vocab)
        return ids, [vocab.names[i] for i in idx], [vocab.split[i] for i in idx]
    split = []
    for c in cats:
        sp = c.get("split", "base")
        if sp not in ("base", "novel"):
            raise DistillError(f"{gt_name}: category {c['id']} ({c['name']}): split {sp!r} is not 'base' or 'novel'")
        split.append(sp)
    return ids, [str(c["name"]) for c in cats], split


def vocab_classes(cats: list[dict], gt_name: str, vocab) -> list[int]:
    """Per ground-truth category, the index of the vocabulary class of the same name (or
    synonym; case and blanks, and LVIS's underscores, aside).

    Classes are matched by name, not by id: a vocabulary from a list numbers its classes by
    position, so matching ids would give a category the name and split of another class. A
    category the vocabulary does not name is an error naming both files (with the class that
    has its id there, if any); vocabulary classes that are not categories of the ground truth
    are not evaluated, which a one-line note says."""
    from distill.vocab import name_key, prompt_text

    src = vocab.source or "the given vocabulary"
    keys: dict[str, int] = {}
    for i, n in enumerate(vocab.names):  # names first, then synonyms
        keys.setdefault(name_key(prompt_text(n)), i)
    for i, syn in enumerate(vocab.synonyms):
        for s_ in syn:
            keys.setdefault(name_key(prompt_text(s_)), i)
    by_id = dict(zip(vocab.ids, vocab.names))
    out: list[int] = []
    taken: dict[int, dict] = {}
    for c in cats:
        i = keys.get(name_key(prompt_text(str(c["name"]))))
        if i is None:
            there = f" (id {c['id']} there is {by_id[c['id']]!r})" if c["id"] in by_id else ""
            raise DistillError(f"{gt_name}: category {c['name']!r} (id {c['id']}) is not a class of {src}{there}: "
                               "expected a vocabulary naming every ground-truth category")
        if i in taken:
            raise DistillError(f"{src}: class {vocab.names[i]!r} names two categories of {gt_name}: "
                               f"{taken[i]['name']!r} (id {taken[i]['id']}) and {c['name']!r} (id {c['id']})")
        taken[i] = c
        out.append(i)
    extra = [vocab.names[i] for i in range(len(vocab)) if i not in taken]
    if extra:
        log.warning("%s: %d class(es) are not categories of %s and are not evaluated: %s", src, len(extra), gt_name,
                    ", ".join(map(repr, extra[:10])) + (" ..." if len(extra) > 10 else ""))
    return out
