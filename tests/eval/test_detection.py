"""COCO box/mask evaluation: faster-coco-eval vs pycocotools, the base/novel split, bad inputs."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from distill.errors import DistillError
from distill.eval.detection import DetectionEvaluator, evaluate_detection, format_table

NAMES = ["red star", "blue circle", "green square", "red circle", "blue star", "green circle"]
SPLIT = ["base", "base", "base", "base", "novel", "novel"]
SUMMARY = ["AP", "AP50", "AP75", "AP_base", "AP_novel", "AP50_base", "AP50_novel"]


def _rle(m: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def _shape_mask(rng, H, W, x0, y0, w, h) -> np.ndarray:
    """A rectangle or an ellipse inside the box."""
    m = np.zeros((H, W), np.uint8)
    if rng.random() < 0.5:
        m[y0 : y0 + h, x0 : x0 + w] = 1
    else:
        yy, xx = np.mgrid[:H, :W]
        cy, cx = y0 + (h - 1) / 2, x0 + (w - 1) / 2
        m[((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1] = 1
    return m


def make_gt(seed=0, n_images=24, H=48, W=64, n_cats=6):
    """A small COCO ground truth with RLE masks and a base/novel split."""
    rng = np.random.default_rng(seed)
    images, anns, masks = [], [], {}
    for i in range(n_images):
        img_id = 100 + i
        images.append({"id": img_id, "file_name": f"val/{img_id:06d}.png", "height": H, "width": W})
        for _ in range(rng.integers(1, 5)):
            w, h = int(rng.integers(6, 30)), int(rng.integers(6, 24))
            x0, y0 = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
            m = _shape_mask(rng, H, W, x0, y0, w, h)
            aid = len(anns) + 1
            rle = _rle(m)
            anns.append({
                "id": aid, "image_id": img_id, "category_id": int(rng.integers(1, n_cats + 1)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)], "area": float(mask_util.area(rle)),
                "iscrowd": 0, "segmentation": rle,
            })
            masks[aid] = m
    cats = [{"id": k + 1, "name": NAMES[k], "split": SPLIT[k]} for k in range(n_cats)]
    return {"images": images, "annotations": anns, "categories": cats}, masks


def _crowd_mask(rng, height: int, width: int) -> np.ndarray:
    """A crowd region: 1-3 overlapping ellipses / rectangles."""
    m = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        w, h = (int(v) for v in rng.integers(6, 40, 2))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        if rng.random() < 0.5:
            m[y0 : y0 + h, x0 : x0 + w] = 1
        else:
            yy, xx = np.mgrid[:height, :width]
            m[((yy - y0 - h / 2) / (h / 2)) ** 2 + ((xx - x0 - w / 2) / (w / 2)) ** 2 <= 1] = 1
    return m


def _crowd_annotation(m: np.ndarray, compressed: bool = False) -> dict:
    """``bbox``, ``area`` and ``segmentation`` of a crowd mask as COCO stores them: RLE with an
    uncompressed ``counts`` list (instances_*.json's crowds) or a compressed string."""
    rle = mask_util.encode(np.asfortranarray(m))
    box, area = [float(v) for v in mask_util.toBbox(rle)], float(mask_util.area(rle))
    if compressed:
        seg = {"counts": rle["counts"].decode("ascii"), "size": list(m.shape)}
    else:  # column-major runs, starting with a run of zeros
        flat = m.flatten(order="F")
        change = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], change, [flat.size]]))
        seg = {"counts": ([0] if flat[0] else []) + [int(c) for c in runs], "size": list(m.shape)}
    return {"bbox": box, "area": area, "segmentation": seg}


