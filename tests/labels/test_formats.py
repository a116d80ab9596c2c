"""Output formats: YOLO lines and COCO RLE on hand examples."""

from __future__ import annotations

import numpy as np

from distill.labels import formats


def test_yolo_and_rle_hand_example():
    anns = [{"category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0]}, {"category_id": 3, "bbox": [0.0, 0.0, 100.0, 200.0]}]
    txt = formats.yolo_lines(anns, width=100, height=200, cat_to_index={3: 0, 7: 2})
    # cx = (10 + 15) / 100, cy = (20 + 20) / 200, w = 30 / 100, h = 40 / 200
    assert txt == "2 0.250000 0.200000 0.300000 0.200000\n0 0.500000 0.500000 1.000000 1.000000\n"
    m = np.zeros((5, 7), bool)
    m[1:3, 2:6] = True
    np.testing.assert_array_equal(formats.rle_to_mask(formats.mask_to_rle(m)), m)
