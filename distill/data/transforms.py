"""Train-time augmentations (albumentations): horizontal flip and a small scale jitter that keep
boxes, instance masks and semantic masks consistent with the image. The image size is unchanged
(the jitter is an Affine zoom about the centre), so batches of the shapes world stay 128x128.

Both callables take and return numpy: ``image (H, W, 3) uint8``;
- detection: ``target = {"boxes": (N, 4) float32 XYXY, "labels": (N,) int64, "masks"?: (N, H, W) uint8}``;
- segmentation: ``mask (H, W)`` integer, 255 = ignore (out-of-image pixels become 255).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np


class DetectionTrainTransform:
    """``f(image, target) -> (image, target)``: horizontal flip, then a zoom about the centre.

    Objects pushed out of the image are dropped (with their labels and masks); when masks are
    given, boxes are recomputed as the masks' tight boxes. A class (not a closure) so DataLoader
    workers can pickle it.
    """

    def __init__(self, flip_p: float = 0.5, scale: tuple[float, float] = (0.8, 1.25), seed: int | None = None) -> None:
        self.aug = A.Compose(
            [
                A.HorizontalFlip(p=flip_p),
                A.Affine(scale=scale, keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0),
            ],
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["index"], min_area=1.0, clip=True),
            seed=seed,
        )

    def __call__(self, image: np.ndarray, target: dict) -> tuple[np.ndarray, dict]:
        boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(target["labels"], np.int64).reshape(-1)
        kw = {"image": image, "bboxes": boxes, "index": list(range(len(boxes)))}
        has_masks = "masks" in target
        if has_masks and len(boxes):
            kw["masks"] = np.asarray(target["masks"], np.uint8)
        r = self.aug(**kw)
        idx = np.asarray(r["index"], np.int64).reshape(-1)
        out = {"boxes": np.asarray(r["bboxes"], np.float32).reshape(-1, 4), "labels": labels[idx]}
        h, w = r["image"].shape[:2]
        if has_masks:
            masks = np.asarray(r["masks"], np.uint8)[idx] if len(boxes) else np.zeros((0, h, w), np.uint8)
            nonempty = masks.reshape(len(masks), -1).any(1)
            masks, out["labels"] = masks[nonempty], out["labels"][nonempty]
            out["boxes"] = masks_to_boxes(masks)
            out["masks"] = masks
        return r["image"], out


class SegmentationTrainTransform:
    """``f(image, mask) -> (image, mask)``: flip and zoom; the mask is resampled nearest and the
    new border is ``ignore_index``."""

    def __init__(self, flip_p: float = 0.5, scale: tuple[float, float] = (0.8, 1.25), ignore_index: int = 255, seed: int | None = None) -> None:
        self.aug = A.Compose(
            [
                A.HorizontalFlip(p=flip_p),
                A.Affine(scale=scale, keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index, p=1.0),
            ],
            seed=seed,
        )

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = self.aug(image=image, mask=mask)
        return r["image"], r["mask"]


def detection_train_transforms(flip_p: float = 0.5, scale: tuple[float, float] = (0.8, 1.25), seed: int | None = None) -> DetectionTrainTransform:
    """The default detection train augmentation (see :class:`DetectionTrainTransform`)."""
    return DetectionTrainTransform(flip_p, scale, seed)


def segmentation_train_transforms(flip_p: float = 0.5, scale: tuple[float, float] = (0.8, 1.25), ignore_index: int = 255, seed: int | None = None) -> SegmentationTrainTransform:
    """The default segmentation train augmentation (see :class:`SegmentationTrainTransform`)."""
    return SegmentationTrainTransform(flip_p, scale, ignore_index, seed)


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
