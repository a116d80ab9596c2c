"""Candidates for the zero-shot teacher source: class-agnostic boxes with box-limited masks.

:func:`component_candidates`: connected components of saturated colour, split into hue bins at
two offsets (so a hue near a bin edge is whole in one of them), each with its component mask (the
shapes world's flat-coloured objects), and / or multi-scale sliding windows (mask = the box;
photos). Masks are kept as :class:`BoxMasks` (each cut to its box), so memory is the image's own
whatever the number of candidates.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torchvision


class BoxMasks:
    """Instance masks kept box-limited: mask ``i`` is ``parts[i]``, a ``(y1 - y0, x1 - x0)`` bool
    array at the integer box ``boxes[i]`` of an image of ``size`` (h, w) (where it was made), read
    at ``out_size`` (H, W; default ``size``): an output pixel takes the value of the pixel its centre
    falls in (nearest neighbour). A full (H, W) mask is only made on request, one at a time
    (``masks[i]``, :meth:`rle`); areas are exact in output pixels without making it.

    Behaves like an (N, H, W) bool array where the labeler needs one: ``masks[i]`` (an int) is
    mask ``i`` as an (H, W) numpy array, ``masks[idx]`` (indices) a subset, ``.numpy()`` itself."""

    def __init__(self, boxes, parts: list[np.ndarray], size: tuple[int, int], out_size: tuple[int, int] | None = None) -> None:
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        self.parts = list(parts)
        self.size = (int(size[0]), int(size[1]))
        self.out_size = (int(out_size[0]), int(out_size[1])) if out_size is not None else self.size

    @classmethod
    def from_dense(cls, masks) -> "BoxMasks":
        """(N, H, W) bool -> box-limited (each part cut to its mask's bounding box)."""
        m = np.asarray(masks, dtype=bool)
        boxes, parts = [], []
        for x in m:
            ys, xs = np.nonzero(x.any(1))[0], np.nonzero(x.any(0))[0]
            if len(ys) == 0:
                boxes.append([0, 0, 0, 0])
                parts.append(np.zeros((0, 0), bool))
                continue
            y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
            boxes.append([x0, y0, x1, y1])
            parts.append(x[y0:y1, x0:x1].copy())
        return cls(np.asarray(boxes).reshape(-1, 4), parts, m.shape[1:3])

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), *self.out_size)

    def numpy(self) -> "BoxMasks":
        return self

    def at(self, out_size: tuple[int, int]) -> "BoxMasks":
        """The same masks read at another output size (the full image's)."""
        return BoxMasks(self.boxes, self.parts, self.size, out_size)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.ndim == 0):
            return self.full(int(idx))
        if isinstance(idx, slice):
            sel = list(range(len(self)))[idx]
        else:
            sel = [int(i) for i in (idx.tolist() if hasattr(idx, "tolist") else idx)]
        return BoxMasks(self.boxes[sel] if sel else np.zeros((0, 4), np.int64), [self.parts[i] for i in sel], self.size, self.out_size)

    @staticmethod
    def _axis(a0: int, a1: int, n: int, N: int) -> tuple[int, int, np.ndarray]:
        """Output range [A0, A1) whose pixel centres fall in input [a0, a1) (n -> N pixels) and
        the input index (relative to a0) of each."""
        if n == N:
            return a0, a1, np.arange(a1 - a0)
        # centre (A + 0.5) * n / N in [a0, a1)  <=>  (2A + 1) n >= 2 a0 N  and  < 2 a1 N
        A0 = -((n - 2 * a0 * N) // (2 * n))
        A1 = -((n - 2 * a1 * N) // (2 * n))
        A0, A1 = max(0, min(N, A0)), max(0, min(N, A1))
        src = ((2 * np.arange(A0, A1, dtype=np.int64) + 1) * n) // (2 * N) - a0
        return A0, A1, np.clip(src, 0, max(0, a1 - a0 - 1))

    def _mapped(self, i: int) -> tuple[int, int, int, int, np.ndarray]:
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        (h, w), (H, W) = self.size, self.out_size
        Y0, Y1, ry = self._axis(y0, y1, h, H)
        X0, X1, rx = self._axis(x0, x1, w, W)
        part = self.parts[i]
        if part.size and (len(ry) != part.shape[0] or len(rx) != part.shape[1] or self.size != self.out_size):
            part = part[np.ix_(ry, rx)]
        return Y0, Y1, X0, X1, part

    def area(self, i: int) -> int:
        """Pixels of mask ``i`` at the output size."""
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        part = self.parts[i]
        if self.size == self.out_size or not part.size:
            return int(part.sum())
        (h, w), (H, W) = self.size, self.out_size
        _, _, ry = self._axis(y0, y1, h, H)
        _, _, rx = self._axis(x0, x1, w, W)
        rows = np.bincount(ry, minlength=part.shape[0]).astype(np.int64)  # output rows per input row
        cols = np.bincount(rx, minlength=part.shape[1]).astype(np.int64)
        return int(rows @ part.astype(np.int64) @ cols)

    def areas(self) -> torch.Tensor:
        return torch.tensor([float(self.area(i)) for i in range(len(self))], dtype=torch.float32)

    def full(self, i: int, dtype=bool, order: str = "C") -> np.ndarray:
        """Mask ``i`` as an (H, W) array at the output size."""
        m = np.zeros(self.out_size, dtype, order=order)
        Y0, Y1, X0, X1, part = self._mapped(i)
        if part.size:
            m[Y0:Y1, X0:X1] = part
        return m

    def rle(self, i: int) -> dict:
        """COCO RLE of mask ``i`` at the output size (as :func:`formats.mask_to_rle`)."""
        from pycocotools import mask as mask_utils

        r = mask_utils.encode(self.full(i, np.uint8, "F"))
        return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}




class _HueComponents:
    """The colour components of one ``image`` ((H, W, 3) uint8 RGB): pixels with HSV saturation
    >= ``sat_min`` and value >= ``val_min``, split into hue bins of ``hue_bin`` degrees at two
    offsets (0 and half a bin); :meth:`labels` labels the 8-connected components of one bin
    (after a 3x3 opening)."""

    def __init__(self, image: np.ndarray, sat_min: float, val_min: float, hue_bin: float, min_area: float) -> None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)  # H, S, V in 0..255
        self.hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
        self.chroma = (hsv[..., 1] >= sat_min * 255) & (hsv[..., 2] >= val_min * 255)
        self.hue_bin, self.min_area = hue_bin, min_area
        self.nbins = max(1, int(round(360.0 / hue_bin)))
        self.offsets = (0.0, hue_bin / 2)
        self.kernel = np.ones((3, 3), np.uint8)

    def bins(self, o: int) -> np.ndarray:
        """(H, W) int32 hue bin of every pixel at offset ``o``."""
        return (((self.hue + self.offsets[o]) % 360.0) // self.hue_bin).astype(np.int32) % self.nbins

    def labels(self, o: int, b: int, bins: np.ndarray | None = None):
        """``cv2.connectedComponentsWithStats`` of bin ``b`` at offset ``o`` (None when the bin
        holds fewer than ``min_area`` pixels)."""
        if bins is None:
            bins = self.bins(o)
        m = (self.chroma & (bins == b)).astype(np.uint8)
        if int(m.sum()) < self.min_area:
            return None
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, self.kernel)
        return cv2.connectedComponentsWithStats(m, connectivity=8)

    def components(self) -> tuple[list[list[int]], list[float], list[tuple[int, int, int]]]:
        """Every component of ``min_area`` pixels or more: its box [x0, y0, x1, y1], area and
        origin (offset, bin, component label)."""
        boxes, areas, origin = [], [], []
        for o in range(len(self.offsets)):
            bins = self.bins(o)
            for b in range(self.nbins):
                res = self.labels(o, b, bins)
                if res is None:
                    continue
                n, _, stats, _ = res
                for k in range(1, n):
                    x, y, bw, bh, area = (int(v) for v in stats[k])
                    if area < self.min_area:
                        continue
                    boxes.append([x, y, x + bw, y + bh])
                    areas.append(float(area))
                    origin.append((o, b, k))
            del bins
        return boxes, areas, origin


