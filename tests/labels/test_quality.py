"""Pseudo-label quality against hidden ground truth: hand-computed box precision / recall and mask mIoU."""

from __future__ import annotations

import numpy as np
import pytest

from distill.labels import formats
from distill.labels.quality import label_quality


def _coco(images, anns, cats):
    return {"images": images, "annotations": anns, "categories": cats}


def test_label_quality_hand_example():
    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue circle", "split": "novel"}]
    gt = _coco(
        [{"id": 10, "file_name": "unlabeled/a.png", "width": 20, "height": 20},
         {"id": 11, "file_name": "unlabeled/b.png", "width": 20, "height": 20}],
        [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 10, 10]},
         {"id": 2, "image_id": 10, "category_id": 2, "bbox": [10, 10, 10, 10]},
         {"id": 3, "image_id": 11, "category_id": 1, "bbox": [0, 0, 4, 4]},
         {"id": 4, "image_id": 11, "category_id": 2, "bbox": [5, 5, 5, 5]}],
        cats,
    )
    # Predicted category ids differ from the ground truth's; names match.
    pcats = [{"id": 5, "name": "Blue Circle"}, {"id": 6, "name": "red square"}, {"id": 7, "name": "pink star"}]
    pred = _coco(
        [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}, {"id": 2, "file_name": "b.png", "width": 20, "height": 20}],
        [{"id": 1, "image_id": 1, "category_id": 6, "bbox": [0, 0, 10, 10], "score": 0.9},   # TP base
         {"id": 2, "image_id": 1, "category_id": 6, "bbox": [0, 0, 10, 9], "score": 0.8},    # duplicate: FP base
         {"id": 3, "image_id": 1, "category_id": 5, "bbox": [10, 10, 10, 8], "score": 0.7},  # IoU 0.8: TP novel
         {"id": 4, "image_id": 2, "category_id": 5, "bbox": [0, 0, 4, 4], "score": 0.6},     # wrong class: FP novel
         {"id": 5, "image_id": 2, "category_id": 6, "bbox": [2, 2, 4, 4], "score": 0.5},     # IoU 4/28 < 0.5: FP base
         {"id": 6, "image_id": 2, "category_id": 7, "bbox": [5, 5, 5, 5], "score": 0.4}],    # unknown class: FP
        pcats,
    )
    m = label_quality(pred, gt, with_counts=True)
    assert m["labels/precision_base"] == pytest.approx(1 / 3)
    assert m["labels/recall_base"] == pytest.approx(1 / 2)
    assert m["labels/precision_novel"] == pytest.approx(1 / 2)
    assert m["labels/recall_novel"] == pytest.approx(1 / 2)
    assert m["labels/precision_all"] == pytest.approx(2 / 6)
    assert m["labels/recall_all"] == pytest.approx(2 / 4)
    assert m["labels/f1_base"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert "labels/miou_all" not in m  # no masks
    # At IoU 0.85 the novel match (0.8) fails.
    assert label_quality(pred, gt, iou_thresh=0.85)["labels/recall_novel"] == 0.0


def _hand_case():
    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue circle", "split": "novel"}]
    gt = _coco([{"id": 10, "file_name": "a.png", "width": 20, "height": 20}],
               [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 10, 10]},
                {"id": 2, "image_id": 10, "category_id": 2, "bbox": [10, 10, 10, 10]}], cats)
    pred = _coco([{"id": 1, "file_name": "a.png", "width": 20, "height": 20}],
                 [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},   # TP base
                  {"id": 2, "image_id": 1, "category_id": 1, "bbox": [12, 0, 5, 5], "score": 0.55},   # FP base
                  {"id": 3, "image_id": 1, "category_id": 2, "bbox": [10, 10, 10, 9], "score": 0.45}],  # TP novel
                 cats)
    return pred, gt


def test_threshold_sweep_hand_example(tmp_path):
    """Each threshold keeps the labels scoring at least it: 0.4 keeps all three, 0.5 drops the novel
    TP, 0.6 keeps the base TP alone, 0.95 nothing (precision undefined = -1)."""
    import json

    from distill.labels.quality import threshold_sweep

    pred, gt = _hand_case()
    (tmp_path / "p.json").write_text(json.dumps(pred))
    (tmp_path / "g.json").write_text(json.dumps(gt))
    rows = threshold_sweep(tmp_path / "p.json", tmp_path / "g.json", [0.6, 0.4, 0.5, 0.95])
    assert [r["score_thresh"] for r in rows] == [0.4, 0.5, 0.6, 0.95]
    got = [(r["labels/precision_base"], r["labels/recall_base"], r["labels/precision_novel"], r["labels/recall_novel"]) for r in rows]
    assert got == [(0.5, 1.0, 1.0, 1.0), (0.5, 1.0, -1.0, 0.0), (1.0, 1.0, -1.0, 0.0), (-1.0, 0.0, -1.0, 0.0)]


