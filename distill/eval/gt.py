"""COCO ground truth for evaluation: read, checked by the project's COCO validator
(:func:`distill.data.coco.validate_coco`, the same checks as every other COCO reader), odd boxes
reported.

Evaluation differs from training data in two ways only: images need no ``file_name`` (results
name images by id), and boxes of zero width or height are kept, as the reference evaluators score
them, with one warning line per file for them and for boxes outside their image
(:func:`warn_odd_boxes`).

For the streaming box evaluator, :func:`load_box_gt` gives the ground truth as flat arrays
(:class:`~distill.eval.coco_stream.BoxGT`): a file is parsed item by item, each record checked by
the validator's per-record checks, so neither its text nor a Python object per image or box is
held. Anything that path does not take as it is (a record the checks refuse, ids that repeat or
name nothing, an id beyond int64, a key given twice...) goes through :func:`load_gt`, which gives
the same error as for the other backends.
"""

from __future__ import annotations

import logging
import math
import os
from array import array
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill.data.coco import check_annotation, check_category, check_image, validate_coco
from distill.errors import DistillError
from distill.files import read_json
from distill.eval.coco_stream import BoxGT, array_view

log = logging.getLogger(__name__)

__all__ = ["load_gt", "load_box_gt", "stream_box_gt", "warn_odd_boxes", "image_size"]


def load_gt(gt_json: str | os.PathLike | dict, iou_types: Sequence[str] = ("bbox",)) -> tuple[dict, str]:
    """Read and check a COCO ground-truth file (or dict, returned as it is). Returns ``(dataset
    dict, name for messages)``. Masks (``"segm"`` in ``iou_types``) need every annotation's
    ``segmentation`` and every image's size."""
    if isinstance(gt_json, dict):
        gt, name = gt_json, "ground truth"
    else:
        name = str(gt_json)
        gt = read_json(gt_json, what="COCO ground-truth")
    gt = validate_coco(gt, name, file_names=None, masks="segm" in iou_types, drop_zero_size=False)
    sizes = {im["id"]: image_size(im) for im in gt["images"]}
    anns = gt["annotations"]
    box = np.array([[float(v) for v in a["bbox"]] for a in anns], np.float64).reshape(-1, 4)
    warn_odd_boxes(name, box, np.array([sizes[a["image_id"]] for a in anns], np.float64).reshape(-1, 2))
    return gt, name


def image_size(im: dict) -> tuple[float, float]:
    """(width, height) of a COCO image entry; NaN where it has no usable size."""
    try:
        w, h = float(im["width"]), float(im["height"])
    except (KeyError, TypeError, ValueError):
        return math.nan, math.nan
    return (w, h) if w > 0 and h > 0 else (math.nan, math.nan)


def warn_odd_boxes(name: str, box: np.ndarray, wh: np.ndarray, reference: str = "pycocotools", index=None) -> None:
    """One warning line for the ground-truth boxes ([x, y, w, h], (N, 4)) of zero width or height,
    or reaching more than a pixel outside their image (``wh``: (N, 2) its width and height, NaN
    where unknown). ``index``: the annotation index of each box (default: its row).

    They are kept: pycocotools (and faster-coco-eval, and the streaming evaluator, which follow
    it) score them without complaint, so the numbers stay the reference's. But nothing matches a
    zero-size box (its IoU is 0 whatever the detection), and a detection clipped to the image
    matches a box outside it poorly or not at all: they lower recall, which is why they are
    reported."""
    box = np.asarray(box, np.float64).reshape(-1, 4)
    if not len(box):
        return
    wh = np.asarray(wh, np.float64).reshape(-1, 2)
    x, y, w, h = box.T
    zero = (w == 0) | (h == 0)
    with np.errstate(invalid="ignore"):
        outside = ~zero & ((x < -1) | (y < -1) | (x + w > wh[:, 0] + 1) | (y + h > wh[:, 1] + 1))
    n_zero, n_out = int(zero.sum()), int(outside.sum())
    if not (n_zero or n_out):
        return
    rows = np.flatnonzero(zero | outside)
    first = int(rows[0] if index is None else np.asarray(index)[rows].min())
    what = ", ".join(f"{n} {s}" for n, s in ((n_zero, "of zero width or height"), (n_out, "outside its image")) if n)
    log.warning("%s: %d ground-truth box(es) that no detection can match well (%s; first: annotations[%d]) are "
                "kept and scored as %s scores them", name, n_zero + n_out, what, first, reference)


