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

What :class:`LvisEval` holds: the ground truth as flat arrays (:class:`LvisGT`: per box its
image, category, [x, y, w, h], area and ignore flag, about 60 bytes; for masks also its
compressed RLE, a few hundred bytes; per image the sorted keys of its evaluated and
not-exhaustive categories), and per kept detection a record of about 40 bytes (image, input
position, category, score, and tp / ignore bit masks over the 10 thresholds for each of the 4 area
ranges). Detections of categories that are not evaluated in their image (most of the 300 an
LVIS detector outputs) are dropped when their image is added, and masks are only read while
their image is matched. One deliberate difference: ``LVISEval`` records a match by the ground
truth's annotation id, so a box with id 0 counts as unmatched there; here matches are flags.
"""

from __future__ import annotations

import logging
import math
import os
from array import array
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from distill.errors import DistillError
from distill.eval.coco_stream import IOU_THRS, REC_THRS, accumulate, box_iou

log = logging.getLogger(__name__)

MAX_DETS = 300  # lvis.results.LVISResults(max_dets=300), "the official value of max_dets for LVIS"
AREA_RNGS = ((0.0**2, 1e5**2), (0.0**2, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_LBLS = ("all", "small", "medium", "large")
FREQS = ("r", "c", "f")
IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")
_T = len(IOU_THRS)
_A = len(AREA_RNGS)
_MATCH_THRS = np.minimum(IOU_THRS, 1 - 1e-10)
_BITS = (np.uint16(1) << np.arange(_T, dtype=np.uint16)).astype(np.uint16)
_ALL_BITS = np.uint16((1 << _T) - 1)

__all__ = ["LvisGT", "LvisEval", "is_lvis", "sniff_lvis", "lvis_summary", "MAX_DETS", "AREA_LBLS", "FREQS"]


# --------------------------------------------------------------------------------------------
# which protocol


def is_lvis(gt: dict, name: str = "ground truth") -> bool:
    """True when a COCO-format dict is an LVIS file: its images carry ``neg_category_ids`` /
    ``not_exhaustive_category_ids``. Then every image must carry both and every category a
    ``frequency`` in r/c/f (else a one-line :class:`DistillError`). Categories with ``frequency``
    but no image with the two lists: False (the caller evaluates COCO-style and says so)."""
    images = gt.get("images") or []
    if not any(isinstance(im, dict) and any(f in im for f in IMAGE_FIELDS) for im in images):
        return False
    for i, im in enumerate(images):
        for f in IMAGE_FIELDS:
            if not isinstance(im, dict) or f not in im:
                raise DistillError(f"{name}: images[{i}]: missing '{f}' (an LVIS file: other images carry it)")
    for i, c in enumerate(gt.get("categories") or []):
        _check_frequency(c, i, name)
    return True


def _check_frequency(c: Any, i: int, name: str) -> None:
    if not isinstance(c, dict) or "frequency" not in c:
        raise DistillError(f"{name}: categories[{i}]: missing 'frequency' (r/c/f; needed for LVIS's AP_r/c/f)")
    if c["frequency"] not in FREQS:
        raise DistillError(f"{name}: categories[{i}]: frequency {c['frequency']!r} is not one of {list(FREQS)}")


def sniff_lvis(path: str | os.PathLike, chunk: int = 1 << 22) -> bool:
    """Whether a json file may be LVIS (its text has a ``"neg_category_ids"`` or
    ``"not_exhaustive_category_ids"`` key): a byte scan, so COCO files are not parsed twice."""
    keys = tuple(f'"{f}"'.encode() for f in IMAGE_FIELDS)
    keep = max(len(k) for k in keys)
    try:
        with open(path, "rb") as f:
            tail = b""
            while True:
                block = f.read(chunk)
                if not block:
                    return False
                buf = tail + block
                if any(k in buf for k in keys):
                    return True
                tail = buf[-keep:]
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# ground truth


class LvisGT:
    """LVIS ground truth as flat arrays.

    Images and categories are indexed in sorted id order (``LVISEval``'s ``img_ids`` /
    ``cat_ids``). Boxes (those with area in (0, inf), the only ones ``LVISEval`` reads) are sorted
    by (image, category), file order within. ``eval_key`` / ``nel_key``: sorted ``image * K +
    category`` of the evaluated (positive or negative) and the not-exhaustive pairs. ``rle``: per
    box its mask's compressed RLE counts (bytes), only when masks are evaluated.
    """

    def __init__(self, name: str = "ground truth") -> None:
        self.name = name

    # ---- building
    @classmethod
    def from_dict(cls, gt: dict, name: str = "ground truth", iou_types: Sequence[str] = ("bbox",)) -> "LvisGT":
        b = _Builder(name, "segm" in iou_types)
        for key in ("images", "annotations", "categories"):
            if not isinstance(gt.get(key), list):
                raise DistillError(f"{name}: missing list '{key}' (expected an LVIS instances file)")
        for i, im in enumerate(gt["images"]):
            b.image(im, i)
        for i, a in enumerate(gt["annotations"]):
            b.annotation(a, i)
        b.categories = gt["categories"]
        return b.finish()

    @classmethod
    def from_file(cls, path: str | os.PathLike, iou_types: Sequence[str] = ("bbox",)) -> "LvisGT":
        """Read a file item by item (:class:`~distill.files.JsonStream`): neither its text nor a
        Python object per annotation is held."""
        from distill.files import JsonStream

        path = Path(path)
        if not path.is_file():
            raise DistillError(f"{path}: file not found (expected an LVIS instances file)")
        b = _Builder(str(path), "segm" in iou_types)
        with JsonStream(path, "LVIS instances") as js:
            if js.peek() != "{":
                raise DistillError(f"{path}: expected an LVIS object with 'images', 'annotations', 'categories'")
            for key in js.members():
                if key in ("images", "annotations"):
                    if js.peek() != "[":
                        raise DistillError(f"{path}: '{key}' must be a list")
                    add = b.image if key == "images" else b.annotation
                    for i, item in enumerate(js.items()):
                        add(item, i)
                elif key == "categories":
                    b.categories = js.value()
                else:
                    js.value()
            js.end()
        return b.finish()

    # ---- queries
    def n_positive(self, images: np.ndarray) -> np.ndarray:
        """[K, A]: the non-ignored boxes per category and area range on the selected images."""
        sel = images[self.ann_img]
        out = np.zeros((self.n_cats, _A), np.int64)
        for a, rng in enumerate(AREA_RNGS):
            ok = sel & ~self.ann_ig & ~_out(self.ann_area, rng)
            out[:, a] = np.bincount(self.ann_cat[ok], minlength=self.n_cats)
        return out

    @property
    def ann_img(self) -> np.ndarray:
        return self.ann_key // self.n_cats

    @property
    def ann_cat(self) -> np.ndarray:
        return self.ann_key % self.n_cats


class _Builder:
    """Collects images, annotations and categories in any order, checking each."""

    def __init__(self, name: str, masks: bool) -> None:
        self.name, self.masks = name, masks
        self.img_ids: list[int] = []
        self.hw: list[tuple[int, int]] = []
        self.lists: list[tuple[list, list]] = []
        self.ann_ids: set = set()
        self.a_img, self.a_cat = [], []
        self.a_box, self.a_area, self.a_ig, self.a_idx = array("d"), array("d"), array("b"), array("q")
        self.a_seg: list = []
        self.categories: Any = None
        from distill.eval.detection import _check_box, check_id  # detection imports this module lazily

        self._check_box, self._check_id = _check_box, check_id

    def image(self, im: Any, i: int) -> None:
        n = self.name
        if not isinstance(im, dict) or "id" not in im:
            raise DistillError(f"{n}: images[{i}] must be an object with 'id'")
        for f in IMAGE_FIELDS:
            if f not in im:
                raise DistillError(f"{n}: images[{i}]: missing '{f}' (an LVIS file: other images carry it)")
            if not isinstance(im[f], list):
                raise DistillError(f"{n}: images[{i}].{f}: expected a list of category ids")
        if self.masks and ("height" not in im or "width" not in im):
            raise DistillError(f"{n}: images[{i}]: missing 'height'/'width' (needed for segm evaluation)")
        self._check_id(im["id"], n, f"images[{i}].id")
        self.img_ids.append(im["id"])
        self.hw.append((int(im.get("height", 0)), int(im.get("width", 0))))
        self.lists.append((im["neg_category_ids"], im["not_exhaustive_category_ids"]))

    def annotation(self, a: Any, i: int) -> None:
        n = self.name
        if not isinstance(a, dict):
            raise DistillError(f"{n}: annotations[{i}] must be an object")
        for key in ("id", "image_id", "category_id", "bbox") + (("segmentation",) if self.masks else ()):
            if key not in a:
                raise DistillError(f"{n}: annotations[{i}]: missing key '{key}'")
        for key, what in (("id", None), ("image_id", "images"), ("category_id", "categories")):
            self._check_id(a[key], n, f"annotations[{i}].{key}", what)
        if a["id"] in self.ann_ids:
            raise DistillError(f"{n}: annotations[{i}]: duplicate annotation id {a['id']}")
        self.ann_ids.add(a["id"])
        self._check_box(a["bbox"], n, f"annotations[{i}].bbox")
        bb = [float(v) for v in a["bbox"]]
        # LVIS files carry "area" (the mask's); w * h where a file has none
        area = float(a["area"]) if "area" in a else bb[2] * bb[3]
        if not (0.0 < area < math.inf):  # LVIS.get_ann_ids(area_rng=[0, inf]): strictly inside
            return
        self.a_img.append(a["image_id"])
        self.a_cat.append(a["category_id"])
        self.a_box.extend(bb)
        self.a_area.append(area)
        self.a_ig.append(bool(a.get("ignore", 0)))
        self.a_idx.append(i)
        if self.masks:
            self.a_seg.append(_compact_segm(a["segmentation"], n, f"annotations[{i}].segmentation"))

    def finish(self) -> LvisGT:
        n = self.name
        cats = self.categories
        if not isinstance(cats, list) or not cats:
            raise DistillError(f"{n}: 'categories' missing or empty (expected an LVIS instances file)")
        for i, c in enumerate(cats):
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise DistillError(f"{n}: categories[{i}] must be an object with 'id' and 'name'")
            self._check_id(c["id"], n, f"categories[{i}].id")
            _check_frequency(c, i, n)
        cat_ids = sorted(c["id"] for c in cats)
        if len(set(cat_ids)) != len(cat_ids):
            raise DistillError(f"{n}: duplicate category ids")
        order = sorted(range(len(self.img_ids)), key=lambda k: self.img_ids[k])
        img_ids = [self.img_ids[k] for k in order]
        if len(set(img_ids)) != len(img_ids):
            raise DistillError(f"{n}: duplicate image ids")
        g = LvisGT(n)
        g.img_ids, g.cat_ids = img_ids, cat_ids
        g.img_index = {v: k for k, v in enumerate(img_ids)}
        g.cat_index = {v: k for k, v in enumerate(cat_ids)}
        g.n_images, g.n_cats = len(img_ids), len(cat_ids)
        K = g.n_cats
        by_id = {c["id"]: c for c in cats}
        g.categories = [by_id[c] for c in cat_ids]
        g.freq = np.array([FREQS.index(c["frequency"]) for c in g.categories], np.int8)
        g.hw = np.array([self.hw[k] for k in order], np.int64).reshape(-1, 2)
        for i, aid in enumerate(self.a_img):
            if aid not in g.img_index:
                raise DistillError(f"{n}: an annotation's image_id {aid!r} is not in 'images'")
        for cid in self.a_cat:
            if cid not in g.cat_index:
                raise DistillError(f"{n}: an annotation's category_id {cid!r} is not in 'categories'")
        img = np.fromiter((g.img_index[x] for x in self.a_img), np.int64, len(self.a_img))
        cat = np.fromiter((g.cat_index[x] for x in self.a_cat), np.int64, len(self.a_cat))
        key = img * K + cat
        srt = np.argsort(key, kind="stable")
        g.ann_key = key[srt]
        box = np.frombuffer(self.a_box, np.float64).reshape(-1, 4) if len(self.a_box) else np.zeros((0, 4))
        g.ann_box = np.ascontiguousarray(box[srt])
        g.ann_area = (np.frombuffer(self.a_area, np.float64) if len(self.a_area) else np.zeros(0))[srt]
        g.ann_ig = (np.frombuffer(self.a_ig, np.int8).astype(bool) if len(self.a_ig) else np.zeros(0, bool))[srt]
        from distill.eval.detection import warn_odd_boxes

        hw = g.hw.astype(np.float64)
        hw[(hw <= 0).any(axis=1)] = np.nan  # no size given
        warn_odd_boxes(n, box, hw[img][:, ::-1], reference="the LVIS API", index=np.frombuffer(self.a_idx, np.int64) if len(self.a_idx) else None)
        g.rle = None
        if self.masks:
            g.rle = [_to_rle(self.a_seg[k], *g.hw[img[k]]) for k in srt]
        # evaluated pairs: positive (has ground truth, after the area filter) or negative
        neg, nel = [], []
        for k, j in enumerate(order):
            nl, el = self.lists[j]
            for what, lst, out in (("neg_category_ids", nl, neg), ("not_exhaustive_category_ids", el, nel)):
                for cid in lst:
                    if cid not in g.cat_index:
                        raise DistillError(f"{n}: images[{j}].{what}: category id {cid!r} is not in 'categories'")
                    out.append(k * K + g.cat_index[cid])
        g.eval_key = np.unique(np.concatenate([g.ann_key, np.asarray(neg, np.int64)]))
        g.nel_key = np.unique(np.asarray(nel, np.int64))
        return g


def _compact_segm(seg: Any, name: str, where: str) -> Any:
    """A GT segmentation kept until the image sizes are known: polygons as float64 arrays."""
    if isinstance(seg, list):
        try:
            return [np.asarray(p, np.float64).reshape(-1) for p in seg]
        except (TypeError, ValueError):
            raise DistillError(f"{name}: {where}: expected a list of polygons [[x, y, ...], ...]") from None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        return seg
    raise DistillError(f"{name}: {where}: expected polygons or an RLE object")


def _to_rle(seg: Any, h: int, w: int) -> dict:
    """``LVIS.ann_to_rle``: polygons merged into one RLE; uncompressed RLE compressed."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in seg], int(h), int(w)))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, int(h), int(w))
    else:
        rle = seg
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _out(area: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    return (area < rng[0]) | (area > rng[1])


# --------------------------------------------------------------------------------------------
# matching


def _greedy(rank: np.ndarray, pair_det: np.ndarray, pair_g: np.ndarray, iou: np.ndarray, g_ig: np.ndarray,
            n_g: int, D: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``LVISEval.evaluate_img``'s greedy matching for many (image, category) groups at once.

    Pairs (detection, local GT index, IoU) are grouped by detection, the GT in file order within;
    detections of the same rank (position in their group's score order) belong to different
    groups and are matched together, ranks in order. Returns per detection the bit masks (over
    thresholds) of: matched to a non-ignored box, matched to an ignored box, matched at all."""
    tp = np.zeros(D, np.uint16)
    mig = np.zeros(D, np.uint16)
    hit_b = np.zeros(D, np.uint16)
    if not len(pair_det):
        return tp, mig, hit_b
    matched = np.zeros((n_g, _T), bool)
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
        valid = ~matched[pg] & (piou[:, None] >= _MATCH_THRS[None, :])
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


class LvisEval:
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

    def reset(self) -> None:
        self.seen = np.zeros(self.gt.n_images, bool)
        self._parts: list[tuple] = []
        self._warned = False

    @property
    def n_records(self) -> int:
        return sum(len(p[0]) for p in self._parts)

    def records(self) -> dict[str, np.ndarray]:
        self._compact()
        if not self._parts:
            return {"img": np.zeros(0, np.int32), "pos": np.zeros(0, np.int32), "cat": np.zeros(0, np.int32),
                    "score": np.zeros(0), "tp": np.zeros((0, _A), np.uint16), "ig": np.zeros((0, _A), np.uint16)}
        return dict(zip(self._FIELDS, self._parts[0]))

    def _compact(self) -> None:
        if len(self._parts) > 1:
            self._parts = [tuple(np.concatenate(x) for x in zip(*self._parts))]

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
        dup = self.seen[images]
        drop_img = np.zeros(self.gt.n_images, bool)
        if dup.any() or len(np.unique(images)) != len(images):
            if not self._warned:
                log.warning("image(s) %s evaluated more than once: only their first detections count",
                            [self.gt.img_ids[i] for i in images[dup][:5]] or "given twice in one call")
                self._warned = True
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
        self._parts.append((img[order].astype(np.int32), pos[order].astype(np.int32), cat[order].astype(np.int32),
                            score[order], *rec))
        if len(self._parts) > 64:
            self._compact()

    def _match(self, img, cat, box, area, rles) -> tuple[np.ndarray, np.ndarray]:
        """Detections sorted by (image, category, score desc, position) -> tp / ig bits [D, A]."""
        gt = self.gt
        D = len(img)
        key = img * gt.n_cats + cat
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        rank = np.arange(D) - np.repeat(starts, np.diff(np.r_[starts, D]))
        gs = np.searchsorted(gt.ann_key, key, "left")
        counts = np.searchsorted(gt.ann_key, key, "right") - gs
        P = int(counts.sum())
        pair_det = np.repeat(np.arange(D), counts)
        first = np.cumsum(counts) - counts
        pair_gt = gs[pair_det] + np.arange(P) - first[pair_det]
        if self.iou_type == "bbox":
            iou = box_iou(box[pair_det], gt.ann_box[pair_gt], np.zeros(P, bool))
        else:
            iou = self._mask_iou(starts, D, counts, gs, first, rles, P)
        uniq, pair_g = np.unique(pair_gt, return_inverse=True)
        nel = np.isin(key, gt.nel_key)
        tp = np.zeros((D, _A), np.uint16)
        ig = np.zeros((D, _A), np.uint16)
        for a, rng in enumerate(AREA_RNGS):
            g_ig = gt.ann_ig[uniq] | _out(gt.ann_area[uniq], rng)
            t, m, h = _greedy(rank, pair_det, pair_g, iou, g_ig, len(uniq), D)
            unmatched_ignored = np.where(_out(area, rng) | nel, _ALL_BITS, np.uint16(0)).astype(np.uint16) & ~h
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

    # ---- gather
    def state(self) -> dict[str, np.ndarray]:
        return {"images": np.flatnonzero(self.seen).astype(np.int32), **self.records()}

    @classmethod
    def merged(cls, gt: LvisGT, iou_type: str, states: Iterable[dict]) -> "LvisEval":
        """One evaluator from several :meth:`state` s; an image in more than one keeps the first."""
        out = cls(gt, iou_type)
        for s in states:
            images = np.asarray(s["images"], np.int64)
            keep = ~out.seen[np.asarray(s["img"], np.int64)]
            if out.seen[images].any() and not out._warned:
                log.warning("some images were evaluated on more than one process: only their first detections count")
                out._warned = True
            out.seen[images] = True
            if keep.any():
                out._parts.append(tuple(np.asarray(s[f])[keep] for f in cls._FIELDS))
        out._compact()
        return out

    # ---- accumulate
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


# --------------------------------------------------------------------------------------------
# numbers


def _mean_valid(x: np.ndarray) -> float:
    v = x[x > -1]
    return float(v.mean()) if v.size else -1.0


def lvis_summary(prec: np.ndarray, freq: np.ndarray, prefix: str) -> dict[str, float]:
    """``LVISEval.summarize``'s AP numbers from a [T, R, K, A] precision array."""
    t50 = int(np.argmin(np.abs(IOU_THRS - 0.5)))
    t75 = int(np.argmin(np.abs(IOU_THRS - 0.75)))
    m = {
        f"{prefix}/AP": _mean_valid(prec[..., 0]),
        f"{prefix}/AP50": _mean_valid(prec[t50, ..., 0]),
        f"{prefix}/AP75": _mean_valid(prec[t75, ..., 0]),
        f"{prefix}/APs": _mean_valid(prec[..., 1]),
        f"{prefix}/APm": _mean_valid(prec[..., 2]),
        f"{prefix}/APl": _mean_valid(prec[..., 3]),
    }
    for g, f in enumerate(FREQS):
        m[f"{prefix}/AP_{f}"] = _mean_valid(prec[:, :, np.asarray(freq) == g, 0])
    return m