def test_threshold_sweep_warns_once_about_classes_outside_the_vocabulary(tmp_path):
    """Ground truth of a class the labels never named is left out with one warning line, not one per threshold."""
    import json
    import logging

    from distill.labels.quality import threshold_sweep

    pred, gt = _hand_case()
    gt["categories"] = [*gt["categories"], {"id": 3, "name": "green star", "split": "novel"}]  # not in pred's (shared) list
    gt["annotations"].append({"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 12, 5, 5]})
    (tmp_path / "p.json").write_text(json.dumps(pred))
    (tmp_path / "g.json").write_text(json.dumps(gt))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # the CLI's setup may stop distill's loggers propagating to pytest's
    logger = logging.getLogger("distill.labels.quality")
    logger.addHandler(handler)
    try:
        rows = threshold_sweep(tmp_path / "p.json", tmp_path / "g.json", [0.4, 0.5, 0.6])
    finally:
        logger.removeHandler(handler)
    assert len([r for r in records if "not in the vocabulary" in r.getMessage()]) == 1
    assert rows[0]["labels/recall_novel"] == 1.0  # the green star is not counted as a miss


def test_eval_labels_cli(tmp_path):
    """`distill eval labels` as a user runs it: the table and sweep.json; a bad threshold list is one
    line naming the option, exit 2, nothing written."""
    import json

    from tests.cli_run import run

    pred, gt = _hand_case()
    (tmp_path / "p.json").write_text(json.dumps(pred))
    (tmp_path / "g.json").write_text(json.dumps(gt))
    r = run(["eval", "labels", "--pred", "p.json", "--gt", "g.json", "--thresholds", "0.4,0.6", "--out", "sweep"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "precision_base" in r.stdout and json.loads((tmp_path / "sweep" / "sweep.json").read_text())[1]["labels/precision_base"] == 1.0
    for bad in ("0.4,x", "1.5"):
        r = run(["eval", "labels", "--pred", "p.json", "--gt", "g.json", "--thresholds", bad, "--out", "bad"], cwd=tmp_path)
        assert r.returncode == 2 and "--thresholds: expected" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_label_quality_mask_miou_hand_example():
    cats = [{"id": 1, "name": "a", "split": "base"}, {"id": 2, "name": "b", "split": "novel"}]
    g1 = np.zeros((4, 4), bool); g1[:2, :2] = True   # class a: 4 px
    g2 = np.zeros((4, 4), bool); g2[2:, 2:] = True   # class b: 4 px
    p1 = np.zeros((4, 4), bool); p1[:2, :] = True    # a: 8 px, 4 right
    p2 = np.zeros((4, 4), bool); p2[3:, 2:] = True   # b: 2 px, 2 right
    R = formats.mask_to_rle
    gt = _coco([{"id": 1, "file_name": "x.png", "width": 4, "height": 4}],
               [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "segmentation": R(g1)},
                {"id": 2, "image_id": 1, "category_id": 2, "bbox": [2, 2, 2, 2], "segmentation": R(g2)}], cats)
    pred = _coco([{"id": 1, "file_name": "x.png", "width": 4, "height": 4}],
                 [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 2], "score": 0.9, "segmentation": R(p1)},
                  {"id": 2, "image_id": 1, "category_id": 2, "bbox": [2, 3, 2, 1], "score": 0.8, "segmentation": R(p2)}], cats)
    m = label_quality(pred, gt)
    # bg: gt 8 px, pred 6 px, both 4 -> 4/10; a: 4/8; b: 2/4
    assert m["labels/miou_base"] == pytest.approx((4 / 10 + 4 / 8) / 2)
    assert m["labels/miou_novel"] == pytest.approx(2 / 4)
    assert m["labels/miou_all"] == pytest.approx((4 / 10 + 4 / 8 + 2 / 4) / 3)
    assert m["labels/pixel_acc"] == pytest.approx(10 / 16)


def test_label_quality_scores_only_the_vocabulary_classes(caplog):
    """A ground-truth class the labels' vocabulary does not name ('green star') is left out of the
    box counts, with one warning line; the full-vocabulary case is unchanged."""
    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "green star", "split": "novel"}]
    gt = _coco([{"id": 10, "file_name": "a.png", "width": 20, "height": 20}],
               [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 10, 10]},
                {"id": 2, "image_id": 10, "category_id": 2, "bbox": [10, 10, 5, 5]},
                {"id": 3, "image_id": 10, "category_id": 2, "bbox": [12, 0, 5, 5]}], cats)
    pred = _coco([{"id": 1, "file_name": "a.png", "width": 20, "height": 20}],
                 [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [0, 0, 10, 10], "score": 0.9}], [{"id": 4, "name": "Red Square"}])
    m = label_quality(pred, gt, with_counts=True)
    assert m["count/gt_all"] == 1 and m["count/gt_novel"] == 0 and m["labels/recall_all"] == 1.0, m
    warned = [r.getMessage() for r in caplog.records if "not in the vocabulary" in r.getMessage()]
    assert warned == ["ground truth: 2 boxes of 1 classes not in the vocabulary (e.g. 'green star') are left out of the metrics"], warned
    caplog.clear()
    full = label_quality({**pred, "categories": pred["categories"] + [{"id": 5, "name": "green star"}]}, gt, with_counts=True)
    assert full["count/gt_all"] == 3 and full["labels/recall_all"] == pytest.approx(1 / 3)
    assert not [r for r in caplog.records if "not in the vocabulary" in r.getMessage()]
