"""COCO loading: validation errors, and CocoDetection against pycocotools on a tiny world."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from distill.config import load_config
from distill.data.coco import CocoDetection, collate, load_coco
from distill.data.world import make_world
from distill.errors import DistillError
from distill.vocab import Vocabulary


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("coco") / "run"
    return make_world(load_config(None, [f"work_dir={wd}", "world.num_train=4", "world.num_val=5", "world.num_unlabeled=1"]))


def _valid() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a/1.png", "width": 32, "height": 24}, {"id": 2, "file_name": "2.png"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 5, 6], "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 7, "bbox": [0.5, 0, 4, 4.5]},
        ],
        "categories": [{"id": 3, "name": "red star"}, {"id": 7, "name": "blue circle"}],
    }


def _write(tmp_path: Path, obj, name="ann.json") -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _mutate(path: list, value):
    def f(d):
        x = d
        for k in path[:-1]:
            x = x[k]
        if value is _DELETE:
            del x[path[-1]]
        else:
            x[path[-1]] = value
        return d

    return f


_DELETE = object()

BAD = [
    ("missing key", _mutate(["categories"], _DELETE), "missing key 'categories'"),
    ("not a list", _mutate(["annotations"], {"id": 1}), "annotations: expected a list, got dict"),
    ("image id type", _mutate(["images", 0, "id"], "1"), r"images\[0\].id: '1' is a string, expected an integer"),
    ("image id float", _mutate(["images", 0, "id"], 1.5), r"images\[0\].id: expected an int"),
    ("dup image", _mutate(["images", 1, "id"], 1), r"images\[1\].id: duplicate image id 1"),
    ("abs file", _mutate(["images", 0, "file_name"], "/etc/passwd"), r"images\[0\].file_name: '/etc/passwd' is absolute or contains '..'"),
    ("dotdot file", _mutate(["images", 1, "file_name"], "x/../../2.png"), r"images\[1\].file_name: 'x/../../2.png' is absolute"),
    ("windows abs", _mutate(["images", 1, "file_name"], "C:\\x.png"), r"images\[1\].file_name"),
    ("bad width", _mutate(["images", 0, "width"], 0), r"images\[0\].width: expected a positive int"),
    ("dup cat", _mutate(["categories", 1, "id"], 3), r"categories\[1\].id: duplicate category id 3"),
    ("cat name", _mutate(["categories", 0, "name"], ""), r"categories\[0\].name: expected a non-empty string"),
    ("dup ann", _mutate(["annotations", 1, "id"], 10), r"annotations\[1\].id: duplicate annotation id 10"),
    ("unknown image", _mutate(["annotations", 0, "image_id"], 99), r"annotations\[0\].image_id: unknown image id 99"),
    ("unknown cat", _mutate(["annotations", 1, "category_id"], 5), r"annotations\[1\].category_id: unknown category id 5 \(valid: \[3, 7\]\)"),
    ("nan box", _mutate(["annotations", 0, "bbox"], [1, 2, float("nan"), 3]), r"annotations\[0\].bbox: expected finite numbers"),
    ("negative w", _mutate(["annotations", 0, "bbox"], [1, 2, -3, 3]), r"annotations\[0\].bbox: expected width and height >= 0"),
    ("short box", _mutate(["annotations", 1, "bbox"], [1, 2, 3]), r"annotations\[1\].bbox: expected \[x, y, width, height\]"),
    ("string box", _mutate(["annotations", 1, "bbox"], ["1", 2, 3, 4]), r"annotations\[1\].bbox: expected \[x, y, width, height\]"),
    ("missing bbox", _mutate(["annotations", 1, "bbox"], _DELETE), r"annotations\[1\].bbox"),
    ("bad seg", _mutate(["annotations", 1, "segmentation"], "poly"), r"annotations\[1\].segmentation: expected an RLE object"),
]


@pytest.mark.parametrize("name,mutate,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_coco_is_a_clear_error_naming_file_and_key(tmp_path, name, mutate, pattern):
    p = _write(tmp_path, mutate(copy.deepcopy(_valid())))
    with pytest.raises(DistillError, match=pattern) as e:
        load_coco(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_missing_corrupt_and_non_object_files(tmp_path):
    with pytest.raises(DistillError, match=r"nope.json: file not found"):
        load_coco(tmp_path / "nope.json")
    with pytest.raises(DistillError, match=r"ann.json: not valid json"):
        load_coco(_write(tmp_path, '{"images": ['))
    with pytest.raises(DistillError, match=r"expected a COCO object .* got a list"):
        load_coco(_write(tmp_path, [1, 2]))


def test_valid_file_loads_and_zero_size_boxes_are_counted_skips(tmp_path):
    assert load_coco(_write(tmp_path, _valid())) == _valid()
    d = _valid()
    d["annotations"] += [
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 2, 0, 6]},
        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [1, 2, 4, 0]},
    ]
    with pytest.warns(UserWarning, match=r"skipped 2 annotation\(s\) with a zero-size box"):
        out = load_coco(_write(tmp_path, d))
    assert [a["id"] for a in out["annotations"]] == [10, 11]


def test_dataset_matches_pycocotools_and_the_png(world):
    ds = CocoDetection(world / "instances_val.json", world / "images", masks=True)
    ref = COCO(str(world / "instances_val.json"))
    assert len(ds) == 5 and ds.vocab.ids == tuple(range(1, 37))
    n_boxes = 0
    for i in range(len(ds)):
        img, t = ds[i]
        iid = t["image_id"]
        assert iid == ds.image_ids[i]
        png = cv2.cvtColor(cv2.imread(str(world / "images" / ref.imgs[iid]["file_name"])), cv2.COLOR_BGR2RGB)
        assert img.dtype == torch.float32 and img.shape == (3, 128, 128)
        assert torch.allclose(img, torch.from_numpy(png).permute(2, 0, 1).float() / 255)
        anns = ref.loadAnns(ref.getAnnIds(imgIds=[iid]))
        xywh = np.array([a["bbox"] for a in anns], np.float32)
        expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        assert t["boxes"].dtype == torch.float32 and np.allclose(t["boxes"].numpy(), expected)
        # ids are 1..C in vocabulary order, so the contiguous label is id - 1
        assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [a["category_id"] - 1 for a in anns]
        assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (len(anns), 128, 128)
        for m, a in zip(t["masks"].numpy(), anns):
            assert np.array_equal(m, ref.annToMask(a))
        n_boxes += len(anns)
    assert n_boxes > 5


def test_labels_follow_a_given_vocabulary_by_name(world):
    names = list(json.loads((world / "vocab.json").read_text()))
    rev = Vocabulary(tuple(c["name"] for c in reversed(names)))
    ds = CocoDetection(world / "instances_val.json", world / "images", vocab=rev)
    ref = COCO(str(world / "instances_val.json"))
    _, t = ds[0]
    anns = ref.loadAnns(ref.getAnnIds(imgIds=[t["image_id"]]))
    assert t["labels"].tolist() == [36 - a["category_id"] for a in anns]

    small = Vocabulary(("red star", "blue circle"))
    with pytest.raises(DistillError, match=r"instances_val.json: category 'red circle' \(id 1\) is not in the vocabulary"):
        CocoDetection(world / "instances_val.json", world / "images", vocab=small)
    with pytest.warns(UserWarning, match="outside the vocabulary"):
        ds2 = CocoDetection(world / "instances_val.json", world / "images", vocab=small, skip_unknown=True)
    kept = sum(1 for a in ref.anns.values() if ref.cats[a["category_id"]]["name"] in ("red star", "blue circle"))
    assert ds2.skipped_unknown == len(ref.anns) - kept
    assert sum(len(ds2[i][1]["labels"]) for i in range(len(ds2))) == kept


def test_image_without_boxes_and_collate(world, tmp_path):
    d = json.loads((world / "instances_val.json").read_text())
    first = d["images"][0]["id"]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != first]
    p = _write(tmp_path, d)
    ds = CocoDetection(p, world / "images", masks=True)
    img, t = ds[0]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 128, 128)
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and images[1].shape == (3, 128, 128) and targets[0]["image_id"] == first
    assert targets[1]["boxes"].shape[0] > 0


def test_size_mismatch_and_missing_image(world, tmp_path):
    d = json.loads((world / "instances_val.json").read_text())
    d["images"][0]["width"] = 100
    with pytest.raises(DistillError, match=r"val/000005.png: decoded size 128x128 differs from .*width 100"):
        CocoDetection(_write(tmp_path, d), world / "images")[0]
    d = json.loads((world / "instances_val.json").read_text())
    d["images"][0]["file_name"] = "val/missing.png"
    with pytest.raises(DistillError, match=r"missing.png: file not found"):
        CocoDetection(_write(tmp_path, d), world / "images")[0]


def test_transforms_keep_boxes_on_their_masks(world):
    from distill.data.transforms import detection_train_transforms

    ds = CocoDetection(world / "instances_train.json", world / "images", masks=True,
                       transforms=detection_train_transforms(scale=(0.7, 1.4), seed=0))
    total = 0
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.shape == (3, 128, 128)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        for b, m in zip(t["boxes"].numpy(), t["masks"].numpy()):
            ys, xs = np.nonzero(m)
            assert list(b) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            total += 1
    assert total > 0
    assert math.isfinite(float(img.sum()))
