"""How good are pseudo-labels? Precision / recall of boxes at IoU 0.5 (base and novel classes) and
mIoU of the pseudo masks, against hidden ground truth (the shapes world's ``unlabeled`` split).

>>> label_quality("runs/shapes/labels/labels.json", "runs/shapes/data/instances_unlabeled.json")
{'labels/precision_base': ..., 'labels/recall_novel': ..., 'labels/miou_unseen': ..., ...}

Matching: images by ``file_name`` (exact, else one name is a path suffix of the other, so labels
made on ``images/unlabeled/`` match ground truth named ``unlabeled/000123.png``); classes by name
(case-insensitive; a predicted category unknown to the ground truth counts as a false positive of
no split and is reported in ``labels/precision_all`` only). Within an image and class, predictions
in descending score are matched greedily to the unmatched ground-truth box of highest IoU >= the
threshold (the PASCAL VOC / COCO rule). Every ground-truth image counts: an image the labeler
failed on contributes misses. Undefined ratios (nothing predicted / nothing to find) are -1.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torchvision

from distill.errors import DistillError
from distill.files import read_json


def _xyxy(b) -> list[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


def _suffixes(name: str) -> list[str]:
    parts = Path(name).as_posix().split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


def match_images(pred_images: list[dict], gt_images: list[dict], where: str = "labels") -> dict[int, int]:
    """pred image id -> gt image id, by file_name (exact, else a path suffix either way)."""
    by_suffix: dict[str, list[int]] = defaultdict(list)
    for g in gt_images:
        for s in _suffixes(g["file_name"]):
            by_suffix[s].append(g["id"])
    out = {}
    for p in pred_images:
        name = Path(p["file_name"]).as_posix()
        cands = by_suffix.get(name, [])
        if not cands:  # the prediction's name is longer: try its suffixes
            for s in _suffixes(name)[1:]:
                exact = [g for g in by_suffix.get(s, [])]
                if len(exact) == 1:
                    cands = exact
                    break
        if len(cands) > 1:
            raise DistillError(f"{where}: image {p['file_name']!r} matches {len(cands)} ground-truth images (give unique relative names)")
        if cands:
            out[p["id"]] = cands[0]
    return out


def _ratio(a: int, b: int) -> float:
    return a / b if b else -1.0


def label_quality(pred_json: str | os.PathLike | dict, gt_json: str | os.PathLike | dict, iou_thresh: float = 0.5, with_counts: bool = False) -> dict:
    """Precision / recall of pseudo boxes at ``iou_thresh`` for base, novel and all classes, and
    (when both sides have masks) mIoU of the pseudo semantic masks via
    :class:`distill.eval.segmentation.SemSegEvaluator` (background = 0 is a seen class; base
    classes seen, novel unseen).

    Keys: ``labels/precision_{base,novel,all}``, ``labels/recall_{base,novel,all}``,
    ``labels/f1_{base,novel,all}``, ``labels/miou_{seen,unseen,all,hiou}``, ``labels/pixel_acc``;
    values in [0, 1] (-1 = undefined). ``with_counts`` adds ``count/...`` integers.
    """
    pred = pred_json if isinstance(pred_json, dict) else read_json(pred_json, "COCO predictions")
    gt = gt_json if isinstance(gt_json, dict) else read_json(gt_json, "COCO ground truth")
    for what, d, src in (("predictions", pred, pred_json), ("ground truth", gt, gt_json)):
        for key in ("images", "annotations", "categories"):
            if not isinstance(d.get(key), list):
                raise DistillError(f"{src if not isinstance(src, dict) else what}: missing list {key!r} (expected a COCO {what} file)")
    gt_cat = {c["id"]: c for c in gt["categories"]}
    name_to_gt = {str(c["name"]).strip().lower(): c["id"] for c in gt["categories"]}
    pred_to_gt_cat = {c["id"]: name_to_gt.get(str(c["name"]).strip().lower()) for c in pred["categories"]}
    split = {cid: c.get("split", "base") for cid, c in gt_cat.items()}
    img_map = match_images(pred["images"], gt["images"], str(pred_json) if not isinstance(pred_json, dict) else "predictions")

    gt_by_img: dict[int, list[dict]] = defaultdict(list)
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            gt_by_img[a["image_id"]].append(a)
    pr_by_img: dict[int, list[dict]] = defaultdict(list)
    for a in pred["annotations"]:
        if a["image_id"] in img_map:
            pr_by_img[img_map[a["image_id"]]].append(a)

    tp = defaultdict(int)
    npred = defaultdict(int)
    ngt = defaultdict(int)
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            ngt[split.get(a["category_id"], "base")] += 1
    for gid in {g["id"] for g in gt["images"]}:
        preds = pr_by_img.get(gid, [])
        gts = gt_by_img.get(gid, [])
        for a in preds:
            c = pred_to_gt_cat.get(a["category_id"])
            npred[split[c] if c is not None else "unknown"] += 1
        classes = {pred_to_gt_cat.get(a["category_id"]) for a in preds} - {None}
        for c in classes:
            P = sorted((a for a in preds if pred_to_gt_cat.get(a["category_id"]) == c), key=lambda a: -float(a.get("score", 1.0)))
            G = [g for g in gts if g["category_id"] == c]
            if not G:
                continue
            iou = torchvision.ops.box_iou(torch.tensor([_xyxy(a["bbox"]) for a in P], dtype=torch.float64),
                                          torch.tensor([_xyxy(g["bbox"]) for g in G], dtype=torch.float64))
            used = torch.zeros(len(G), dtype=torch.bool)
            for i in range(len(P)):
                row = iou[i].clone()
                row[used] = -1.0
                j = int(row.argmax())
                if row[j] >= iou_thresh:
                    used[j] = True
                    tp[split[c]] += 1
    m: dict[str, float] = {}
    for s in ("base", "novel", "all"):
        t = sum(tp.values()) if s == "all" else tp[s]
        p = sum(npred.values()) if s == "all" else npred[s]
        g = sum(ngt.values()) if s == "all" else ngt[s]
        prec, rec = _ratio(t, p), _ratio(t, g)
        m[f"labels/precision_{s}"] = prec
        m[f"labels/recall_{s}"] = rec
        m[f"labels/f1_{s}"] = 2 * prec * rec / (prec + rec) if prec > 0 and rec > 0 else (0.0 if prec >= 0 and rec >= 0 else -1.0)
        if with_counts:
            m[f"count/tp_{s}"], m[f"count/pred_{s}"], m[f"count/gt_{s}"] = t, p, g
    has_masks = any("segmentation" in a for a in pred["annotations"]) and all("segmentation" in a for a in gt["annotations"])
    if has_masks:
        m.update(_mask_miou(pred, gt, img_map, pred_to_gt_cat, split))
    return m


def _paint(anns: list[dict], shape: tuple[int, int], cat_map, by_score: bool) -> np.ndarray:
    from distill.labels.formats import rle_to_mask

    sem = np.zeros(shape, np.int64)
    if by_score:  # higher scores paint last and win overlaps
        anns = sorted(anns, key=lambda a: float(a.get("score", 1.0)))
    for a in anns:
        c = cat_map(a["category_id"])
        if c is None or "segmentation" not in a or not isinstance(a["segmentation"], dict):
            continue
        mk = rle_to_mask(a["segmentation"])
        if mk.shape != shape:
            continue
        sem[mk] = c
    return sem


def _mask_miou(pred: dict, gt: dict, img_map: dict, pred_to_gt_cat: dict, split: dict) -> dict:
    from distill.eval.segmentation import SemSegEvaluator

    num = max(split) + 1
    seen = [0] + [c for c, s in split.items() if s == "base"]
    ev = SemSegEvaluator(num, seen)
    pr_by_img: dict[int, list[dict]] = defaultdict(list)
    for a in pred["annotations"]:
        if a["image_id"] in img_map:
            pr_by_img[img_map[a["image_id"]]].append(a)
    gt_by_img: dict[int, list[dict]] = defaultdict(list)
    for a in gt["annotations"]:
        gt_by_img[a["image_id"]].append(a)
    for g in gt["images"]:
        shape = (int(g["height"]), int(g["width"]))
        gsem = _paint(gt_by_img.get(g["id"], []), shape, lambda c: c, by_score=False)
        psem = _paint(pr_by_img.get(g["id"], []), shape, lambda c: pred_to_gt_cat.get(c), by_score=True)
        ev.process(psem, gsem)
    r = ev.evaluate()
    return {f"labels/miou_{k.split('/')[1]}": v for k, v in r.items() if k.startswith("miou/")} | {"labels/pixel_acc": r["pixel_acc"]}
