"""Detection augmentations: boxes, labels and masks move with the image."""

from __future__ import annotations

import numpy as np

from distill.data.transforms import detection_train_transforms, masks_to_boxes


def _scene():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    masks = np.zeros((3, 64, 80), np.uint8)
    masks[0, 25:35, 22:32] = 1
    masks[1, 30:50, 40:79] = 1
    masks[2, 60:64, 0:4] = 1  # in a corner: leaves the image when zoomed in
    target = {"boxes": masks_to_boxes(masks), "labels": np.array([4, 7, 9], np.int64), "masks": masks}
    return img, target


def test_masks_to_boxes_is_the_tight_exclusive_box():
    _, t = _scene()
    assert t["boxes"].tolist() == [[22, 25, 32, 35], [40, 30, 79, 50], [0, 60, 4, 64]]


def test_horizontal_flip_is_exact():
    img, t = _scene()
    f = detection_train_transforms(flip_p=1.0, scale=(1.0, 1.0), seed=0)
    out_img, out = f(img, {"boxes": t["boxes"], "labels": t["labels"]})
    assert np.array_equal(out_img, img[:, ::-1])
    expected = t["boxes"].copy()
    expected[:, [0, 2]] = 80 - t["boxes"][:, [2, 0]]
    assert np.allclose(out["boxes"], expected, atol=1e-4) and out["labels"].tolist() == [4, 7, 9]
    _, out_m = f(img, t)
    assert np.array_equal(out_m["masks"], t["masks"][:, :, ::-1]) and np.allclose(out_m["boxes"], expected)


def test_zoom_moves_boxes_about_the_centre_and_drops_objects_that_leave():
    img, t = _scene()
    f = detection_train_transforms(flip_p=0.0, scale=(2.0, 2.0), seed=0)
    _, out = f(img, {"boxes": t["boxes"], "labels": t["labels"]})
    # object 2 (bottom-left corner) leaves the image; the others scale by 2 about (40, 32), clipped
    assert out["labels"].tolist() == [4, 7]
    c = np.array([40, 32, 40, 32], np.float32)
    expected = np.clip(c + 2 * (t["boxes"][:2] - c), 0, [80, 64, 80, 64])
    assert np.allclose(out["boxes"], expected, atol=1.0)
    _, out_m = f(img, t)
    assert out_m["labels"].tolist() == [4, 7] and out_m["masks"].shape == (2, 64, 80)
    assert np.array_equal(out_m["boxes"], masks_to_boxes(out_m["masks"]))
    assert np.allclose(out_m["boxes"], expected, atol=1.5)


def test_transforms_pickle_for_dataloader_workers():
    import pickle

    from distill.data.transforms import segmentation_train_transforms

    img, t = _scene()
    f = pickle.loads(pickle.dumps(detection_train_transforms(flip_p=1.0, scale=(1.0, 1.0), seed=0)))
    assert np.array_equal(f(img, t)[0], img[:, ::-1])
    g = pickle.loads(pickle.dumps(segmentation_train_transforms(flip_p=1.0, scale=(1.0, 1.0), seed=0)))
    assert np.array_equal(g(img, t["masks"][1])[1], t["masks"][1][:, ::-1])
