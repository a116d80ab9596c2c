"""``distill label --gt``: the ground truth is checked before anything is labelled, as a user runs
it (the installed entry point in a subprocess, from a folder outside the repository, a tiny
random teacher and two 32x32 images).

- a malformed COCO file (a json list, an annotation without ``bbox``, a ``category_id`` not in
  ``categories``, a missing file) is one line naming the file and the entry, exit 2, and nothing
  is written (before, the images were labelled first and the run ended in a traceback, or left
  labels.json with a manifest in state "running" and no metrics.json);
- a ground truth of other images (no ``file_name`` matches) is one line before labelling (before:
  exit 0 with precision -1 and a pixel accuracy over images never labelled);
- a ground truth of more images than were labelled gives ``labels/gt_images_matched`` /
  ``labels/gt_images_unmatched`` and one note line;
- a ground-truth image whose width / height differ from the labelled image is left out of the
  mask metrics with one warning line naming it (before: painted on a canvas of the ground
  truth's size, silently changing ``labels/pixel_acc``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reliability._fixtures import make_teacher_dir, teacher_overrides

EXE = shutil.which("distill") or str(Path(sys.executable).parent / "distill")
VOCAB = "red square, blue circle"
BOX = [8, 6, 16, 14]  # the red block of every image, [x, y, w, h]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("label_gt_cli")
    overrides = teacher_overrides(make_teacher_dir(root / "teacher"))
    (root / "imgs").mkdir()
    for i in range(2):
        img = np.random.default_rng(i).integers(100, 140, (32, 32, 3), dtype=np.uint8)
        x, y, w, h = BOX
        img[y : y + h, x : x + w] = (220, 30, 30)
        Image.fromarray(img).save(root / "imgs" / f"{i}.png")
    return root, overrides


def _gt(names=("imgs/0.png", "imgs/1.png"), size=(32, 32)) -> dict:
    """Ground truth of the images named: one red square each, with its mask (RLE)."""
    from distill.labels import formats

    mask = np.zeros((32, 32), bool)
    x, y, w, h = BOX
    mask[y : y + h, x : x + w] = True
    images = [{"id": 10 + i, "file_name": n, "width": size[0], "height": size[1]} for i, n in enumerate(names)]
    anns = [{"id": 1 + i, "image_id": 10 + i, "category_id": 1, "bbox": BOX, "area": w * h, "iscrowd": 0,
             "segmentation": formats.mask_to_rle(mask)} for i in range(len(names))]
    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue circle", "split": "novel"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _label(world, cwd: Path, gt: Path) -> subprocess.CompletedProcess:
    root, overrides = world
    args = ["label", "--images", root / "imgs", "--vocab", VOCAB, "--model", "teacher", "--out", cwd / "out",
            "--score-thresh", "0", "--proposals", "components", "--gt", gt, *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([EXE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _one_line_error(r, *wants: str) -> str:
    lines = _lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert lines[0].startswith("error: "), lines[0]
    for w in wants:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _no_bbox(gt: dict) -> dict:
    del gt["annotations"][0]["bbox"]
    return gt


def _unknown_category(gt: dict) -> dict:
    gt["annotations"][1]["category_id"] = 999
    return gt


@pytest.mark.parametrize("case, make, wants", [
    ("list", lambda: [_gt()], ["gt.json", "got a list"]),
    ("no bbox", lambda: _no_bbox(_gt()), ["gt.json", "annotations[0].bbox"]),
    ("unknown category", lambda: _unknown_category(_gt()), ["gt.json", "annotations[1].category_id", "999"]),
    ("missing", None, ["gt.json", "not found"]),
])
def test_malformed_gt_is_one_line_before_labelling(world, tmp_path, case, make, wants):
    gt = tmp_path / "gt.json"
    if make is not None:
        _write(gt, make())
    r = _label(world, tmp_path, gt)
    _one_line_error(r, *wants)
    assert not (tmp_path / "out").exists()  # checked before labelling: nothing half-written


def test_gt_of_other_images_is_one_line_before_labelling(world, tmp_path):
    gt = _write(tmp_path / "gt.json", _gt(names=("other/000009.jpg", "other/000010.jpg")))
    r = _label(world, tmp_path, gt)
    _one_line_error(r, "gt.json", "none of its 2 images", "'other/000009.jpg'")
    assert not (tmp_path / "out").exists()


def test_gt_of_more_images_counts_them_with_one_note(world, tmp_path):
    gt = _write(tmp_path / "gt.json", _gt(names=("imgs/0.png", "imgs/1.png", "imgs/extra.png")))
    r = _label(world, tmp_path, gt)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "gt.json" in lines[0] and "1 of its 3" in lines[0] and "imgs/extra.png" in lines[0], r.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["labels/gt_images_matched"] == 2 and m["labels/gt_images_unmatched"] == 1, m
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["state"] == "complete"


def test_gt_size_differing_from_the_image_is_left_out_of_the_masks(world, tmp_path):
    """Image 0 is 32x32; the ground truth says 64x32: its masks are not scored (one warning line
    naming it), its boxes are; the pixel metrics are those of the other image alone."""
    from distill.labels.quality import label_quality

    gt = _gt()
    gt["images"][0]["width"] = 64
    r = _label(world, tmp_path, _write(tmp_path / "gt.json", gt))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "gt.json" in lines[0] and "'0.png'" in lines[0] and "32x32" in lines[0] and "64x32" in lines[0], r.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["labels/gt_images_size_mismatch"] == 1 and m["labels/gt_images_matched"] == 2, m
    alone = _gt(names=("imgs/1.png",))
    ref = label_quality(tmp_path / "out" / "labels.json", alone)
    for k in ("labels/pixel_acc", "labels/miou_all"):
        assert m[k] == pytest.approx(ref[k]), k
    full = label_quality(tmp_path / "out" / "labels.json", _gt(), with_counts=True)
    assert m["labels/recall_all"] == full["labels/recall_all"]  # the boxes of image 0 still count


def test_gt_classes_outside_the_vocabulary_are_left_out_with_one_warning(world, tmp_path):
    """The ground truth also holds 'green triangle', a class the vocabulary does not name: its
    boxes are left out of the metrics (one warning line naming the file and the class) instead of
    counting as misses; the metrics are those of the ground truth without it."""
    from distill.labels.quality import label_quality

    gt = _gt()
    gt["categories"].append({"id": 3, "name": "green triangle", "split": "novel"})
    gt["annotations"] += [{**a, "id": 10 + a["id"], "category_id": 3} for a in gt["annotations"]]
    r = _label(world, tmp_path, _write(tmp_path / "gt.json", gt))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "gt.json: 2 boxes of 1 classes not in the vocabulary (e.g. 'green triangle') are left out" in lines[0], r.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    ref = label_quality(tmp_path / "out" / "labels.json", _gt())
    assert m == pytest.approx(ref), (m, ref)
