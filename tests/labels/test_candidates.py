"""Colour-component candidates and box-limited masks (nearest mapping against a brute-force reference)."""

from __future__ import annotations

import numpy as np
import torch

from distill.labels import formats
from distill.labels.candidates import BoxMasks, component_proposals


def test_component_proposals_hand_image():
    img = np.full((40, 50, 3), 120, np.uint8)
    img[5:15, 10:30] = (220, 30, 30)  # red 20x10
    img[20:36, 30:46] = (30, 70, 225)  # blue 16x16
    img[2:4, 2:4] = (30, 170, 40)  # 4 px: below min_area
    boxes, masks = component_proposals(img, min_area=16)
    got = sorted(map(tuple, boxes.astype(int).tolist()))
    assert got == [(10, 5, 30, 15), (30, 20, 46, 36)]
    assert sorted(int(m.sum()) for m in masks) == [200, 256]
    boxes, masks = component_proposals(img, min_area=16, windows=True)
    # + 3x3 windows of 12x10 (stride 6x5: 7 x 7 positions) and 25x20 (3 x 3), no duplicates of the two
    assert len(boxes) == 2 + 7 * 7 + 3 * 3


def test_box_masks_nearest_mapping_matches_bruteforce():
    rng = np.random.default_rng(2)
    h, w = 13, 17
    dense = rng.random((4, h, w)) < 0.4
    dense[3] = False
    bm = BoxMasks.from_dense(dense)
    for i in range(4):
        np.testing.assert_array_equal(bm[i], dense[i])  # at its own size: the mask itself
    for H, W in ((13, 17), (40, 51), (29, 100), (7, 9)):
        big = bm.at((H, W))
        ys = ((2 * np.arange(H) + 1) * h) // (2 * H)  # the source pixel of each output pixel's centre
        xs = ((2 * np.arange(W) + 1) * w) // (2 * W)
        for i in range(4):
            ref = dense[i][np.ix_(ys, xs)]
            np.testing.assert_array_equal(big[i], ref)
            assert big.area(i) == int(ref.sum())
            np.testing.assert_array_equal(formats.rle_to_mask(big.rle(i)), ref)
            assert big.rle(i) == formats.mask_to_rle(ref)
        sub = big[torch.tensor([2, 0])]
        assert len(sub) == 2 and sub.shape == (2, H, W)
        np.testing.assert_array_equal(sub[1], big[0])
