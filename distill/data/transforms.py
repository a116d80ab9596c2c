"""Train-time augmentations (albumentations) for detection and segmentation: boxes, instance masks,
proposals and semantic masks move with the image. Evaluation and inference never augment.

Recipes (``det.augment``; :func:`detection_train_transform` builds one from its name):

- ``flip``: horizontal flip (p = 0.5);
- ``flip_zoom``: flip, then an Affine zoom about the centre; the image size is unchanged, so
  batches of the shapes world stay 128x128;
- ``lsj``: ViLD's recipe: flip, then large-scale jitter: the image is resized so its longer side
  is ``round(size * s)``, ``s ~ U(lo, hi)``, and randomly cropped / padded (bottom and right) to
  ``size x size``. ViLD trains at 1024x1024 with s in [0.1, 2.0]: tensorflow/tpu
  models/official/detection/projects/vild/configs/vild_resnet.yaml (``vild_parser``:
  ``output_size: [1024, 1024]``, ``aug_rand_hflip: true``, ``aug_scale_min: 0.1``,
  ``aug_scale_max: 2.0``) and dataloader/vild_parser.py (flip, then
  ``input_utils.resize_and_crop_image``; the precomputed ``roi_boxes`` move with the image).

Detection, ``f(image, target) -> (image, target)``, numpy in and out: ``image (H, W, 3) uint8``;
``target = {"boxes": (N, 4) float32 XYXY absolute pixels, "labels": (N,) int64,
"masks"?: (N, H, W) uint8, "box_embeddings"?: (N, D), "proposals"?: (M, 4) float32 XYXY,
"proposal_embeddings"?: (M, D)}``;
other keys pass through. Boxes are clipped to the new image; objects (and proposals) with less
than 1 px^2 left are dropped with their labels, masks and embeddings; with masks, boxes are the
masks' tight boxes and objects whose mask left the image are dropped.

Segmentation, ``f(image, mask) -> (image, mask)``: ``mask (H, W)`` integer, 255 = ignore (pixels
from outside the image become ``ignore_index``).

Randomness: with ``seed`` the transform draws from its own generator (a fixed stream, for tests);
without, every call seeds it from torch's global generator, which the engine seeds and the
DataLoader seeds per worker, so runs repeat and workers do not repeat each other.
"""

from __future__ import annotations

import os

# albumentations asks PyPI for a newer release on import (a 2 s timeout, a warning offline) unless told not to
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

AUGMENTS = ("none", "flip", "flip_zoom", "lsj")  # det.augment
LSJ_SCALE = (0.1, 2.0)  # ViLD's aug_scale_min, aug_scale_max (see the module docstring)
ZOOM_SCALE = (0.8, 1.25)  # flip_zoom: Affine scale range
# LSJ pads with torchvision's ImageNet mean (the detector's normalisation), i.e. 0 after
# normalising, as ViLD pads its normalised image with 0 and torchvision pads its batches
IMAGE_MEAN_UINT8 = (124, 116, 104)


def flip_ops(p: float = 0.5) -> list:
    return [A.HorizontalFlip(p=p)]


def zoom_ops(scale: tuple[float, float] = ZOOM_SCALE, fill_mask: int = 0) -> list:
    """Zoom about the centre by a factor drawn from ``scale``; the size is unchanged."""
    return [A.Affine(scale=tuple(scale), keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=fill_mask, p=1.0)]


def lsj_ops(size: int, scale: tuple[float, float] = LSJ_SCALE, fill=IMAGE_MEAN_UINT8, fill_mask: int = 0) -> list:
    """Large-scale jitter to a ``size x size`` canvas: longer side to ``round(size * s)`` (one
    resize; s uniform over the whole pixels of ``[size * lo, size * hi]``), then a random crop
    where the image is larger than the canvas and padding at the bottom / right where smaller."""
    lo, hi = max(1, round(size * scale[0])), max(1, round(size * scale[1]))
    return [
        A.LongestMaxSize(max_size=list(range(lo, hi + 1)), interpolation=cv2.INTER_LINEAR),
        A.RandomCrop(height=size, width=size, pad_if_needed=True, pad_position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=fill_mask),
    ]


class _Augment:
    """An albumentations Compose with the seeding rule of the module docstring. A class (not a
    closure) so DataLoader workers can pickle it."""

    def __init__(self, ops: list, seed: int | None = None, **compose_kw) -> None:
        self.seed = seed
        self.aug = A.Compose(ops, seed=seed, **compose_kw)

    def _run(self, **data):
        if self.seed is None:
            self.aug.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        return self.aug(**data)


