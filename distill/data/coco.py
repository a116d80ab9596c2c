"""COCO-format detection data: the one COCO validator and a torch Dataset.

:func:`load_coco` reads a COCO instances json and checks what the rest of the toolkit relies on
(:func:`validate_coco`, for a dict already read, e.g. ``distill label --gt``); a user's mistake is
a :class:`~distill.errors.DistillError` naming the file and key:

- a missing or corrupt file; a top level that is not an object; missing ``images``,
  ``annotations`` or ``categories``, or one that is not a list; no category at all;
- images without an integer ``id`` or a string ``file_name``; a ``file_name`` that is absolute or
  contains ``..`` (it must stay under the image root); a ``width`` / ``height`` that is not a
  positive integer; duplicate image ids;
- categories without an integer ``id`` and a non-empty ``name``; duplicate category ids;
- annotations without an integer ``id``, ``image_id``, ``category_id`` or a 4-number ``bbox``;
  duplicate annotation ids; ids naming an unknown image or category; a NaN / inf coordinate or a
  negative width or height; a ``segmentation`` that is neither an RLE object nor polygons; an
  ``iscrowd`` other than 0 / 1.

Annotations whose box has zero width or height are dropped and counted (one warning per file);
evaluation keeps them (``drop_zero_size=False``: the reference scores them).

The checks of one record (:func:`check_image`, :func:`check_category`, :func:`check_annotation`,
:func:`check_id`, :func:`check_bbox`) are the same wherever COCO is read: the evaluation's
readers (:mod:`distill.eval.gt`, :mod:`distill.eval.lvis_gt`, which stream a file item by item)
call them too.

:class:`CocoDetection` gives ``(image float (3, H, W) in [0, 1], target)`` with ``target`` =
``{"boxes": (N, 4) float32 XYXY absolute pixels, "labels": (N,) int64 vocabulary indices,
"image_id": int, "masks": (N, H, W) uint8 (only with masks=True)}`` (docs/contracts.md).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

import numpy as np
import torch

from distill.errors import DistillError
from distill.files import read_json, safe_join
from distill.vocab import Vocabulary

REQUIRED_KEYS = ("images", "annotations", "categories")
FILE_NAMES = ("relative", "any", None)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad_file_name(name: str) -> bool:
    if os.path.isabs(name) or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return True
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return ".." in parts or not parts


def check_id(v: Any, where: str, ids_of: str | None = None) -> None:
    """A COCO id must be an integer (the format's type, and the only one both COCO evaluators
    agree on: pycocotools takes string ids as dict keys, and a string ``image_id`` beside integer
    image ids silently loses its boxes; faster-coco-eval refuses consistent string ids).
    ``where``: ``"<file>: <key>"``; ``ids_of``: the list the id refers to."""
    if _is_int(v):
        return
    like = f" like the ids in '{ids_of}'" if ids_of else " (COCO ids are integers)"
    if isinstance(v, str):
        raise DistillError(f"{where}: {v!r} is a string, expected an integer{like}")
    raise DistillError(f"{where}: expected an integer{like}, got {v!r}")


def _number(v: Any) -> float | None:
    if isinstance(v, (str, bytes, bool)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def check_bbox(bb: Any, where: str) -> list[float]:
    """A COCO box ``[x, y, width, height]``: 4 finite numbers, width and height >= 0 (ground
    truth and results alike). Returns it as floats."""
    vals = [_number(v) for v in bb] if isinstance(bb, (list, tuple)) and len(bb) == 4 else [None]
    if any(v is None for v in vals):
        raise DistillError(f"{where}: expected [x, y, width, height] (4 numbers), got {bb!r}")
    if not all(math.isfinite(v) for v in vals):
        raise DistillError(f"{where}: expected finite numbers, got {bb!r}")
    if vals[2] < 0 or vals[3] < 0:
        raise DistillError(f"{where}: expected width and height >= 0, got {bb!r}")
    return vals


def check_image(im: Any, where: str, file_names: str | None = "relative", masks: bool = False) -> None:
    """One ``images`` entry (``where``: ``"<file>: images[i]"``). ``file_names``: ``"relative"``
    (a path under an image root), ``"any"`` (matched by name, never joined to a root: absolute
    or ``..`` allowed) or None (not needed: evaluation by id). ``masks``: ``width`` and
    ``height`` are needed (masks are decoded at that size)."""
    if not isinstance(im, dict):
        raise DistillError(f"{where}: expected an object with 'id'" + (" and 'file_name'" if file_names else ""))
    check_id(im.get("id"), f"{where}.id")
    if file_names:
        name = im.get("file_name")
        if not isinstance(name, str) or not name:
            raise DistillError(f"{where}.file_name: expected a relative path string, got {name!r}")
        if file_names == "relative" and _bad_file_name(name):
            raise DistillError(f"{where}.file_name: {name!r} is absolute or contains '..' (expected a path relative to the image root)")
    for dim in ("width", "height"):
        if dim in im and not (_is_int(im[dim]) and im[dim] > 0):
            raise DistillError(f"{where}.{dim}: expected a positive int, got {im[dim]!r}")
    if masks and ("height" not in im or "width" not in im):
        raise DistillError(f"{where}: missing 'height'/'width' (needed for segm evaluation)")


def check_category(c: Any, where: str) -> None:
    """One ``categories`` entry (``where``: ``"<file>: categories[i]"``)."""
    if not isinstance(c, dict):
        raise DistillError(f"{where}: expected an object with 'id' and 'name'")
    check_id(c.get("id"), f"{where}.id")
    if not isinstance(c.get("name"), str) or not c["name"].strip():
        raise DistillError(f"{where}.name: expected a non-empty string, got {c.get('name')!r}")


def check_annotation(a: Any, where: str, masks: bool = False) -> list[float]:
    """One ``annotations`` entry on its own (``where``: ``"<file>: annotations[i]"``; whether its
    ids are unique and known is the caller's to check). ``masks``: ``segmentation`` is needed.
    Returns its box as floats."""
    if not isinstance(a, dict):
        raise DistillError(f"{where}: expected an object with 'id', 'image_id', 'category_id', 'bbox'")
    for key, ids_of in (("id", None), ("image_id", "images"), ("category_id", "categories")):
        check_id(a.get(key), f"{where}.{key}", ids_of)
    box = check_bbox(a.get("bbox"), f"{where}.bbox")
    seg = a.get("segmentation")
    if seg is None and masks:
        raise DistillError(f"{where}: missing key 'segmentation' (needed for segm evaluation)")
    if seg is not None and not isinstance(seg, (dict, list)):
        raise DistillError(f"{where}.segmentation: expected an RLE object or a list of polygons, got {type(seg).__name__}")
    if a.get("iscrowd", 0) not in (0, 1):
        raise DistillError(f"{where}.iscrowd: expected 0 or 1, got {a.get('iscrowd')!r}")
    return box


def check_lists(data: Any, path: str) -> None:
    """The top level: an object whose ``images``, ``annotations``, ``categories`` are lists."""
    if not isinstance(data, dict):
        raise DistillError(f"{path}: expected a COCO object with keys {', '.join(REQUIRED_KEYS)}, got a {type(data).__name__}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise DistillError(f"{path}: missing key {key!r} (a COCO file needs {', '.join(REQUIRED_KEYS)})")
        if not isinstance(data[key], list):
            raise DistillError(f"{path}: {key}: expected a list, got {type(data[key]).__name__}")


def load_coco(path: str | os.PathLike, what: str = "COCO annotation", file_names: str | None = "relative") -> dict:
    """Read and validate the COCO instances json at ``path``; return its dict.

    Zero-size boxes are removed from ``annotations`` (counted in a warning); everything else that
    is wrong raises :class:`DistillError` ``"<path>: <key>: <what was expected>"``. ``what`` names
    the file in the error of a missing or corrupt file; ``file_names``: see :func:`validate_coco`.
    """
    path = Path(path)
    return validate_coco(read_json(path, what), str(path), file_names=file_names)


def validate_coco(data: Any, path: str = "COCO file", file_names: str | None = "relative", masks: bool = False,
                  drop_zero_size: bool = True) -> dict:
    """Validate a COCO instances dict already read (``path`` names it in the errors); return it,
    without its zero-size boxes (counted in a warning) unless ``drop_zero_size=False``.

    ``file_names``: as :func:`check_image` (``"any"`` for a ground truth matched to images by
    name, None for one evaluated by image id); ``masks``: every annotation needs a
    ``segmentation`` and every image its size."""
    if file_names not in FILE_NAMES:
        raise ValueError(f"file_names {file_names!r}: expected one of {FILE_NAMES}")
    check_lists(data, path)
    image_ids: set[int] = set()
    for i, im in enumerate(data["images"]):
        check_image(im, f"{path}: images[{i}]", file_names, masks)
        if im["id"] in image_ids:
            raise DistillError(f"{path}: images[{i}].id: duplicate image id {im['id']}")
        image_ids.add(im["id"])
    if not data["categories"]:
        raise DistillError(f"{path}: categories: expected at least one category")
    cat_ids: set[int] = set()
    for i, c in enumerate(data["categories"]):
        check_category(c, f"{path}: categories[{i}]")
        if c["id"] in cat_ids:
            raise DistillError(f"{path}: categories[{i}].id: duplicate category id {c['id']}")
        cat_ids.add(c["id"])
    ann_ids: set[int] = set()
    kept: list[dict] = []
    for i, a in enumerate(data["annotations"]):
        box = check_annotation(a, f"{path}: annotations[{i}]", masks)
        if a["id"] in ann_ids:
            raise DistillError(f"{path}: annotations[{i}].id: duplicate annotation id {a['id']}")
        ann_ids.add(a["id"])
        if a["image_id"] not in image_ids:
            raise DistillError(f"{path}: annotations[{i}].image_id: unknown image id {a['image_id']} (not in 'images')")
        if a["category_id"] not in cat_ids:
            valid = sorted(cat_ids)
            shown = str(valid) if len(valid) <= 12 else f"{len(valid)} ids from {valid[0]} to {valid[-1]}"
            raise DistillError(f"{path}: annotations[{i}].category_id: unknown category id {a['category_id']} (valid: {shown})")
        if not drop_zero_size or (box[2] and box[3]):
            kept.append(a)
    zero = len(data["annotations"]) - len(kept)
    if zero:
        warnings.warn(f"{path}: skipped {zero} annotation(s) with a zero-size box", stacklevel=2)
        data = dict(data, annotations=kept)
    return data


def vocab_from_coco(data: dict, source: str = "") -> Vocabulary:
    """The vocabulary of a loaded COCO / LVIS dict: categories sorted by id, read by
    :func:`distill.vocab.vocab_from_categories` (``split``, or LVIS ``frequency`` r = novel;
    prompt-ready names)."""
    from distill.vocab import vocab_from_categories

    cats = sorted(data["categories"], key=lambda c: c["id"])
    if not cats:
        raise DistillError(f"{source or 'COCO file'}: categories: expected at least one category")
    return vocab_from_categories(cats, source)


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, RLE, or uncompressed RLE) as an (H, W) uint8 mask."""
    import pycocotools.mask as mask_utils

    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(np.uint8)


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances as ``(image, target)`` (see the module docstring for shapes).

    Args:
        json_path: a COCO instances json (validated with :func:`load_coco`).
        image_root: the folder ``file_name`` is relative to.
        vocab: labels are indices into this vocabulary, matched by category name (or synonym);
            ``None`` = the file's categories sorted by id (labels 0..C-1 in id order). A category
            of the file that is not in ``vocab`` is an error unless ``skip_unknown`` is set, in
            which case its annotations are dropped and counted (``self.skipped_unknown``).
        masks: also return instance masks (N, H, W) uint8 decoded from ``segmentation``.
        transforms: ``f(image (H, W, 3) uint8, target of numpy arrays) -> (image, target)``,
            e.g. :func:`distill.data.transforms.detection_train_transforms`.

    Crowd annotations (``iscrowd=1``) are left out of targets; images without boxes are kept
    with empty ``(0, 4)`` boxes.
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_root: str | os.PathLike,
        vocab: Vocabulary | None = None,
        masks: bool = False,
        transforms: Callable | None = None,
        skip_unknown: bool = False,
    ) -> None:
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        self.coco = load_coco(self.json_path)
        self.masks = masks
        self.transforms = transforms
        file_vocab = vocab_from_coco(self.coco, str(self.json_path))
        self.vocab = vocab if vocab is not None else file_vocab
        self.cat_to_label: dict[int, int] = {}
        for c in self.coco["categories"]:
            try:
                self.cat_to_label[c["id"]] = self.vocab.index(c["name"])
            except DistillError:
                if not skip_unknown:
                    raise DistillError(
                        f"{self.json_path}: category {c['name']!r} (id {c['id']}) is not in the vocabulary "
                        f"({', '.join(self.vocab.names[:20])}{' ...' if len(self.vocab) > 20 else ''})"
                    ) from None
        self.images = list(self.coco["images"])
        self.image_ids = [im["id"] for im in self.images]
        self._anns: dict[int, list[dict]] = {i: [] for i in self.image_ids}
        self.skipped_unknown = 0
        for a in self.coco["annotations"]:
            if a.get("iscrowd", 0):
                continue
            if a["category_id"] not in self.cat_to_label:
                self.skipped_unknown += 1
                continue
            self._anns[a["image_id"]].append(a)
        if self.skipped_unknown:
            warnings.warn(f"{self.json_path}: skipped {self.skipped_unknown} annotation(s) of categories outside the vocabulary", stacklevel=2)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return safe_join(self.image_root, self.images[index]["file_name"])

    def annotations(self, index: int) -> list[dict]:
        """The (non-crowd, in-vocabulary) raw annotations of image ``index``."""
        return self._anns[self.image_ids[index]]

    def load_target(self, index: int, height: int, width: int) -> dict[str, np.ndarray]:
        """Numpy target of image ``index``: boxes (N, 4) float32 XYXY clipped to the image,
        labels (N,) int64, masks (N, H, W) uint8 when ``masks``; zero-area boxes after clipping go."""
        anns = self.annotations(index)
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": boxes[keep],
            "labels": np.array([self.cat_to_label[a["category_id"]] for a in anns], np.int64).reshape(-1)[keep],
        }
        if self.masks:
            ms = []
            for a, k in zip(anns, keep):
                if not k:
                    continue
                seg = a.get("segmentation")
                if not seg:
                    raise DistillError(f"{self.json_path}: annotation {a['id']}: masks were asked for but it has no 'segmentation'")
                m = decode_segmentation(seg, height, width)
                if m.shape != (height, width):
                    raise DistillError(f"{self.json_path}: annotation {a['id']}: mask is {m.shape[1]}x{m.shape[0]}, image is {width}x{height}")
                ms.append(m)
            target["masks"] = np.stack(ms) if ms else np.zeros((0, height, width), np.uint8)
        return target

    def raw(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Image ``index`` as numpy, before any transform: ``(image (H, W, 3) uint8, target)``,
        the target of :meth:`load_target` plus ``image_id``."""
        from distill.data.images import load_image

        info = self.images[index]
        path = self.image_path(index)
        image = load_image(path)
        h, w = image.shape[:2]
        if ("width" in info and info["width"] != w) or ("height" in info and info["height"] != h):
            raise DistillError(f"{path}: decoded size {w}x{h} differs from {self.json_path} (width {info.get('width')}, height {info.get('height')})")
        target = self.load_target(index, h, w)
        target["image_id"] = int(info["id"])
        return image, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.raw(index)
        if self.transforms is not None:
            image, t = self.transforms(image, target)
            target = {**t, "image_id": target["image_id"]}
        return to_tensors(image, target)


def to_tensors(image: np.ndarray, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """numpy ``(image (H, W, 3) uint8, target)`` -> ``(image (3, H, W) float in [0, 1], target)``
    with ``boxes`` (N, 4) float32, ``labels`` (N,) int64, ``masks`` (N, H, W) uint8 when present,
    ``image_id`` int; other array fields become tensors as they are."""
    out: dict[str, Any] = {
        "boxes": torch.as_tensor(np.asarray(target["boxes"], np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(target["labels"], np.int64).reshape(-1)),
    }
    for k, v in target.items():
        if k in out:
            continue
        if k == "masks":
            out[k] = torch.as_tensor(np.ascontiguousarray(v, np.uint8))
        elif k == "image_id":
            out[k] = int(v)
        else:
            out[k] = torch.as_tensor(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return img, out


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection collate: ``(list of (3, H, W) images, list of targets)`` (sizes may differ)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
