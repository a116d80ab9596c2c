"""LVIS v1 federated box and mask AP, streaming.

The algorithm is the official ``lvis`` package's (lvis-api 0.5.3, ``lvis/eval.py`` ``LVISEval``
and ``lvis/results.py`` ``LVISResults``), step for step; the tests compare every reported number
with ``LVISEval`` on random LVIS-format data:

- results: at most ``MAX_DETS`` (300) detections per image, the highest scores over all categories
  of the image (``limit_dets_per_image``); a detection's area is its box's ``w * h`` (its mask's
  area when it has no box);
- ground truth and detections with area not in (0, inf) are left out (``get_ann_ids`` with an
  area filter), as are detections of a category that is neither *positive* in the image (it has
  ground truth there) nor in the image's ``neg_category_ids``: the detector is not judged on
  categories whose presence nobody checked;
- per image and category, detections in score order (ties: input order) are matched greedily to
  the ground truth at every IoU threshold (0.50:0.05:0.95, ``min(t, 1 - 1e-10)``): the best
  available non-ignored box (the last one of equal IoU), else the best ignored one; a ground
  truth is ignored when its ``ignore`` field is set or its area is outside the area range; a
  detection matched to an ignored box is ignored; an unmatched detection is ignored when its
  area is outside the range or its category is in the image's ``not_exhaustive_category_ids``
  (so it is not a false positive);
- per category and area range (all, small < 32², medium < 96², large), the detections of all
  images sorted by descending score (ties: image id, then input order), cumulative tp / fp,
  precision made monotone and read at 101 recall points; -1 where the category has no
  non-ignored ground truth in that range;
- AP, AP50, AP75, APs/m/l average the valid precision entries of all categories; AP_r / AP_c /
  AP_f those of the categories of each ``frequency``.

``lvis`` itself is not used at run time: 0.5.3 (the last release) calls ``np.float``, which
NumPy >= 1.24 no longer has, and it keeps every ground truth and detection as a Python dict and
every (image, category, area range) result until the end (gigabytes on LVIS val).

What :class:`LvisEval` holds: the ground truth as flat arrays
(:class:`~distill.eval.lvis_gt.LvisGT`), and per kept detection a record of about 40 bytes (image, input
position, category, score, and tp / ignore bit masks over the 10 thresholds for each of the 4 area
ranges). Detections of categories that are not evaluated in their image (most of the 300 an
LVIS detector outputs) are dropped when their image is added, and masks are only read while
their image is matched. One deliberate difference: ``LVISEval`` records a match by the ground
truth's annotation id, so a box with id 0 counts as unmatched there; here matches are flags.

:func:`evaluate_lvis` runs the protocol on a results file or list (for
:func:`distill.eval.detection.evaluate_detection`, which calls it when :func:`load_lvis_gt` finds
an LVIS file), :func:`lvis_metrics` gives its metric keys.
"""

from __future__ import annotations

import logging
import math
import os
from array import array
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from distill.errors import DistillError
from distill.eval.coco_stream import IOU_THRS, REC_THRS, MatchRecords, accumulate, array_view, box_iou, greedy, pairs, top_per_image
from distill.eval.lvis_gt import AREA_RNGS, FREQS, LvisGT, is_lvis, out_of, sniff_lvis
from distill.eval.precision import categories_split, mean_valid, metrics_from_precision
from distill.eval.results import check_result, needed_keys, results_items

log = logging.getLogger(__name__)

MAX_DETS = 300  # lvis.results.LVISResults(max_dets=300), "the official value of max_dets for LVIS"
_T = len(IOU_THRS)
_A = len(AREA_RNGS)
_ALL_BITS = np.uint16((1 << _T) - 1)

__all__ = ["LvisEval", "lvis_summary", "load_lvis_gt", "evaluate_lvis", "lvis_metrics", "warn_frequency", "MAX_DETS"]


