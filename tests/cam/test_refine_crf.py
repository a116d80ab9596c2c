"""``distill.cam.refine.dense_crf`` itself (pydensecrf2, the ``crf`` extra; ``make`` installs it, so
these run wherever it built, and are skipped only where it is not installed).

The arithmetic it must satisfy: the unary is ``-log p`` and mean-field inference starts from
``softmax(-unary) = p``, so with no iteration, or with both pairwise weights 0, ``Q`` is the input
distribution itself (up to float32 exp/log rounding, ~1e-7); with the repo's parameters ``Q``
stays a distribution per pixel and its argmax snaps a blurry score to the colour edges. The image
is not square, so a width / height mix-up cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest

from distill.cam import refine

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (the crf extra) is not installed")

H, W = 24, 40


def _probs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.random((3, H, W)).astype(np.float32) + 0.05  # > clip (1e-5) everywhere: -log p is exact
    return p / p.sum(0, keepdims=True)


@pytest.mark.parametrize("params", [{"pos_w": 0.0, "bi_w": 0.0}, {"iter_max": 0}])
def test_without_pairwise_messages_q_is_the_input_distribution(params):
    p = _probs()
    img = np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)
    q = refine.dense_crf(img, p, params)
    assert q.shape == (3, H, W) and q.dtype == np.float32
    np.testing.assert_allclose(q, p, rtol=0, atol=1e-6)  # float32 softmax(log p): ~1e-7


def test_with_the_repo_parameters_q_is_a_distribution_that_moves():
    p = _probs()
    img = np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)
    q = refine.dense_crf(img, p)
    assert q.shape == (3, H, W) and (q >= 0).all()
    np.testing.assert_allclose(q.sum(0), 1.0, rtol=0, atol=1e-5)
    assert np.abs(q - p).max() > 0.1  # the pairwise terms did act (10 iterations by default)


def test_crf_snaps_a_blurry_score_to_the_object_on_a_wide_image():
    """A red 28 x 16 rectangle on gray in a 48 x 32 image; the class score is a blurry blob off its
    centre. Plain thresholding covers half of it (IoU 0.51); the CRF's bilateral term pulls the
    mask onto the colour edges (IoU 0.88 measured; 0.8 required, and 0.25 better than plain)."""
    img = np.full((32, 48, 3), 128, np.uint8)
    img[8:24, 10:38] = (220, 30, 30)
    yy, xx = np.mgrid[:32, :48]
    cam = np.exp(-((yy - 18.0) ** 2 / (2 * 6.0**2) + (xx - 27.0) ** 2 / (2 * 10.0**2))).astype(np.float32)[None]
    rect = np.zeros((32, 48), bool)
    rect[8:24, 10:38] = True

    def iou(m):
        return (m & rect).sum() / (m | rect).sum()

    plain, _ = refine.cams_to_mask(cam, [5])
    crf, conf = refine.cams_to_mask(cam, [5], crf=True, image=img)
    assert crf.shape == (32, 48) and set(np.unique(crf)) <= {0, 5}
    assert iou(crf == 5) > 0.8 and iou(crf == 5) > iou(plain == 5) + 0.25, (iou(crf == 5), iou(plain == 5))
    assert conf.min() >= 0.0 and conf.max() <= 1.0 + 1e-6