def add_crowds(gt: dict, res: list[dict], seed: int) -> None:
    """Crowd regions (iscrowd=1, uncompressed RLE as in COCO) on every third image, each with a
    few detections (box + mask) inside it: a detection on a crowd is ignored, not a false positive."""
    rng = np.random.default_rng(seed + 500)
    cats = [c["id"] for c in gt["categories"]]
    for im in gt["images"][::3]:
        m = _crowd_mask(rng, im["height"], im["width"])
        c = _crowd_annotation(m)
        cat = int(rng.choice(cats))
        gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": im["id"], "category_id": cat, "iscrowd": 1, **c})
        ys, xs = np.nonzero(m)
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(len(ys)))
            y0, x0 = int(ys[k]), int(xs[k])
            part = np.zeros_like(m)
            part[y0 : y0 + 6, x0 : x0 + 6] = 1
            part &= m
            rle = mask_util.encode(np.asfortranarray(part))
            res.append({"image_id": im["id"], "category_id": cat, "bbox": [float(v) for v in mask_util.toBbox(rle)],
                        "score": float(rng.uniform(0.2, 0.9)), "segmentation": {"size": list(m.shape), "counts": rle["counts"].decode("ascii")}})


def gt_as_results(gt, keep=lambda a: True):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0,
         "segmentation": dict(a["segmentation"])}
        for a in gt["annotations"] if keep(a)
    ]


