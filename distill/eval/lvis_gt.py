"""LVIS v1 ground truth as flat arrays, read item by item; which files are LVIS.

An LVIS file is a COCO instances file whose images carry ``neg_category_ids`` and
``not_exhaustive_category_ids`` and whose categories carry a ``frequency`` (r / c / f). Every
image, category and annotation goes through the project's COCO checks
(:mod:`distill.data.coco`); the LVIS fields are checked here. What :class:`LvisGT` holds: per box
(those with area in (0, inf), the only ones ``LVISEval`` reads) its image, category, [x, y, w, h],
area and ignore flag, about 60 bytes; for masks also its compressed RLE, a few hundred bytes; per
image the sorted keys of its evaluated and not-exhaustive categories. The matching is in
:mod:`distill.eval.lvis`.
"""

from __future__ import annotations

import math
import os
from array import array
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill.data.coco import check_annotation, check_category, check_image, check_lists
from distill.errors import DistillError
from distill.eval.coco_stream import array_view
from distill.eval.gt import warn_odd_boxes

AREA_RNGS = ((0.0**2, 1e5**2), (0.0**2, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_LBLS = ("all", "small", "medium", "large")
FREQS = ("r", "c", "f")
IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")

__all__ = ["LvisGT", "is_lvis", "sniff_lvis", "AREA_RNGS", "AREA_LBLS", "FREQS", "IMAGE_FIELDS", "out_of"]


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
        check_lists(gt, name)
        b = _Builder(name, "segm" in iou_types)
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
        sel = images[self.ann_key // self.n_cats]
        cat = self.ann_key % self.n_cats
        out = np.zeros((self.n_cats, len(AREA_RNGS)), np.int64)
        for a, rng in enumerate(AREA_RNGS):
            ok = sel & ~self.ann_ig & ~out_of(self.ann_area, rng)
            out[:, a] = np.bincount(cat[ok], minlength=self.n_cats)
        return out


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

    def image(self, im: Any, i: int) -> None:
        n = self.name
        check_image(im, f"{n}: images[{i}]", None, self.masks)
        for f in IMAGE_FIELDS:
            if f not in im:
                raise DistillError(f"{n}: images[{i}]: missing '{f}' (an LVIS file: other images carry it)")
            if not isinstance(im[f], list):
                raise DistillError(f"{n}: images[{i}].{f}: expected a list of category ids")
        self.img_ids.append(im["id"])
        self.hw.append((int(im.get("height", 0)), int(im.get("width", 0))))
        self.lists.append((im["neg_category_ids"], im["not_exhaustive_category_ids"]))

    def annotation(self, a: Any, i: int) -> None:
        n = self.name
        bb = check_annotation(a, f"{n}: annotations[{i}]", self.masks)
        if a["id"] in self.ann_ids:
            raise DistillError(f"{n}: annotations[{i}].id: duplicate annotation id {a['id']}")
        self.ann_ids.add(a["id"])
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
            check_category(c, f"{n}: categories[{i}]")
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
        box = array_view(self.a_box, np.float64).reshape(-1, 4)
        g.ann_box = np.ascontiguousarray(box[srt])
        g.ann_area = array_view(self.a_area, np.float64)[srt]
        g.ann_ig = array_view(self.a_ig, np.int8).astype(bool)[srt]
        hw = g.hw.astype(np.float64)
        hw[(hw <= 0).any(axis=1)] = np.nan  # no size given
        warn_odd_boxes(n, box, hw[img][:, ::-1], reference="the LVIS API", index=array_view(self.a_idx, np.int64))
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


def out_of(area: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    return (area < rng[0]) | (area > rng[1])