def _windows(h: int, w: int) -> tuple[list[list[int]], list[float]]:
    """Sliding windows of sides 1/4 and 1/2 of an (h, w) image, stride half a side: boxes and
    their areas clipped to the image (a window's mask is its box)."""
    boxes, areas = [], []
    for frac in (0.25, 0.5):
        sw, sh = max(1, int(round(w * frac))), max(1, int(round(h * frac)))
        for y in range(0, max(1, h - sh + 1), max(1, sh // 2)):
            for x in range(0, max(1, w - sw + 1), max(1, sw // 2)):
                boxes.append([x, y, x + sw, y + sh])
                areas.append(float((min(h, y + sh) - y) * (min(w, x + sw) - x)))
    return boxes, areas


def component_candidates(
    image: np.ndarray,
    *,
    min_area: float = 16.0,
    max_boxes: int = 100,
    sat_min: float = 0.4,
    val_min: float = 0.45,
    hue_bin: float = 20.0,
    windows: bool = False,
) -> tuple[np.ndarray, BoxMasks]:
    """Class-agnostic boxes for the zero-shot teacher: connected components of saturated colour.

    ``image``: (H, W, 3) uint8 RGB. Pixels with HSV saturation >= ``sat_min`` and value >=
    ``val_min`` (defaults: above the shapes world's muted backgrounds, S <= 0.25, and its dark
    brown clutter, V <= 0.45; below its least saturated category colour, pink, S ~ 0.45)
    are split into hue bins of ``hue_bin`` degrees at two offsets (0 and half a bin);
    each 8-connected component (after a 3x3 opening) of ``min_area`` pixels or more gives a box and
    its mask. ``windows`` adds sliding windows (sides 1/4, 1/2 of the image, stride half a side;
    mask = the box). Duplicates (IoU > 0.9) are dropped; the ``max_boxes`` largest are kept.

    Returns ``boxes`` (N, 4) float32 XYXY absolute pixels and their masks (:class:`BoxMasks`):
    every component is first kept as its box, area and where it came from; the ``max_boxes``
    kept after the duplicate removal are the only masks ever cut out (one pass over their hue
    bins again), so memory is the image's own (a few arrays of its size).
    """
    h, w = image.shape[:2]
    comp = _HueComponents(image, sat_min, val_min, hue_bin, min_area)
    boxes, areas, origin = comp.components()
    if windows:
        wb, wa = _windows(h, w)
        boxes, areas, origin = boxes + wb, areas + wa, origin + [(-1, 0, 0)] * len(wb)
    if not boxes:
        return np.zeros((0, 4), np.float32), BoxMasks(np.zeros((0, 4)), [], (h, w))
    bt = torch.tensor(boxes, dtype=torch.float32)
    keep = torchvision.ops.nms(bt, torch.tensor(areas), 0.9)  # larger first, near-duplicates dropped
    keep = keep[:max_boxes].tolist()
    parts: dict[int, np.ndarray] = {}
    wanted: dict[tuple[int, int], list[int]] = {}
    for i in keep:
        o, b, _ = origin[i]
        if o < 0:
            x0, y0, x1, y1 = boxes[i]
            parts[i] = np.ones((min(h, y1) - y0, min(w, x1) - x0), bool)
        else:
            wanted.setdefault((o, b), []).append(i)
    for (o, b), idx in sorted(wanted.items()):
        _, lab, _, _ = comp.labels(o, b)
        for i in idx:
            x0, y0, x1, y1 = boxes[i]
            parts[i] = lab[y0:y1, x0:x1] == origin[i][2]
        del lab
    kept_boxes = np.asarray([boxes[i] for i in keep], np.int64)
    for i, kb in zip(keep, kept_boxes):  # a window clipped at the image edge: its part is the clipped box
        kb[2], kb[3] = kb[0] + parts[i].shape[1], kb[1] + parts[i].shape[0]
    return bt[keep].numpy(), BoxMasks(kept_boxes, [parts[i] for i in keep], (h, w))


def component_proposals(image: np.ndarray, **options) -> tuple[np.ndarray, np.ndarray]:
    """:func:`component_candidates` (same ``options``) with full-size masks: ``boxes`` (N, 4)
    float32 XYXY absolute pixels and ``masks`` (N, H, W) bool (the labeler never makes these)."""
    h, w = image.shape[:2]
    boxes, bm = component_candidates(image, **options)
    if not len(bm):
        return boxes, np.zeros((0, h, w), bool)
    return boxes, np.stack([bm.full(i) for i in range(len(bm))])