def noisy_results(gt, masks, seed=1):
    """Jittered GT (boxes and shifted masks), misses, wrong classes and random false positives."""
    rng = np.random.default_rng(seed)
    H, W = gt["images"][0]["height"], gt["images"][0]["width"]
    n_cats = len(gt["categories"])
    res = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # a miss
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 2.0, 4)
        bb = [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]
        m = np.roll(masks[a["id"]], (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        cat = a["category_id"] if rng.random() < 0.85 else int(rng.integers(1, n_cats + 1))
        res.append({"image_id": a["image_id"], "category_id": cat, "bbox": bb, "score": float(rng.uniform(0.3, 1.0)),
                    "segmentation": _rle(m)})
    for im in gt["images"]:
        for _ in range(rng.integers(0, 4)):  # false positives
            w, h = int(rng.integers(4, 25)), int(rng.integers(4, 20))
            x0, y0 = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
            res.append({"image_id": im["id"], "category_id": int(rng.integers(1, n_cats + 1)),
                        "bbox": [float(x0), float(y0), float(w), float(h)], "score": float(rng.uniform(0.0, 0.8)),
                        "segmentation": _rle(_shape_mask(rng, H, W, x0, y0, w, h))})
    return res


@pytest.fixture
def world(tmp_path):
    gt, masks = make_gt()
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    res = noisy_results(gt, masks)
    res_path = tmp_path / "res.json"
    res_path.write_text(json.dumps(res))
    return gt, gt_path, res, res_path


def _pycocotools_stats(gt, res, iou_type, cat_ids=None):
    """pycocotools' own summary (stats[0:3] = AP, AP50, AP75), optionally on a category subset."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = copy.deepcopy(gt)
        c.createIndex()
        r = [{k: v for k, v in d.items() if k != ("segmentation" if iou_type == "bbox" else "bbox")} for d in copy.deepcopy(res)]
        dt = c.loadRes(r)
        ev = COCOeval(c, dt, iou_type)
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("crowds", [False, True], ids=["no_crowd", "crowd_rle"])
def test_faster_equals_pycocotools_and_split_averages(world, tmp_path, crowds):
    gt, gt_path, res, res_path = world
    if crowds:  # COCO's crowd regions: iscrowd=1 with uncompressed RLE masks, detections on them
        gt, res = copy.deepcopy(gt), list(res)
        add_crowds(gt, res, 0)
        gt_path.write_text(json.dumps(gt))
        res_path.write_text(json.dumps(res))
    gt_before = json.dumps(gt)
    fast = evaluate_detection(gt_path, res_path, out_dir=tmp_path / "out", iou_types=("bbox", "segm"))
    ref = evaluate_detection(gt_path, res_path, iou_types=("bbox", "segm"), backend="pycocotools")
    assert fast.keys() == ref.keys()
    for k in fast:
        assert fast[k] == pytest.approx(ref[k], abs=1e-6), k
    # the numbers are not trivial: the check would catch a wrong averaging
    for t in ("bbox", "segm"):
        for k in SUMMARY:
            assert 0.05 < fast[f"{t}/{k}"] < 0.99, (t, k, fast[f"{t}/{k}"])
        assert fast[f"{t}/AP50"] > fast[f"{t}/AP"] > 0
        # every category appears in the fixture: one per-class AP50 each
        assert sum(k.startswith(f"{t}/AP50/") for k in fast) == len(gt["categories"])
        # independent: pycocotools' own summarize() over all categories and over each split
        # (COCOeval evaluates each category on its own, so a category subset gives the split AP)
        st = _pycocotools_stats(gt, res, t)
        assert fast[f"{t}/AP"] == pytest.approx(st[0], abs=1e-6)
        assert fast[f"{t}/AP50"] == pytest.approx(st[1], abs=1e-6)
        assert fast[f"{t}/AP75"] == pytest.approx(st[2], abs=1e-6)
        base_ids = [c["id"] for c in gt["categories"] if c["split"] == "base"]
        novel_ids = [c["id"] for c in gt["categories"] if c["split"] == "novel"]
        sb, sn = _pycocotools_stats(gt, res, t, base_ids), _pycocotools_stats(gt, res, t, novel_ids)
        assert fast[f"{t}/AP_base"] == pytest.approx(sb[0], abs=1e-6)
        assert fast[f"{t}/AP50_base"] == pytest.approx(sb[1], abs=1e-6)
        assert fast[f"{t}/AP_novel"] == pytest.approx(sn[0], abs=1e-6)
        assert fast[f"{t}/AP50_novel"] == pytest.approx(sn[1], abs=1e-6)
        one = _pycocotools_stats(gt, res, t, [5])
        assert fast[f"{t}/AP50/blue star"] == pytest.approx(one[1], abs=1e-6)
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == pytest.approx(fast)
    assert json.dumps(gt) == gt_before  # the evaluation does not modify the caller's ground truth
    table = format_table(fast)
    assert f"{100 * fast['bbox/AP_novel']:.1f}" in table and "| segm |" in table


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_ground_truth_as_results_gives_one_and_removing_novel_gives_zero(world, backend):
    gt, gt_path, _, _ = world
    m = evaluate_detection(gt_path, gt_as_results(gt), iou_types=("bbox", "segm"), backend=backend)
    for t in ("bbox", "segm"):
        for k in SUMMARY:
            assert m[f"{t}/{k}"] == pytest.approx(1.0, abs=1e-12), (t, k)
    novel = {c["id"] for c in gt["categories"] if c["split"] == "novel"}
    m = evaluate_detection(gt_path, gt_as_results(gt, lambda a: a["category_id"] not in novel), iou_types=("bbox", "segm"), backend=backend)
    n_base = sum(c["split"] == "base" for c in gt["categories"])
    for t in ("bbox", "segm"):
        assert m[f"{t}/AP_novel"] == 0.0 and m[f"{t}/AP50_novel"] == 0.0
        assert m[f"{t}/AP_base"] == pytest.approx(1.0) and m[f"{t}/AP50_base"] == pytest.approx(1.0)
        assert m[f"{t}/AP"] == pytest.approx(n_base / len(gt["categories"]))
        assert m[f"{t}/AP50/blue star"] == 0.0 and m[f"{t}/AP50/red star"] == pytest.approx(1.0)


def test_ground_truth_without_area_and_iscrowd(world):
    gt, _, res, _ = world
    bare = copy.deepcopy(gt)
    for a in bare["annotations"]:
        del a["area"], a["iscrowd"]
    for backend in ("faster", "pycocotools"):
        assert evaluate_detection(bare, gt_as_results(gt), backend=backend)["bbox/AP"] == pytest.approx(1.0)
        m, ref = evaluate_detection(bare, res, backend=backend), evaluate_detection(gt, res, backend=backend)
        assert m["bbox/AP"] == pytest.approx(ref["bbox/AP"], abs=1e-12)


def test_vocab_overrides_split_and_category_without_gt_is_excluded(world):
    from distill.vocab import Vocabulary

    gt, gt_path, res, _ = world
    gt = copy.deepcopy(gt)
    gt["categories"].append({"id": 7, "name": "pink star", "split": "novel"})  # no annotations
    novel = {c["id"] for c in gt["categories"] if c["split"] == "novel"}
    m = evaluate_detection(gt, gt_as_results(gt, lambda a: a["category_id"] not in novel))
    assert m["bbox/AP_novel"] == 0.0 and m["bbox/AP_base"] == pytest.approx(1.0)
    assert m["bbox/AP"] == pytest.approx(4 / 6)  # pink star (no GT) is not averaged
    assert "bbox/AP50/pink star" not in m
    # a vocabulary that calls every class base: no novel GT, AP_novel is undefined (-1)
    vocab = Vocabulary(tuple(c["name"] for c in gt["categories"]), split=("base",) * 6 + ("novel",), ids=tuple(range(1, 8)))
    m = evaluate_detection(gt, gt_as_results(gt), vocab=vocab)
    assert m["bbox/AP_novel"] == -1.0 and m["bbox/AP_base"] == pytest.approx(1.0)
    assert "| - |" in format_table(m)


def test_empty_predictions_give_zero_with_a_warning(world, caplog):
    gt, gt_path, _, _ = world
    with caplog.at_level(logging.WARNING, logger="distill.eval.detection"):
        m = evaluate_detection(gt_path, [], iou_types=("bbox", "segm"))
    assert any("no predictions" in r.getMessage() for r in caplog.records)
    for t in ("bbox", "segm"):
        for k in SUMMARY:
            assert m[f"{t}/{k}"] == 0.0
    assert m["bbox/AP50/red star"] == 0.0


def test_max_dets_keeps_the_top_scores_per_image(world):
    gt, gt_path, _, _ = world
    res = gt_as_results(gt)
    # 5 extra low-score false positives on every image; with max_dets = (GT per image) they go
    per_img = {}
    for a in gt["annotations"]:
        per_img[a["image_id"]] = per_img.get(a["image_id"], 0) + 1
    fps = [{"image_id": i, "category_id": 1, "bbox": [0.0, 0.0, 2.0, 2.0], "score": 0.1} for i in per_img for _ in range(5)]
    k = max(per_img.values())
    m = evaluate_detection(gt_path, fps + res, max_dets=k)
    assert m["bbox/AP"] == pytest.approx(1.0)
    ref = evaluate_detection(gt_path, fps + res, max_dets=k, backend="pycocotools")
    assert ref["bbox/AP"] == pytest.approx(1.0)


def _write(tmp_path, obj, name="bad.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda r: r[3].update(image_id=999999), "image_id 999999"),
        (lambda r: r[3].update(category_id=42), "category_id 42"),
        (lambda r: r[3].pop("score"), "missing key 'score'"),
        (lambda r: r[3].update(bbox=[1.0, float("nan"), 3.0, 4.0]), "[3].bbox"),
        (lambda r: r[3].update(bbox=[1.0, 2.0]), "[3].bbox"),
    ],
)
def test_bad_results_name_the_file_and_the_key(world, tmp_path, mutate, expect):
    gt, gt_path, res, _ = world
    res = copy.deepcopy(res)
    mutate(res)
    p = _write(tmp_path, json.dumps(res))  # json.dumps writes NaN as the (non-standard) token NaN
    with pytest.raises(DistillError) as e:
        evaluate_detection(gt_path, p, out_dir=tmp_path / "out")
    assert str(p) in str(e.value) and expect in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_bad_files(world, tmp_path):
    gt, gt_path, res, res_path = world
    with pytest.raises(DistillError, match="res_dict.json.*expected a json list"):
        evaluate_detection(gt_path, _write(tmp_path, {"a": 1}, "res_dict.json"))
    with pytest.raises(DistillError, match="broken.json.*not valid json"):
        evaluate_detection(gt_path, _write(tmp_path, "[{", "broken.json"))
    with pytest.raises(DistillError, match="nope.json.*not found"):
        evaluate_detection(tmp_path / "nope.json", res_path)
    bad_gt = {k: v for k, v in gt.items() if k != "categories"}
    with pytest.raises(DistillError, match="gt_bad.json.*'categories'"):
        evaluate_detection(_write(tmp_path, bad_gt, "gt_bad.json"), res_path)
    no_seg = [{k: v for k, v in r.items() if k != "segmentation"} for r in res]
    with pytest.raises(DistillError, match="nos.json.*'segmentation'"):
        evaluate_detection(gt_path, _write(tmp_path, no_seg, "nos.json"), iou_types=("segm",))
    with pytest.raises(DistillError, match="iou types"):
        evaluate_detection(gt_path, res_path, iou_types=("keypoints",))


def _as_predictions(gt, results, vocab_ids):
    """COCO results -> per-image tensors (xyxy boxes, scores, label indices, masks)."""
    H, W = gt["images"][0]["height"], gt["images"][0]["width"]
    idx = {cid: i for i, cid in enumerate(vocab_ids)}
    preds = {im["id"]: {"boxes": [], "scores": [], "labels": [], "masks": []} for im in gt["images"]}
    for r in results:
        x, y, w, h = r["bbox"]
        p = preds[r["image_id"]]
        p["boxes"].append([x, y, x + w, y + h])
        p["scores"].append(r["score"])
        p["labels"].append(idx[r["category_id"]])
        p["masks"].append(mask_util.decode(r["segmentation"]))
    out = {}
    for i, p in preds.items():
        n = len(p["scores"])
        out[i] = {
            "boxes": torch.tensor(p["boxes"], dtype=torch.float64).reshape(n, 4),
            "scores": torch.tensor(p["scores"], dtype=torch.float32),
            "labels": torch.tensor(p["labels"], dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(p["masks"])).float()[:, None] if n else torch.zeros(0, 1, H, W),
        }
    return out


def test_streaming_evaluator_equals_file_evaluation(world, tmp_path):
    gt, gt_path, res, _ = world
    ids = [c["id"] for c in gt["categories"]]
    preds = _as_predictions(gt, res, ids)
    ev = DetectionEvaluator(gt_path, iou_types=("bbox", "segm"), out_dir=tmp_path / "ev")
    img_ids = list(preds)
    for s in range(0, len(img_ids), 5):
        batch = img_ids[s : s + 5]
        ev.process(batch, [preds[i] for i in batch])
    m = ev.evaluate()
    ref = evaluate_detection(gt_path, res, iou_types=("bbox", "segm"))
    for k in ref:
        assert m[k] == pytest.approx(ref[k], abs=1e-5), k  # boxes went through float32 scores
    assert (tmp_path / "ev" / "metrics.json").is_file()
    # reset, then only half the images: evaluated over the processed images only
    ev.reset()
    half = img_ids[: len(img_ids) // 2]
    ev.process(half, [preds[i] for i in half])
    sub = ev.evaluate()
    ref_sub = evaluate_detection(gt_path, res, iou_types=("bbox", "segm"), img_ids=half)
    for k in ref_sub:
        assert sub[k] == pytest.approx(ref_sub[k], abs=1e-5), k
    assert sub["bbox/AP"] != pytest.approx(ref["bbox/AP"], abs=1e-4)
    # ground truth as predictions -> AP 1.0 through the streaming path too
    ev.reset()
    gp = _as_predictions(gt, gt_as_results(gt), ids)
    ev.process(list(gp), list(gp.values()))
    m = ev.evaluate()
    assert m["segm/AP_novel"] == pytest.approx(1.0) and m["bbox/AP_base"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["auto", "faster"])
def test_streaming_evaluator_keeps_max_dets_per_image(world, backend):
    gt, gt_path, _, _ = world
    ev = DetectionEvaluator(gt_path, max_dets=7, backend=backend)
    assert ev.streaming == (backend == "auto")
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(50, 4, generator=g) * 20
    boxes[:, 2:] += boxes[:, :2] + 1
    scores = torch.rand(50, generator=g)
    ev.process([100], [{"boxes": boxes, "scores": scores, "labels": torch.randint(0, 6, (50,), generator=g)}])
    if ev.streaming:  # one compact match record per kept detection, no result dicts
        assert ev._results == [] and ev._matcher.n_records == 7
        kept = sorted(ev._matcher.records()["score"].tolist(), reverse=True)
    else:
        assert len(ev._results) == 7
        kept = sorted((r["score"] for r in ev._results), reverse=True)
    assert kept == pytest.approx(sorted(scores.tolist(), reverse=True)[:7])
    with pytest.raises(DistillError, match="image_id 5"):
        ev.process([5], [{"boxes": boxes[:1], "scores": torch.ones(1), "labels": torch.zeros(1, dtype=torch.long)}])


def test_cli_det(world, tmp_path, capsys):
    from distill.cli import main

    gt, gt_path, _, _ = world
    res = _write(tmp_path, gt_as_results(gt), "gt_res.json")
    out = tmp_path / "cli"
    assert main(["eval", "det", "--gt", str(gt_path), "--pred", str(res), "--out", str(out), "--iou", "bbox,segm"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["bbox/AP_novel"] == pytest.approx(1.0) and m["segm/AP"] == pytest.approx(1.0)
    assert "| bbox | 100.0 |" in capsys.readouterr().out
    out2 = tmp_path / "cli2"
    assert main(["eval", "det", "--gt", str(tmp_path / "missing.json"), "--pred", str(res), "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out2.exists()
    assert main(["eval", "det", "--gt", str(gt_path), "--pred", str(res), "--iou", "bbox,kp"]) == 2


def _ddp_worker(rank, world, port, gt, res, out_dir):
    """Each rank evaluates half of the images; rank 0 writes what it got."""
    import torch.distributed as dist

    from distill.eval.segmentation import SemSegEvaluator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ids = [c["id"] for c in gt["categories"]]
        preds = _as_predictions(gt, res, ids)
        mine = list(preds)[rank::world]
        ev = DetectionEvaluator(gt, iou_types=("bbox", "segm"))
        ev.process(mine, [preds[i] for i in mine])
        det = ev.evaluate()
        rng = np.random.default_rng(rank)
        seg = SemSegEvaluator(5, base=[0, 1, 2])
        g = rng.integers(0, 5, (4, 9, 9))
        seg.process(np.where(rng.random(g.shape) < 0.5, g, 0), g)
        sm = seg.evaluate()
        sm2 = seg.evaluate()  # a second call does not add the other ranks twice
        assert sm == sm2
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"det": det, "seg": sm, "conf": seg.conf.tolist()}))
    finally:
        dist.destroy_process_group()


def test_evaluators_gather_across_ranks(world, tmp_path):
    """Two gloo processes, each with half the images, give the single-process numbers."""
    import socket

    import torch.multiprocessing as mp

    from distill.eval.segmentation import SemSegEvaluator

    gt, _, res, _ = world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, gt, res, tmp_path), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    ref = evaluate_detection(gt, res, iou_types=("bbox", "segm"))
    assert r1["det"] == {}  # only rank 0 gets detection metrics
    for k in ref:
        assert r0["det"][k] == pytest.approx(ref[k], abs=1e-5), k
    single = SemSegEvaluator(5, base=[0, 1, 2])
    single.conf = torch.tensor(r0["conf"]) + torch.tensor(r1["conf"])
    assert r0["seg"] == r1["seg"] == pytest.approx(single.evaluate())
    assert r0["conf"] != r1["conf"]
