"""From CAMs to masks (CLIP-ES 3.4, the repo's eval_cam_with_crf.py): upsampling, background
score, dense CRF, confidence-guided ignore."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from distill.errors import DistillError


# Dense CRF parameters of the repo (eval_cam_with_crf.py: DenseCRF(iter_max=10, pos_xy_std=1,
# pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4)).
CRF_PARAMS = dict(iter_max=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0)


# ---------------------------------------------------------------------------------------------


def upsample_cams(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) -> (K, H, W): min-max then bilinear resize (pytorch_grad_cam scale_cam_image)."""
    H, W = size
    out = np.zeros((len(cams), H, W), np.float32)
    for i, c in enumerate(cams):
        c = c.astype(np.float32) - c.min()
        c = c / max(float(c.max()), float(np.finfo(np.float32).tiny))  # relative, as normalize_cam
        out[i] = cv2.resize(c, (W, H))
    return out


def dense_crf(image: np.ndarray, probs: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Dense CRF (Krahenbuhl & Koltun) with the repo's parameters. image: (H, W, 3) uint8 RGB;
    probs: (C, H, W) scores. Returns Q (C, H, W). Needs the ``crf`` extra (pydensecrf2).

    Deviation: the repo subtracts the BGR mean and casts to uint8 (which wraps around); we pass the
    image itself, which is what the bilateral kernel's colour distance expects.
    """
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as dutils
    except ImportError:
        raise DistillError("cam.crf=true needs pydensecrf2, which is not installed: pip install 'distill[crf]'") from None
    p = dict(CRF_PARAMS, **(params or {}))
    c, h, w = probs.shape
    u = np.ascontiguousarray(dutils.unary_from_softmax(probs.astype(np.float32)))
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(u)
    d.addPairwiseGaussian(sxy=p["pos_xy_std"], compat=p["pos_w"])
    d.addPairwiseBilateral(sxy=p["bi_xy_std"], srgb=p["bi_rgb_std"], rgbim=np.ascontiguousarray(image), compat=p["bi_w"])
    return np.array(d.inference(int(p["iter_max"]))).reshape(c, h, w)


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def cams_to_mask(
    cams: np.ndarray,
    category_ids: Sequence[int],
    *,
    bg_thresh: float = 0.0,
    bg_power: float = 1.0,
    image: np.ndarray | None = None,
    crf: bool = False,
    conf_thresh: float = 0.0,
    conf_source: str = "prob",
) -> tuple[np.ndarray, np.ndarray]:
    """Class CAMs ``(K, H, W)`` in [0, 1] -> mask ``(H, W) uint8`` (category id, 0 bg, 255 ignore)
    and the per-pixel confidence ``(H, W)``.

    Background score: ``bg_thresh`` if > 0, else ``(1 - max_k cam_k) ** bg_power`` (repo
    eval_cam.py). With ``crf`` the scores go through :func:`dense_crf` and the confidence is its
    posterior (repo eval_cam_with_crf.py); without, ``conf_source="prob"`` is the winning score
    normalised over background + classes, ``"score"`` the winning score itself.
    Pixels with confidence below ``conf_thresh`` become 255 (CLIP-ES 3.4: 0.95).
    """
    K = len(cams)
    if K == 0:
        shape = cams.shape[1:]
        return np.zeros(shape, np.uint8), np.ones(shape, np.float32)
    if bg_thresh > 0:
        bg = np.full((1,) + cams.shape[1:], bg_thresh, np.float32)
    else:
        bg = np.power(1 - cams.max(0, keepdims=True), bg_power).astype(np.float32)
    scores = np.concatenate([bg, cams.astype(np.float32)], 0)
    if crf:
        if image is None:
            raise DistillError("cam.crf: the dense CRF needs the image")
        scores = dense_crf(image, scores)
        prob = scores
    elif conf_source == "prob":
        prob = scores / np.maximum(scores.sum(0, keepdims=True), 1e-7)
    elif conf_source == "score":
        prob = scores
    else:
        raise DistillError(f"cam.conf_source: {conf_source!r} is not one of prob, score")
    label = scores.argmax(0)
    keys = np.asarray([0] + [int(c) for c in category_ids], np.int64)
    mask = keys[label].astype(np.uint8)
    conf = prob.max(0).astype(np.float32)
    if conf_thresh > 0:
        mask[conf < conf_thresh] = 255
    return mask, conf


# ---------------------------------------------------------------------------------------------
# Batched CLIP-ES for a list of images
