"""How good are pseudo-labels? Precision / recall of boxes at IoU 0.5 (base and novel classes) and
mIoU of the pseudo masks, against hidden ground truth (the shapes world's ``unlabeled`` split).

>>> label_quality("runs/shapes/labels/labels.json", "runs/shapes/data/instances_unlabeled.json")
{'labels/precision_base': ..., 'labels/recall_novel': ..., 'labels/miou_novel': ..., ...}

The ground truth is checked by the project's COCO validator (:func:`distill.data.coco.validate_coco`,
:func:`load_label_gt`): a malformed file is one error naming it and the entry at fault.
``distill label --gt`` checks it, and that its images are those being labelled
(:func:`check_gt_matches`), before labelling anything.

Matching: images by ``file_name`` (exact, else one name is a path suffix of the other, so labels
made on ``images/unlabeled/`` match ground truth named ``unlabeled/000123.png``); classes by name
(case-insensitive; a predicted category unknown to the ground truth counts as a false positive of
no split and is reported in ``labels/precision_all`` only; a ground-truth class the vocabulary
does not name is left out, with one warning line). Within an image and class, predictions
in descending score are matched greedily to the unmatched ground-truth box of highest IoU >= the
threshold (the PASCAL VOC / COCO rule). Every ground-truth image counts: an image the labeler
failed on, or that was not labelled, contributes misses; ``labels/gt_images_matched`` and
``labels/gt_images_unmatched`` count the ground-truth images with and without a labelled image
(one note line when some have none; no match at all is an error). Undefined ratios (nothing
predicted / nothing to find) are -1.

Masks are painted at the labelled image's size. A ground-truth image whose ``width`` / ``height``
differ from it is left out of the mask metrics (boxes still count), with one warning line naming
it, and counted in ``labels/gt_images_size_mismatch``: the size is only known once the image is
decoded, after labelling, and refusing then would throw the finished labels away, while painting
both on one canvas of either size would misplace one of them and change ``pixel_acc``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict

import numpy as np
import torch
import torchvision

from distill.errors import DistillError
from distill.eval.match import match_images, norm_name
from distill.files import read_json

log = logging.getLogger(__name__)

__all__ = ["label_quality", "load_label_gt", "check_gt_matches", "match_images"]


def _xyxy(b) -> list[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


def load_label_gt(gt_json: str | os.PathLike | dict) -> tuple[dict, str]:
    """The ground truth, read and checked by :func:`distill.data.coco.validate_coco` (file names
    may be absolute: they are matched, never opened), with at least one category. Returns
    ``(dict, name for messages)``; the warning about zero-size boxes it drops is one log line."""
    from distill.data.coco import validate_coco

    if isinstance(gt_json, dict):
        name, data = "ground truth", gt_json
    else:
        name, data = str(gt_json), read_json(gt_json, "COCO ground truth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gt = validate_coco(data, name, file_names="any")
    for w in caught:
        log.warning("%s", w.message)
    if not gt["categories"]:
        raise DistillError(f"{name}: categories: empty (expected the ground truth's classes)")
    return gt, name


def check_gt_matches(gt: dict, names: list[str], gt_name: str = "ground truth") -> int:
    """How many images of ``gt`` match one of ``names`` (the images about to be labelled, by
    file name as :func:`match_images`); none is an error naming an example of each side."""
    pred = [{"id": i, "file_name": n} for i, n in enumerate(names)]
    matched = len(set(match_images(pred, gt["images"], gt_name).values()))
    if not matched and gt["images"] and names:
        raise DistillError(f"{gt_name}: none of its {len(gt['images'])} images is one of the {len(names)} labelled images "
                           f"(matched by file_name: ground truth {gt['images'][0]['file_name']!r}, labelled {names[0]!r}); "
                           "expected the ground truth of these images")
    return matched


def _check_pred(pred, name: str) -> None:
    if not isinstance(pred, dict):
        raise DistillError(f"{name}: expected a COCO object with 'images', 'annotations', 'categories', got a {type(pred).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(pred.get(key), list):
            raise DistillError(f"{name}: missing list {key!r} (expected a COCO predictions file)")
    for key, need in (("images", ("id", "file_name")), ("categories", ("id", "name")), ("annotations", ("image_id", "category_id", "bbox"))):
        for i, x in enumerate(pred[key]):
            if not isinstance(x, dict) or any(k not in x for k in need):
                raise DistillError(f"{name}: {key}[{i}]: expected an object with {', '.join(map(repr, need))}")


def _ratio(a: int, b: int) -> float:
    return a / b if b else -1.0


def label_quality(pred_json: str | os.PathLike | dict, gt_json: str | os.PathLike | dict, iou_thresh: float = 0.5,
                  with_counts: bool = False, gt_name: str | None = None, require_match: bool = True) -> dict:
    """Precision / recall of pseudo boxes at ``iou_thresh`` for base, novel and all classes, and
    (when both sides have masks) mIoU of the pseudo masks via
    :class:`distill.eval.segmentation.SemSegEvaluator` (background = 0 is a base class).

    Keys: ``labels/precision_{base,novel,all}``, ``labels/recall_{base,novel,all}``,
    ``labels/f1_{base,novel,all}``, ``labels/miou_{base,novel,all,hiou}``, ``labels/pixel_acc``;
    values in [0, 1] (-1 = undefined); ``labels/gt_images_matched``, ``labels/gt_images_unmatched``
    (and ``labels/gt_images_size_mismatch`` with masks) count images. ``with_counts`` adds
    ``count/...`` integers.

    ``gt_json``: a file, or a dict (already checked by :func:`load_label_gt` when ``gt_name`` is
    given). ``require_match``: predictions on images none of which is in the ground truth are an
    error (``distill label`` checks its image names before labelling and passes False: when every
    image it could match failed to decode, the misses are the numbers).
    """
    pred_name = str(pred_json) if not isinstance(pred_json, dict) else "predictions"
    pred = pred_json if isinstance(pred_json, dict) else read_json(pred_json, "COCO predictions")
    _check_pred(pred, pred_name)
    if isinstance(gt_json, dict) and gt_name is not None:
        gt = gt_json
    else:
        gt, gt_name = load_label_gt(gt_json)
    gt = _in_vocabulary(gt, pred, gt_name)
    gt_cat = {c["id"]: c for c in gt["categories"]}
    name_to_gt = {norm_name(c["name"]): c["id"] for c in gt["categories"]}
    pred_to_gt_cat = {c["id"]: name_to_gt.get(norm_name(c["name"])) for c in pred["categories"]}
    split = {cid: c.get("split", "base") for cid, c in gt_cat.items()}
    img_map = match_images(pred["images"], gt["images"], pred_name)
    matched = set(img_map.values())
    n_gt = len(gt["images"])
    if not matched and pred["images"] and n_gt and require_match:
        raise DistillError(f"{gt_name}: none of its {n_gt} images is an image of {pred_name} (matched by file_name: ground truth "
                           f"{gt['images'][0]['file_name']!r}, labelled {pred['images'][0]['file_name']!r}); expected the "
                           "ground truth of the labelled images")
    unmatched = [g for g in gt["images"] if g["id"] not in matched]
    if unmatched:
        log.warning("%s: %d of its %d images match no labelled image (e.g. %r): they count as misses", gt_name,
                    len(unmatched), n_gt, unmatched[0]["file_name"])

    m = _box_metrics(*_box_counts(pred, gt, img_map, pred_to_gt_cat, split, iou_thresh), with_counts)
    m["labels/gt_images_matched"] = len(matched)
    m["labels/gt_images_unmatched"] = len(unmatched)
    has_masks = any("segmentation" in a for a in pred["annotations"]) and all("segmentation" in a for a in gt["annotations"])
    if has_masks:
        m.update(_mask_miou(pred, gt, img_map, pred_to_gt_cat, split, gt_name))
    return m


def threshold_sweep(pred_json: str | os.PathLike, gt_json: str | os.PathLike, thresholds, iou_thresh: float = 0.5) -> list[dict]:
    """Box precision / recall / F1 (:func:`label_quality`, boxes only) of the labels whose score is
    at least each threshold: how to choose ``label.score_thresh`` on ground truth that is not val
    (the hidden ground truth of the unlabeled split, or base classes of held-out training images).
    Returns one dict per threshold, ``{"score_thresh": t, "labels/...": ...}``."""
    pred = read_json(pred_json, "COCO predictions")
    _check_pred(pred, str(pred_json))
    gt, gt_name = load_label_gt(gt_json)
    gt = _in_vocabulary(gt, pred, gt_name)  # once: its warning line is not repeated per threshold
    rows = []
    for t in sorted(float(x) for x in thresholds):
        kept = dict(pred, annotations=[{k: v for k, v in a.items() if k != "segmentation"}
                                       for a in pred["annotations"] if float(a.get("score", 1.0)) >= t])
        m = label_quality(kept, gt, iou_thresh, gt_name=gt_name)
        rows.append({"score_thresh": t, **{k: v for k, v in m.items() if k.startswith(("labels/precision", "labels/recall", "labels/f1"))}})
    return rows


def _in_vocabulary(gt: dict, pred: dict, gt_name: str) -> dict:
    """``gt`` restricted to the classes the labels' vocabulary names (by name): a class the user
    never named cannot be found, so its boxes are left out of the metrics (one warning line).
    Unchanged when the vocabulary covers every class, or none of them (then all are misses)."""
    names = {norm_name(c["name"]) for c in pred["categories"]}
    keep = {c["id"] for c in gt["categories"] if norm_name(c["name"]) in names}
    if len(keep) == len(gt["categories"]) or not keep:
        return gt
    left = [a for a in gt["annotations"] if a["category_id"] not in keep]
    log.warning("%s: %d boxes of %d classes not in the vocabulary (e.g. %r) are left out of the metrics", gt_name, len(left),
                len(gt["categories"]) - len(keep), next(c["name"] for c in gt["categories"] if c["id"] not in keep))
    return {**gt, "categories": [c for c in gt["categories"] if c["id"] in keep],
            "annotations": [a for a in gt["annotations"] if a["category_id"] in keep]}


def _box_counts(pred: dict, gt: dict, img_map: dict, pred_to_gt_cat: dict, split: dict, iou_thresh: float):
    """(true positives, predictions, ground-truth boxes) per split: predictions of one class in one
    image are matched greedily by score to unused ground-truth boxes of that class at IoU >=
    ``iou_thresh``; crowd boxes are left out."""
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
    return tp, npred, ngt


def _box_metrics(tp: dict, npred: dict, ngt: dict, with_counts: bool) -> dict:
    """``labels/{precision,recall,f1}_{base,novel,all}`` (-1 = undefined) and, ``with_counts``,
    the ``count/...`` integers."""
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
    return m


def _paint(anns: list[dict], shape: tuple[int, int], cat_map, by_score: bool) -> np.ndarray:
    from distill.data.coco import decode_segmentation
    from distill.labels.formats import rle_to_mask

    sem = np.zeros(shape, np.int64)
    if by_score:  # higher scores paint last and win overlaps
        anns = sorted(anns, key=lambda a: float(a.get("score", 1.0)))
    for a in anns:
        c = cat_map(a["category_id"])
        seg = a.get("segmentation")
        if c is None or not seg or not isinstance(seg, (dict, list)):
            continue
        mk = rle_to_mask(seg) if isinstance(seg, dict) else decode_segmentation(seg, *shape).astype(bool)  # RLE / polygons
        if mk.shape != shape:
            continue
        sem[mk] = c
    return sem


def _size(im: dict) -> tuple[int, int] | None:
    """(height, width) of a COCO image entry, None when it has none."""
    try:
        return int(im["height"]), int(im["width"])
    except (KeyError, TypeError, ValueError):
        return None


def _mask_miou(pred: dict, gt: dict, img_map: dict, pred_to_gt_cat: dict, split: dict, gt_name: str = "ground truth") -> dict:
    """Pixel metrics over the ground-truth images, painted at the labelled image's size (the
    ground truth's for an image that was not labelled; one without a size is left out). An image
    whose ground-truth size differs from the labelled image's is left out (one warning line)."""
    from distill.eval.segmentation import SemSegEvaluator

    num = max(split) + 1
    base = [0] + [c for c, s in split.items() if s == "base"]
    ev = SemSegEvaluator(num, base)
    pr_by_img: dict[int, list[dict]] = defaultdict(list)
    for a in pred["annotations"]:
        if a["image_id"] in img_map:
            pr_by_img[img_map[a["image_id"]]].append(a)
    gt_by_img: dict[int, list[dict]] = defaultdict(list)
    for a in gt["annotations"]:
        gt_by_img[a["image_id"]].append(a)
    labelled = {img_map[p["id"]]: p for p in pred["images"] if p["id"] in img_map}
    wrong: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
    for g in gt["images"]:
        gsize, p = _size(g), labelled.get(g["id"])
        psize = _size(p) if p is not None else None
        if psize is not None and gsize is not None and psize != gsize:
            wrong.append((p["file_name"], psize, gsize))
            continue
        shape = psize or gsize
        if shape is None:
            continue
        gsem = _paint(gt_by_img.get(g["id"], []), shape, lambda c: c, by_score=False)
        psem = _paint(pr_by_img.get(g["id"], []), shape, lambda c: pred_to_gt_cat.get(c), by_score=True)
        ev.process(psem, gsem)
    if wrong:
        name, (ph, pw), (gh, gw) = wrong[0]
        log.warning("%s: %d image(s) differ in size from the labelled image, left out of the mask metrics (boxes still count): "
                    "first %r is %dx%d, the ground truth says %dx%d", gt_name, len(wrong), name, pw, ph, gw, gh)
    r = ev.evaluate()
    return ({f"labels/miou_{k.split('/')[1]}": v for k, v in r.items() if k.startswith("miou/")}
            | {"labels/pixel_acc": r["pixel_acc"], "labels/gt_images_size_mismatch": len(wrong)})