class DetectionTrainTransform(_Augment):
    """``f(image, target) -> (image, target)`` applying ``ops`` (see the module docstring)."""

    def __init__(self, ops: list, seed: int | None = None) -> None:
        super().__init__(ops, seed, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["index"], min_area=1.0, clip=True))

    def __call__(self, image: np.ndarray, target: dict) -> tuple[np.ndarray, dict]:
        boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(target["labels"], np.int64).reshape(-1)
        n = len(boxes)
        has_props = "proposals" in target
        props = np.asarray(target["proposals"], np.float32).reshape(-1, 4) if has_props else np.zeros((0, 4), np.float32)
        has_blocks = "blocks" in target  # OADP's image blocks (detection/pyramid.py) move like proposals
        blocks = np.asarray(target["blocks"], np.float32).reshape(-1, 4) if has_blocks else np.zeros((0, 4), np.float32)
        # GT boxes, proposals and blocks go through as one box list: index < n is a GT box, then the
        # proposals, then the blocks; degenerate or non-finite input boxes (which albumentations
        # refuses) are dropped
        allb = np.concatenate([boxes, props, blocks])
        ok = np.flatnonzero(np.isfinite(allb).all(1) & (allb[:, 2] > allb[:, 0]) & (allb[:, 3] > allb[:, 1]))
        kw = {"image": image, "bboxes": allb[ok], "index": ok.tolist()}
        has_masks = "masks" in target
        if has_masks and n:
            kw["masks"] = np.asarray(target["masks"], np.uint8)
        r = self._run(**kw)
        idx = np.asarray(r["index"], np.int64).reshape(-1)
        out_boxes = np.asarray(r["bboxes"], np.float32).reshape(-1, 4)
        gt = idx < n
        out = dict(target)
        out["boxes"], out["labels"] = out_boxes[gt], labels[idx[gt]]
        if "box_embeddings" in target:  # one per GT box (the one-stage student's teacher targets)
            out["box_embeddings"] = np.asarray(target["box_embeddings"])[idx[gt]]
        h, w = r["image"].shape[:2]
        if has_masks:
            masks = np.asarray(r["masks"], np.uint8)[idx[gt]] if n else np.zeros((0, h, w), np.uint8)
            nonempty = masks.any(axis=(1, 2))
            masks, out["labels"] = masks[nonempty], out["labels"][nonempty]
            if "box_embeddings" in out:
                out["box_embeddings"] = out["box_embeddings"][nonempty]
            out["boxes"] = masks_to_boxes(masks)
            out["masks"] = masks
        m = len(props)
        if has_props:
            sel = (idx >= n) & (idx < n + m)
            out["proposals"] = out_boxes[sel]
            if "proposal_embeddings" in target:
                out["proposal_embeddings"] = np.asarray(target["proposal_embeddings"])[idx[sel] - n]
        if has_blocks:
            sel = idx >= n + m
            out["blocks"] = out_boxes[sel]
            if "block_embeddings" in target:
                out["block_embeddings"] = np.asarray(target["block_embeddings"])[idx[sel] - n - m]
        return r["image"], out


class SegmentationTrainTransform(_Augment):
    """``f(image, mask) -> (image, mask)`` applying ``ops``; masks are resampled nearest."""

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = self._run(image=image, mask=mask)
        return r["image"], r["mask"]


def detection_train_transforms(flip_p: float = 0.5, scale: tuple[float, float] = ZOOM_SCALE, seed: int | None = None) -> DetectionTrainTransform:
    """Horizontal flip, then a zoom about the centre (``flip_zoom``; the image size is unchanged)."""
    return DetectionTrainTransform(flip_ops(flip_p) + zoom_ops(scale), seed)


def detection_lsj_transforms(size: int = 1024, scale: tuple[float, float] = LSJ_SCALE, flip_p: float = 0.5, seed: int | None = None) -> DetectionTrainTransform:
    """ViLD's augmentation (``lsj``): horizontal flip, then large-scale jitter to ``size x size``."""
    return DetectionTrainTransform(flip_ops(flip_p) + lsj_ops(size, scale), seed)


def detection_train_transform(augment: str, size: int = 0, lsj_scale: tuple[float, ...] = LSJ_SCALE, seed: int | None = None) -> DetectionTrainTransform | None:
    """The detection train augmentation named ``augment`` (one of :data:`AUGMENTS`; ``none`` ->
    None); ``size`` is the LSJ canvas side."""
    if augment == "none":
        return None
    if augment == "flip":
        return DetectionTrainTransform(flip_ops(), seed)
    if augment == "flip_zoom":
        return detection_train_transforms(seed=seed)
    if augment == "lsj":
        return detection_lsj_transforms(size, (float(lsj_scale[0]), float(lsj_scale[1])), seed=seed)
    raise ValueError(f"augment: {augment!r} is not one of {', '.join(AUGMENTS)}")


def segmentation_train_transforms(flip_p: float = 0.5, scale: tuple[float, float] = ZOOM_SCALE, ignore_index: int = 255, seed: int | None = None) -> SegmentationTrainTransform:
    """Flip and zoom about the centre; the new border is ``ignore_index``."""
    return SegmentationTrainTransform(flip_ops(flip_p) + zoom_ops(scale, fill_mask=ignore_index), seed)


def segmentation_crop_transforms(size: int, ignore_index: int = 255, seed: int | None = None) -> SegmentationTrainTransform:
    """Shorter side to ``size``, pad (mask: ``ignore_index``) to at least ``size x size``, a random
    ``size x size`` crop, horizontal flip: the segmentation students' training crops."""
    return SegmentationTrainTransform(
        [
            A.SmallestMaxSize(max_size=size),
            A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
            A.RandomCrop(height=size, width=size),
            *flip_ops(),
        ],
        seed,
    )


def segmentation_lsj_transforms(size: int, scale: tuple[float, float] = LSJ_SCALE, ignore_index: int = 255, seed: int | None = None) -> SegmentationTrainTransform:
    """Flip, then large-scale jitter to ``size x size``; padding is ``ignore_index`` in the mask."""
    return SegmentationTrainTransform(flip_ops() + lsj_ops(size, scale, fill_mask=ignore_index), seed)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 4) float32 XYXY tight boxes (x2, y2 exclusive, like COCO x + w)."""
    n = len(masks)
    out = np.zeros((n, 4), np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(1))
        xs = np.flatnonzero(m.any(0))
        if len(xs):
            out[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out
