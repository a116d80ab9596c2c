"""LVIS federated evaluation (distill/eval/lvis.py) against the official ``lvis`` package's LVISEval."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from distill.errors import DistillError
from distill.eval.detection import DetectionEvaluator, evaluate_detection, format_table

H, W = 160, 200
KEYS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "APs": "APs", "APm": "APm", "APl": "APl",
        "APr": "AP_r", "APc": "AP_c", "APf": "AP_f"}


def _poly(rng, x, y, w, h) -> list[float]:
    """A convex-ish polygon inside the box (integer box corners, so the box is exact in float32)."""
    k = int(rng.integers(4, 8))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    r = rng.uniform(0.6, 1.0, k)
    px = x + w / 2 + r * np.cos(ang) * w / 2
    py = y + h / 2 + r * np.sin(ang) * h / 2
    return [float(v) for xy in zip(px, py) for v in xy]


def _box(rng):
    s = float(rng.choice([8, 20, 40, 70, 150]))  # small, medium and large areas
    w = int(np.clip(rng.normal(s, s / 4), 3, W - 1))
    h = int(np.clip(rng.normal(s * 0.8, s / 4), 3, H - 1))
    return int(rng.integers(0, W - w)), int(rng.integers(0, H - h)), w, h


def make_lvis(seed=0, n_images=20, n_cats=15):
    """A random LVIS v1-format ground truth with polygon masks, r/c/f categories, negative and
    not-exhaustive category lists."""
    rng = np.random.default_rng(seed)
    freqs = ["r", "c", "f"] * (n_cats // 3) + ["f"] * (n_cats % 3)
    cats = [{"id": 10 + k, "name": f"thing_{k}", "frequency": freqs[k], "synonyms": [f"thing_{k}"]} for k in range(n_cats)]
    images, anns = [], []
    for i in range(n_images):
        img_id = 1000 + 3 * i
        pos = sorted(rng.choice(n_cats, int(rng.integers(1, 5)), replace=False).tolist())
        for k in pos:
            for _ in range(int(rng.integers(1, 4))):
                x, y, w, h = _box(rng)
                poly = _poly(rng, x, y, w, h)
                rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
                anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 10 + k, "segmentation": [poly],
                             "bbox": [float(v) for v in mask_util.toBbox(rle)], "area": float(mask_util.area(rle))})
        rest = [k for k in range(n_cats) if k not in pos]
        neg = rng.choice(rest, int(rng.integers(0, 5)), replace=False).tolist()
        nel = [k for k in pos if rng.random() < 0.3]
        images.append({"id": img_id, "height": H, "width": W, "coco_url": f"http://x/{img_id}.jpg",
                       "neg_category_ids": [10 + k for k in neg], "not_exhaustive_category_ids": [10 + k for k in nel]})
    return {"images": images, "annotations": anns, "categories": cats}


def _rle(poly) -> dict:
    r = mask_util.merge(mask_util.frPyObjects([poly], H, W))
    r["counts"] = r["counts"].decode("ascii")
    return r


def make_results(gt, seed=0, extra_per_image=12):
    """Detections: jittered copies of most GT boxes (right or wrong category), random boxes on any
    category (positive, negative, not exhaustive, or neither), random scores (float32 values)."""
    rng = np.random.default_rng(seed + 100)
    n_cats = len(gt["categories"])
    res = []
    for a in gt["anns_sorted"] if "anns_sorted" in gt else gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        j = rng.integers(-3, 4, 4)
        x2, y2 = max(0, int(x) + j[0]), max(0, int(y) + j[1])
        w2, h2 = max(2, int(w) + j[2]), max(2, int(h) + j[3])
        cat = a["category_id"] if rng.random() < 0.8 else 10 + int(rng.integers(n_cats))
        res.append({"image_id": a["image_id"], "category_id": cat, "bbox": [float(x2), float(y2), float(w2), float(h2)],
                    "score": float(np.float32(rng.random())),
                    "segmentation": _rle([v + (j[0] if k % 2 == 0 else j[1]) for k, v in enumerate(a["segmentation"][0])])})
    for im in gt["images"]:
        for _ in range(extra_per_image):
            x, y, w, h = _box(rng)
            res.append({"image_id": im["id"], "category_id": 10 + int(rng.integers(n_cats)), "bbox": [float(x), float(y), float(w), float(h)],
                        "score": float(np.float32(rng.random() * 0.7)), "segmentation": _rle(_poly(rng, x, y, w, h))})
    return res


def lvis_reference(gt: dict, results: list, iou_type: str, tmp_path, monkeypatch) -> dict:
    """The official lvis 0.5.3 LVISEval numbers (it calls np.float, gone since NumPy 1.24: patched)."""
    pytest.importorskip("lvis", reason="lvis 0.5.3 (make venv installs it with --no-deps)")
    from lvis import LVIS, LVISEval, LVISResults

    monkeypatch.setattr(np, "float", float, raising=False)
    path = tmp_path / "lvis_gt.json"
    path.write_text(json.dumps(gt))
    lgt = LVIS(str(path))
    dt = LVISResults(lgt, copy.deepcopy(results), max_dets=300)
    ev = LVISEval(lgt, dt, iou_type)
    ev.run()
    return {KEYS[k]: float(v) for k, v in ev.get_results().items() if k in KEYS}


@pytest.fixture
def lvis_case(tmp_path):
    gt = make_lvis(0)
    res = make_results(gt, 0)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return gt, res, path


def _max_diff(ours: dict, ref: dict, t: str) -> float:
    return max(abs(ours[f"{t}/{k}"] - v) for k, v in ref.items())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_lvis_api(seed, tmp_path, monkeypatch):
    gt = make_lvis(seed)
    res = make_results(gt, seed)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ours = evaluate_detection(path, res, iou_types=("bbox", "segm"), out_dir=tmp_path / "out")
    for t in ("bbox", "segm"):
        ref = lvis_reference(gt, res, t, tmp_path, monkeypatch)
        assert all(v > -1 for v in ref.values()), ref  # every number is defined on this fixture
        assert _max_diff(ours, ref, t) < 1e-4, (t, ours, ref)
        # LVIS rare = novel (no split field): AP_novel is AP_r
        assert ours[f"{t}/AP_novel"] == pytest.approx(ours[f"{t}/AP_r"], abs=1e-12)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == ours
    assert all(isinstance(v, float) for v in ours.values())
    # a dict ground truth gives the same numbers as the file
    assert evaluate_detection(gt, res, iou_types=("bbox", "segm")) == ours


def test_evaluator_streams_the_same(lvis_case, tmp_path):
    """DetectionEvaluator (predictions per image, masks as arrays) = evaluate_detection."""
    gt, res, path = lvis_case
    ref = evaluate_detection(path, res, iou_types=("bbox", "segm"))
    ev = DetectionEvaluator(path, iou_types=("bbox", "segm"))
    assert ev.max_dets == 300
    by_img: dict[int, list] = {im["id"]: [] for im in gt["images"]}
    for r in res:
        by_img[r["image_id"]].append(r)
    label = {c["id"]: i for i, c in enumerate(gt["categories"])}
    ids = list(by_img)
    for b in range(0, len(ids), 3):
        batch = ids[b : b + 3]
        preds = []
        for i in batch:
            rs = sorted(by_img[i], key=lambda r: -r["score"])  # stable: the results' order for ties
            boxes = torch.tensor([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]] for r in rs]).reshape(-1, 4)
            masks = torch.from_numpy(np.stack([mask_util.decode(r["segmentation"]) for r in rs])) if rs else torch.zeros(0, H, W)
            preds.append({"boxes": boxes, "scores": torch.tensor([r["score"] for r in rs]),
                          "labels": torch.tensor([label[r["category_id"]] for r in rs], dtype=torch.int64), "masks": masks})
        ev.process(batch, preds)
    got = ev.evaluate()
    assert got.keys() == ref.keys()
    assert max(abs(got[k] - ref[k]) for k in ref) < 1e-9


def test_unevaluated_category_changes_nothing(lvis_case):
    """A detection of a category neither positive nor negative in its image is not judged."""
    gt, res, path = lvis_case
    base = evaluate_detection(path, res, iou_types=("bbox", "segm"))
    pos = {(a["image_id"], a["category_id"]) for a in gt["annotations"]}
    extra = []
    for im in gt["images"]:
        known = {c for (i, c) in pos if i == im["id"]} | set(im["neg_category_ids"])
        free = [c["id"] for c in gt["categories"] if c["id"] not in known]
        for c in free[:2]:  # confident false positives
            extra.append({"image_id": im["id"], "category_id": c, "bbox": [1.0, 1.0, 50.0, 40.0], "score": 0.99,
                          "segmentation": _rle(_poly(np.random.default_rng(0), 1, 1, 50, 40))})
    assert extra
    assert evaluate_detection(path, res + extra, iou_types=("bbox", "segm")) == base
    # the same boxes on a negative category are false positives and lower the AP
    neg = [dict(e, category_id=im["neg_category_ids"][0]) for e in extra for im in gt["images"]
           if im["id"] == e["image_id"] and im["neg_category_ids"]]
    assert evaluate_detection(path, res + neg)["bbox/AP"] < base["bbox/AP"]


def test_not_exhaustive_unmatched_is_no_false_positive(lvis_case):
    gt, res, path = lvis_case
    base = evaluate_detection(path, res)
    im = next(i for i in gt["images"] if i["not_exhaustive_category_ids"])
    c = im["not_exhaustive_category_ids"][0]
    fp = [{"image_id": im["id"], "category_id": c, "bbox": [150.0, 110.0, 9.0, 9.0], "score": 0.999}]
    assert evaluate_detection(path, res + fp) == base


def test_at_most_300_per_image(tmp_path, monkeypatch):
    """The 300 best of an image over all categories are kept: a true positive ranked 301st is cut."""
    gt = make_lvis(3, n_images=4)
    im = gt["images"][0]
    a = next(x for x in gt["annotations"] if x["image_id"] == im["id"])
    neg = im["neg_category_ids"] or [c["id"] for c in gt["categories"] if c["id"] != a["category_id"]][:1]
    im["neg_category_ids"] = neg
    im["not_exhaustive_category_ids"] = []
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    fps = [{"image_id": im["id"], "category_id": neg[0], "bbox": [0.0, 0.0, 5.0 + k % 7, 5.0], "score": 0.9 - k * 1e-4}
           for k in range(300)]
    tp = [{"image_id": im["id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.1}]
    k = gt["categories"].index(next(c for c in gt["categories"] if c["id"] == a["category_id"]))
    name = gt["categories"][k]["name"]
    cut = evaluate_detection(path, fps + tp)
    kept = evaluate_detection(path, fps[:299] + tp)
    assert cut.get(f"bbox/AP50/{name}", 0.0) == 0.0 and kept[f"bbox/AP50/{name}"] > 0
    assert evaluate_detection(path, fps + tp, max_dets=100) == cut  # the LVIS protocol's 300, whatever is asked
    ref = lvis_reference(gt, fps + tp, "bbox", tmp_path, monkeypatch)
    assert _max_diff(cut, ref, "bbox") < 1e-4


def test_protocol_dispatch_and_table(lvis_case, tmp_path, caplog):
    gt, res, path = lvis_case
    with caplog.at_level(logging.INFO, logger="distill.eval.detection"):
        m = evaluate_detection(path, res)
    assert "LVIS federated" in caplog.text
    assert {"bbox/AP_r", "bbox/AP_c", "bbox/AP_f", "bbox/APs", "bbox/APm", "bbox/APl", "bbox/AP50_novel"} <= m.keys()
    assert "AP_r" in format_table(m).splitlines()[0]
    # the same file without the federated lists is COCO (said in a warning)
    coco = copy.deepcopy(gt)
    for im in coco["images"]:
        del im["neg_category_ids"], im["not_exhaustive_category_ids"]
    p2 = tmp_path / "coco.json"
    p2.write_text(json.dumps(coco))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        c = evaluate_detection(p2, res)
    assert "bbox/AP_r" not in c and "evaluated as COCO" in caplog.text


def _one_line_error(gt_json, res, match):
    with pytest.raises(DistillError, match=match) as e:
        evaluate_detection(gt_json, res)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_errors_name_file_and_field(lvis_case, tmp_path):
    gt, res, _ = lvis_case
    bad = copy.deepcopy(gt)
    del bad["categories"][4]["frequency"]
    p = tmp_path / "nofreq.json"
    p.write_text(json.dumps(bad))
    msg = _one_line_error(p, res, "frequency")
    assert str(p) in msg and "categories[4]" in msg
    _one_line_error(bad, res, "categories\\[4\\].*frequency")
    bad = copy.deepcopy(gt)
    del bad["images"][7]["not_exhaustive_category_ids"]
    p = tmp_path / "nonel.json"
    p.write_text(json.dumps(bad))
    msg = _one_line_error(p, res, "not_exhaustive_category_ids")
    assert str(p) in msg and "images[7]" in msg
    _one_line_error(bad, res, "images\\[7\\].*not_exhaustive_category_ids")
    bad = copy.deepcopy(gt)
    bad["images"][2]["neg_category_ids"] = [99999]
    p = tmp_path / "badneg.json"
    p.write_text(json.dumps(bad))
    _one_line_error(p, res, "neg_category_ids.*99999")


def test_string_ids_and_odd_boxes_in_an_lvis_file(lvis_case, tmp_path, caplog):
    gt, res, _ = lvis_case
    bad = copy.deepcopy(gt)
    bad["annotations"][3]["image_id"] = str(bad["annotations"][3]["image_id"])
    p = tmp_path / "strid.json"
    p.write_text(json.dumps(bad))
    msg = _one_line_error(p, res, r"annotations\[3\].image_id: '\d+' is a string, expected an integer like the ids in 'images'")
    assert str(p) in msg
    odd = copy.deepcopy(gt)
    odd["annotations"][5]["bbox"] = [W + 10.0, 5.0, 20.0, 20.0]  # right of the image; its mask area is kept
    p = tmp_path / "odd.json"
    p.write_text(json.dumps(odd))
    with caplog.at_level(logging.WARNING, logger="distill.eval.detection"):
        evaluate_detection(p, res)
    lines = [r.getMessage() for r in caplog.records if "ground-truth box" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{p}: 1 ground-truth box") and "1 outside its image" in lines[0], lines
    assert "first: annotations[5]" in lines[0] and "the LVIS API" in lines[0]
