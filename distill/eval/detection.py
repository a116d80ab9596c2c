"""COCO box and mask evaluation in the generalized open-vocabulary setting.

Every detection competes over the whole vocabulary (base and novel classes together): the COCO
evaluation runs once over all categories, and the base / novel numbers are the per-category
precision of that single run averaged over the categories of each split. This is how OV-COCO
results are reported (OVR-CNN, Zareian et al. CVPR 2021, section 4; ViLD, Gu et al. ICLR 2022,
section 4.1 "generalized" setting): the novel AP is *not* obtained by evaluating novel detections
against novel ground truth in isolation.

Box numbers come from a streaming implementation of COCOeval's bbox algorithm
(:mod:`distill.eval.coco_stream`, ``backend="stream"``, the default for boxes): it keeps the
ground truth as flat arrays and, per detection, only its score and its match at each IoU threshold,
so its memory stays flat as the images grow. Masks are evaluated with faster-coco-eval
(``COCOeval_faster``, ``backend="faster"``); ``backend="pycocotools"`` runs the reference
implementation on the same inputs. The tests show the three agree to 1e-6.

Metric names (values are fractions in [0, 1]; ``-1`` means undefined, i.e. no ground truth in that
split, as COCO reports it):

- ``bbox/AP``, ``bbox/AP50``, ``bbox/AP75``: over all categories with ground truth;
- ``bbox/AP_base``, ``bbox/AP_novel``, ``bbox/AP50_base``, ``bbox/AP50_novel``;
- ``bbox/AP50/<class name>`` for every category with ground truth;
- ``segm/...`` likewise when masks are evaluated.

At most ``max_dets`` detections per image are kept (the highest scores), as the COCO protocol
asks; COCO area range "all" is used throughout.

Ground truth is checked before anything is computed (:func:`load_gt`): ids are integers (a string
id is an error saying so: pycocotools and faster-coco-eval disagree on them), and boxes of zero
width or height or outside their image are kept, as the reference scores them, with one warning
line per file (:func:`warn_odd_boxes`).

LVIS: when the ground truth is an LVIS file (its images carry ``neg_category_ids`` and
``not_exhaustive_category_ids``, its categories a ``frequency``), :func:`evaluate_detection` and
:class:`DetectionEvaluator` run LVIS's federated protocol instead (:mod:`distill.eval.lvis`,
300 detections per image) and log which protocol ran; the keys add ``APs``, ``APm``, ``APl``,
``AP_r``, ``AP_c``, ``AP_f`` (novel = the categories whose split is novel: LVIS rare unless the
file or the vocabulary says otherwise).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
from array import array
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from distill.errors import DistillError
from distill.files import read_json, write_json

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
BACKENDS = ("auto", "stream", "faster", "pycocotools")
SUMMARY_KEYS = ("AP", "AP50", "AP75", "AP_base", "AP_novel", "AP50_base", "AP50_novel")
LVIS_KEYS = ("APs", "APm", "APl", "AP_r", "AP_c", "AP_f")

__all__ = [
    "evaluate_detection",
    "DetectionEvaluator",
    "format_table",
    "load_gt",
    "load_results",
    "IOU_TYPES",
]


# --------------------------------------------------------------------------------------------
# inputs


def load_gt(gt_json: str | os.PathLike | dict, iou_types: Sequence[str] = ("bbox",)) -> tuple[dict, str]:
    """Read and check a COCO ground-truth file. Returns ``(dataset dict, name for messages)``."""
    if isinstance(gt_json, dict):
        gt, name = gt_json, "ground truth"
    else:
        name = str(gt_json)
        gt = read_json(gt_json, what="COCO ground-truth")
    if not isinstance(gt, dict):
        raise DistillError(f"{name}: expected a COCO object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise DistillError(f"{name}: missing key '{key}' (expected a COCO instances file)")
        if not isinstance(gt[key], list):
            raise DistillError(f"{name}: '{key}' must be a list")
    if not gt["categories"]:
        raise DistillError(f"{name}: 'categories' is empty (expected at least one category)")
    img_ids = set()
    sizes: dict = {}
    for i, im in enumerate(gt["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise DistillError(f"{name}: images[{i}] must be an object with 'id'")
        check_id(im["id"], name, f"images[{i}].id")
        if "segm" in iou_types and ("height" not in im or "width" not in im):
            raise DistillError(f"{name}: images[{i}]: missing 'height'/'width' (needed for segm evaluation)")
        if im["id"] in img_ids:
            raise DistillError(f"{name}: images[{i}]: duplicate image id {im['id']}")
        img_ids.add(im["id"])
        sizes[im["id"]] = _image_size(im)
    cat_ids = set()
    for i, c in enumerate(gt["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DistillError(f"{name}: categories[{i}] must be an object with 'id' and 'name'")
        check_id(c["id"], name, f"categories[{i}].id")
        if c["id"] in cat_ids:
            raise DistillError(f"{name}: categories[{i}]: duplicate category id {c['id']}")
        cat_ids.add(c["id"])
    ann_ids = set()
    boxes, box_wh = [], []
    for i, a in enumerate(gt["annotations"]):
        if not isinstance(a, dict):
            raise DistillError(f"{name}: annotations[{i}] must be an object")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in a:
                raise DistillError(f"{name}: annotations[{i}]: missing key '{key}'")
        for key, what in (("id", None), ("image_id", "images"), ("category_id", "categories")):
            check_id(a[key], name, f"annotations[{i}].{key}", what)
        if a["id"] in ann_ids:
            raise DistillError(f"{name}: annotations[{i}]: duplicate annotation id {a['id']}")
        ann_ids.add(a["id"])
        if a["image_id"] not in img_ids:
            raise DistillError(f"{name}: annotations[{i}]: image_id {a['image_id']} is not in 'images'")
        if a["category_id"] not in cat_ids:
            raise DistillError(f"{name}: annotations[{i}]: category_id {a['category_id']} is not in 'categories'")
        _check_box(a["bbox"], name, f"annotations[{i}].bbox")
        boxes.append([float(v) for v in a["bbox"]])
        box_wh.append(sizes[a["image_id"]])
        if "segm" in iou_types and "segmentation" not in a:
            raise DistillError(f"{name}: annotations[{i}]: missing key 'segmentation' (needed for segm evaluation)")
    warn_odd_boxes(name, np.array(boxes, np.float64).reshape(-1, 4), np.array(box_wh, np.float64).reshape(-1, 2))
    return gt, name


def check_id(v: Any, name: str, where: str, ids_of: str | None = None) -> None:
    """A COCO id must be an integer (the format's type, and the only one both COCO evaluators
    agree on: pycocotools takes string ids as dict keys, and a string ``image_id`` beside integer
    image ids silently loses its boxes; faster-coco-eval refuses consistent string ids)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return
    like = f" like the ids in '{ids_of}'" if ids_of else " (COCO ids are integers)"
    if isinstance(v, str):
        raise DistillError(f"{name}: {where}: {v!r} is a string, expected an integer{like}")
    raise DistillError(f"{name}: {where}: expected an integer{like}, got {v!r}")


