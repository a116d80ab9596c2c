"""What the ids of a prediction file mean, through the installed ``distill`` entry point in a
subprocess, from a folder outside the repository.

- ``distill eval det --pred labels.json``, where labels.json is a COCO *dataset* (``distill
  label``'s output: images with ``file_name``, numbered in label order; categories numbered by its
  vocabulary): images are matched to the ground truth's by file name, categories by name. Before,
  the ids were taken literally and perfect boxes scored AP 0 against other images' ground truth.
  An image that is not in the ground truth is one line naming it; predictions of a category the
  ground truth lacks are left out with one note line;
- a plain results list (the COCO results format) keeps its ids as they are;
- ``distill eval seg`` with a prediction folder without ``legend.json`` says, in one note line,
  that its values are read as the ground truth's category ids (before: nothing was said).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_run import lines as _lines
from cli_run import one_line_error as _one_line_error
from cli_run import run as _run
BACKENDS = ("auto", "pycocotools")  # the streaming box evaluator and the reference (load_results)


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _gt() -> dict:
    """Three images under val/, one box each (cat, dog, cat)."""
    images = [{"id": 1 + i, "file_name": f"val/{n}.jpg", "width": 100, "height": 80} for i, n in enumerate("abc")]
    boxes = [[10, 10, 30, 20], [50, 20, 20, 30], [5, 40, 40, 30]]
    anns = [{"id": 1 + i, "image_id": 1 + i, "category_id": [1, 2, 1][i], "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, b in enumerate(boxes)]
    cats = [{"id": 1, "name": "cat", "split": "base"}, {"id": 2, "name": "dog", "split": "novel"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _labels_json(gt: dict) -> dict:
    """The ground truth's boxes as ``distill label`` writes them: images renumbered 1..n in
    another order (names relative to the labelled folder), categories numbered by a vocabulary
    that lists dog first."""
    order = list(reversed(gt["images"]))
    new_img = {im["id"]: k + 1 for k, im in enumerate(order)}
    new_cat = {1: 2, 2: 1}  # cat -> 2, dog -> 1
    return {
        "images": [{"id": new_img[im["id"]], "file_name": im["file_name"].split("/", 1)[1], "width": 100, "height": 80} for im in order],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "Cat"}],
        "annotations": [{"id": a["id"], "image_id": new_img[a["image_id"]], "category_id": new_cat[a["category_id"]],
                         "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]],
    }


def test_det_labels_json_is_matched_by_file_name_and_class_name(tmp_path):
    gt = _gt()
    g = _write(tmp_path / "gt.json", gt)
    pred = _write(tmp_path / "labels.json", _labels_json(gt))
    for backend in BACKENDS:
        r = _run(["eval", "det", "--gt", g, "--pred", pred, "--out", backend, "--backend", backend], tmp_path)
        assert r.returncode == 0 and _lines(r.stderr) == [], r.stderr
        m = json.loads((tmp_path / backend / "metrics.json").read_text())
        assert m["bbox/AP"] == pytest.approx(1.0) and m["bbox/AP_novel"] == pytest.approx(1.0), (backend, m)


def test_det_labels_json_with_an_image_not_in_the_gt_is_one_line(tmp_path):
    gt = _gt()
    g = _write(tmp_path / "gt.json", gt)
    lj = _labels_json(gt)
    lj["images"][1]["file_name"] = "zzz.jpg"
    r = _run(["eval", "det", "--gt", g, "--pred", _write(tmp_path / "labels.json", lj), "--out", "out"], tmp_path)
    _one_line_error(r, "labels.json", "images[1]", "'zzz.jpg'", "gt.json")
    assert not (tmp_path / "out").exists()


def test_det_labels_json_class_unknown_to_the_gt_is_a_note(tmp_path):
    gt = _gt()
    g = _write(tmp_path / "gt.json", gt)
    lj = _labels_json(gt)
    lj["categories"].append({"id": 3, "name": "fish"})
    lj["annotations"].append({"id": 99, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.99})
    r = _run(["eval", "det", "--gt", g, "--pred", _write(tmp_path / "labels.json", lj), "--out", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "labels.json" in lines[0] and "fish" in lines[0] and "gt.json" in lines[0], r.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["bbox/AP"] == pytest.approx(1.0)


def test_det_results_list_keeps_its_ids(tmp_path):
    """The COCO results format: ids are the ground truth's, as before (the file's own order and
    the labels.json renumbering do not apply)."""
    gt = _gt()
    g = _write(tmp_path / "gt.json", gt)
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    r = _run(["eval", "det", "--gt", g, "--pred", _write(tmp_path / "res.json", res), "--out", "out"], tmp_path)
    assert r.returncode == 0 and _lines(r.stderr) == [], r.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["bbox/AP"] == pytest.approx(1.0)
    wrong = [dict(x, image_id={1: 3, 2: 2, 3: 1}[x["image_id"]]) for x in res]  # literal: other images' boxes
    r = _run(["eval", "det", "--gt", g, "--pred", _write(tmp_path / "wrong.json", wrong), "--out", "out2"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out2" / "metrics.json").read_text())["bbox/AP"] < 1.0


def test_seg_prediction_folder_without_legend_is_a_note(tmp_path):
    cats = [{"id": 1, "name": "cat", "split": "base"}, {"id": 2, "name": "dog", "split": "novel"}]
    gt_json = _write(tmp_path / "instances_val.json", {"images": [], "annotations": [], "categories": cats})
    gdir, pdir = tmp_path / "gt", tmp_path / "nolegend"
    gdir.mkdir()
    pdir.mkdir()
    m = np.kron(np.array([[0, 1], [2, 1]], np.uint8), np.ones((4, 4), np.uint8))
    Image.fromarray(m).save(gdir / "a.png")
    Image.fromarray(m).save(pdir / "a.png")
    r = _run(["eval", "seg", "--gt", gdir, "--pred", pdir, "--gt-json", gt_json, "--out", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "nolegend" in lines[0] and "legend.json" in lines[0] and "category ids" in lines[0], r.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["miou/all"] == 1.0
