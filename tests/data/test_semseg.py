"""SemSegDataset on a tiny world: masks equal the PNGs, train_base lookup, and bad masks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from distill.config import load_config
from distill.data.semseg import SemSegDataset
from distill.data.world import make_world
from distill.errors import DistillError


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("seg") / "run"
    return make_world(load_config(None, [f"work_dir={wd}", "world.num_train=4", "world.num_val=3", "world.num_unlabeled=1"]))


def test_items_match_the_pngs(world):
    ds = SemSegDataset(world / "images", world / "instances_val.json", world / "semantic", num_classes=37)
    assert len(ds) == 3
    for i in range(3):
        img, mask = ds[i]
        assert img.shape == (3, 128, 128) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        assert mask.dtype == torch.int64 and mask.shape == (128, 128)
        png = cv2.imread(str(world / "semantic" / ds.file_names[i]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask.numpy(), png)
    assert ds.image_ids == [5, 6, 7]


def test_train_base_masks_found_by_base_name(world):
    ds = SemSegDataset(world / "images", world / "image_labels_train_base.json", world / "semantic" / "train_base")
    full = SemSegDataset(world / "images", world / "image_labels_train.json", world / "semantic")
    novel = [c["id"] for c in json.loads((world / "vocab.json").read_text()) if c["split"] == "novel"]
    n_ignored = 0
    for i in range(len(ds)):
        assert ds.mask_path(i) == world / "semantic" / "train_base" / Path(ds.file_names[i]).name
        m_base, m_full = ds[i][1].numpy(), full[i][1].numpy()
        assert np.array_equal(m_base, np.where(np.isin(m_full, novel), 255, m_full))
        n_ignored += int((m_base == 255).sum())
    assert n_ignored > 0


def test_bad_masks_are_errors_naming_the_png(world, tmp_path):
    names = ["val/000005.png"]
    bad = tmp_path / "masks" / "val"
    bad.mkdir(parents=True)
    Image.fromarray(np.zeros((64, 128), np.uint8)).save(bad / "000005.png")
    with pytest.raises(DistillError, match=r"masks/val/000005.png: mask is 128x64, its image val/000005.png is 128x128"):
        SemSegDataset(world / "images", names, tmp_path / "masks")[0]
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(bad / "000005.png")
    with pytest.raises(DistillError, match=r"000005.png: mask has mode RGB"):
        SemSegDataset(world / "images", names, tmp_path / "masks")[0]
    m = np.zeros((128, 128), np.uint8)
    m[0, 0], m[1, 1] = 40, 255
    Image.fromarray(m).save(bad / "000005.png")
    with pytest.raises(DistillError, match=r"000005.png: mask values \[40\] outside 0..36"):
        SemSegDataset(world / "images", names, tmp_path / "masks", num_classes=37)[0]
    with pytest.raises(DistillError, match=r"missing/val/000005.png: mask not found"):
        SemSegDataset(world / "images", names, tmp_path / "missing")[0]


def test_segmentation_transform_flips_and_fills_ignore(world):
    from distill.data.transforms import segmentation_train_transforms

    base = SemSegDataset(world / "images", world / "instances_val.json", world / "semantic")
    flip = SemSegDataset(world / "images", world / "instances_val.json", world / "semantic",
                         transforms=segmentation_train_transforms(flip_p=1.0, scale=(1.0, 1.0), seed=0))
    (img0, m0), (img1, m1) = base[0], flip[0]
    assert torch.equal(img1, img0.flip(-1)) and torch.equal(m1, m0.flip(-1))
    shrink = SemSegDataset(world / "images", world / "instances_val.json", world / "semantic",
                           transforms=segmentation_train_transforms(flip_p=0.0, scale=(0.5, 0.5), seed=0))
    _, m2 = shrink[0]
    # zooming out by 2 leaves a border of about 32 px that is ignore (255)
    assert (m2[:30] == 255).all() and (m2[-30:] == 255).all() and (m2[40:88, 40:88] != 255).all()


def test_16_bit_label_pngs_read_as_the_labeler_writes_them(world, tmp_path):
    """Above 254 classes the labeler writes 16-bit PNGs (mode I;16): 255 is a class there and
    65535 the ignore value. The dataset reads them with the evaluation's reader."""
    from distill.data.semseg import read_mask
    from distill.eval.segmentation import read_label_png

    names = ["val/000005.png"]
    d = tmp_path / "masks16" / "val"
    d.mkdir(parents=True)
    m = np.zeros((128, 128), np.uint16)
    m[:10], m[10:20], m[20:30] = 300, 255, 65535
    Image.fromarray(m).save(d / "000005.png")
    with Image.open(d / "000005.png") as im:
        assert im.mode == "I;16"
    raw = read_mask(d / "000005.png")
    assert raw.dtype == np.uint16 and np.array_equal(raw, m)
    assert np.array_equal(read_label_png(d / "000005.png"), m.astype(np.int64))
    _, mask = SemSegDataset(world / "images", names, tmp_path / "masks16", num_classes=301, ignore_index=65535)[0]
    assert torch.equal(mask, torch.from_numpy(m.astype(np.int64)))
    with pytest.raises(DistillError, match=r"000005.png: mask values \[300\] outside 0..299 \(and 65535 = ignore\)"):
        SemSegDataset(world / "images", names, tmp_path / "masks16", num_classes=300, ignore_index=65535)[0]
    # the dataset's ignore index stands for the file's (65535); a class equal to it is an error
    with pytest.raises(DistillError, match=r"000005.png: 16-bit mask holds class 255, the ignore_index"):
        SemSegDataset(world / "images", names, tmp_path / "masks16", num_classes=301)[0]
    m[10:20] = 7
    Image.fromarray(m).save(d / "000005.png")
    _, mask = SemSegDataset(world / "images", names, tmp_path / "masks16", num_classes=301)[0]
    assert set(mask.unique().tolist()) == {0, 7, 300, 255} and (mask[20:30] == 255).all()
