"""The ground truth for evaluation (distill/eval/gt.py): a COCO file read item by item into the
streaming evaluator's flat arrays equals the one read whole, and a bad file gives the same
one-line error on every backend (the checks are the COCO validator's, distill/data/coco.py)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from distill.errors import DistillError
from distill.eval.coco_stream import BoxGT
from distill.eval.detection import DetectionEvaluator, evaluate_detection

from .test_detection import make_gt
from .test_stream_eval import random_world


def _same_box_gt(a: BoxGT, b: BoxGT) -> None:
    assert a.img_ids == b.img_ids and a.cat_ids == b.cat_ids
    for f in ("key", "box", "crowd", "ignored"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@pytest.mark.parametrize("seed", range(3))
def test_ground_truth_file_is_read_item_by_item(tmp_path, monkeypatch, seed):
    import distill.eval.detection as det
    import distill.eval.gt as gt_mod

    gt, dets = (make_gt()[0], None) if seed == 0 else random_world(seed)  # seed 0: with RLE masks
    # keys in another order than COCO's, and extra keys (all values parsed and skipped)
    shuffled = {"categories": gt["categories"], "info": {"year": 2024, "x": [1, {"y": None}]}, "annotations": gt["annotations"],
                "licenses": [], "images": gt["images"]}
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(shuffled, indent=1 if seed == 1 else None))
    streamed = gt_mod.stream_box_gt(p)
    assert streamed is not None  # not the fallback
    _same_box_gt(streamed[0], BoxGT(gt))
    assert streamed[1] == gt["categories"]
    if dets is not None:
        ref = evaluate_detection(gt, dets, backend="pycocotools")

        def no_load_gt(*a, **k):
            raise AssertionError("the streaming path read the GT with load_gt")

        monkeypatch.setattr(det, "load_gt", no_load_gt)
        monkeypatch.setattr(gt_mod, "load_gt", no_load_gt)
        assert evaluate_detection(p, dets) == pytest.approx(ref, abs=1e-12)
        ev = DetectionEvaluator(p)
        assert ev.streaming and ev.gt is None


def _mutations():
    def dup_image(g):
        g["images"][3]["id"] = g["images"][2]["id"]

    def unknown_image(g):
        g["annotations"][4]["image_id"] = 10**9

    def unknown_cat(g):
        g["annotations"][4]["category_id"] = 99

    def bad_box(g):
        g["annotations"][6]["bbox"] = [1.0, 2.0, -3.0, 4.0]

    def dup_ann(g):
        g["annotations"][7]["id"] = g["annotations"][1]["id"]

    def no_cats(g):
        del g["categories"]

    def empty_cats(g):
        g["categories"] = []

    def ann_not_dict(g):
        g["annotations"][2] = [1, 2]

    def images_not_list(g):
        g["images"] = {"a": 1}

    return [dup_image, unknown_image, unknown_cat, bad_box, dup_ann, no_cats, empty_cats, ann_not_dict, images_not_list]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_bad_ground_truth_files_give_the_same_errors(tmp_path, mutate):
    gt, dets = random_world(0, n_images=10)
    bad = copy.deepcopy(gt)
    mutate(bad)
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(DistillError) as ref:
        evaluate_detection(p, dets, backend="faster")
    with pytest.raises(DistillError) as got:
        evaluate_detection(p, dets)
    assert str(got.value) == str(ref.value)
    with pytest.raises(DistillError) as got:
        DetectionEvaluator(p)
    assert str(got.value) == str(ref.value)


def test_invalid_json_and_unusual_ids_fall_back(tmp_path):
    gt, dets = random_world(1, n_images=8)
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt)[:-40])
    with pytest.raises(DistillError, match="gt.json: not valid json"):
        evaluate_detection(p, dets)
    # string image ids: not for the fast path; load_gt refuses them in one line (COCO ids are
    # integers; faster-coco-eval refuses string ids where pycocotools takes them as dict keys)
    g2 = copy.deepcopy(gt)
    for im in g2["images"]:
        im["id"] = f"img{im['id']:05d}"
    for a in g2["annotations"]:
        a["image_id"] = f"img{a['image_id']:05d}"
    p.write_text(json.dumps(g2))
    import distill.eval.gt as gt_mod

    assert gt_mod.stream_box_gt(p) is None
    with pytest.raises(DistillError, match=r"gt.json: images\[0\].id: 'img\d+' is a string, expected an integer"):
        gt_mod.load_box_gt(p)
    # integer ids beyond int64 do not fit the fast path's arrays: read through load_gt
    g3 = copy.deepcopy(gt)
    for a in g3["annotations"]:
        a["id"] += 2**70
    p.write_text(json.dumps(g3))
    box_gt, _, _ = gt_mod.load_box_gt(p)
    _same_box_gt(box_gt, BoxGT(g3))
