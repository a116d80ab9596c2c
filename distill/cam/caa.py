"""Class-aware attention affinity (CLIP-ES 3.3): Sinkhorn-normalised attention of the last blocks,
restricted to the boxes around each CAM, propagates the CAM."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch


# ---------------------------------------------------------------------------------------------


def scoremap_boxes(cam: np.ndarray, threshold: float = 0.4) -> list[tuple[int, int, int, int]]:
    """Boxes ``(x0, y0, x1, y1)`` around every contour of ``cam >= threshold * max`` (repo
    utils.scoremap2bbox with multi_contour_eval=True, including its ``min(x1, width - 1)`` clip and
    its ``[0, 0, 0, 0]`` box when nothing is above the threshold)."""
    height, width = cam.shape
    img = (np.clip(cam, 0, None) * 255).astype(np.uint8)
    _, thr = cv2.threshold(img, int(threshold * img.max()), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(thr, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return [(0, 0, 0, 0)]
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
    return boxes


def box_mask(cam: np.ndarray, threshold: float = 0.4) -> np.ndarray:
    """(h, w) float 0/1: the union of :func:`scoremap_boxes` (repo: ``aff_mask[y0:y1, x0:x1] = 1``)."""
    m = np.zeros(cam.shape, np.float32)
    for x0, y0, x1, y1 in scoremap_boxes(cam, threshold):
        m[y0:y1, x0:x1] = 1
    return m


def attention_affinity(attn: Sequence[torch.Tensor] | torch.Tensor, layers: int = 8, power: int = 2) -> torch.Tensor:
    """Affinity ``(N, N)`` from per-block attention ``(1 + N, 1 + N)`` (class token first).

    Patch-to-patch attention of the last ``layers`` blocks averaged; Sinkhorn-style normalisation
    (column then row, three rounds), symmetrised, raised to ``power`` (the repo squares it:
    ``trans_mat @ trans_mat`` once; ``power=1`` keeps the symmetrised affinity).
    """
    a = torch.stack([x[1:, 1:].float() for x in list(attn)[-layers:]]).mean(0)
    t = a / a.sum(0, keepdim=True)
    t = t / t.sum(1, keepdim=True)
    for _ in range(2):
        t = t / t.sum(0, keepdim=True)
        t = t / t.sum(1, keepdim=True)
    t = (t + t.T) / 2
    return torch.linalg.matrix_power(t, power)


def refine_cams(cams: torch.Tensor, affinity: torch.Tensor, box_thresh: float = 0.4) -> torch.Tensor:
    """CAA: ``refined_k = (A * box_mask_k[None, :]) @ cam_k`` for every class map ``cams (K, h, w)``.

    The box mask multiplies the affinity's columns (repo: ``trans_mat * aff_mask`` with
    ``aff_mask (1, n)``), i.e. only patches inside the boxes propagate. Returns ``(K, h, w)``, not
    normalised (normalise with :func:`normalize_cam`, as the repo's ``scale_cam_image`` does).
    """
    k, h, w = cams.shape
    if k == 0:
        return cams.clone()
    masks = torch.stack([torch.from_numpy(box_mask(c.float().cpu().numpy(), box_thresh)) for c in cams])
    src = (masks.to(cams) * cams).reshape(k, h * w)  # (A * m) @ c == A @ (m * c)
    return (src @ affinity.to(cams).T).reshape(k, h, w)


# ---------------------------------------------------------------------------------------------
# Seeds -> masks (CLIP-ES 3.4; repo eval_cam.py / eval_cam_with_crf.py)
