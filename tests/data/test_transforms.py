"""Detection and segmentation augmentations: boxes, labels, masks and proposals move with the image
(flip, the shapes world's zoom, ViLD's large-scale jitter)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from distill.data.transforms import (
    AUGMENTS,
    IMAGE_MEAN_UINT8,
    DetectionTrainTransform,
    detection_lsj_transforms,
    detection_train_transform,
    detection_train_transforms,
    flip_ops,
    masks_to_boxes,
    segmentation_lsj_transforms,
)


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


# --- ViLD's recipe: flip + large-scale jitter (LSJ) onto a square canvas -----------------------


def _with_proposals(t):
    props = np.array([[0, 0, 40, 32], [60, 50, 80, 64], [2, 58, 6, 63], [10, 10, 70, 60]], np.float32)
    return dict(t, proposals=props, proposal_embeddings=np.eye(4, 6, dtype=np.float32), image_id=7)


def _find_offset(canvas: np.ndarray, resized: np.ndarray) -> tuple[int, int]:
    """Brute force: where in ``resized`` the canvas was cropped from (an independent reference)."""
    s = canvas.shape[0]
    hits = [(x, y) for y in range(resized.shape[0] - s + 1) for x in range(resized.shape[1] - s + 1)
            if np.array_equal(resized[y:y + s, x:x + s], canvas)]
    assert len(hits) == 1, hits
    return hits[0]


def test_augment_names_match_the_config():
    import typing

    from distill.config import DetConfig

    assert AUGMENTS == typing.get_args(typing.get_type_hints(DetConfig)["augment"])
    assert detection_train_transform("none") is None
    with pytest.raises(ValueError, match="flip_zoom"):
        detection_train_transform("jitter")


def test_flip_moves_boxes_masks_and_proposals_exactly():
    img, t = _scene()
    f = DetectionTrainTransform(flip_ops(1.0), seed=0)
    out_img, out = f(img, _with_proposals(t))
    assert np.array_equal(out_img, img[:, ::-1])
    b = t["boxes"]
    assert np.allclose(out["boxes"], np.stack([80 - b[:, 2], b[:, 1], 80 - b[:, 0], b[:, 3]], 1))
    assert np.array_equal(out["masks"], t["masks"][:, :, ::-1]) and out["labels"].tolist() == [4, 7, 9]
    p = _with_proposals(t)["proposals"]
    assert np.allclose(out["proposals"], np.stack([80 - p[:, 2], p[:, 1], 80 - p[:, 0], p[:, 3]], 1))
    assert np.array_equal(out["proposal_embeddings"], np.eye(4, 6)) and out["image_id"] == 7


def test_lsj_shrink_pads_bottom_right_with_the_mean_and_flips():
    """s = 0.5 of a 160 canvas: the 64x80 image keeps its size, sits at the top-left, flipped."""
    img, t = _scene()
    f = detection_lsj_transforms(160, (0.5, 0.5), flip_p=1.0, seed=0)
    out_img, out = f(img, t)
    assert out_img.shape == (160, 160, 3) and out["masks"].shape == (3, 160, 160)
    assert np.array_equal(out_img[:64, :80], img[:, ::-1])
    assert (out_img[64:] == IMAGE_MEAN_UINT8).all() and (out_img[:, 80:] == IMAGE_MEAN_UINT8).all()
    assert not out["masks"][:, 64:].any() and not out["masks"][:, :, 80:].any()
    b = t["boxes"]
    assert np.allclose(out["boxes"], np.stack([80 - b[:, 2], b[:, 1], 80 - b[:, 0], b[:, 3]], 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lsj_zoom_in_crops_and_drops_what_leaves_the_canvas(seed):
    """s = 1.6 of a 100 canvas: longer side 160 (x2), then a random 100x100 crop. The crop offset
    is found by brute force against cv2.resize; boxes, masks, proposals and the dropped objects
    are checked against that reference."""
    img, t = _scene()
    s = _with_proposals(t)
    f = detection_lsj_transforms(100, (1.6, 1.6), flip_p=0.0, seed=seed)
    out_img, out = f(img, {k: v for k, v in s.items() if k != "masks"})
    resized = cv2.resize(img, (160, 128), interpolation=cv2.INTER_LINEAR)
    ox, oy = _find_offset(out_img, resized)
    off = np.array([ox, oy, ox, oy], np.float32)

    def expect(boxes):
        e = np.clip(2 * boxes - off, 0, 100)
        keep = (e[:, 2] - e[:, 0]) * (e[:, 3] - e[:, 1]) >= 1
        return e[keep], np.flatnonzero(keep)

    eb, ek = expect(t["boxes"])
    assert np.allclose(out["boxes"], eb, atol=1e-3) and out["labels"].tolist() == t["labels"][ek].tolist()
    ep, pk = expect(s["proposals"])
    assert np.allclose(out["proposals"], ep, atol=1e-3)
    assert np.array_equal(out["proposal_embeddings"], np.eye(4, 6, dtype=np.float32)[pk])
    # with masks, from the same seed: masks are the crop of the nearest-resized masks, boxes their
    # tight boxes, within 1 px of the transformed boxes
    out_img2, out_m = detection_lsj_transforms(100, (1.6, 1.6), flip_p=0.0, seed=seed)(img, s)
    assert np.array_equal(out_img2, out_img)
    ref = np.stack([cv2.resize(m, (160, 128), interpolation=cv2.INTER_NEAREST)[oy:oy + 100, ox:ox + 100] for m in t["masks"]])
    present = ref.any(axis=(1, 2))
    assert out_m["labels"].tolist() == t["labels"][present].tolist()
    assert np.array_equal(out_m["masks"], ref[present])
    assert np.array_equal(out_m["boxes"], masks_to_boxes(out_m["masks"]))
    close = {int(k): b for k, b in zip(ek, eb)}
    for lab, box in zip(out_m["labels"], out_m["boxes"]):
        k = int(np.flatnonzero(t["labels"] == lab)[0])
        assert np.abs(box - close[k]).max() <= 1.0


def test_lsj_output_is_always_the_canvas_with_valid_boxes():
    img, t = _scene()
    f = detection_lsj_transforms(96, seed=0)  # ViLD's 0.1-2.0
    sizes = set()
    for _ in range(30):
        out_img, out = f(img, _with_proposals(t))
        assert out_img.shape == (96, 96, 3) and out_img.dtype == np.uint8
        assert out["masks"].shape == (len(out["labels"]), 96, 96)
        for key in ("boxes", "proposals"):
            b = out[key]
            assert ((b >= 0) & (b <= 96)).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert len(out["proposals"]) == len(out["proposal_embeddings"])
        sizes.add(int((out_img != IMAGE_MEAN_UINT8).any(2).any(0).sum()))
    assert len(sizes) > 10  # the scale really varies


def test_seeded_transforms_repeat_and_unseeded_follow_torch():
    img, t = _scene()
    a, b = detection_lsj_transforms(96, seed=3), detection_lsj_transforms(96, seed=3)
    for _ in range(3):
        (ia, ta), (ib, tb) = a(img, t), b(img, t)
        assert np.array_equal(ia, ib) and np.array_equal(ta["masks"], tb["masks"]) and np.array_equal(ta["boxes"], tb["boxes"])
    f = detection_lsj_transforms(96)
    runs = []
    for s in (0, 0, 1):
        torch.manual_seed(s)
        runs.append([f(img, t)[0] for _ in range(2)])
    assert all(np.array_equal(x, y) for x, y in zip(runs[0], runs[1]))
    assert not all(np.array_equal(x, y) for x, y in zip(runs[0], runs[2]))


def test_segmentation_lsj_pads_the_mask_with_ignore():
    img, t = _scene()
    sem = t["masks"][1] * 3
    out_img, out = segmentation_lsj_transforms(160, (0.5, 0.5), seed=0)(img, sem)
    assert out_img.shape == (160, 160, 3) and out.shape == (160, 160)
    assert (out[64:] == 255).all() and (out[:, 80:] == 255).all()
    assert np.array_equal(out[:64, :80], sem) or np.array_equal(out[:64, :80], sem[:, ::-1])


def test_degenerate_input_boxes_are_dropped_and_lsj_pickles():
    import pickle

    img, t = _scene()
    t = dict(t, boxes=np.concatenate([t["boxes"][:2], [[5, 5, 5, 9]]]).astype(np.float32))  # the third is 0 px wide
    f = pickle.loads(pickle.dumps(DetectionTrainTransform(flip_ops(0.0), seed=0)))
    _, out = f(img, {"boxes": t["boxes"], "labels": t["labels"]})
    assert out["labels"].tolist() == [4, 7] and np.allclose(out["boxes"], t["boxes"][:2])
    g = pickle.loads(pickle.dumps(detection_lsj_transforms(160, (0.5, 0.5), flip_p=0.0, seed=0)))
    assert np.array_equal(g(img, t)[0][:64, :80], img)


def test_importing_the_transforms_asks_no_server_for_albumentations_updates():
    """albumentations checks PyPI for a newer release on import unless NO_ALBUMENTATIONS_UPDATE is
    set (2 s a process offline, and a warning): distill sets it, so no URL is opened."""
    import subprocess
    import sys

    code = ("import os, urllib.request as u\n"
            "os.environ.pop('NO_ALBUMENTATIONS_UPDATE', None)\n"
            "def opened(self, url, *a, **k): raise SystemExit(f'opened {getattr(url, \"full_url\", url)}')\n"
            "u.OpenerDirector.open = opened\n"
            "import distill.data.transforms\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