def _image_size(im: dict) -> tuple[float, float]:
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


def _load_box_gt(gt_json: str | os.PathLike | dict) -> tuple[Any, list[dict], str]:
    """The ground truth for box evaluation as flat arrays: ``(BoxGT, categories, name)``.

    A file is parsed item by item (:class:`~distill.files.JsonStream`), so neither its text nor a
    Python object per image or box is held; a dict is converted. Anything this fast path does not
    take as it is (an invalid file, ids that are not integers, a key given twice...) goes through
    :func:`load_gt`, which gives the same errors as for the other backends.
    """
    from distill.eval.coco_stream import BoxGT

    if not isinstance(gt_json, dict):
        try:
            got = _stream_box_gt(Path(gt_json))
        except (DistillError, OverflowError, TypeError, ValueError):
            got = None
        if got is not None:
            return got[0], got[1], str(gt_json)
    gt, name = load_gt(gt_json, ("bbox",))
    return BoxGT(gt), gt["categories"], name


def _stream_box_gt(path: Path):
    """``(BoxGT, categories)`` from a COCO file read item by item, or None where this file needs
    :func:`load_gt` (invalid, or not plain: ids that are not int, repeated keys)."""
    from array import array

    from distill.eval.coco_stream import BoxGT
    from distill.files import JsonStream

    if not path.is_file():
        return None
    seen: set[str] = set()
    img_ids: list[int] = []
    img_wh = array("d")  # width, height per image (NaN: unknown)
    cats: list | None = None
    aid, aimg, acat, box, crowd, area = array("q"), array("q"), array("q"), array("d"), array("b"), array("d")
    with JsonStream(path, "COCO ground-truth") as js:
        if js.peek() != "{":
            return None
        for key in js.members():
            if key in seen:
                return None
            seen.add(key)
            if key == "images":
                if js.peek() != "[":
                    return None
                for im in js.items():
                    if not isinstance(im, dict) or type(im.get("id")) is not int:
                        return None
                    img_ids.append(im["id"])
                    img_wh.extend(_image_size(im))
            elif key == "annotations":
                if js.peek() != "[":
                    return None
                for a in js.items():
                    if not isinstance(a, dict) or any(k not in a for k in ("id", "image_id", "category_id", "bbox")):
                        return None
                    if any(type(a[k]) is not int for k in ("id", "image_id", "category_id")):
                        return None
                    bb = a["bbox"]
                    if not isinstance(bb, (list, tuple)) or len(bb) != 4:
                        return None
                    vals = [float(v) for v in bb]
                    if not all(math.isfinite(v) for v in vals) or vals[2] < 0 or vals[3] < 0:
                        return None
                    aid.append(a["id"])
                    aimg.append(a["image_id"])
                    acat.append(a["category_id"])
                    box.extend(vals)
                    crowd.append(bool(a.get("iscrowd", 0)))
                    area.append(float(a["area"]) if "area" in a else vals[2] * vals[3])
            else:
                v = js.value()
                if key == "categories":
                    cats = v
        js.end()
    if not {"images", "annotations", "categories"} <= seen or not isinstance(cats, list) or not cats:
        return None
    if any(not isinstance(c, dict) or type(c.get("id")) is not int or "name" not in c for c in cats):
        return None
    cat_ids = sorted(c["id"] for c in cats)
    img_sorted = np.array(sorted(img_ids), dtype=np.int64)
    cat_arr = np.array(cat_ids, dtype=np.int64)
    if len(np.unique(img_sorted)) != len(img_sorted) or len(np.unique(cat_arr)) != len(cat_arr):
        return None
    aid_a, aimg_a, acat_a = (_view(x, np.int64) for x in (aid, aimg, acat))
    if len(np.unique(aid_a)) != len(aid_a) or not np.isin(aimg_a, img_sorted).all() or not np.isin(acat_a, cat_arr).all():
        return None
    img_k = np.searchsorted(img_sorted, aimg_a)
    box_a = _view(box, np.float64).reshape(-1, 4)
    wh = _view(img_wh, np.float64).reshape(-1, 2)[np.argsort(np.array(img_ids, dtype=np.int64), kind="stable")]
    warn_odd_boxes(str(path), box_a, wh[img_k])
    gt = BoxGT.from_arrays(
        img_sorted.tolist(), cat_ids, img_k, np.searchsorted(cat_arr, acat_a),
        box_a, _view(crowd, np.int8).astype(bool), _view(area, np.float64),
    )
    return gt, cats