def load_box_gt(gt_json: str | os.PathLike | dict) -> tuple[BoxGT, list[dict], str]:
    """The ground truth for box evaluation as flat arrays: ``(BoxGT, categories, name)``; a file
    is read item by item (:func:`stream_box_gt`) where it can be, else through :func:`load_gt`."""
    if not isinstance(gt_json, dict):
        try:
            got = stream_box_gt(Path(gt_json))
        except (DistillError, OverflowError, TypeError, ValueError):
            got = None
        if got is not None:
            return got[0], got[1], str(gt_json)
    gt, name = load_gt(gt_json, ("bbox",))
    return BoxGT(gt), gt["categories"], name


class _Items:
    """The images (id, width, height) and boxes of a COCO file, as ``array.array`` s."""

    def __init__(self) -> None:
        self.img_ids: list[int] = []
        self.img_wh = array("d")  # width, height per image (NaN: unknown)
        self.cats: list | None = None
        self.aid, self.aimg, self.acat = array("q"), array("q"), array("q")
        self.box, self.crowd, self.area = array("d"), array("b"), array("d")

    def image(self, im: Any, where: str) -> None:
        check_image(im, where, file_names=None)
        self.img_ids.append(im["id"])
        self.img_wh.extend(image_size(im))

    def annotation(self, a: Any, where: str) -> None:
        vals = check_annotation(a, where)
        self.aid.append(a["id"])
        self.aimg.append(a["image_id"])
        self.acat.append(a["category_id"])
        self.box.extend(vals)
        self.crowd.append(bool(a.get("iscrowd", 0)))
        self.area.append(float(a["area"]) if "area" in a else vals[2] * vals[3])


def _read_items(path: Path, name: str) -> _Items | None:
    """Every record of the file, checked one by one (a refused one raises); None where the file
    is not a plain COCO object (a key given twice, a list that is not one)."""
    from distill.files import JsonStream

    items = _Items()
    seen: set[str] = set()
    with JsonStream(path, "COCO ground-truth") as js:
        if js.peek() != "{":
            return None
        for key in js.members():
            if key in seen:
                return None
            seen.add(key)
            if key in ("images", "annotations"):
                if js.peek() != "[":
                    return None
                add = items.image if key == "images" else items.annotation
                for i, item in enumerate(js.items()):
                    add(item, f"{name}: {key}[{i}]")
            elif key == "categories":
                items.cats = js.value()
            else:
                js.value()
        js.end()
    if not {"images", "annotations", "categories"} <= seen or not isinstance(items.cats, list) or not items.cats:
        return None
    for i, c in enumerate(items.cats):
        check_category(c, f"{name}: categories[{i}]")
    return items


def stream_box_gt(path: Path) -> tuple[BoxGT, list[dict]] | None:
    """``(BoxGT, categories)`` from a COCO file read item by item, or None where this file needs
    :func:`load_gt` (a record the COCO checks refuse, ids that repeat or name nothing, not a
    plain COCO object): that one names the problem."""
    if not path.is_file():
        return None
    try:
        items = _read_items(path, str(path))
    except DistillError:
        return None
    if items is None:
        return None
    cat_ids = sorted(c["id"] for c in items.cats)
    img_sorted = np.array(sorted(items.img_ids), dtype=np.int64)
    cat_arr = np.array(cat_ids, dtype=np.int64)
    if len(np.unique(img_sorted)) != len(img_sorted) or len(np.unique(cat_arr)) != len(cat_arr):
        return None
    aid, aimg, acat = (array_view(x, np.int64) for x in (items.aid, items.aimg, items.acat))
    if len(np.unique(aid)) != len(aid) or not np.isin(aimg, img_sorted).all() or not np.isin(acat, cat_arr).all():
        return None
    img_k = np.searchsorted(img_sorted, aimg)
    box = array_view(items.box, np.float64).reshape(-1, 4)
    wh = array_view(items.img_wh, np.float64).reshape(-1, 2)[np.argsort(np.array(items.img_ids, dtype=np.int64), kind="stable")]
    warn_odd_boxes(str(path), box, wh[img_k])
    gt = BoxGT.from_arrays(img_sorted.tolist(), cat_ids, img_k, np.searchsorted(cat_arr, acat), box,
                           array_view(items.crowd, np.int8).astype(bool), array_view(items.area, np.float64))
    return gt, items.cats
