"""Semantic segmentation data: images with single-channel PNG masks (value = class id; 8-bit PNGs:
255 = ignore; 16-bit PNGs, as ``distill label`` writes above 254 classes: 65535 = ignore).

Masks are looked up under ``mask_root`` by the image's relative name with a ``.png`` suffix
(``train/000001.png`` -> ``mask_root/train/000001.png``, the world's ``semantic/`` layout), and
failing that by its base name (``mask_root/000001.png``: ``semantic/train_base/`` and flat
folders such as CAM or pseudo-label outputs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from distill.errors import DistillError
from distill.files import read_json, safe_join


def _file_names(source: str | os.PathLike | Sequence[str]) -> tuple[list[str], list[int | None], str]:
    """(file names, image ids or None, description) from a COCO json, an image-labels json or a list."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() != ".json":
            raise DistillError(f"{path}: expected a COCO json, an image-labels json, or a list of file names")
        data = read_json(path, "COCO or image-labels")
        if isinstance(data, dict) and "images" in data:
            entries = data["images"]
        elif isinstance(data, list):
            entries = data
        else:
            raise DistillError(f"{path}: expected a COCO object with 'images' or a list of {{'image_id', 'file_name'}}")
        names, ids = [], []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("file_name"), str):
                raise DistillError(f"{path}: entry {i}: expected an object with a string 'file_name'")
            names.append(e["file_name"])
            ids.append(e.get("id", e.get("image_id")))
        return names, ids, str(path)
    names = [str(n) for n in source]
    return names, [None] * len(names), "file list"


LABEL_PNG_MODES_8 = ("1", "L", "P")  # 8-bit (or bilevel) label PNGs: 255 = ignore
LABEL_PNG_MODES_16 = ("I;16", "I;16B", "I;16L", "I")  # 16-bit grayscale (PIL may open it as I): 65535 = ignore
IGNORE_8, IGNORE_16 = 255, 65535


def read_label_png(path: str | os.PathLike, dtype=np.int64, what: str = "label PNG") -> np.ndarray:
    """A single-channel label PNG as (H, W) class values: the one reader of label PNGs.

    8-bit PNGs (mode L, or P: the palette indices; 255 = ignore) and 16-bit grayscale PNGs (PIL
    mode ``I;16``, as ``distill label`` writes above 254 classes: 255 is a class there, 65535 the
    ignore value; see :mod:`distill.labels.formats`). ``dtype=None`` keeps the file's width
    (uint8: 255 = ignore, or uint16: 65535 = ignore); otherwise the values are cast to ``dtype``.
    Anything else (RGB, a missing or unreadable file) is a :class:`DistillError` naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{p}: {what} not found (expected a single-channel PNG of class ids)")
    try:
        with Image.open(p) as im:
            if im.mode in LABEL_PNG_MODES_8:
                arr = np.asarray(im, dtype=np.uint8)
            elif im.mode in LABEL_PNG_MODES_16:
                arr = np.asarray(im)
                if arr.size and (int(arr.min()) < 0 or int(arr.max()) > IGNORE_16):
                    raise DistillError(f"{p}: {what} values outside 0..{IGNORE_16} (expected a 16-bit label PNG)")
                arr = arr.astype(np.uint16)
            else:
                raise DistillError(
                    f"{p}: {what} has mode {im.mode} (expected a single-channel PNG of class ids: 8-bit L or P, or 16-bit I;16)"
                )
    except DistillError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DistillError(f"{p}: unreadable {what} ({e})") from None
    arr = np.array(arr, copy=True) if dtype is None else arr.astype(dtype)
    return arr


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label PNG as (H, W) uint8 (8-bit PNG, mode L or P) or uint16 (16-bit, mode I;16):
    :func:`read_label_png` with the file's own width."""
    return read_label_png(path, dtype=None, what="mask")


class SemSegDataset(torch.utils.data.Dataset):
    """``(image float (3, H, W) in [0, 1], mask int64 (H, W))`` pairs.

    Args:
        image_root: the folder the file names are relative to.
        source: a COCO json (its ``images``), an ``image_labels_{split}.json``, or a list of names.
        mask_root: the folder of masks (see the module docstring for the lookup).
        num_classes: when given, mask values must be < num_classes or == ignore_index.
        transforms: ``f(image (H, W, 3) uint8, mask (H, W)) -> (image, mask)``.

    Masks are read by :func:`read_label_png` (8-bit, or 16-bit where 65535 = ignore: those
    pixels get ``ignore_index``). A mask whose size differs from its image, with values outside
    the classes, or a 16-bit mask holding ``ignore_index`` as a class, is a
    :class:`DistillError` naming the PNG.
    """

    def __init__(
        self,
        image_root: str | os.PathLike,
        source: str | os.PathLike | Sequence[str],
        mask_root: str | os.PathLike,
        num_classes: int | None = None,
        transforms: Callable | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.image_root = Path(image_root)
        self.mask_root = Path(mask_root)
        self.file_names, self.image_ids, self.source = _file_names(source)
        self.num_classes = num_classes
        self.transforms = transforms
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.file_names)

    def image_path(self, index: int) -> Path:
        return safe_join(self.image_root, self.file_names[index])

    def mask_path(self, index: int) -> Path:
        rel = Path(self.file_names[index]).with_suffix(".png").as_posix()
        p = safe_join(self.mask_root, rel)
        if p.is_file():
            return p
        flat = safe_join(self.mask_root, Path(rel).name)
        return flat if flat.is_file() else p

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from distill.data.images import load_image

        image = load_image(self.image_path(index))
        mpath = self.mask_path(index)
        mask = read_mask(mpath)
        if mask.shape != image.shape[:2]:
            raise DistillError(
                f"{mpath}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {self.file_names[index]} is "
                f"{image.shape[1]}x{image.shape[0]} (expected the same size)"
            )
        if mask.dtype == np.uint16 and self.ignore_index != IGNORE_16:  # a 16-bit PNG's 65535 is this dataset's ignore_index
            if (mask == self.ignore_index).any():
                raise DistillError(
                    f"{mpath}: 16-bit mask holds class {self.ignore_index}, the ignore_index (in a 16-bit label PNG "
                    f"255 is a class and {IGNORE_16} the ignore value: set ignore_index={IGNORE_16})"
                )
            dt = np.uint16 if 0 <= self.ignore_index <= IGNORE_16 else np.int32  # a dtype the transforms take
            mask = np.where(mask == IGNORE_16, self.ignore_index, mask).astype(dt)
        if self.num_classes is not None:
            bad = np.unique(mask[(mask >= self.num_classes) & (mask != self.ignore_index)])
            if len(bad):
                raise DistillError(f"{mpath}: mask values {bad.tolist()[:10]} outside 0..{self.num_classes - 1} (and {self.ignore_index} = ignore)")
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        return img, torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