def _check_box(bb: Any, name: str, where: str) -> None:
    if not isinstance(bb, (list, tuple)) or len(bb) != 4:
        raise DistillError(f"{name}: {where}: expected [x, y, w, h]")
    try:
        vals = [float(v) for v in bb]
    except (TypeError, ValueError):
        raise DistillError(f"{name}: {where}: expected 4 numbers, got {bb!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise DistillError(f"{name}: {where}: NaN or infinite value in {bb!r}")
    if vals[2] < 0 or vals[3] < 0:
        raise DistillError(f"{name}: {where}: negative width or height in {bb!r}")


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
    name, data = _results_source(results, read_json)
    if not isinstance(data, list):
        raise DistillError(f"{name}: expected a json list of COCO results [{{image_id, category_id, bbox, score}}, ...]")
    img_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    need = _needed_keys(iou_types)
    for i, r in enumerate(data):
        _check_result(i, r, need, img_ids, cat_ids, iou_types, name, gt_name)
    return data, name


def _needed_keys(iou_types: Sequence[str]) -> list[str]:
    return ["image_id", "category_id", "score"] + (["bbox"] if "bbox" in iou_types else []) + (
        ["segmentation"] if "segm" in iou_types else []
    )


def _check_result(i: int, r: Any, need: list[str], img_ids, cat_ids, iou_types: Sequence[str], name: str, gt_name: str) -> float:
    """Check one COCO result; returns its score."""
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
        _check_box(r["bbox"], name, f"[{i}].bbox")
    if "segm" in iou_types:
        seg = r["segmentation"]
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise DistillError(f"{name}: [{i}].segmentation: expected an RLE object {{'size': [h, w], 'counts': ...}}")
    return s


def _results_source(results, reader) -> tuple[str, Any]:
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


def _box_results(results: str | os.PathLike | list, box_gt, gt_name: str = "ground truth") -> tuple[tuple, str]:
    """Check COCO box results (as :func:`load_results`) into flat arrays, item by item: a results
    file holding a json list is parsed one result at a time, so no Python object per result is
    kept. Returns ``((image index, category index, [x, y, w, h] float64, score float64), name)``."""
    from array import array

    from distill.files import read_json_items

    name, data = _results_source(results, read_json_items)
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise DistillError(f"{name}: expected a json list of COCO results [{{image_id, category_id, bbox, score}}, ...]")
    need = _needed_keys(("bbox",))
    img_index, cat_index = box_gt.img_index, box_gt.cat_index
    img, cat, box, score = array("i"), array("i"), array("d"), array("d")
    for i, r in enumerate(data):
        s = _check_result(i, r, need, img_index, cat_index, ("bbox",), name, gt_name)
        img.append(img_index[r["image_id"]])
        cat.append(cat_index[r["category_id"]])
        box.extend(float(v) for v in r["bbox"])
        score.append(s)
    return (_view(img, np.int32), _view(cat, np.int32), _view(box, np.float64).reshape(-1, 4), _view(score, np.float64)), name


def _view(a, dtype) -> np.ndarray:
    """A numpy view of an ``array.array`` (no copy)."""
    return np.frombuffer(a, dtype=dtype) if len(a) else np.zeros(0, dtype)


def _top_per_image(results: list[dict], max_dets: int) -> list[dict]:
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


def _for_iou_type(results: list[dict], iou_type: str) -> list[dict]:
    """Fresh dicts (the COCO loaders modify them in place) with only the keys this type uses."""
    geom = "bbox" if iou_type == "bbox" else "segmentation"
    out = []
    for r in results:
        d = {"image_id": r["image_id"], "category_id": r["category_id"], "score": float(r["score"])}
        g = r[geom]
        d[geom] = [float(v) for v in g] if geom == "bbox" else dict(g)
        out.append(d)
    return out


# --------------------------------------------------------------------------------------------
# the split


def _categories_split(gt: dict, gt_name: str, vocab=None) -> tuple[list[int], list[str], list[str]]:
    """Sorted category ids (COCOeval's order), their names, and 'base'/'novel' per category."""
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in cats]
    if vocab is not None:
        idx = _vocab_classes(cats, gt_name, vocab)
        return ids, [vocab.names[i] for i in idx], [vocab.split[i] for i in idx]
    split = []
    for c in cats:
        sp = c.get("split", "base")
        if sp not in ("base", "novel"):
            raise DistillError(f"{gt_name}: category {c['id']} ({c['name']}): split {sp!r} is not 'base' or 'novel'")
        split.append(sp)
    return ids, [str(c["name"]) for c in cats], split


def _vocab_classes(cats: list[dict], gt_name: str, vocab) -> list[int]:
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


# --------------------------------------------------------------------------------------------
# evaluation


