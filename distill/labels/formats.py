"""Output formats of pseudo-labels: COCO json pieces (boxes, RLE masks), YOLO txt, semantic PNG.

Shapes and formats:
- boxes: (N, 4) float XYXY absolute pixels in, COCO ``bbox`` XYWH out, YOLO ``cx cy w h``
  normalised by the image width / height;
- masks: (N, H, W) bool in, COCO RLE (``{"size": [H, W], "counts": str}``, pycocotools) out;
- semantic PNG: (H, W), value = category id (0 = background). Up to 254 classes an 8-bit palette
  PNG, so it is viewable (255 = ignore); above 254 classes a 16-bit grayscale PNG (PIL mode
  ``I;16``, 65535 = ignore; 255 is then a class), which :func:`distill.eval.segmentation.read_label_png`
  reads back. The labeler writes no ignore pixels. ``legend.json`` / ``legend.png`` say which
  colour and value is which class.
"""

from __future__ import annotations

import colorsys
import io as _io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from distill.errors import DistillError
from distill.files import safe_join, write_bytes, write_json, write_text
from distill.vocab import Vocabulary

PNG8_MAX = 254  # class values of an 8-bit label PNG: 1..254 (0 = background, 255 = ignore)
PNG16_MAX = 65534  # of a 16-bit one: 1..65534 (65535 = ignore)


