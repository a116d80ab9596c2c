"""Drawing the shapes world (see distill/data/world.py for what the world is): category colours
with jitter, per-shape fill textures, textured backgrounds, clutter, and the placement of objects
that keeps every earlier object at least 30 % visible.

Drawing is done at 2x with anti-aliased polygons (cv2.fillPoly) and downsampled with INTER_AREA;
instance masks are the 2x ownership map downsampled by majority (a pixel belongs to the object
covering most of it, ties to the upper object), so masks agree with what is drawn. Every random
draw comes from the ``rng`` handed in, in a fixed order: the same generator gives the same image.
"""

from __future__ import annotations

import cv2
import numpy as np

from distill.config import WorldConfig
from distill.errors import DistillError

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


def render(rng: np.random.Generator, wcfg: WorldConfig, classes: list[str]) -> tuple[np.ndarray, list[dict], str, list[dict]]:
    """Draw one image. Returns (RGB uint8 (S, S, 3), objects, background word, clutter items).

    Each object: ``{"class": index into classes, "mask": (S, S) bool visible mask, "center": (x, y),
    "dropped": bool}``; a dropped object was left almost invisible by discretisation.
    """
    size = wcfg.image_size
    big = 2 * size
    bg, bg_word = _background(rng, size)
    canvas = cv2.resize(bg, (big, big), interpolation=cv2.INTER_LINEAR)
    clutter = _draw_clutter(rng, canvas, int(rng.integers(0, wcfg.clutter + 1)))
    objs, owner, full_area = _draw_objects(rng, wcfg, classes, canvas)

    img = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    img += rng.normal(0, rng.uniform(2, 7), img.shape).astype(np.float32)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return img, _visible_masks(objs, owner, full_area, size), bg_word, clutter


def _draw_objects(rng: np.random.Generator, wcfg: WorldConfig, classes: list[str], canvas: np.ndarray) -> tuple[list[dict], np.ndarray, list[int]]:
    """Draw ``min_objects..max_objects`` objects on the 2x ``canvas``, later over earlier.
    Returns the objects (class, centre), the 2x ownership map (0 = background, k = object k) and
    each object's full 2x area."""
    big = canvas.shape[0]
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
        placed = _place(rng, shape, radius, angle, owner, visible[: len(objs) + 1], full_area)
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
    return objs, owner, full_area


def _place(rng: np.random.Generator, shape: str, radius: float, angle: float, owner: np.ndarray, visible: np.ndarray, full_area: list[int]):
    """Up to ``_PLACEMENT_TRIES`` random centres for an object; the first whose polygon is big
    enough and leaves every earlier object ``k`` (``visible[k]`` 2x pixels now) visible enough.
    Returns (polygon, (2S, 2S) uint8 mask, area, cx, cy) or None."""
    big = owner.shape[0]
    n = len(full_area)
    for _try in range(_PLACEMENT_TRIES):
        m = 0.75 * radius
        cx, cy = rng.uniform(m, big - m, 2)
        poly = _polygon(shape, cx, cy, radius, angle)
        mine = np.zeros((big, big), np.uint8)
        cv2.fillPoly(mine, [poly], 1, cv2.LINE_8, _SHIFT)
        area = int(mine.sum())
        if area < 4 * MIN_VISIBLE_PIXELS:
            continue
        covered = np.bincount(owner[mine.astype(bool)], minlength=n + 1)
        vis = visible - covered
        ok = all(
            vis[k] >= MIN_VISIBLE_FRACTION * full_area[k - 1] and vis[k] >= 4 * MIN_VISIBLE_PIXELS
            for k in range(1, n + 1)
        )
        if ok:
            return poly, mine, area, cx, cy
    return None


def _visible_masks(objs: list[dict], owner: np.ndarray, full_area: list[int], size: int) -> list[dict]:
    """Each object's (S, S) visible mask: majority vote of the 2x ownership over each 1x pixel,
    ties to the upper (later) object; ``dropped`` when too little of it is left."""
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
    return keep