class LvisEval(MatchRecords):
    """Federated matching image by image, kept as compact records; :meth:`precision` accumulates.

    ``add`` takes whole images (all their detections, at most ``MAX_DETS`` each: the caller cuts);
    an image given a second time is skipped (its first detections count).
    """

    _FIELDS = ("img", "pos", "cat", "score", "tp", "ig")

    def __init__(self, gt: LvisGT, iou_type: str = "bbox") -> None:
        if iou_type not in ("bbox", "segm"):
            raise DistillError(f"iou type {iou_type!r}: expected 'bbox' or 'segm'")
        if iou_type == "segm" and gt.rle is None:
            raise ValueError("LvisEval(segm) needs a ground truth loaded with iou_types containing 'segm'")
        self.gt, self.iou_type = gt, iou_type
        self.reset()

    def _empty(self) -> dict[str, np.ndarray]:
        return {"img": np.zeros(0, np.int32), "pos": np.zeros(0, np.int32), "cat": np.zeros(0, np.int32),
                "score": np.zeros(0), "tp": np.zeros((0, _A), np.uint16), "ig": np.zeros((0, _A), np.uint16)}

    def keep_mask(self, img: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """Which detections (image, category indices) are evaluated: positive or negative pairs."""
        key = np.asarray(img, np.int64) * self.gt.n_cats + np.asarray(cat, np.int64)
        return np.isin(key, self.gt.eval_key)

    def add(self, images: Sequence[int] | np.ndarray, img: np.ndarray, pos: np.ndarray, cat: np.ndarray, box: np.ndarray,
            score: np.ndarray, area: np.ndarray, rles: Sequence[dict | None] | None = None) -> None:
        """Match the detections of some images.

        Args (per detection, any order): image index (one of ``images``, the indices of the
        images of this call), position in its image's results (ties), category index,
        ``[x, y, w, h]`` float64, score, area (``w * h``, or the mask's), and for ``segm`` its
        compressed RLE (None is allowed for a detection ``keep_mask`` drops).
        """
        images = np.asarray(images, np.int64).reshape(-1)
        img = np.asarray(img, np.int64).reshape(-1)
        dup, _ = self._repeated(images)
        drop_img = np.zeros(self.gt.n_images, bool)
        drop_img[images[dup]] = True
        self.seen[images] = True
        cat = np.asarray(cat, np.int64).reshape(-1)
        box = np.asarray(box, np.float64).reshape(-1, 4)
        score = np.asarray(score, np.float64).reshape(-1)
        pos = np.asarray(pos, np.int64).reshape(-1)
        area = np.asarray(area, np.float64).reshape(-1)
        keep = self.keep_mask(img, cat) & (area > 0) & (area < math.inf) & ~drop_img[img]
        sel = np.flatnonzero(keep)
        if not len(sel):
            return
        order = sel[np.lexsort((pos[sel], -score[sel], cat[sel], img[sel]))]
        rec = self._match(img[order], cat[order], box[order], area[order],
                          [rles[i] for i in order] if self.iou_type == "segm" else None)
        self._append((img[order].astype(np.int32), pos[order].astype(np.int32), cat[order].astype(np.int32),
                      score[order], *rec))

    def _match(self, img, cat, box, area, rles) -> tuple[np.ndarray, np.ndarray]:
        """Detections sorted by (image, category, score desc, position) -> tp / ig bits [D, A]."""
        gt = self.gt
        D = len(img)
        key = img * gt.n_cats + cat
        starts, rank, gs, counts, first, pair_det, pair_gt = pairs(gt.ann_key, key)
        P = len(pair_det)
        if self.iou_type == "bbox":
            iou = box_iou(box[pair_det], gt.ann_box[pair_gt], np.zeros(P, bool))
        else:
            iou = self._mask_iou(starts, D, counts, gs, first, rles, P)
        uniq, pair_g = np.unique(pair_gt, return_inverse=True)
        nel = np.isin(key, gt.nel_key)
        tp = np.zeros((D, _A), np.uint16)
        ig = np.zeros((D, _A), np.uint16)
        for a, rng in enumerate(AREA_RNGS):
            g_ig = gt.ann_ig[uniq] | out_of(gt.ann_area[uniq], rng)
            t, m, h = greedy(rank, pair_det, pair_g, iou, g_ig, None, len(uniq), D)
            unmatched_ignored = np.where(out_of(area, rng) | nel, _ALL_BITS, np.uint16(0)).astype(np.uint16) & ~h
            tp[:, a] = t
            ig[:, a] = m | unmatched_ignored
        return tp, ig

    def _mask_iou(self, starts, D, counts, gs, first, rles, P) -> np.ndarray:
        """IoU of the (detection, GT) pairs, one ``maskUtils.iou`` call per (image, category)."""
        from pycocotools import mask as mask_utils

        iou = np.zeros(P)
        ends = np.r_[starts[1:], D]
        for s, e in zip(starts.tolist(), ends.tolist()):
            G = int(counts[s])
            if G == 0:
                continue
            g = self.gt.rle[int(gs[s]) : int(gs[s]) + G]
            m = np.asarray(mask_utils.iou([rles[i] for i in range(s, e)], g, [0] * G), np.float64).reshape(e - s, G)
            off = int(first[s])
            iou[off : off + (e - s) * G] = m.reshape(-1)  # the pairs of a group: detection-major, GT in order
        return iou

    @classmethod
    def merged(cls, gt: LvisGT, iou_type: str, states: Iterable[dict]) -> "LvisEval":
        """One evaluator from several :meth:`state` s; an image in more than one keeps the first."""
        out = cls(gt, iou_type)
        out._merge(states)
        return out

    def precision(self) -> np.ndarray:
        """``LVISEval.eval["precision"]``: [T, R, K, A], -1 where a category has no non-ignored
        ground truth in that area range on the evaluated images."""
        rec = self.records()
        o = np.lexsort((rec["pos"], rec["img"]))  # image order, then input order: the tie order
        npig = self.gt.n_positive(self.seen)
        K = self.gt.n_cats
        prec = np.empty((_T, len(REC_THRS), K, _A))
        for a in range(_A):
            r = {"img": rec["img"][o], "cat": rec["cat"][o], "score": rec["score"][o], "tp": rec["tp"][o, a], "ig": rec["ig"][o, a]}
            prec[..., a] = accumulate(r, npig[:, a], K)
        return prec



def lvis_summary(prec: np.ndarray, freq: np.ndarray, prefix: str) -> dict[str, float]:
    """``LVISEval.summarize``'s AP numbers from a [T, R, K, A] precision array."""
    t50 = int(np.argmin(np.abs(IOU_THRS - 0.5)))
    t75 = int(np.argmin(np.abs(IOU_THRS - 0.75)))
    m = {
        f"{prefix}/AP": mean_valid(prec[..., 0]),
        f"{prefix}/AP50": mean_valid(prec[t50, ..., 0]),
        f"{prefix}/AP75": mean_valid(prec[t75, ..., 0]),
        f"{prefix}/APs": mean_valid(prec[..., 1]),
        f"{prefix}/APm": mean_valid(prec[..., 2]),
        f"{prefix}/APl": mean_valid(prec[..., 3]),
    }
    for g, f in enumerate(FREQS):
        m[f"{prefix}/AP_{f}"] = mean_valid(prec[:, :, np.asarray(freq) == g, 0])
    return m


def load_lvis_gt(gt_json: str | os.PathLike | dict, iou_types: Sequence[str]) -> LvisGT | None:
    """The ground truth as :class:`~distill.eval.lvis_gt.LvisGT` when it is an LVIS file, else None."""
    if isinstance(gt_json, dict):
        return LvisGT.from_dict(gt_json, "ground truth", iou_types) if is_lvis(gt_json) else None
    if Path(gt_json).is_file() and sniff_lvis(gt_json):
        return LvisGT.from_file(gt_json, iou_types)
    return None


def warn_frequency(categories: list, name: str) -> None:
    if any(isinstance(c, dict) and "frequency" in c for c in categories):
        log.warning("%s: categories carry 'frequency' but no image carries 'neg_category_ids' / "
                    "'not_exhaustive_category_ids': evaluated as COCO, not with LVIS's federated protocol", name)


def lvis_metrics(lgt: LvisGT, precs: dict, vocab=None) -> dict[str, float]:
    """Metrics of :func:`~distill.eval.detection.evaluate_detection` from LVIS precision arrays
    ``{iou type: [T, R, K, A]}``: LVIS's summary, plus base / novel and per-class AP50 over area "all"."""
    if vocab is not None:
        _, names, split = categories_split({"categories": lgt.categories}, lgt.name, vocab)
    else:  # the file's split, else LVIS frequency r = novel (as distill.vocab)
        names = [str(c["name"]) for c in lgt.categories]
        split = [c["split"] if c.get("split") in ("base", "novel") else ("novel" if c["frequency"] == "r" else "base")
                 for c in lgt.categories]
    m: dict[str, float] = {}
    for t, prec in precs.items():
        m.update(lvis_summary(prec, lgt.freq, t))
        for k, v in metrics_from_precision(prec[..., 0], IOU_THRS, names, split, t).items():
            m.setdefault(k, v)
    return m


def lvis_results(results, lgt: LvisGT, iou_types: Sequence[str]) -> tuple[tuple, list | None, str]:
    """Results checked item by item (as :func:`~distill.eval.results.load_results`) into flat arrays: image index,
    category index, [x, y, w, h], score, area (box ``w * h``; the mask's when there is no box,
    as ``LVISResults``). Masks are kept (compressed RLE) only for detections of an evaluated
    (image, category) pair. Returns ``(arrays, rles or None, name)``."""
    from pycocotools import mask as mask_utils

    name, data = results_items(results)
    need = needed_keys(iou_types)
    masks = "segm" in iou_types
    eval_keys = set(lgt.eval_key.tolist()) if masks else set()
    K = lgt.n_cats
    img, cat, box, score, area = array("q"), array("q"), array("d"), array("d"), array("d")
    rles: list | None = [] if masks else None
    for i, r in enumerate(data):
        s = check_result(i, r, need, lgt.img_index, lgt.cat_index, iou_types, name, lgt.name)
        k, c = lgt.img_index[r["image_id"]], lgt.cat_index[r["category_id"]]
        rle = None
        if masks:
            seg = r["segmentation"]
            counts = seg["counts"]
            rle = {"size": list(seg["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        if "bbox" in r:
            bb = [float(v) for v in r["bbox"]]
            a = bb[2] * bb[3]
        else:
            bb = [float(v) for v in mask_utils.toBbox(rle)]
            a = float(mask_utils.area(rle))
        img.append(k)
        cat.append(c)
        box.extend(bb)
        score.append(s)
        area.append(a)
        if masks:
            rles.append(rle if k * K + c in eval_keys else None)
    arrays = (array_view(img, np.int64), array_view(cat, np.int64), array_view(box, np.float64).reshape(-1, 4),
              array_view(score, np.float64), array_view(area, np.float64))
    return arrays, rles, name


def evaluate_lvis(lgt: LvisGT, results, iou_types: Sequence[str], vocab, max_dets: int, img_ids) -> tuple[dict, int, str]:
    """Federated LVIS metrics of a results file / list (``max_dets`` per image, the highest
    scores); returns ``(metrics, detections, results name)``."""
    (img, cat, box, score, area), rles, res_name = lvis_results(results, lgt, iou_types)
    images = np.ones(lgt.n_images, bool)
    if img_ids is not None:
        images[:] = False
        images[[lgt.img_index[i] for i in img_ids if i in lgt.img_index]] = True
    sel = np.flatnonzero(images[img])
    keep = sel[top_per_image(img[sel], score[sel], max_dets)]  # by image, score desc, input order
    if len(sel) > len(keep):
        log.info("kept the top %d detections per image (%d dropped)", max_dets, len(sel) - len(keep))
    evs = {t: LvisEval(lgt, t) for t in iou_types}
    for ev in evs.values():
        ev.seen[:] = images
    ends = np.flatnonzero(np.r_[img[keep][1:] != img[keep][:-1], True]) + 1 if len(keep) else np.zeros(0, np.int64)
    start = 0
    while start < len(keep):  # whole images, some thousands of detections at a time
        stop = int(ends[min(np.searchsorted(ends, start + 20000, "left"), len(ends) - 1)])
        sl = keep[start:stop]
        for t, ev in evs.items():
            ev.add([], img[sl], sl, cat[sl], box[sl], score[sl], area[sl],
                   [rles[j] for j in sl] if t == "segm" else None)
        start = stop
    precs = {t: ev.precision() for t, ev in evs.items()}
    return lvis_metrics(lgt, precs, vocab), len(sel), res_name