def mask_to_rle(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO RLE with ``counts`` as str (json-serialisable)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def rle_to_mask(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    r = dict(rle)
    if isinstance(r.get("counts"), list):  # uncompressed RLE
        r = mask_utils.frPyObjects(r, r["size"][0], r["size"][1])
    elif isinstance(r.get("counts"), str):
        r["counts"] = r["counts"].encode("ascii")
    return mask_utils.decode(r).astype(bool)


def xyxy_to_xywh(box) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def yolo_lines(anns: list[dict], width: int, height: int, cat_to_index: dict[int, int]) -> str:
    """COCO annotations of one image -> YOLO txt: ``class cx cy w h`` (normalised, 6 decimals).

    ``class`` is the 0-based line of ``classes.txt`` (the vocabulary order)."""
    out = []
    for a in anns:
        x, y, w, h = a["bbox"]
        cx, cy = (x + w / 2) / width, (y + h / 2) / height
        out.append(f"{cat_to_index[a['category_id']]} {cx:.6f} {cy:.6f} {w / width:.6f} {h / height:.6f}")
    return "\n".join(out) + ("\n" if out else "")


def output_stems(names: list[str]) -> list[str]:
    """Per input name, the stem its PNG / YOLO outputs are named by: the name without its
    extension (``a/b.jpg`` -> ``a/b``), or the whole name where two inputs share a stem
    (``a.jpg`` and ``a.png`` -> ``a.jpg``, ``a.png``), so outputs never collide."""
    stems = [str(Path(n).with_suffix("").as_posix()) for n in names]
    count: dict[str, int] = {}
    for s in stems:
        count[s] = count.get(s, 0) + 1
    return [n if count[s] > 1 else s for n, s in zip(names, stems)]


def yolo_name(file_name: str) -> str:
    """``a/b/img.jpg`` -> ``a/b/img.txt`` (the relative folder keeps duplicate names apart)."""
    return str(Path(file_name).with_suffix(".txt").as_posix())


def png_name(file_name: str) -> str:
    return str(Path(file_name).with_suffix(".png").as_posix())


def palette(n: int) -> list[tuple[int, int, int]]:
    """Colours for values 0..n (0 = background black), evenly spaced hues, deterministic."""
    cols = [(0, 0, 0)]
    for i in range(n):
        h = (i * 0.61803398875) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 0.95 if i % 3 else 0.75)
        cols.append((int(r * 255), int(g * 255), int(b * 255)))
    return cols


def semantic_values(vocab: Vocabulary) -> list[int]:
    """PNG value per vocabulary index: the category id when every id fits in 1..254 (as in the
    shapes world's semantic PNGs), else index + 1 (8-bit PNGs). Above 254 classes the PNGs are
    16-bit: the category id when every id fits in 1..65534, else index + 1. Called only when
    PNG output is asked for; more than 65534 classes is an error then."""
    if all(1 <= i <= PNG8_MAX for i in vocab.ids):
        return list(vocab.ids)
    if len(vocab) <= PNG8_MAX:
        return list(range(1, len(vocab) + 1))
    if len(vocab) > PNG16_MAX:
        raise DistillError(f"{vocab.source or 'vocabulary'}: {len(vocab)} classes do not fit a 16-bit label PNG (at most {PNG16_MAX}); "
                           "label to coco or yolo instead (--format coco,yolo)")
    if all(1 <= i <= PNG16_MAX for i in vocab.ids):
        return list(vocab.ids)
    return list(range(1, len(vocab) + 1))


def is_16bit(values: list[int]) -> bool:
    """Whether class values this large need a 16-bit PNG."""
    return max(values, default=0) > PNG8_MAX


def ignore_value(values: list[int]) -> int:
    """The ignore value of the label PNGs holding these class values: 255, or 65535 in 16-bit."""
    return 65535 if is_16bit(values) else 255


def _palette_bytes(values: list[int]) -> list[int]:
    cols = palette(max(values) if values else 0)
    flat = [0] * 768
    for v in range(len(cols)):
        flat[3 * v : 3 * v + 3] = cols[v]
    flat[3 * 255 : 3 * 255 + 3] = [255, 255, 255]  # ignore
    return flat


def write_semantic_png(path: Path, sem: np.ndarray, values: list[int]) -> None:
    """(H, W) class values -> a palette PNG (values kept as the pixel indices), or a 16-bit
    grayscale PNG (mode ``I;16``) when the values do not fit 8 bits."""
    if is_16bit(values):
        im = Image.fromarray(np.ascontiguousarray(sem, dtype=np.uint16))
    else:
        im = Image.fromarray(sem.astype(np.uint8), "P")
        im.putpalette(_palette_bytes(values))
    buf = _io.BytesIO()
    im.save(buf, "PNG")
    write_bytes(path, buf.getvalue())


def write_legend(out: Path, vocab: Vocabulary) -> None:
    """``legend.json`` (value, name, rgb per class; 0 = background) and ``legend.png`` swatches."""
    values = semantic_values(vocab)
    cols = palette(max(values))
    entries = [{"value": 0, "name": "background", "color": list(cols[0])}]
    entries += [{"value": v, "name": n, "color": list(cols[v])} for v, n in zip(values, vocab.names)]
    write_json(out / "legend.json", entries)
    row = 18
    im = Image.new("RGB", (260, row * len(entries) + 4), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for i, e in enumerate(entries):
        y = 2 + i * row
        d.rectangle([4, y, 4 + row - 4, y + row - 4], fill=tuple(e["color"]), outline=(0, 0, 0))
        d.text((row + 10, y + 2), f"{e['value']:3d}  {e['name']}", fill=(0, 0, 0))
    buf = _io.BytesIO()
    im.save(buf, "PNG")
    write_bytes(out / "legend.png", buf.getvalue())


def paint_semantic(masks: np.ndarray, labels: np.ndarray, scores: np.ndarray, values: list[int], shape: tuple[int, int]) -> np.ndarray:
    """Instance masks -> (H, W) semantic map (uint8, or uint16 for 16-bit values); higher scores
    paint last (win overlaps)."""
    sem = np.zeros(shape, np.uint16 if is_16bit(values) else np.uint8)
    for i in np.argsort(scores, kind="stable"):
        sem[masks[i]] = values[int(labels[i])]
    return sem


def write_classes(out: Path, vocab: Vocabulary) -> None:
    write_text(out / "classes.txt", "\n".join(vocab.names) + "\n")


def write_yolo_file(root: Path, stem: str, text: str) -> None:
    write_text(safe_join(root, stem + ".txt"), text)
