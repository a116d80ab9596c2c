"""Predictions made on images by file name, matched to a ground truth's images and categories.

``distill label`` numbers the images of its ``labels.json`` 1..n in label order and its categories
as its vocabulary does: the ids say nothing about a ground truth's. What ties them is each image's
``file_name`` and each category's ``name``:

- :func:`match_images`: images by ``file_name``, exact, else one name is a path suffix of the
  other (labels made on ``images/unlabeled/`` match ground truth named ``unlabeled/000123.png``);
- :func:`category_names`: categories by name (case and surrounding blanks ignored);
- :func:`dataset_results`: a prediction *dataset* (a COCO dict whose ``images`` carry file names)
  as COCO results with the ground truth's image and category ids, for ``distill eval det``.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from distill.errors import DistillError

log = logging.getLogger(__name__)


def _suffixes(name: str) -> list[str]:
    parts = Path(name).as_posix().split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


def match_images(pred_images: list[dict], gt_images: list[dict], where: str = "labels") -> dict[int, int]:
    """pred image id -> gt image id, by file_name (exact, else a path suffix either way); images
    without a match are left out. A name matching several ground-truth images is an error."""
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


def norm_name(name: Any) -> str:
    return str(name).strip().lower()


def category_names(categories: list[dict]) -> dict[str, int]:
    """normalised category name -> id."""
    return {norm_name(c["name"]): c["id"] for c in categories}


class Named:
    """Results already read, with the name of the file they came from (for messages)."""

    def __init__(self, name: str, data: Any) -> None:
        self.name, self.data = name, data


def is_dataset(data: Any) -> bool:
    """A COCO dataset dict whose images carry file names (what ``distill label`` writes)."""
    return (isinstance(data, dict) and isinstance(data.get("images"), list)
            and any(isinstance(im, dict) and "file_name" in im for im in data["images"]))


def dataset_results(results: Any, gt_images_cats: Callable[[], tuple[list[dict], list[dict]]], gt_name: str) -> Any:
    """``results`` (a path, a dict or a list) as given, or as :class:`Named` results.

    A COCO dataset dict whose ``images`` carry ``file_name`` (``distill label``'s labels.json)
    has its own image ids: they are mapped to the ground truth's by file name (an image that is
    not in the ground truth is an error naming it), and its category ids by name when it has
    ``categories`` (predictions of a category the ground truth lacks are left out, one note
    line). Its annotations come back as COCO results with the ground truth's ids. A results list
    (the COCO results format) comes back unchanged: its ids are the ground truth's as they are.

    ``gt_images_cats()`` gives the ground truth's images and categories, when needed."""
    from distill.files import JsonListItems, read_json_items

    if isinstance(results, (str, os.PathLike)):
        name, data = str(results), read_json_items(results, what="COCO results")
        if isinstance(data, JsonListItems):
            return results  # a results list, read item by item later
    elif isinstance(results, dict):
        name, data = "results", results
    else:
        return results
    if not is_dataset(data) or not isinstance(data.get("annotations"), list):
        return Named(name, data)
    gt_images, gt_cats = gt_images_cats()
    img_map = _image_map(data["images"], gt_images, name, gt_name)
    cat_map = _category_map(data["categories"], gt_cats, name) if isinstance(data.get("categories"), list) else None
    out = []
    unknown: dict[str, int] = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            out.append(a)  # refused with its index by the results check
            continue
        r = dict(a)
        for key, known, what in (("image_id", img_map, "images"), ("category_id", cat_map, "categories")):
            if key not in a or known is None:
                continue  # a missing key is named by the results check
            try:
                ok = a[key] in known
            except TypeError:
                ok = False
            if not ok:
                raise DistillError(f"{name}: annotations[{i}].{key} {a[key]!r} is not in its '{what}'")
        if "image_id" in a:
            r["image_id"] = img_map[a["image_id"]]
        if cat_map is not None and "category_id" in a:
            c = cat_map[a["category_id"]]
            if c is None:
                cname = next(str(x["name"]) for x in data["categories"] if x["id"] == a["category_id"])
                unknown[cname] = unknown.get(cname, 0) + 1
                continue
            r["category_id"] = c
        out.append(r)
    if unknown:
        names = sorted(unknown)
        log.warning("%s: %d categor%s not in %s, %d prediction(s) not scored: %s", name, len(names), "y" if len(names) == 1 else "ies",
                    gt_name, sum(unknown.values()), ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
    return Named(name, out)


def _image_map(pred_images: list, gt_images: list[dict], name: str, gt_name: str) -> dict:
    """A prediction dataset's image id -> the ground truth's, by file name; an image that is not
    in the ground truth, or two naming the same one, is an error."""
    for i, g in enumerate(gt_images):
        if not isinstance(g.get("file_name"), str) or not g["file_name"]:
            raise DistillError(f"{gt_name}: images[{i}]: no 'file_name' to match the images of {name} by (it is a COCO "
                               "dataset with its own image ids; give a results list with the ground truth's image ids instead)")
    for i, im in enumerate(pred_images):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or not im["file_name"] or "id" not in im:
            raise DistillError(f"{name}: images[{i}]: expected an object with 'id' and 'file_name'")
        try:
            hash(im["id"])
        except TypeError:
            raise DistillError(f"{name}: images[{i}].id: expected an integer, got {im['id']!r}") from None
    img_map = match_images(pred_images, gt_images, name)
    for i, im in enumerate(pred_images):
        if im["id"] not in img_map:
            raise DistillError(f"{name}: images[{i}] {im['file_name']!r} is not an image of {gt_name} (the images of a "
                               "COCO dataset are matched to the ground truth's by file_name)")
    back: dict[Any, str] = {}
    for i, im in enumerate(pred_images):
        g = img_map[im["id"]]
        if g in back and back[g] != im["file_name"]:
            raise DistillError(f"{name}: images[{i}] {im['file_name']!r} and {back[g]!r} are the same image of {gt_name}")
        back[g] = im["file_name"]
    return img_map


def _category_map(categories: list, gt_cats: list[dict], name: str) -> dict:
    """A prediction dataset's category id -> the ground truth's of the same name (None: none)."""
    gt_by_name = category_names(gt_cats)
    cat_map = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise DistillError(f"{name}: categories[{i}]: expected an object with 'id' and 'name'")
        try:
            cat_map[c["id"]] = gt_by_name.get(norm_name(c["name"]))
        except TypeError:
            raise DistillError(f"{name}: categories[{i}].id: expected an integer, got {c['id']!r}") from None
    return cat_map


def gt_images_and_categories(gt_json: str | os.PathLike | dict) -> tuple[list[dict], list[dict]]:
    """The images and categories of a ground truth already checked (a dict, or a file read item
    by item without its annotations)."""
    if isinstance(gt_json, dict):
        return gt_json["images"], gt_json["categories"]
    from distill.files import JsonStream

    images: list[dict] = []
    cats: list[dict] = []
    with JsonStream(gt_json, "COCO ground-truth") as js:
        for key in js.members():
            if key == "images":
                images = [{k: im.get(k) for k in ("id", "file_name")} for im in js.items()]
            elif key == "annotations":
                for _ in js.items():
                    pass
            else:
                v = js.value()
                if key == "categories":
                    cats = v
    return images, cats
