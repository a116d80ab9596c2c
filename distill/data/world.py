"""The procedural shapes world: the embedded open-vocabulary problem (ARCHITECTURE.md, "The embedded
default").

Categories are colour x shape pairs ("red star"), ids 1..C in vocabulary order (colour-major). The
novel split is ``world.novel`` when given, otherwise drawn from the seed so that every colour and
every shape also occurs in a base category (compositional zero-shot, like OV-COCO's 48/17 split
keeps the novel words' parts seen).

Each image (``image_size`` square, RGB) has a textured background (flat + noise, gradient, stripes
or blotches in muted colours far from every category colour), a few non-category clutter items
(thin lines, gray/brown blobs, elongated ellipses) and ``min_objects..max_objects`` objects of size
``min_size..max_size`` px (log-uniform), random rotation and mild hue / saturation / brightness
jitter. With ``fill: pattern`` (the default) each shape also has its own fill texture (dots,
checks, stripes, ...; darkened pixels in image axes, so flips keep it), a local cue as natural
categories have fur or wheels: a patch inside an object then tells its class, which dense readings
of the teacher (MaskCLIP, CLIPSelf) need; ``fill: flat`` leaves the outline as the only shape cue.
The texture's phase follows the object's position, so both fills give the same layout and
annotations. Objects are drawn in order, later ones over earlier ones; a placement that would leave an
earlier object less than 30 % visible (or under 20 px) is re-drawn, so every annotation is the
VISIBLE part of an object and no unannotated object fragment is left in an image.

Drawing is done at 2x with anti-aliased polygons (cv2.fillPoly) and downsampled with INTER_AREA;
instance masks are the 2x ownership map downsampled by majority (a pixel belongs to the object
covering most of it, ties to the upper object), so masks agree with what is drawn.

Everything comes from ``numpy.random.default_rng([seed, split, index])``: the same config gives
byte-identical files, and each image depends only on (seed, split, index), so changing ``num_train``
leaves the val images unchanged.

Layout under ``{work_dir}/data/`` (docs/contracts.md, "World"): ``images/{split}/{id:06d}.png``,
``instances_{train,val,unlabeled,train_base}.json``, ``semantic/{split}/{id:06d}.png`` (also
``train_base``), ``image_labels_{split}.json``, ``captions.json``, ``vocab.json``, ``world.yaml``,
``manifest.json``. The folder is built under a temporary name and renamed into place, so a killed
build never leaves a ``data/`` that looks complete.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from distill.config import Config, WorldConfig, config_hash, save_config
from distill.errors import DistillError
from distill.files import write_json
from distill.vocab import Vocabulary

SPLITS = ("train", "val", "unlabeled")
_SPLIT_INDEX = {"train": 1, "val": 2, "unlabeled": 3}
_NOVEL_STREAM = 1000  # rng stream for the novel split (distinct from the split streams)

# Category colours (RGB). Hues are far apart (red 0, orange 28, yellow 53, green 127, blue 228,
# purple 283 degrees) so the +-5 degree hue jitter below never makes two of them meet.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (235, 215, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 225),
    "purple": (150, 40, 190),
    "cyan": (20, 200, 210),
    "pink": (245, 110, 190),
}

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "pentagon", "diamond", "heart")

# Objects occluded below these are re-placed (the task's "almost fully occluded" rule).
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 20
_PLACEMENT_TRIES = 12
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


# --------------------------------------------------------------------------------------------
# Vocabulary and split
# --------------------------------------------------------------------------------------------


def _check_world(wcfg: WorldConfig) -> None:
    for c in wcfg.colors:
        if c not in COLORS:
            raise DistillError(f"world.colors: unknown colour {c!r} (valid: {', '.join(COLORS)})")
    for s in wcfg.shapes:
        if s not in SHAPES:
            raise DistillError(f"world.shapes: unknown shape {s!r} (valid: {', '.join(SHAPES)})")
    for what, seq in (("world.colors", wcfg.colors), ("world.shapes", wcfg.shapes)):
        if not seq:
            raise DistillError(f"{what}: expected at least one entry")
        if len(set(seq)) != len(seq):
            raise DistillError(f"{what}: duplicate entries in {list(seq)}")
    if wcfg.image_size < 32:
        raise DistillError(f"world.image_size: expected at least 32, got {wcfg.image_size}")
    if not 1 <= wcfg.min_objects <= wcfg.max_objects:
        raise DistillError(f"world.min_objects/max_objects: expected 1 <= min <= max, got {wcfg.min_objects}, {wcfg.max_objects}")
    if not 4 <= wcfg.min_size <= wcfg.max_size <= wcfg.image_size:
        raise DistillError(f"world.min_size/max_size: expected 4 <= min <= max <= image_size, got {wcfg.min_size}, {wcfg.max_size}")
    for key in ("num_train", "num_val", "num_unlabeled", "clutter", "num_novel"):
        if getattr(wcfg, key) < 0:
            raise DistillError(f"world.{key}: expected >= 0, got {getattr(wcfg, key)}")
    if wcfg.fill not in FILLS:
        raise DistillError(f"world.fill: expected one of {', '.join(FILLS)}, got {wcfg.fill!r}")
    if wcfg.num_captions_per_image < 1:
        raise DistillError(f"world.num_captions_per_image: expected >= 1, got {wcfg.num_captions_per_image}")


def _category_names(wcfg: WorldConfig) -> list[str]:
    return [f"{c} {s}" for c in wcfg.colors for s in wcfg.shapes]


def _covers(names: list[str], base: set[str], wcfg: WorldConfig) -> bool:
    colors = {n.split(" ", 1)[0] for n in base}
    shapes = {n.split(" ", 1)[1] for n in base}
    return colors >= set(wcfg.colors) and shapes >= set(wcfg.shapes)


def novel_names(wcfg: WorldConfig) -> list[str]:
    """The novel category names, in vocabulary order."""
    _check_world(wcfg)
    names = _category_names(wcfg)
    if wcfg.novel:
        lower = {n.lower(): n for n in names}
        picked = []
        for n in wcfg.novel:
            key = " ".join(str(n).split()).lower()
            if key not in lower:
                raise DistillError(f"world.novel: unknown category {n!r} (valid: {', '.join(names)})")
            picked.append(lower[key])
        novel = set(picked)
        if len(novel) == len(names):
            raise DistillError("world.novel: every category is novel; expected at least one base category")
        if not _covers(names, set(names) - novel, wcfg):
            warnings.warn("world.novel: some colour or shape occurs in no base category (the split is not compositional)", stacklevel=2)
        return [n for n in names if n in novel]
    if wcfg.num_novel == 0:
        return []
    # Every colour and every shape must stay in base: at most C - max(#colours, #shapes) novel.
    most = len(names) - max(len(wcfg.colors), len(wcfg.shapes))
    if wcfg.num_novel > most:
        raise DistillError(
            f"world.num_novel: {wcfg.num_novel} is too many for {len(wcfg.colors)} colours x {len(wcfg.shapes)} shapes "
            f"(expected at most {most}, so every colour and shape also occurs in a base category)"
        )
    rng = np.random.default_rng([wcfg.seed, _NOVEL_STREAM])
    for _ in range(10000):
        perm = rng.permutation(len(names))
        novel = {names[i] for i in perm[: wcfg.num_novel]}
        if _covers(names, set(names) - novel, wcfg):
            return [n for n in names if n in novel]
    raise DistillError(f"world.num_novel: found no split of {wcfg.num_novel} novel classes keeping every colour and shape in base")


def world_vocab(wcfg: WorldConfig) -> Vocabulary:
    """The world's vocabulary: colour x shape names, ids 1..C, base/novel split."""
    names = _category_names(wcfg)
    novel = set(novel_names(wcfg))
    return Vocabulary(
        names=tuple(names),
        split=tuple("novel" if n in novel else "base" for n in names),
        ids=tuple(range(1, len(names) + 1)),
        source="shapes world",
    )


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _unit_polygon(shape: str) -> np.ndarray:
    """(K, 2) vertices of ``shape`` with circumradius about 1, centred at 0, y down."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape in ("square", "triangle", "hexagon", "pentagon"):
        k = {"square": 4, "triangle": 3, "hexagon": 6, "pentagon": 5}[shape]
        t = -np.pi / 2 + np.arange(k) * 2 * np.pi / k
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "diamond":
        return np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], float)
    if shape == "cross":
        a = 0.34  # half arm width
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]], float)
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        p = np.stack([x, y], 1)
        p -= (p.max(0) + p.min(0)) / 2
        return p / np.abs(p).max()
    raise DistillError(f"world.shapes: unknown shape {shape!r} (valid: {', '.join(SHAPES)})")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}

FILLS = ("flat", "pattern")
# world.fill=pattern: each shape's fill texture, in 2x canvas pixels (period 8 = 4 px in the image),
# drawn in image axes so horizontal flips keep every pattern; the marked pixels are darkened.
_PATTERNS = ("dots", "checker", "hstripes", "vstripes", "crosshatch", "grid", "rings", "bigchecker", "diagonal")
_PATTERN_OF = dict(zip(SHAPES, _PATTERNS))
_PATTERN_DARKEN = 0.45


def _pattern(name: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean texture ``name`` at integer 2x coordinates (already shifted by the object's phase)."""
    if name == "dots":
        return ((yy % 8) - 3.5) ** 2 + ((xx % 8) - 3.5) ** 2 <= 5.0
    if name == "checker":
        return ((yy // 6) + (xx // 6)) % 2 == 0
    if name == "hstripes":
        return (yy % 8) < 4
    if name == "vstripes":
        return (xx % 8) < 4
    if name == "crosshatch":
        return ((xx + yy) % 8 < 2) | ((xx - yy) % 8 < 2)
    if name == "grid":
        return (xx % 8 < 2) | (yy % 8 < 2)
    if name == "rings":
        return (np.sqrt(((yy % 16) - 7.5) ** 2 + ((xx % 16) - 7.5) ** 2) % 8) < 3
    if name == "bigchecker":
        return ((yy // 8) + (xx // 8)) % 2 == 0
    return (np.abs(xx - yy) % 8) < 3  # diagonal (a horizontal flip turns it into the other diagonal)
_SHIFT = 4  # fixed-point bits for cv2 polygon coordinates (sub-pixel precision)


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    p = _POLYGONS[shape]
    c, s = np.cos(angle), np.sin(angle)
    x = cx + radius * (c * p[:, 0] - s * p[:, 1])
    y = cy + radius * (s * p[:, 0] + c * p[:, 1])
    return np.round(np.stack([x, y], 1) * (1 << _SHIFT)).astype(np.int32)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """h in degrees, s and v in [0, 1] -> float RGB in [0, 255]."""
    px = np.array([[[h % 360.0, s, v]]], np.float32)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0] * 255.0


def _rgb_to_hsv(rgb: tuple[int, int, int]) -> np.ndarray:
    px = np.array([[rgb]], np.float32) / 255.0
    return cv2.cvtColor(px, cv2.COLOR_RGB2HSV)[0, 0]


_COLOR_HSV = {k: _rgb_to_hsv(v) for k, v in COLORS.items()}
_ALL_COLOR_RGB = np.array(list(COLORS.values()), np.float32)


def _object_color(rng: np.random.Generator, name: str) -> tuple[float, float, float]:
    """The category colour with mild hue / saturation / brightness jitter."""
    h, s, v = _COLOR_HSV[name]
    h = h + rng.uniform(-5, 5)
    s = np.clip(s * rng.uniform(0.8, 1.0), 0, 1)
    v = np.clip(v * rng.uniform(0.8, 1.05), 0, 1)
    return tuple(float(x) for x in _hsv_to_rgb(h, s, v))


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour at least 90 (RGB L2) from every category colour."""
    while True:
        rgb = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.85))
        if np.sqrt(((_ALL_COLOR_RGB - rgb) ** 2).sum(1)).min() > 90:
            return rgb


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """(size, size, 3) float32 RGB texture and a word for captions."""
    kind = ("plain", "gradient", "striped", "blotchy")[rng.integers(4)]
    a = _muted_color(rng)
    if kind == "plain":
        return np.broadcast_to(a, (size, size, 3)).astype(np.float32), kind
    b = _muted_color(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "gradient":
        t = rng.uniform(0, 2 * np.pi)
        w = np.cos(t) * xx + np.sin(t) * yy
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-6)
    elif kind == "striped":
        t = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.25)
        w = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (np.cos(t) * xx + np.sin(t) * yy) / period))
        w = cv2.GaussianBlur(w.astype(np.float32), (3, 3), 0)
    else:  # blotchy: bilinearly upsampled coarse noise
        g = rng.uniform(0, 1, (int(rng.integers(3, 7)),) * 2).astype(np.float32)
        w = cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    img = a[None, None, :] * (1 - w[..., None]) + b[None, None, :] * w[..., None]
    return img.astype(np.float32), kind


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray, count: int) -> list[dict]:
    """Non-category items on the 2x canvas: thin lines, gray/brown blobs, elongated ellipses.

    Returns one ``{"name": "gray line" | "brown blob" | ..., "bbox": [x, y, w, h]}`` per item, the
    box in 1x pixels, clipped to the image (objects drawn later may cover the item).
    """
    s = canvas.shape[0]
    items = []
    for _ in range(count):
        kind = rng.integers(3)
        if rng.random() < 0.5:  # gray
            col, tone = _hsv_to_rgb(0, 0, rng.uniform(0.15, 0.9)), "gray"
        else:  # brown
            col, tone = _hsv_to_rgb(rng.uniform(20, 40), rng.uniform(0.4, 0.65), rng.uniform(0.25, 0.45)), "brown"
        col = tuple(float(x) for x in col)
        if kind == 0:
            p1 = rng.uniform(0, s, 2)
            ang = rng.uniform(0, 2 * np.pi)
            ln = rng.uniform(0.2, 0.7) * s
            p2 = p1 + ln * np.array([np.cos(ang), np.sin(ang)])
            thick = int(rng.integers(2, 4))
            pts = np.round(np.stack([p1, p2]) * (1 << _SHIFT)).astype(np.int32)
            cv2.line(canvas, tuple(pts[0]), tuple(pts[1]), col, thick, cv2.LINE_AA, _SHIFT)
            lo, hi = np.minimum(p1, p2) - thick, np.maximum(p1, p2) + thick
            name = f"{tone} line"
        else:
            c = rng.uniform(0, s, 2)
            if kind == 1:  # small blob
                ax = rng.uniform(2, 6) * s / 64, rng.uniform(2, 6) * s / 64
            else:  # elongated ellipse (aspect <= 0.5: never a circle)
                major = rng.uniform(6, 16) * s / 64
                ax = major, major * rng.uniform(0.25, 0.5)
            ang = float(rng.uniform(0, 180))
            center = tuple(int(round(v * (1 << _SHIFT))) for v in c)
            axes = tuple(int(round(v * (1 << _SHIFT))) for v in ax)
            cv2.ellipse(canvas, center, axes, ang, 0, 360, col, -1, cv2.LINE_AA, _SHIFT)
            # the rotated ellipse's axis-aligned half extents
            t = np.deg2rad(ang)
            half = np.array([np.hypot(ax[0] * np.cos(t), ax[1] * np.sin(t)), np.hypot(ax[0] * np.sin(t), ax[1] * np.cos(t))])
            lo, hi = c - half, c + half
            name = f"{tone} {'blob' if kind == 1 else 'ellipse'}"
        lo, hi = np.clip(lo, 0, s) / 2, np.clip(hi, 0, s) / 2  # 1x pixels
        if (hi - lo).min() >= 1:
            items.append({"name": name, "bbox": [round(float(lo[0]), 2), round(float(lo[1]), 2), round(float(hi[0] - lo[0]), 2), round(float(hi[1] - lo[1]), 2)]})
    return items


def _render(rng: np.random.Generator, wcfg: WorldConfig, classes: list[str]) -> tuple[np.ndarray, list[dict], str, list[dict]]:
    """Draw one image. Returns (RGB uint8 (S, S, 3), objects, background word, clutter items).

    Each object: ``{"class": index into classes, "mask": (S, S) bool visible mask, "center": (x, y)}``.
    """
    size = wcfg.image_size
    big = 2 * size
    bg, bg_word = _background(rng, size)
    canvas = cv2.resize(bg, (big, big), interpolation=cv2.INTER_LINEAR)
    clutter = _draw_clutter(rng, canvas, int(rng.integers(0, wcfg.clutter + 1)))

    n_want = int(rng.integers(wcfg.min_objects, wcfg.max_objects + 1))
    owner = np.zeros((big, big), np.uint8)  # 0 = background, k = object k (1-based), 2x resolution
    full_area: list[int] = []
    visible = np.zeros(wcfg.max_objects + 1, np.int64)  # visible 2x pixels per owner
    objs: list[dict] = []
    lo, hi = np.log(wcfg.min_size), np.log(wcfg.max_size)
    for _ in range(n_want):
        cls = int(rng.integers(len(classes)))
        shape = classes[cls].split(" ", 1)[1]
        diameter = float(np.exp(rng.uniform(lo, hi)))
        radius = diameter  # at 2x: the 2x radius equals the 1x diameter
        angle = float(rng.uniform(0, 2 * np.pi))
        color = _object_color(rng, classes[cls].split(" ", 1)[0])
        placed = None
        for _try in range(_PLACEMENT_TRIES):
            m = 0.75 * radius
            cx, cy = rng.uniform(m, big - m, 2)
            poly = _polygon(shape, cx, cy, radius, angle)
            mine = np.zeros((big, big), np.uint8)
            cv2.fillPoly(mine, [poly], 1, cv2.LINE_8, _SHIFT)
            area = int(mine.sum())
            if area < 4 * MIN_VISIBLE_PIXELS:
                continue
            covered = np.bincount(owner[mine.astype(bool)], minlength=len(objs) + 1)
            vis = visible[: len(objs) + 1] - covered
            ok = all(
                vis[k] >= MIN_VISIBLE_FRACTION * full_area[k - 1] and vis[k] >= 4 * MIN_VISIBLE_PIXELS
                for k in range(1, len(objs) + 1)
            )
            if ok:
                placed = (poly, mine, area, cx, cy)
                break
        if placed is None:
            continue
        poly, mine, area, cx, cy = placed
        cv2.fillPoly(canvas, [poly], color, cv2.LINE_AA, _SHIFT)
        if wcfg.fill == "pattern":
            yy, xx = np.nonzero(mine)
            # The texture's phase follows the object's position, so no random draw is spent:
            # fill=flat and fill=pattern give the same layout and annotations.
            # Even offsets keep each texture aligned with the image's 2x2 pixel blocks.
            oy, ox = 2 * (int(cy) % 8), 2 * (int(cx) % 8)
            dark = _pattern(_PATTERN_OF[shape], yy + oy, xx + ox)
            canvas[yy[dark], xx[dark]] *= 1.0 - _PATTERN_DARKEN
        owner[mine.astype(bool)] = len(objs) + 1
        visible = np.bincount(owner.ravel(), minlength=wcfg.max_objects + 1)
        full_area.append(area)
        objs.append({"class": cls, "center": (float(cx) / 2, float(cy) / 2)})

    img = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    img += rng.normal(0, rng.uniform(2, 7), img.shape).astype(np.float32)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)

    # Majority vote of the 2x ownership over each 1x pixel; ties go to the upper (later) object.
    n = len(objs)
    onehot = owner.reshape(size, 2, size, 2)
    counts = np.stack([(onehot == k).sum((1, 3)) for k in range(n + 1)])  # (n+1, S, S)
    top = n - np.argmax(counts[::-1], axis=0)  # 0 = background
    keep = []
    for k, o in enumerate(objs, start=1):
        m = top == k
        # Safety net (the 2x placement check makes this rare): an object left almost invisible
        # by discretisation is dropped and its pixels become ignore (255) in semantic masks.
        o["mask"] = m
        o["dropped"] = int(m.sum()) < MIN_VISIBLE_PIXELS or m.sum() < MIN_VISIBLE_FRACTION * full_area[k - 1] / 4
        keep.append(o)
    return img, keep, bg_word, clutter


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(name: str, count: int) -> str:
    color, shape = name.split(" ", 1)
    if count == 1:
        return f"{_article(color)} {color} {shape}"
    return f"{_NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else count} {color} {_plural(shape)}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(a: dict, b: dict) -> str:
    dx = b["center"][0] - a["center"][0]
    dy = b["center"][1] - a["center"][1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _captions(rng: np.random.Generator, names: list[str], objs: list[dict], bg_word: str, n: int) -> list[str]:
    """``n`` distinct captions, each naming every object's colour and shape (with counts)."""
    counts: dict[str, int] = {}
    for o in objs:
        counts[names[o["class"]]] = counts.get(names[o["class"]], 0) + 1
    order = list(counts)
    bg_phrase = f"{_article(bg_word)} {bg_word} background"

    def listing() -> str:
        perm = rng.permutation(len(order))
        return _join([_phrase(order[i], counts[order[i]]) for i in perm])

    def relational() -> str | None:
        singles = [o for o in objs if counts[names[o["class"]]] == 1]
        if len(singles) < 2:
            return None
        i, j = rng.choice(len(singles), 2, replace=False)
        a, b = singles[i], singles[j]
        na, nb = names[a["class"]], names[b["class"]]
        head = f"{_phrase(na, 1)} {_relation(a, b)} {_phrase(nb, 1)}"
        rest = [_phrase(k, counts[k]) for k in order if k not in (na, nb)]
        return head + (", with " + _join(rest) if rest else "")

    forms = [
        lambda: listing(),
        lambda: f"a picture with {listing()} on {bg_phrase}",
        lambda: f"an image of {listing()}",
        lambda: f"there {'is' if len(objs) == 1 else 'are'} {listing()} in this picture",
        lambda: f"{listing()} on {bg_phrase}",
        lambda: f"a photo showing {listing()}",
        relational,
    ]
    out: list[str] = []
    for _ in range(8 * n):
        c = forms[int(rng.integers(len(forms)))]()
        if c and c not in out:
            out.append(c)
        if len(out) == n:
            break
    while len(out) < n:  # more captions asked than there are distinct forms: repeat one
        out.append(out[len(out) % max(len(out), 1)] if out else listing())
    return out


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def _png(img: np.ndarray) -> bytes:
    """PNG bytes of an RGB (H, W, 3) or single-channel (H, W) uint8 array (deterministic)."""
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _write(path: Path, data: bytes) -> None:
    # Inside the staging folder: plain writes; the folder is renamed into place at the end.
    with open(path, "wb") as f:
        f.write(data)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _coco(images: list[dict], anns: list[dict], vocab: Vocabulary, info: dict) -> dict:
    return {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": vocab.categories()}


def world_hash(wcfg: WorldConfig) -> str:
    """Identifies the world's content (the world section, not where it is written)."""
    return config_hash(wcfg)


def make_world(cfg: Config) -> Path:
    """Build the shapes world of ``cfg.world`` into ``{cfg.work_dir}/data`` and return that folder.

    An existing ``data`` folder is replaced (the new one is built under a temporary name first).
    """
    t0 = time.perf_counter()
    wcfg = cfg.world
    vocab = world_vocab(wcfg)
    names = list(vocab.names)
    novel_ids = {cid for cid, sp in zip(vocab.ids, vocab.split) if sp == "novel"}
    whash = world_hash(wcfg)
    size = wcfg.image_size

    out = Path(cfg.work_dir) / "data"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistillError(f"{out.parent}: cannot create the work dir ({e.strerror})") from None
    stage = out.parent / f".data.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        for sub in [f"images/{s}" for s in SPLITS] + [f"semantic/{s}" for s in (*SPLITS, "train_base")]:
            (stage / sub).mkdir(parents=True, exist_ok=True)

        sizes = {"train": wcfg.num_train, "val": wcfg.num_val, "unlabeled": wcfg.num_unlabeled}
        image_id = 0
        ann_id = 0
        captions: list[dict] = []
        counts: dict[str, dict] = {}
        coco_by_split: dict[str, dict] = {}
        dropped_total = 0
        for split in SPLITS:
            images, anns, labels = [], [], []
            base_anns, base_labels = [], []
            for index in range(sizes[split]):
                image_id += 1
                rng = np.random.default_rng([wcfg.seed, _SPLIT_INDEX[split], index])
                img, objs, bg_word, clutter = _render(rng, wcfg, names)
                file_name = f"{split}/{image_id:06d}.png"
                _write(stage / "images" / file_name, _png(img))
                images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})

                sem = np.zeros((size, size), np.uint8)
                cats: list[int] = []
                kept = []
                for o in objs:
                    cid = vocab.ids[o["class"]]
                    if o["dropped"]:
                        sem[o["mask"]] = 255
                        dropped_total += 1
                        continue
                    sem[o["mask"]] = cid
                    kept.append(o)
                    ann_id += 1
                    rle = _rle(o["mask"])
                    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                    ann = {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cid,
                        "segmentation": rle,
                        "area": float(o["mask"].sum()),
                        "bbox": [x, y, w, h],
                        "iscrowd": 0,
                    }
                    anns.append(ann)
                    if cid not in novel_ids:
                        base_anns.append(ann)
                    if cid not in cats:
                        cats.append(cid)
                cats.sort()
                _write(stage / "semantic" / file_name, _png(sem))
                labels.append({"image_id": image_id, "file_name": file_name, "category_ids": cats})
                if split == "train":
                    sem_base = sem.copy()
                    for cid in novel_ids:
                        sem_base[sem == cid] = 255
                    _write(stage / "semantic" / "train_base" / f"{image_id:06d}.png", _png(sem_base))
                    base_labels.append({"image_id": image_id, "file_name": file_name, "category_ids": [c for c in cats if c not in novel_ids]})
                captions.append(
                    {
                        "image_id": image_id,
                        "file_name": file_name,
                        "split": split,
                        "captions": _captions(rng, names, kept, bg_word, wcfg.num_captions_per_image) if kept else [f"{_article(bg_word)} {bg_word} background"],
                        # what the captions leave out, for the teacher's stuff crops
                        # (pretrain.stuff_fraction): the background texture and the clutter items
                        "background": bg_word,
                        "clutter": clutter,
                    }
                )
            info = {"description": "distill shapes world", "version": "1", "split": split, "world_hash": whash, "seed": wcfg.seed}
            coco_by_split[split] = _coco(images, anns, vocab, info)
            write_json(stage / f"image_labels_{split}.json", labels, indent=None)
            counts[split] = {"images": len(images), "annotations": len(anns)}
            if split == "train":
                info_b = dict(info, split="train_base", note="OV-COCO protocol: all images, novel annotations removed")
                coco_by_split["train_base"] = _coco(images, base_anns, vocab, info_b)
                write_json(stage / "image_labels_train_base.json", base_labels, indent=None)
                counts["train_base"] = {"images": len(images), "annotations": len(base_anns)}
        for split, coco in coco_by_split.items():
            write_json(stage / f"instances_{split}.json", coco, indent=None)
        write_json(stage / "captions.json", captions, indent=None)
        write_json(stage / "vocab.json", vocab.to_json())
        save_config(cfg, stage / "world.yaml")
        wall = time.perf_counter() - t0
        manifest = {
            "stage": "world",
            "config_hash": config_hash(cfg),
            "world_hash": whash,
            "base": [n for n, s in zip(vocab.names, vocab.split) if s == "base"],
            "novel": [n for n, s in zip(vocab.names, vocab.split) if s == "novel"],
            "counts": counts,
            "dropped_occluded": dropped_total,
            "versions": {
                "python": sys.version.split()[0],
                "numpy": np.__version__,
                "opencv": cv2.__version__,
                "pycocotools": _version("pycocotools"),
            },
            "wall_time_s": round(wall, 3),
        }
        write_json(stage / "manifest.json", manifest)
        # Swap the finished folder into place.
        trash = None
        if out.exists():
            trash = out.parent / f".data.old-{os.getpid()}"
            os.replace(out, trash)
        os.replace(stage, out)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise DistillError(f"{out}: cannot write the world ({e.strerror or e}: {e.filename or ''})") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def summary(data_dir: str | Path) -> dict:
    """The manifest of a built world (counts, base/novel names, wall time)."""
    from distill.files import read_json

    return read_json(Path(data_dir) / "manifest.json", "world manifest")
