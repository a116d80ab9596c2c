"""Robust image decoding and image-folder listing.

:func:`load_image` turns any file a user hands in into an ``(H, W, 3) uint8`` RGB array or raises a
:class:`~distill.errors.DistillError` that names the file and says why:

- EXIF orientation is applied (``ImageOps.exif_transpose``), so a phone photo stored sideways with
  orientation tag 6 comes out upright;
- grayscale (``L``, ``1``), palette (``P``, with or without transparency), 16-bit (``I;16``, ``I``),
  float (``F``), ``LA``/``RGBA`` (alpha composited over white), ``CMYK``, ``YCbCr``, ``LAB`` and
  ``HSV`` are converted to 8-bit RGB;
- decompression bombs: the pixel count read from the header is checked against ``max_pixels``
  before any pixel is decoded (and Pillow's own bomb warning is raised as an error);
- zero-byte files, truncated files and files that are not images (a text file named ``.jpg``) are
  errors naming the file.

:func:`load_image_scaled` decodes at a working size (longer side at most ``max_side``) without
ever holding the full-size RGB array (JPEG: DCT-domain downscale), and says the full size.

:func:`list_images` lists a folder recursively (or reads a list file) in a deterministic order.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from distill.errors import DistillError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# 1 gigapixel-class headers are bombs for this toolkit; 2**27 = 134M pixels (about 11600 x 11600)
# is far above any image a detector here is run on and well below what exhausts memory as RGB.
MAX_PIXELS = 1 << 27
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Never decode a truncated file as if it were complete (Pillow's default, made explicit).
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = a.astype(np.float64)
            hi = 1.0 if np.nanmax(a, initial=0.0) <= 1.0 else 255.0  # [0, 1] floats or [0, 255]
            a = np.clip(np.nan_to_num(a) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            # 16-bit (I;16 / I;16B, or I as Pillow opens 16-bit PNG / TIFF): keep the high byte.
            a = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode == "RGB":
            return np.asarray(im, dtype=np.uint8)
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    # 1, L, CMYK, YCbCr, LAB, HSV, RGBX ...: Pillow knows the conversion.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to ``(H, W, 3) uint8`` RGB, upright (EXIF orientation applied).

    Raises :class:`DistillError` ``"<path>: <why>"`` for a missing, empty, truncated, corrupt,
    non-image or oversized (decompression bomb) file.
    """
    return _decode(path, max_pixels, 0)[0]


