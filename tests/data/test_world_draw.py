"""Drawing the shapes world: clutter boxes, background and object colours."""

from __future__ import annotations

import cv2
import numpy as np

from distill.data import world_draw as D


def test_clutter_pixels_lie_inside_their_boxes():
    # render one image's clutter alone: every drawn pixel lies inside its box
    canvas = np.zeros((256, 256, 3), np.float32)
    items = D._draw_clutter(np.random.default_rng(5), canvas, 3)
    drawn = canvas.max(-1) > 0
    inside = np.zeros_like(drawn)
    for c in items:
        x, y, w, h = (2 * v for v in c["bbox"])
        inside[int(y):int(np.ceil(y + h)) + 1, int(x):int(np.ceil(x + w)) + 1] = True
    assert drawn.any() and not (drawn & ~inside).any()


def test_background_colours_stay_far_from_category_colours():
    rng = np.random.default_rng(0)
    cats = np.array(list(D.COLORS.values()), np.float32)
    for _ in range(300):
        c = D._muted_color(rng)
        assert np.sqrt(((cats - c) ** 2).sum(1)).min() > 90


def test_object_colours_stay_nearest_their_category():
    rng = np.random.default_rng(0)
    names = list(D.COLORS)
    hsv = np.array([cv2.cvtColor(np.array([[v]], np.float32) / 255, cv2.COLOR_RGB2HSV)[0, 0, 0] for v in D.COLORS.values()])
    for name in names:
        for _ in range(50):
            c = np.array(D._object_color(rng, name), np.float32) / 255
            h = cv2.cvtColor(c[None, None], cv2.COLOR_RGB2HSV)[0, 0, 0]
            d = np.abs((hsv - h + 180) % 360 - 180)
            assert names[int(d.argmin())] == name