def _run_coco(
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


def _run_stream(
    gt: dict | Any, results: list[dict] | tuple, max_dets: int, img_ids=None, gt_name: str = "ground truth"
) -> tuple[np.ndarray, np.ndarray]:
    """The streaming box evaluation (same return as :func:`_run_coco` for ``iou_type="bbox"``).

    ``gt``: a COCO dict or a :class:`~distill.eval.coco_stream.BoxGT`; ``results``: COCO results
    (list of dicts) or the arrays of :func:`_box_results`. Keeps the top ``max_dets`` of each image.
    """
    from distill.eval.coco_stream import IOU_THRS, BoxGT, evaluate_arrays

    box_gt = gt if isinstance(gt, BoxGT) else BoxGT(gt)
    arrays = results if isinstance(results, tuple) else _box_results(results, box_gt, gt_name)[0]
    images = _image_mask(box_gt, img_ids)
    prec, dropped = evaluate_arrays(box_gt, images, *arrays, max_dets=max_dets)
    if dropped:
        log.info("kept the top %d detections per image (%d dropped)", max_dets, dropped)
    return prec, IOU_THRS.copy()


def _image_mask(box_gt, img_ids=None) -> np.ndarray:
    """Bool mask over ``box_gt``'s images: ``img_ids`` (ids not in the GT are ignored) or all."""
    if img_ids is None:
        return np.ones(box_gt.n_images, bool)
    m = np.zeros(box_gt.n_images, bool)
    idx = [box_gt.img_index[i] for i in img_ids if i in box_gt.img_index]
    m[np.asarray(idx, dtype=np.int64)] = True
    return m


def _empty_precision(cat_ids: list, has_gt) -> tuple[np.ndarray, np.ndarray]:
    """No detections at all: every category with (non-crowd) ground truth gets precision 0, the
    others stay -1 (excluded), as COCOeval would do. (COCO loaders cannot take an empty list.)"""
    prec = np.full((10, 101, len(cat_ids)), -1.0)
    for k, cid in enumerate(cat_ids):
        if cid in has_gt:
            prec[:, :, k] = 0.0
    return prec, np.linspace(0.5, 0.95, 10)


def _backend_for(backend: str, iou_type: str) -> str:
    """``auto`` and ``stream`` evaluate boxes with the streaming evaluator and masks with
    faster-coco-eval (the streaming evaluator has no masks)."""
    if backend in ("auto", "stream"):
        return "stream" if iou_type == "bbox" else "faster"
    return backend


def _mean_valid(x: np.ndarray) -> float:
    v = x[x > -1]
    return float(v.mean()) if v.size else -1.0


def _metrics_from_precision(prec: np.ndarray, iou_thrs: np.ndarray, names: list[str], split: list[str], prefix: str) -> dict:
    """AP numbers from a precision array [T, R, K] (-1 = category without ground truth)."""
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    # A category with ground truth has every entry set; one without has every entry -1. So the
    # mean over valid entries equals the mean of per-category APs over categories with GT.
    ap_k = np.array([_mean_valid(prec[:, :, k]) for k in range(prec.shape[2])])
    ap50_k = np.array([_mean_valid(prec[t50, :, k]) for k in range(prec.shape[2])])

    def avg(vals: np.ndarray, sel: list[bool]) -> float:
        v = vals[np.array(sel, dtype=bool) & (vals > -1)]
        return float(v.mean()) if v.size else -1.0

    every = [True] * len(split)
    base = [s == "base" for s in split]
    novel = [s == "novel" for s in split]
    m = {
        f"{prefix}/AP": _mean_valid(prec),
        f"{prefix}/AP50": _mean_valid(prec[t50]),
        f"{prefix}/AP75": _mean_valid(prec[t75]),
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


# --------------------------------------------------------------------------------------------
# LVIS (federated)


def _lvis_gt(gt_json: str | os.PathLike | dict, iou_types: Sequence[str]):
    """The ground truth as :class:`~distill.eval.lvis.LvisGT` when it is an LVIS file, else None."""
    from distill.eval import lvis

    if isinstance(gt_json, dict):
        return lvis.LvisGT.from_dict(gt_json, "ground truth", iou_types) if lvis.is_lvis(gt_json) else None
    if Path(gt_json).is_file() and lvis.sniff_lvis(gt_json):
        return lvis.LvisGT.from_file(gt_json, iou_types)
    return None


def _lvis_max_dets(max_dets: int | None, name: str) -> int:
    from distill.eval.lvis import MAX_DETS

    if max_dets is not None and int(max_dets) != MAX_DETS:
        log.warning("%s: LVIS protocol: %d detections per image (max_dets=%s not used)", name, MAX_DETS, max_dets)
    log.info("%s: LVIS federated evaluation (%d detections per image)", name, MAX_DETS)
    return MAX_DETS


def _warn_frequency(categories: list, name: str) -> None:
    if any(isinstance(c, dict) and "frequency" in c for c in categories):
        log.warning("%s: categories carry 'frequency' but no image carries 'neg_category_ids' / "
                    "'not_exhaustive_category_ids': evaluated as COCO, not with LVIS's federated protocol", name)


def _lvis_metrics(lgt, precs: dict, vocab=None) -> dict[str, float]:
    """Metrics of :func:`evaluate_detection` from LVIS precision arrays ``{iou type: [T, R, K, A]}``:
    LVIS's summary, plus base / novel and per-class AP50 over area "all"."""
    from distill.eval.coco_stream import IOU_THRS
    from distill.eval.lvis import lvis_summary

    if vocab is not None:
        _, names, split = _categories_split({"categories": lgt.categories}, lgt.name, vocab)
    else:  # the file's split, else LVIS frequency r = novel (as distill.vocab)
        names = [str(c["name"]) for c in lgt.categories]
        split = [c["split"] if c.get("split") in ("base", "novel") else ("novel" if c["frequency"] == "r" else "base")
                 for c in lgt.categories]
    m: dict[str, float] = {}
    for t, prec in precs.items():
        m.update(lvis_summary(prec, lgt.freq, t))
        for k, v in _metrics_from_precision(prec[..., 0], IOU_THRS, names, split, t).items():
            m.setdefault(k, v)
    return m


def _lvis_results(results, lgt, iou_types: Sequence[str]) -> tuple[tuple, list | None, str]:
    """Results checked item by item (as :func:`load_results`) into flat arrays: image index,
    category index, [x, y, w, h], score, area (box ``w * h``; the mask's when there is no box,
    as ``LVISResults``). Masks are kept (compressed RLE) only for detections of an evaluated
    (image, category) pair. Returns ``(arrays, rles or None, name)``."""
    from pycocotools import mask as mask_utils

    from distill.files import read_json_items

    name, data = _results_source(results, read_json_items)
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise DistillError(f"{name}: expected a json list of COCO results [{{image_id, category_id, bbox, score}}, ...]")
    need = _needed_keys(iou_types)
    masks = "segm" in iou_types
    eval_keys = set(lgt.eval_key.tolist()) if masks else set()
    K = lgt.n_cats
    img, cat, box, score, area = array("q"), array("q"), array("d"), array("d"), array("d")
    rles: list | None = [] if masks else None
    for i, r in enumerate(data):
        s = _check_result(i, r, need, lgt.img_index, lgt.cat_index, iou_types, name, lgt.name)
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
    arrays = (_view(img, np.int64), _view(cat, np.int64), _view(box, np.float64).reshape(-1, 4), _view(score, np.float64),
              _view(area, np.float64))
    return arrays, rles, name


def _evaluate_lvis(lgt, results, iou_types: Sequence[str], vocab, max_dets: int | None, img_ids) -> tuple[dict, int, str]:
    """Federated LVIS metrics of a results file / list; returns ``(metrics, detections, results name)``."""
    from distill.eval.coco_stream import top_per_image
    from distill.eval.lvis import LvisEval

    max_dets = _lvis_max_dets(max_dets, lgt.name)
    (img, cat, box, score, area), rles, res_name = _lvis_results(results, lgt, iou_types)
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
    return _lvis_metrics(lgt, precs, vocab), len(sel), res_name


def evaluate_detection(
    gt_json: str | os.PathLike | dict,
    results: str | os.PathLike | list[dict],
    out_dir: str | os.PathLike | None = None,
    iou_types: Sequence[str] = ("bbox",),
    vocab=None,
    max_dets: int | None = None,
    backend: str = "auto",
    img_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCO AP / AP50 / AP75 over all, base and novel categories.

    Args:
        gt_json: COCO instances file (or its dict); categories carry ``split`` ("base"/"novel").
        results: a COCO results json path, or a list of ``{image_id, category_id, bbox: [x, y, w, h],
            score, segmentation?: RLE}`` (ids are the ground truth's); or a COCO dataset (dict or
            file, e.g. ``distill label``'s labels.json) whose ``images`` carry ``file_name``: its
            images are matched to the ground truth's by file name and its categories by name
            (:func:`distill.eval.match.dataset_results`).
        out_dir: when given, ``metrics.json`` is written there (atomically).
        iou_types: any of ``("bbox", "segm")``.
        vocab: a :class:`~distill.vocab.Vocabulary` naming every GT category (matched by name or
            synonym, not by id: see :func:`_vocab_classes`); it gives their split (and names). A
            GT category it lacks is an error naming both; its classes that are not GT
            categories are not evaluated (a one-line note).
        max_dets: detections kept per image (highest scores) and COCO's largest maxDets; default
            100 (COCO). An LVIS ground truth always keeps 300 (the LVIS protocol).
        backend: ``"auto"`` (boxes: ``"stream"``, masks: ``"faster"``), ``"stream"`` (the
            streaming box evaluator, flat memory; masks still go to faster-coco-eval),
            ``"faster"`` (faster-coco-eval) or ``"pycocotools"`` (the reference).
        img_ids: evaluate only these images (default: every GT image).

    Returns:
        ``{"bbox/AP": ..., "bbox/AP_novel": ..., "bbox/AP50/<name>": ..., ...}`` (LVIS: also
        ``bbox/APs``, ``bbox/APm``, ``bbox/APl``, ``bbox/AP_r``, ``bbox/AP_c``, ``bbox/AP_f``).
    """
    iou_types = tuple(iou_types)
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise DistillError(f"iou types {list(iou_types)}: expected a non-empty subset of {list(IOU_TYPES)}")
    if backend not in BACKENDS:
        raise DistillError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
    if max_dets is not None and int(max_dets) < 1:
        raise DistillError(f"max_dets {max_dets}: expected a positive integer")
    if img_ids is not None:
        img_ids = sorted(set(img_ids))
    from distill.eval.match import dataset_results, gt_images_and_categories

    lgt = _lvis_gt(gt_json, iou_types)
    if lgt is not None:
        results = dataset_results(results, lambda: gt_images_and_categories(gt_json), lgt.name)
        metrics, n_dets, res_name = _evaluate_lvis(lgt, results, iou_types, vocab, max_dets, img_ids)
        if not n_dets:
            log.warning("%s: no predictions; every AP is 0", res_name)
        if out_dir is not None:
            write_json(Path(out_dir) / "metrics.json", metrics)
        return metrics
    max_dets = 100 if max_dets is None else int(max_dets)
    backends = {t: _backend_for(backend, t) for t in iou_types}
    metrics: dict[str, float] = {}
    if set(backends.values()) == {"stream"}:
        # boxes only, streaming: the GT as flat arrays, the results checked and packed one by one
        box_gt, categories, gt_name = _load_box_gt(gt_json)
        results = dataset_results(results, lambda: gt_images_and_categories(gt_json), gt_name)
        arrays, res_name = _box_results(results, box_gt, gt_name)
        _warn_frequency(categories, gt_name)
        cat_ids, names, split = _categories_split({"categories": categories}, gt_name, vocab)
        images = _image_mask(box_gt, img_ids)
        n_dets = int(images[arrays[0]].sum())
        if n_dets:
            prec, iou_thrs = _run_stream(box_gt, arrays, int(max_dets), img_ids)
        else:
            has = box_gt.has_non_crowd(images)
            prec, iou_thrs = _empty_precision(cat_ids, {box_gt.cat_ids[k] for k in np.flatnonzero(has)})
        metrics.update(_metrics_from_precision(prec, iou_thrs, names, split, "bbox"))
    else:
        gt, gt_name = load_gt(gt_json, iou_types)
        results = dataset_results(results, lambda: gt_images_and_categories(gt), gt_name)
        dets, res_name = load_results(results, gt, iou_types, gt_name)
        _warn_frequency(gt["categories"], gt_name)
        cat_ids, names, split = _categories_split(gt, gt_name, vocab)
        if img_ids is not None:
            keep_imgs = set(img_ids)
            dets = [r for r in dets if r["image_id"] in keep_imgs]
        dets = _top_per_image(dets, int(max_dets))
        n_dets = len(dets)
        for t in iou_types:
            if not dets:
                ev_imgs = set(img_ids) if img_ids is not None else None
                has_gt = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0) and (ev_imgs is None or a["image_id"] in ev_imgs)}
                prec, iou_thrs = _empty_precision(cat_ids, has_gt)
            elif backends[t] == "stream":
                prec, iou_thrs = _run_stream(gt, dets, int(max_dets), img_ids, gt_name)
            else:
                prec, iou_thrs = _run_coco(gt, _for_iou_type(dets, t), t, int(max_dets), backends[t], img_ids)
            metrics.update(_metrics_from_precision(prec, iou_thrs, names, split, t))
    if not n_dets:
        log.warning("%s: no predictions; every AP is 0", res_name)
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


# --------------------------------------------------------------------------------------------
# streaming evaluator (during training)


class DetectionEvaluator:
    """reset / process / evaluate, for use inside a training loop.

    Boxes only (the default backend): each image's detections are matched against its ground
    truth as soon as they are processed, and only a compact record per detection is kept (score,
    category, and its match at each IoU threshold: about 20 bytes), with the ground truth as flat
    arrays, so the memory stays flat as the images grow. With masks, or with ``backend="faster"``
    / ``"pycocotools"``, at most ``max_dets`` COCO results per image are kept (masks as RLE) and
    evaluated at the end. Under ``torch.distributed`` the records (or results) of all ranks are
    gathered; rank 0 gets the metrics, the other ranks an empty dict. An image processed more than
    once (e.g. the padding of a ``DistributedSampler``) counts once with the streaming backend.

    Args:
        gt_json: COCO instances file (or dict) of the images that will be processed.
        vocab: maps label indices to category ids (``vocab.ids[label]``) and gives the split;
            default: the GT file's categories in file order.
        iou_types: ``("bbox",)`` or ``("bbox", "segm")`` (then predictions carry ``masks``).
        backend: as :func:`evaluate_detection`.
        out_dir: where :meth:`evaluate` writes ``metrics.json`` (optional).
    """

    def __init__(
        self,
        gt_json: str | os.PathLike | dict,
        vocab=None,
        iou_types: Sequence[str] = ("bbox",),
        max_dets: int | None = None,
        backend: str = "auto",
        out_dir: str | os.PathLike | None = None,
    ) -> None:
        iou_types = tuple(iou_types)
        if backend not in BACKENDS:
            raise DistillError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
        if max_dets is not None and int(max_dets) < 1:
            raise DistillError(f"max_dets {max_dets}: expected a positive integer")
        self._lvis = _lvis_gt(gt_json, iou_types)
        self.streaming = {_backend_for(backend, t) for t in iou_types} == {"stream"}
        if self._lvis is not None:
            from distill.eval.lvis import LvisEval

            self.streaming = False
            self.gt, self.gt_name = None, self._lvis.name
            categories = self._lvis.categories
            self._valid_imgs = self._lvis.img_index
            self._lvis_evs = {t: LvisEval(self._lvis, t) for t in iou_types}
            max_dets = _lvis_max_dets(max_dets, self.gt_name)
        elif self.streaming:
            from distill.eval.coco_stream import StreamingBoxEval

            # the GT as flat arrays; a file's GT is never held as dicts (``self.gt`` stays None)
            self._box_gt, categories, self.gt_name = _load_box_gt(gt_json)
            self.gt = gt_json if isinstance(gt_json, dict) else None
            self._matcher = StreamingBoxEval(self._box_gt)
            self._valid_imgs = self._box_gt.img_index
        else:
            self.gt, self.gt_name = load_gt(gt_json, iou_types)
            categories = self.gt["categories"]
            self._valid_imgs = {im["id"] for im in self.gt["images"]}
        self._categories = list(categories)
        if vocab is None:
            from distill.vocab import vocab_from_categories

            vocab = vocab_from_categories(categories, self.gt_name)
        self.vocab = vocab
        self.label_to_cat = list(vocab.ids)
        self.iou_types = iou_types
        self.max_dets = 100 if max_dets is None else int(max_dets)
        self.backend = backend
        self.out_dir = out_dir
        if self.streaming or self._lvis is not None:
            # label index -> GT category index (-1: the category is not in the ground truth)
            cat_index = self._lvis.cat_index if self._lvis is not None else self._box_gt.cat_index
            self._label_to_k = np.array([cat_index.get(c, -1) for c in self.label_to_cat], dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._results: list[dict] = []
        self._img_ids: set[int] = set()
        if self.streaming:
            self._matcher.reset()
        for ev in getattr(self, "_lvis_evs", {}).values():
            ev.reset()

    def process(self, image_ids: Sequence[int], predictions: Sequence[dict]) -> None:
        """Add one batch.

        Args:
            image_ids: COCO image ids of the batch.
            predictions: per image ``{"boxes": (N, 4) float XYXY absolute pixels, "scores": (N,),
                "labels": (N,) int64 vocabulary indices, "masks": optional (N, H, W) or (N, 1, H, W)
                (bool/uint8, or float probabilities thresholded at 0.5)}``.
        """
        import torch

        if len(image_ids) != len(predictions):
            raise ValueError(f"{len(image_ids)} image ids for {len(predictions)} predictions")
        batch_imgs: list[int] = []
        det_img, det_cat, det_box, det_score = [], [], [], []
        for img_id, pred in zip(image_ids, predictions):
            img_id = int(img_id)
            if img_id not in self._valid_imgs:
                raise DistillError(f"{self.gt_name}: image_id {img_id} is not an image of the ground truth")
            if not self.streaming:
                self._img_ids.add(img_id)
            scores = torch.as_tensor(pred["scores"]).detach().float().cpu()
            boxes = torch.as_tensor(pred["boxes"]).detach().float().cpu().reshape(-1, 4)
            labels = torch.as_tensor(pred["labels"]).detach().long().cpu()
            if not torch.isfinite(boxes).all() or not torch.isfinite(scores).all():
                raise ValueError(f"image {img_id}: NaN or infinite boxes/scores in predictions")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_to_cat)):
                raise ValueError(f"image {img_id}: label outside 0..{len(self.label_to_cat) - 1}")
            order = torch.argsort(scores, descending=True, stable=True)[: self.max_dets]
            xywh = boxes[order].clone()
            xywh[:, 2:] -= xywh[:, :2]
            if self._lvis is not None:
                self._add_lvis(img_id, pred, order, xywh, scores, labels)
            elif self.streaming:
                k = self._valid_imgs[img_id]
                cats = self._label_to_k[labels[order].numpy()]
                if (cats < 0).any():
                    lab = int(labels[order][torch.from_numpy(cats < 0)][0])
                    raise DistillError(f"image {img_id}: label {lab} is category_id {self.label_to_cat[lab]!r}, "
                                       f"which is not a category of {self.gt_name}")
                batch_imgs.append(k)
                det_img.append(np.full(len(cats), k, np.int64))
                det_cat.append(cats)
                det_box.append(xywh.double().numpy())
                det_score.append(scores[order].double().numpy())
            else:
                self._add_results(img_id, pred, order, xywh, scores, labels)
        if self.streaming and batch_imgs:
            self._matcher.add(batch_imgs, np.concatenate(det_img), np.concatenate(det_cat), np.concatenate(det_box),
                              np.concatenate(det_score))

    def _categories_of(self, img_id: int, labels: np.ndarray, gt_cats: np.ndarray) -> np.ndarray:
        if (gt_cats < 0).any():
            lab = int(labels[gt_cats < 0][0])
            raise DistillError(f"image {img_id}: label {lab} is category_id {self.label_to_cat[lab]!r}, "
                               f"which is not a category of {self.gt_name}")
        return gt_cats

    def _add_lvis(self, img_id: int, pred: dict, order, xywh, scores, labels) -> None:
        """One image into the federated evaluators: only the detections of its evaluated
        categories are kept (their masks encoded), in score order (``pos`` = rank)."""
        import torch
        from pycocotools import mask as mask_util

        k = self._valid_imgs[img_id]
        lab = labels[order].numpy()
        cats = self._categories_of(img_id, lab, self._label_to_k[lab])
        n = len(cats)
        img = np.full(n, k, np.int64)
        box = xywh.double().numpy()
        score = scores[order].double().numpy()
        area = box[:, 2] * box[:, 3]  # LVISResults: a result with a box has area w * h
        ev0 = next(iter(self._lvis_evs.values()))
        keep = np.flatnonzero(ev0.keep_mask(img, cats))
        for t, ev in self._lvis_evs.items():
            rles = None
            if t == "segm":
                m = torch.as_tensor(pred["masks"]).detach().cpu()
                if m.dim() == 4:
                    m = m[:, 0]
                m = (m > 0.5) if m.is_floating_point() else m.bool()
                m = m[order]
                rles = [None] * n
                for j in keep.tolist():
                    rles[j] = mask_util.encode(np.asfortranarray(m[j].numpy().astype(np.uint8)))
            ev.add([k], img[keep], keep, cats[keep], box[keep], score[keep], area[keep],
                   [rles[j] for j in keep] if rles is not None else None)

    def _add_results(self, img_id: int, pred: dict, order, xywh, scores, labels) -> None:
        import torch
        from pycocotools import mask as mask_util

        masks = None
        if "segm" in self.iou_types:
            m = torch.as_tensor(pred["masks"]).detach().cpu()
            if m.dim() == 4:
                m = m[:, 0]
            m = (m > 0.5) if m.is_floating_point() else m.bool()
            masks = m[order].numpy()
        for j, (b, s, lab) in enumerate(zip(xywh.tolist(), scores[order].tolist(), labels[order].tolist())):
            r = {"image_id": img_id, "category_id": int(self.label_to_cat[lab]), "bbox": b, "score": float(s)}
            if masks is not None:
                rle = mask_util.encode(np.asfortranarray(masks[j].astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                r["segmentation"] = rle
            self._results.append(r)

    @staticmethod
    def _gather(obj) -> list | None:
        """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the others; ``[obj]`` when
        not distributed."""
        try:
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        except ImportError:  # pragma: no cover
            distributed = False
        if not distributed:
            return [obj]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered if dist.get_rank() == 0 else None

    def evaluate(self) -> dict[str, float]:
        if self._lvis is not None:
            return self._evaluate_lvis()
        if self.streaming:
            return self._evaluate_stream()
        gathered = self._gather((self._results, sorted(self._img_ids)))
        if gathered is None:
            return {}
        results = [r for part, _ in gathered for r in part]
        img_ids = {i for _, ids in gathered for i in ids}
        if not img_ids:
            raise DistillError("DetectionEvaluator: no images were processed")
        return evaluate_detection(
            self.gt, results, out_dir=self.out_dir, iou_types=self.iou_types, vocab=self.vocab,
            max_dets=self.max_dets, backend=self.backend, img_ids=img_ids,
        )

    def _evaluate_lvis(self) -> dict[str, float]:
        from distill.eval.lvis import LvisEval

        states = self._gather({t: ev.state() for t, ev in self._lvis_evs.items()})
        if states is None:
            return {}
        precs = {}
        for t, ev in self._lvis_evs.items():
            merged = ev if len(states) == 1 else LvisEval.merged(self._lvis, t, [s[t] for s in states])
            if not merged.seen.any():
                raise DistillError("DetectionEvaluator: no images were processed")
            precs[t] = merged.precision()
        metrics = _lvis_metrics(self._lvis, precs, self.vocab)
        if self.out_dir is not None:
            write_json(Path(self.out_dir) / "metrics.json", metrics)
        return metrics

    def _evaluate_stream(self) -> dict[str, float]:
        from distill.eval.coco_stream import IOU_THRS, StreamingBoxEval

        states = self._gather(self._matcher.state())
        if states is None:
            return {}
        matcher = self._matcher if len(states) == 1 else StreamingBoxEval.merged(self._box_gt, states)
        if not matcher.seen.any():
            raise DistillError("DetectionEvaluator: no images were processed")
        cat_ids, names, split = _categories_split({"categories": self._categories}, self.gt_name, self.vocab)
        if matcher.n_records:
            prec, iou_thrs = matcher.precision(), IOU_THRS.copy()
        else:
            has = self._box_gt.has_non_crowd(matcher.seen)
            prec, iou_thrs = _empty_precision(cat_ids, {self._box_gt.cat_ids[k] for k in np.flatnonzero(has)})
            log.warning("%s: no predictions; every AP is 0", "results")
        metrics = _metrics_from_precision(prec, iou_thrs, names, split, "bbox")
        if self.out_dir is not None:
            write_json(Path(self.out_dir) / "metrics.json", metrics)
        return metrics


# --------------------------------------------------------------------------------------------
# table


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and (math.isnan(v) or v < 0):
        return "-"
    return f"{100 * v:.1f}"


def format_table(metrics: dict[str, float]) -> str:
    """A short markdown table (percent, one decimal; ``-`` = undefined) of the summary metrics.

    Detection rows per iou type (AP, AP50, AP75, base/novel; with LVIS's federated metrics also
    APs/m/l and AP_r/c/f); a segmentation row when the
    ``miou/...`` keys are present.
    """
    lines: list[str] = []
    types = [t for t in IOU_TYPES if f"{t}/AP" in metrics]
    if types:
        keys = SUMMARY_KEYS + (LVIS_KEYS if any(f"{t}/AP_r" in metrics for t in types) else ())
        lines.append("| | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for t in types:
            lines.append(f"| {t} | " + " | ".join(_fmt(metrics.get(f"{t}/{k}")) for k in keys) + " |")
    seg_keys = ("miou/seen", "miou/unseen", "miou/all", "miou/hiou", "pixel_acc")
    if any(k in metrics for k in seg_keys):
        if lines:
            lines.append("")
        lines.append("| mIoU seen | mIoU unseen | mIoU all | hIoU | pixel acc |")
        lines.append("|---|---|---|---|---|")
        lines.append("| " + " | ".join(_fmt(metrics.get(k)) for k in seg_keys) + " |")
    return "\n".join(lines)