def load_image_scaled(path: str | os.PathLike, max_side: int, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path`` at a working size: ``(array (h, w, 3) uint8 RGB upright, (H, W) of the
    full upright image)``. An image whose longer side exceeds ``max_side`` (> 0) is scaled so that
    it is ``max_side`` (aspect kept, each side ``round(side * scale)``); others are decoded exactly
    as :func:`load_image` does. The full-size RGB array is never made: a JPEG is decoded at the
    smallest 1/2, 1/4 or 1/8 DCT scale still at least the working size (Pillow's ``draft``), any
    other format is resized (antialiased bilinear) before the RGB conversion and EXIF rotation.
    Errors as :func:`load_image`."""
    return _decode(path, max_pixels, max_side)


def working_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) of a ``width`` x ``height`` image with its longer side limited to ``max_side``
    (0 = no limit); the image's own size when it is small enough."""
    side = max(width, height)
    if max_side <= 0 or side <= max_side:
        return width, height
    s = max_side / side
    return max(1, int(round(width * s))), max(1, int(round(height * s)))


def _decode(path: str | os.PathLike, max_pixels: int, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise DistillError(f"{p}: file not found (expected an image)") from None
    except OSError as e:
        raise DistillError(f"{p}: cannot read ({e.strerror})") from None
    if not p.is_file():
        raise DistillError(f"{p}: not a file (expected an image)")
    if size == 0:
        raise DistillError(f"{p}: empty file (0 bytes), expected an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w <= 0 or h <= 0:
                    raise DistillError(f"{p}: image has size {w}x{h} (expected at least 1x1)")
                if w * h > max_pixels:
                    raise DistillError(
                        f"{p}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                        "(possible decompression bomb)"
                    )
                target = working_size(w, h, max_side)  # in the stored orientation (the limit is symmetric)
                if target != (w, h):
                    if im.format == "JPEG":
                        im.draft("RGB", target)  # DCT-domain downscale: at least target, decoded small
                    im.load()
                    if im.mode not in ("RGB", "L"):
                        im = Image.fromarray(_to_rgb(im))  # modes resize cannot handle (P, I;16, RGBA...)
                    if im.size != target:
                        im = im.resize(target, Image.Resampling.BILINEAR)
                else:
                    im.load()
                stored = im
                try:
                    im = ImageOps.exif_transpose(stored)
                    swapped = stored.getexif().get(0x0112, 1) in (5, 6, 7, 8) or im.size != stored.size
                except Exception:  # a corrupt EXIF block: keep the stored orientation
                    im, swapped = stored, False
                full = (h, w) if swapped else (w, h)  # (width, height) of the full image, upright
                arr = _to_rgb(im)
    except DistillError:
        raise
    except UnidentifiedImageError:
        raise DistillError(f"{p}: not an image (no decoder recognises its content; extension {p.suffix or 'none'})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DistillError(f"{p}: possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).replace("\n", " ") or type(e).__name__
        raise DistillError(f"{p}: truncated or corrupt image ({msg})") from None
    except MemoryError:
        raise DistillError(f"{p}: out of memory while decoding") from None
    if arr.ndim != 3 or arr.shape[2] != 3:  # defensive: _to_rgb always returns RGB
        raise DistillError(f"{p}: decoded to shape {arr.shape}, expected (H, W, 3)")
    arr = np.ascontiguousarray(arr)
    arr = arr if arr.flags.writeable else arr.copy()
    return arr, (int(full[1]), int(full[0]))


def is_image_name(name: str | os.PathLike) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


SKIP_HIDDEN = "hidden"
SKIP_FOLDER_LINK = "folder_link"
SKIP_UNSUPPORTED = "unsupported"


def _short(text: str, limit: int = 80) -> str:
    """``repr`` of a piece of a user's file, cut to ``limit`` characters (never echo a whole file)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _is_json(text: str) -> bool:
    import json

    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def scan_images(source: str | os.PathLike) -> tuple[list[Path], list[tuple[str, str, str]]]:
    """:func:`list_images` and what a folder walk left out: ``(paths, skipped)``, ``skipped`` a
    sorted list of ``(relative POSIX name, kind, why)`` with ``kind`` one of

    - ``hidden``: a file or folder whose name starts with ``.`` (a hidden folder is one entry,
      not searched);
    - ``folder_link``: a symbolic link to a folder (not followed: it could loop or list the same
      images twice; links to files are followed);
    - ``unsupported``: any other file that is not one of :data:`IMAGE_EXTENSIONS`, a GIF
      included (animated or not, it is not labeled: convert it to PNG).

    A single image or a list file skips nothing (a list file's non-image line is an error)."""
    src = Path(source)
    if src.is_dir():
        root = src.resolve()
        found: list[Path] = []
        skipped: list[tuple[str, str, str]] = []

        def rel(dirpath: str, name: str) -> str:
            return Path(dirpath, name).relative_to(root).as_posix()

        for dirpath, dirnames, filenames in os.walk(root):
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    skipped.append((rel(dirpath, d) + "/", SKIP_HIDDEN, "hidden folder (name starts with '.'), not searched"))
                elif os.path.islink(os.path.join(dirpath, d)):
                    skipped.append((rel(dirpath, d) + "/", SKIP_FOLDER_LINK, "link to a folder, not followed"))
                else:
                    keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                if f.startswith("."):
                    skipped.append((rel(dirpath, f), SKIP_HIDDEN, "hidden file (name starts with '.')"))
                elif is_image_name(f):
                    found.append(Path(dirpath, f))
                elif f.lower().endswith(".gif"):
                    skipped.append((rel(dirpath, f), SKIP_UNSUPPORTED, "GIF is not labeled (convert it to PNG to label it)"))
                else:
                    skipped.append((rel(dirpath, f), SKIP_UNSUPPORTED, f"not an image type ({Path(f).suffix or 'no extension'})"))
        skipped.sort()
        if not found:
            extra = f"; skipped {len(skipped)} other entries, e.g. {skipped[0][0]!r}: {skipped[0][2]}" if skipped else ""
            raise DistillError(f"{src}: no images found (looked recursively for {', '.join(IMAGE_EXTENSIONS)}){extra}")
        found.sort(key=lambda q: q.relative_to(root).as_posix())
        return found, skipped
    if src.is_file():
        if is_image_name(src):
            return [src.resolve()], []
        expected = "expected an image folder, or a list file (.txt) with one image path a line"
        if src.suffix.lower() == ".json":
            raise DistillError(f"{src}: a json file is not an image source ({expected})")
        try:
            text = src.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DistillError(f"{src}: not a UTF-8 list file ({expected})") from None
        if text.lstrip("\ufeff \t\r\n")[:1] in ("{", "[") and _is_json(text.lstrip("\ufeff")):  # not '[2020] a.png'
            raise DistillError(f"{src}: holds json, not a list of image paths ({expected})")
        out: list[Path] = []
        seen: set[Path] = set()
        for i, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if "\x00" in s:
                raise DistillError(f"{src}:{i}: not a text list file ({expected})")
            q = Path(s)
            q = (q if q.is_absolute() else src.parent / q).resolve()
            if not is_image_name(q):
                raise DistillError(f"{src}:{i}: {_short(s)} is not an image name (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            if q not in seen:
                seen.add(q)
                out.append(q)
        if not out:
            raise DistillError(f"{src}: list file names no images")
        return out, []
    raise DistillError(f"{src}: not found (expected an image folder or a list file)")


def list_images(source: str | os.PathLike) -> list[Path]:
    """Images under a folder (recursive) or named by a list file, as absolute paths.

    - a folder: every file whose extension is one of :data:`IMAGE_EXTENSIONS` (any case), hidden
      files and folders (``.name``, e.g. temporary files) and links to folders skipped, sorted by
      relative POSIX path (:func:`scan_images` also says what was skipped and why);
    - a single image file: ``[that file]``;
    - a list file (``.txt`` / ``.lst``): one path a line (relative to the list file's folder, or
      absolute); ``#`` comments and blank lines skipped; order kept, duplicates dropped. A json
      file (a COCO annotation file given by mistake) is refused without echoing its content.

    A folder without images, a missing source or an empty list is a :class:`DistillError`.
    """
    return scan_images(source)[0]


def image_root(source: str | os.PathLike, paths: list[Path]) -> Path:
    """The folder that output names are made relative to: the folder itself, the list file's
    folder when it holds every listed image, else the images' common folder."""
    src = Path(source).resolve()
    if src.is_dir():
        return src
    base = src.parent
    if all(base in p.parents for p in paths):
        return base
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def relative_names(source: str | os.PathLike, paths: list[Path]) -> list[str]:
    """POSIX names relative to :func:`image_root` (unique, so duplicate base names never collide)."""
    root = image_root(source, paths)
    return [p.relative_to(root).as_posix() for p in paths]
