"""Streaming COCO box AP: COCOeval's bbox algorithm on compact per-image match records.

``pycocotools.cocoeval.COCOeval`` (and faster-coco-eval) keep every ground-truth box and every
detection as Python objects until ``accumulate``; their memory grows with the number of images.
This module computes the same precision array from much less:

- the ground truth as flat numpy arrays sorted by (image, category, ignore) (:class:`BoxGT`);
- per detection, once its image has been matched: the image index, the category index, the score
  and two ``uint16`` bit masks over the 10 IoU thresholds (true positive, ignored).

The algorithm is pycocotools' (``evaluateImg`` with area range "all" and the largest ``maxDets``,
then ``accumulate``), step for step, so the numbers are the same to the last bit on the inputs the
tests use:

- IoU as ``maskUtils.iou`` on boxes (float64; a crowd box divides by the detection's area);
- per image and category, detections in score order (a stable sort, so ties keep their input
  order) are matched greedily at every threshold ``min(t, 1 - 1e-10)``: the best available
  non-ignored box wins (the last one of equal IoU, as COCOeval's loop does); only when there is
  none, the best ignored box (crowd, or area outside [0, 1e10]). A crowd box can be matched again;
  a match to an ignored box makes the detection ignored; an unmatched detection whose area is
  outside the range is ignored too;
- per category, the detections of all images in image-id order, then a stable sort by descending
  score (pycocotools' ``mergesort``), cumulative tp/fp, recall over the non-ignored boxes,
  precision made monotone and read at 101 recall points (``searchsorted(..., side="left")``).
  A category without non-ignored ground truth keeps precision -1.

The metrics of :mod:`distill.eval.detection` only read area range "all" at the largest maxDets,
so that is the only cell computed.

One deliberate difference: COCOeval records a match by the ground-truth annotation's id, so a
box with annotation id 0 counts as unmatched (its detection becomes a false positive) in
pycocotools and faster-coco-eval (which warns about it). Here matches are flags, so id 0 is an
ordinary box. The files this project writes number annotations from 1.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# pycocotools.cocoeval.Params (iouType "bbox")
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_ALL = (0**2, 1e5**2)
_T = len(IOU_THRS)
_MATCH_THRS = np.minimum(IOU_THRS, 1 - 1e-10)  # COCOeval: iou = min([t, 1 - 1e-10])
_BITS = (np.uint16(1) << np.arange(_T, dtype=np.uint16)).astype(np.uint16)
_ALL_BITS = np.uint16((1 << _T) - 1)
assert _T <= 16

CHUNK_DETS = 4096  # detections matched per call when a whole results file is evaluated (bounds the temporaries)


def array_view(a, dtype) -> np.ndarray:
    """A numpy view of an ``array.array`` (no copy)."""
    return np.frombuffer(a, dtype=dtype) if len(a) else np.zeros(0, dtype)


def _out_of_range(area: np.ndarray) -> np.ndarray:
    return (area < AREA_ALL[0]) | (area > AREA_ALL[1])


def box_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of paired boxes ``d[i]`` and ``g[i]`` ([x, y, w, h], float64), as pycocotools'
    ``bbIou``: intersection over union, or over the detection's area when ``crowd[i]``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
        h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
        inter = w * h
        da = d[:, 2] * d[:, 3]
        union = np.where(crowd, da, da + g[:, 2] * g[:, 3] - inter)
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


class BoxGT:
    """COCO ground-truth boxes as flat arrays (no Python object per box).

    Images are indexed in sorted id order (COCOeval's ``imgIds``), categories likewise. Boxes are
    sorted by (image, category, ignored) keeping the file order otherwise, which is the order
    COCOeval matches them in. ``ignored`` = crowd or area outside the "all" range; ``area``
    defaults to ``w * h`` and ``iscrowd`` to 0.
    """

    def __init__(self, gt: dict) -> None:
        img_ids = sorted(im["id"] for im in gt["images"])
        cat_ids = sorted(c["id"] for c in gt["categories"])
        img_index = {i: n for n, i in enumerate(img_ids)}
        cat_index = {c: k for k, c in enumerate(cat_ids)}
        anns = gt["annotations"]
        n = len(anns)
        img = np.fromiter((img_index[a["image_id"]] for a in anns), np.int64, n)
        cat = np.fromiter((cat_index[a["category_id"]] for a in anns), np.int64, n)
        box = np.array([[float(v) for v in a["bbox"]] for a in anns], dtype=np.float64).reshape(n, 4)
        crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, n)
        area = np.fromiter(
            (float(a["area"]) if "area" in a else float(a["bbox"][2]) * float(a["bbox"][3]) for a in anns), np.float64, n
        )
        self._set(img_ids, cat_ids, img, cat, box, crowd, area, img_index, cat_index)

    @classmethod
    def from_arrays(cls, img_ids: list, cat_ids: list, img: np.ndarray, cat: np.ndarray, box: np.ndarray,
                    crowd: np.ndarray, area: np.ndarray) -> "BoxGT":
        """From per-box arrays: image and category *indices* into the sorted ``img_ids`` /
        ``cat_ids``, [x, y, w, h], iscrowd, area (in the file's order)."""
        self = cls.__new__(cls)
        self._set(list(img_ids), list(cat_ids), img, cat, box, crowd, area)
        return self

    def _set(self, img_ids, cat_ids, img, cat, box, crowd, area, img_index=None, cat_index=None) -> None:
        self.img_ids: list = img_ids
        self.img_index: dict = img_index if img_index is not None else {i: n for n, i in enumerate(img_ids)}
        self.cat_ids: list = cat_ids
        self.cat_index: dict = cat_index if cat_index is not None else {c: k for k, c in enumerate(cat_ids)}
        K = len(cat_ids)
        img, cat = np.asarray(img, np.int64), np.asarray(cat, np.int64)
        crowd = np.asarray(crowd, bool)
        ignored = crowd | _out_of_range(np.asarray(area, np.float64))
        order = np.lexsort((ignored, cat, img))  # stable: file order within (image, category, ignored)
        self.key = (img * K + cat)[order]  # sorted
        self.box = np.ascontiguousarray(np.asarray(box, np.float64).reshape(-1, 4)[order])
        self.crowd = crowd[order]
        self.ignored = ignored[order]
        self.n_images, self.n_cats = len(img_ids), K

    @property
    def img(self) -> np.ndarray:
        return self.key // self.n_cats

    @property
    def cat(self) -> np.ndarray:
        return self.key % self.n_cats

    def n_positive(self, images: np.ndarray) -> np.ndarray:
        """Per category, the non-ignored boxes on the selected images (bool mask over images)."""
        sel = ~self.ignored & images[self.img]
        return np.bincount(self.cat[sel], minlength=self.n_cats)

    def has_non_crowd(self, images: np.ndarray) -> np.ndarray:
        sel = ~self.crowd & images[self.img]
        return np.bincount(self.cat[sel], minlength=self.n_cats) > 0


def pairs(gt_key: np.ndarray, key: np.ndarray) -> tuple:
    """The (detection, ground truth) pairs of detections sorted by ``key`` (image * K + category)
    against ground truth sorted by ``gt_key``. Returns ``(starts, rank, gs, counts, first,
    pair_det, pair_gt)``: where each key's run of detections starts, each detection's position in
    its run, its first ground truth and their number, where its pairs start, and per pair the
    detection and the ground truth (detection-major, the ground truth in order)."""
    D = len(key)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if D else np.zeros(0, np.int64)
    rank = np.arange(D) - np.repeat(starts, np.diff(np.r_[starts, D]))  # position within (image, category)
    gs = np.searchsorted(gt_key, key, "left")
    counts = np.searchsorted(gt_key, key, "right") - gs
    P = int(counts.sum())
    pair_det = np.repeat(np.arange(D), counts)
    first = np.cumsum(counts) - counts
    pair_gt = gs[pair_det] + np.arange(P) - first[pair_det]
    return starts, rank, gs, counts, first, pair_det, pair_gt


def greedy(rank: np.ndarray, pair_det: np.ndarray, pair_g: np.ndarray, iou: np.ndarray, g_ig: np.ndarray,
           g_crowd: np.ndarray | None, n_g: int, D: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCOeval's (and ``LVISEval``'s) greedy matching for many (image, category) groups at once.

    Pairs (detection, local GT index, IoU) are grouped by detection, the GT in order within;
    detections of the same rank (position in their group's score order) belong to different
    groups and are matched together, ranks in order, as COCOeval's loop over the sorted
    detections. At each threshold a detection takes the best available non-ignored box (the last
    one of equal IoU), else the best ignored one; a crowd box (``g_crowd``) can be matched again.
    Returns per detection the bit masks (over thresholds) of: matched to a non-ignored box,
    matched to an ignored box, matched at all."""
    tp = np.zeros(D, np.uint16)
    mig = np.zeros(D, np.uint16)
    hit_b = np.zeros(D, np.uint16)
    if not len(pair_det):
        return tp, mig, hit_b
    matched = np.zeros((n_g, _T), bool)  # COCOeval's gtm > 0
    pair_rank = rank[pair_det]
    porder = np.argsort(pair_rank, kind="stable")
    bounds = np.searchsorted(pair_rank[porder], np.arange(int(pair_rank.max()) + 2))
    for r in range(len(bounds) - 1):
        sl = porder[bounds[r] : bounds[r + 1]]
        if not len(sl):
            continue
        pd, pg, piou = pair_det[sl], pair_g[sl], iou[sl]
        seg_flag = np.r_[True, pd[1:] != pd[:-1]]
        seg = np.flatnonzero(seg_flag)
        seg_of = np.cumsum(seg_flag) - 1
        ig = g_ig[pg][:, None]
        free = ~matched[pg] if g_crowd is None else ~matched[pg] | g_crowd[pg][:, None]
        valid = free & (piou[:, None] >= _MATCH_THRS[None, :])
        has_regular = np.logical_or.reduceat(valid & ~ig, seg, axis=0)
        eligible = valid & (ig != has_regular[seg_of])  # regular boxes if any, else ignored ones
        val = np.where(eligible, piou[:, None], -1.0)
        best = np.maximum.reduceat(val, seg, axis=0)
        idx = np.arange(len(sl))[:, None]
        win = np.maximum.reduceat(np.where(eligible & (val == best[seg_of]), idx, -1), seg, axis=0)  # last of equal IoU
        hit = win >= 0
        wg = pg[np.where(hit, win, 0)]
        w_ig = g_ig[wg] & hit
        tt = np.nonzero(hit)
        matched[wg[tt], tt[1]] = True
        dets = pd[seg]
        tp[dets] = ((hit & ~w_ig) * _BITS).sum(axis=1).astype(np.uint16)
        mig[dets] = (w_ig * _BITS).sum(axis=1).astype(np.uint16)
        hit_b[dets] = (hit * _BITS).sum(axis=1).astype(np.uint16)
    return tp, mig, hit_b


def match(gt: BoxGT, img: np.ndarray, cat: np.ndarray, box: np.ndarray, score: np.ndarray) -> tuple:
    """Match detections (already cut to the top ``maxDets`` of each image) against ``gt``.

    Args are per detection: image index, category index, [x, y, w, h] float64, score, in the
    order COCO saw them (the results order within an image). Returns ``(order, tp_bits, ig_bits)``:
    the detections sorted by (image, category, descending score, input order), and per sorted
    detection the thresholds at which it is a true positive / ignored (bit t = ``IOU_THRS[t]``).
    """
    D = len(img)
    order = np.lexsort((-score, cat, img))
    img, cat, box = img[order], cat[order], box[order]
    tp_bits = np.zeros(D, np.uint16)
    ig_bits = np.where(_out_of_range(box[:, 2] * box[:, 3]), _ALL_BITS, np.uint16(0)).astype(np.uint16)
    if D == 0:
        return order, tp_bits, ig_bits
    _, rank, _, counts, _, pair_det, pair_gt = pairs(gt.key, img.astype(np.int64) * gt.n_cats + cat)
    if not len(pair_det):
        return order, tp_bits, ig_bits
    iou = box_iou(box[pair_det], gt.box[pair_gt], gt.crowd[pair_gt])
    uniq, pair_g = np.unique(pair_gt, return_inverse=True)  # local ground-truth index
    tp_bits, mig, hit = greedy(rank, pair_det, pair_g, iou, gt.ignored[uniq], gt.crowd[uniq], len(uniq), D)
    # matched to an ignored box -> ignored; unmatched keeps the area-range ignore
    return order, tp_bits, mig | (ig_bits & ~hit)


class MatchRecords:
    """What the streaming evaluators share: the images seen, and per kept detection a compact
    match record (the fields ``_FIELDS``), kept in parts that are joined now and then; merging
    the records of several processes. ``self.gt`` has ``n_images`` and ``img_ids``."""

    _FIELDS: tuple[str, ...] = ()

    def reset(self) -> None:
        self.seen = np.zeros(self.gt.n_images, bool)
        self._parts: list[tuple] = []
        self._warned = False

    def _empty(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @property
    def n_records(self) -> int:
        return sum(len(p[0]) for p in self._parts)

    def records(self) -> dict[str, np.ndarray]:
        self._compact()
        if not self._parts:
            return self._empty()
        return dict(zip(self._FIELDS, self._parts[0]))

    def _compact(self) -> None:
        if len(self._parts) > 1:
            self._parts = [tuple(np.concatenate(x) for x in zip(*self._parts))]

    def _append(self, part: tuple) -> None:
        self._parts.append(part)
        if len(self._parts) > 64:
            self._compact()

    def _repeated(self, images: np.ndarray) -> tuple[np.ndarray, bool]:
        """Which of ``images`` were seen before, and whether any image comes again (seen before,
        or twice in this call; one warning the first time)."""
        dup = self.seen[images]
        again = bool(dup.any()) or len(np.unique(images)) != len(images)
        if again and not self._warned:
            log.warning("image(s) %s evaluated more than once: only their first detections count",
                        [self.gt.img_ids[i] for i in images[dup][:5]] or "given twice in one call")
            self._warned = True
        return dup, again

    def state(self) -> dict[str, np.ndarray]:
        """What another process needs to merge this one's work (see :meth:`_merge`)."""
        return {"images": np.flatnonzero(self.seen).astype(np.int32), **self.records()}

    def _merge(self, states: Iterable[dict]) -> None:
        """Add several :meth:`state` s to this (empty) one; an image in more than one keeps the first."""
        for s in states:
            images = np.asarray(s["images"], dtype=np.int64)
            keep = ~self.seen[np.asarray(s["img"], dtype=np.int64)]
            if self.seen[images].any() and not self._warned:
                log.warning("some images were evaluated on more than one process: only their first detections count")
                self._warned = True
            self.seen[images] = True
            if keep.any():
                self._parts.append(tuple(np.asarray(s[f])[keep] for f in self._FIELDS))
        self._compact()


class StreamingBoxEval(MatchRecords):
    """Per-image COCO box matching, kept as compact records; :meth:`precision` accumulates.

    ``add`` takes whole images (every detection of each image, already cut to the top
    ``maxDets``); an image given a second time is skipped (its first detections count).
    """

    _FIELDS = ("img", "cat", "score", "tp", "ig")

    def __init__(self, gt: BoxGT) -> None:
        self.gt = gt
        self.reset()

    def _empty(self) -> dict[str, np.ndarray]:
        return {"img": np.zeros(0, np.int32), "cat": np.zeros(0, np.int32), "score": np.zeros(0),
                "tp": np.zeros(0, np.uint16), "ig": np.zeros(0, np.uint16)}

    def add(self, images: Sequence[int] | np.ndarray, img: np.ndarray, cat: np.ndarray, box: np.ndarray, score: np.ndarray) -> None:
        """``images``: indices of the images of this call (with or without detections); per
        detection its image index (one of ``images``), category index, [x, y, w, h], score."""
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        img = np.asarray(img, dtype=np.int64).reshape(-1)
        dup, again = self._repeated(images)
        if again:
            _, first = np.unique(images, return_index=True)
            keep_img = np.zeros(self.gt.n_images, bool)
            keep_img[images[np.sort(first)]] = True
            keep_img[images[dup]] = False
            keep = keep_img[img]
            images = np.flatnonzero(keep_img)
            img, cat, box, score = img[keep], np.asarray(cat)[keep], np.asarray(box)[keep], np.asarray(score)[keep]
        self.seen[images] = True
        if not len(img):
            return
        cat = np.asarray(cat, dtype=np.int64).reshape(-1)
        box = np.asarray(box, dtype=np.float64).reshape(-1, 4)
        score = np.asarray(score, dtype=np.float64).reshape(-1)
        self._append(_matched(self.gt, img, cat, box, score))

    @classmethod
    def merged(cls, gt: BoxGT, states: Iterable[dict]) -> "StreamingBoxEval":
        """One evaluator from several :meth:`state` s; an image in more than one keeps the first."""
        out = cls(gt)
        out._merge(states)
        return out

    def precision(self) -> np.ndarray:
        """COCOeval's ``eval["precision"][:, :, :, area "all", maxDets[-1]]``: [T, R, K], -1 where a
        category has no non-ignored ground truth on the evaluated images."""
        return accumulate(self.records(), self.gt.n_positive(self.seen), self.gt.n_cats)


def accumulate(rec: dict[str, np.ndarray], npig: np.ndarray, n_cats: int) -> np.ndarray:
    R = len(REC_THRS)
    prec = -np.ones((_T, R, n_cats))
    score = rec["score"]
    order = np.lexsort((rec["img"], -score, rec["cat"]))  # per category: score desc, then image, then input order
    cat_sorted = rec["cat"][order]
    bounds = np.searchsorted(cat_sorted, np.arange(n_cats + 1))
    tp_all, ig_all = rec["tp"], rec["ig"]
    for k in range(n_cats):
        if npig[k] == 0:
            continue
        sl = order[bounds[k] : bounds[k + 1]]
        nd = len(sl)
        if nd == 0:
            prec[:, :, k] = 0.0
            continue
        tp_k, ig_k = tp_all[sl], ig_all[sl]
        for t in range(_T):  # one threshold at a time: the temporaries stay small
            tps = ((tp_k >> t) & 1).astype(bool)
            fps = ~tps & ~((ig_k >> t) & 1).astype(bool)
            tp_sum = np.cumsum(tps).astype(dtype=float)
            fp_sum = np.cumsum(fps).astype(dtype=float)
            rc = tp_sum / npig[k]
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1]  # COCOeval: pr[i-1] = max(pr[i-1], pr[i]), from the end
            inds = np.searchsorted(rc, REC_THRS, side="left")
            prec[t, :, k] = np.where(inds < nd, pr[np.minimum(inds, nd - 1)], 0.0)
    return prec


def top_per_image(img: np.ndarray, score: np.ndarray, max_dets: int) -> np.ndarray:
    """Indices of the ``max_dets`` highest scores of each image (ties: input order), sorted by
    (image, descending score, input order)."""
    order = np.lexsort((-score, img))
    s = img[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
    rank = np.arange(len(s)) - np.repeat(starts, np.diff(np.r_[starts, len(s)]))
    return order[rank < max_dets]


def evaluate_arrays(gt: BoxGT, images: np.ndarray, img: np.ndarray, cat: np.ndarray, box: np.ndarray, score: np.ndarray,
                    max_dets: int) -> tuple[np.ndarray, int]:
    """Precision [T, R, K] of detections given as arrays (a whole results file, any image order).

    ``images``: bool mask of the evaluated images (detections of other images are dropped). The
    detections are visited by image through one index array and matched some thousands at a
    time (whole images, top ``max_dets`` each), so besides the inputs only the index and the
    match records grow with the number of detections. Returns (precision, detections dropped by
    the ``max_dets`` cut)."""
    img = np.asarray(img)
    if images.all():
        order = np.argsort(img, kind="stable")  # by image, input order within
    else:
        idx = np.flatnonzero(images[img])
        order = idx[np.argsort(img[idx], kind="stable")]
        del idx
    counts = np.bincount(img[order], minlength=gt.n_images) if len(order) else np.zeros(gt.n_images, np.int64)
    ends = np.cumsum(counts)
    ev = StreamingBoxEval(gt)
    ev.seen[:] = images
    dropped, start = 0, 0
    while start < len(order):
        # whole images, about CHUNK_DETS detections
        stop = int(ends[np.searchsorted(ends, start + CHUNK_DETS, "left")]) if start + CHUNK_DETS < len(order) else len(order)
        stop = max(stop, int(ends[np.searchsorted(ends, start, "right")]))
        sl = order[start:stop]
        keep = top_per_image(img[sl], score[sl], max_dets)
        dropped += len(sl) - len(keep)
        sl = sl[np.sort(keep)]  # input order again within each image (COCO's order for ties)
        ev._append(_matched(gt, img[sl].astype(np.int64), cat[sl].astype(np.int64), box[sl], score[sl]))
        start = stop
    del order
    return ev.precision(), dropped


def _matched(gt: BoxGT, img, cat, box, score) -> tuple:
    order, tp, ig = match(gt, img, cat, box, score)
    return img[order].astype(np.int32), cat[order].astype(np.int32), score[order], tp, ig

