"""COCO detection results for evaluation: read and checked against the ground truth.

A result is ``{image_id, category_id, score, bbox: [x, y, w, h]}`` (plus ``segmentation``, an RLE
object, for mask evaluation), with the ground truth's ids. Results come as a json file holding a
list (read one item at a time where only arrays are kept: :func:`box_results`), a list in memory,
a COCO-style dict whose ``annotations`` are the predictions, or
:class:`~distill.eval.match.Named` results already mapped to the ground truth's ids. Every entry
is checked (:func:`check_result`; its box by the COCO validator's
:func:`~distill.data.coco.check_bbox`) and a mistake is a one-line error naming the file and the
entry.
"""

from __future__ import annotations

import logging
import math
import os
from array import array
from typing import Any, Callable, Sequence

import numpy as np

from distill.data.coco import check_bbox
from distill.errors import DistillError
from distill.eval.coco_stream import array_view
from distill.files import read_json, read_json_items

log = logging.getLogger(__name__)

__all__ = ["load_results", "box_results", "check_result", "needed_keys", "results_source", "results_items",
           "top_results", "for_iou_type"]


def load_results(
    results: str | os.PathLike | list,
    gt: dict,
    iou_types: Sequence[str] = ("bbox",),
    gt_name: str = "ground truth",
) -> tuple[list[dict], str]:
    """Read and check COCO results against ``gt``. Returns ``(results list, name for messages)``.

    Each entry needs ``image_id``, ``category_id``, ``score``, plus ``bbox`` ([x, y, w, h]) for
    bbox evaluation and ``segmentation`` (RLE) for segm evaluation.
    """
    name, data = results_source(results, read_json)
    if not isinstance(data, list):
        raise DistillError(f"{name}: expected a json list of COCO results [{{image_id, category_id, bbox, score}}, ...]")
    img_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    need = needed_keys(iou_types)
    for i, r in enumerate(data):
        check_result(i, r, need, img_ids, cat_ids, iou_types, name, gt_name)
    return data, name


def needed_keys(iou_types: Sequence[str]) -> list[str]:
    return ["image_id", "category_id", "score"] + (["bbox"] if "bbox" in iou_types else []) + (
        ["segmentation"] if "segm" in iou_types else []
    )


def check_result(i: int, r: Any, need: list[str], img_ids, cat_ids, iou_types: Sequence[str], name: str, gt_name: str) -> float:
    """Check one COCO result (``img_ids`` / ``cat_ids``: the ground truth's ids, any container);
    returns its score."""
    if not isinstance(r, dict):
        raise DistillError(f"{name}: [{i}] must be an object with keys {need}")
    for key in need:
        if key not in r:
            raise DistillError(f"{name}: [{i}]: missing key '{key}' (each result needs {need})")
    for key, ids, what in (("image_id", img_ids, "an image"), ("category_id", cat_ids, "a category")):
        v = r[key]
        try:
            known = v in ids
        except TypeError:  # unhashable (a list, an object)
            known = False
        if not known:
            if isinstance(v, str):
                raise DistillError(f"{name}: [{i}]: {key} {v!r} is a string, expected an integer like the ids of {gt_name}")
            raise DistillError(f"{name}: [{i}]: {key} {v!r} is not {what} of {gt_name}")
    try:
        s = float(r["score"])
    except (TypeError, ValueError):
        raise DistillError(f"{name}: [{i}].score: expected a number, got {r['score']!r}") from None
    if not math.isfinite(s):
        raise DistillError(f"{name}: [{i}].score: NaN or infinite")
    if "bbox" in r:
        check_bbox(r["bbox"], f"{name}: [{i}].bbox")
    if "segm" in iou_types:
        seg = r["segmentation"]
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise DistillError(f"{name}: [{i}].segmentation: expected an RLE object {{'size': [h, w], 'counts': ...}}")
    return s


def results_source(results, reader: Callable) -> tuple[str, Any]:
    """``(name for messages, data)`` of results given as a path (read with ``reader``) or in memory;
    a COCO-style dict holding predictions (e.g. pseudo-labels) yields its ``annotations``."""
    from distill.eval.match import Named

    if isinstance(results, Named):
        name, data = results.name, results.data
    elif isinstance(results, (str, os.PathLike)):
        name, data = str(results), reader(results, what="COCO results")
    else:
        name, data = "results", results
    if isinstance(data, dict) and "annotations" in data and isinstance(data["annotations"], list):
        data = data["annotations"]
    return name, data


def results_items(results) -> tuple[str, Any]:
    """As :func:`results_source`, a file holding a json list read one result at a time; anything
    but a list of results is an error."""
    name, data = results_source(results, read_json_items)
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise DistillError(f"{name}: expected a json list of COCO results [{{image_id, category_id, bbox, score}}, ...]")
    return name, data


def box_results(results: str | os.PathLike | list, box_gt, gt_name: str = "ground truth") -> tuple[tuple, str]:
    """Check COCO box results (as :func:`load_results`) into flat arrays, item by item: a results
    file holding a json list is parsed one result at a time, so no Python object per result is
    kept. Returns ``((image index, category index, [x, y, w, h] float64, score float64), name)``."""
    name, data = results_items(results)
    need = needed_keys(("bbox",))
    img_index, cat_index = box_gt.img_index, box_gt.cat_index
    img, cat, box, score = array("i"), array("i"), array("d"), array("d")
    for i, r in enumerate(data):
        s = check_result(i, r, need, img_index, cat_index, ("bbox",), name, gt_name)
        img.append(img_index[r["image_id"]])
        cat.append(cat_index[r["category_id"]])
        box.extend(float(v) for v in r["bbox"])
        score.append(s)
    return (array_view(img, np.int32), array_view(cat, np.int32), array_view(box, np.float64).reshape(-1, 4),
            array_view(score, np.float64)), name


def top_results(results: list[dict], max_dets: int) -> list[dict]:
    """Keep the ``max_dets`` highest-scoring results of each image (stable for ties)."""
    by_img: dict[Any, list[int]] = {}
    for i, r in enumerate(results):
        by_img.setdefault(r["image_id"], []).append(i)
    if all(len(v) <= max_dets for v in by_img.values()):
        return results
    keep: list[int] = []
    dropped = 0
    for idx in by_img.values():
        idx = sorted(idx, key=lambda i: -float(results[i]["score"]))
        keep.extend(idx[:max_dets])
        dropped += max(0, len(idx) - max_dets)
    log.info("kept the top %d detections per image (%d dropped)", max_dets, dropped)
    keep.sort()
    return [results[i] for i in keep]


def for_iou_type(results: list[dict], iou_type: str) -> list[dict]:
    """Fresh dicts (the COCO loaders modify them in place) with only the keys this type uses."""
    geom = "bbox" if iou_type == "bbox" else "segmentation"
    out = []
    for r in results:
        d = {"image_id": r["image_id"], "category_id": r["category_id"], "score": float(r["score"])}
        g = r[geom]
        d[geom] = [float(v) for v in g] if geom == "bbox" else dict(g)
        out.append(d)
    return out
