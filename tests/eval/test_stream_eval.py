"""The streaming COCO box evaluator equals faster-coco-eval and pycocotools.

The precision arrays [T, R, K] are compared entry by entry (not only the summary metrics), on
random inputs made to hit COCOeval's corner cases: crowd boxes, tiny and huge boxes (area above
the 1e10 of area range "all"), GT areas that differ from w*h, duplicate GT boxes (equal IoU),
IoU exactly at a threshold, tied scores (within and across images), more than maxDets
detections per image, empty images, images with detections but no GT, categories without GT.
Crowd regions carry RLE masks as COCO ships them (uncompressed ``counts`` lists, and compressed
strings), their box and area read from the mask.

``max_dets`` is a per-image limit (COCO's 100 detections per image; detectron2's
``DETECTIONS_PER_IMAGE`` and LVIS's ``limit_dets_per_image`` apply the same rule), which
pycocotools' ``maxDets`` alone does not enforce: it keeps maxDets per image *and category*. The
references therefore get the untruncated detection lists with that rule applied by LVIS's own
``LVISResults.limit_dets_per_image``, never by our code.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.eval.coco_stream import IOU_THRS, REC_THRS, BoxGT, StreamingBoxEval
from distill.eval.detection import DetectionEvaluator, evaluate_detection
from distill.eval.precision import run_coco, run_stream

from .test_detection import _crowd_annotation, _crowd_mask, add_crowds, make_gt, noisy_results


def _box(rng, kind: str) -> list[float]:
    if kind == "tiny":
        return [float(rng.uniform(0, 50)), float(rng.uniform(0, 50)), float(rng.uniform(0, 0.01)), float(rng.uniform(0, 0.01))]
    if kind == "huge":  # area > 1e10: outside area range "all"
        return [float(rng.uniform(0, 10)), float(rng.uniform(0, 10)), float(rng.uniform(1.1e5, 2e5)), float(rng.uniform(1.1e5, 2e5))]
    w, h = rng.uniform(2, 40, 2)
    return [float(rng.uniform(0, 60)), float(rng.uniform(0, 60)), float(w), float(h)]


def _crowd_region(rng, height: int, width: int) -> dict:
    """A crowd annotation's box, area and RLE (uncompressed 70% of the time, as COCO's)."""
    m = _crowd_mask(rng, height, width)
    return _crowd_annotation(m, compressed=rng.random() >= 0.7)


def random_world(seed: int, n_images: int = 40, n_cats: int = 7, max_dets_per_img: int = 40):
    """GT + detections with every corner case above (categories 6 and 7 never have GT)."""
    rng = np.random.default_rng(seed)
    crowd_rng = np.random.default_rng(seed + 1000)  # the crowd masks: the other draws stay as they were
    images = [{"id": int(i), "file_name": f"{i}.png", "height": 100, "width": 100} for i in rng.permutation(np.arange(1, 3 * n_images, 3))[:n_images]]
    gt_cats = list(range(1, n_cats - 1))
    anns, dets = [], []
    for im in images:
        i = im["id"]
        kind_img = rng.random()
        n_gt = 0 if kind_img < 0.15 else int(rng.integers(1, 9))  # some images without GT
        img_gt = []
        for _ in range(n_gt):
            kind = rng.choice(["normal", "tiny", "huge"], p=[0.85, 0.08, 0.07])
            bb = _box(rng, kind)
            a = {"id": len(anns) + 1, "image_id": i, "category_id": int(rng.choice(gt_cats)), "bbox": bb}
            r = rng.random()
            if r < 0.15:
                a["iscrowd"] = 1
                crowd = _crowd_region(crowd_rng, im["height"], im["width"])
                a.update(crowd)
            elif r < 0.25:
                pass  # no iscrowd / area keys
            else:
                a["iscrowd"] = 0
            if r >= 0.15 and rng.random() < 0.3:
                pass
            elif rng.random() < 0.2:
                a["area"] = float(bb[2] * bb[3] * rng.uniform(0.3, 1.0))  # e.g. a mask area
            else:
                a["area"] = float(bb[2] * bb[3])
            if r < 0.15:
                a["area"] = crowd["area"]  # a crowd region's area is its mask's (the draws above kept the other boxes as they were)
            anns.append(a)
            img_gt.append(a)
            if rng.random() < 0.1:  # an exact duplicate GT box (equal IoU for every detection)
                b = dict(a, id=len(anns) + 1)
                anns.append(b)
                img_gt.append(b)
        if kind_img > 0.97:
            continue  # an image without detections
        n_det = int(rng.integers(0, max_dets_per_img))
        quant = rng.random() < 0.5  # tied scores
        for _ in range(n_det):
            if img_gt and rng.random() < 0.6:
                g = img_gt[int(rng.integers(len(img_gt)))]
                x, y, w, h = g["bbox"]
                if rng.random() < 0.15:  # IoU exactly 0.5 or 0.75 (the detection inside the box)
                    f = float(rng.choice([0.5, 0.75]))
                    bb = [x, y, w, h * f]
                else:
                    j = rng.normal(0, 0.1 * max(w, h, 1.0), 4)
                    bb = [x + j[0], y + j[1], max(0.0, w + j[2]), max(0.0, h + j[3])]
                cat = g["category_id"] if rng.random() < 0.85 else int(rng.integers(1, n_cats + 1))
            else:
                bb = _box(rng, rng.choice(["normal", "tiny", "huge"], p=[0.9, 0.05, 0.05]))
                cat = int(rng.integers(1, n_cats + 1))
            s = float(np.round(rng.random(), 1)) if quant else float(rng.random())
            dets.append({"image_id": i, "category_id": cat, "bbox": [float(v) for v in bb], "score": s})
    order = rng.permutation(len(dets))  # results interleave the images
    dets = [dets[k] for k in order]
    cats = [{"id": k, "name": f"c{k}", "split": "novel" if k % 3 == 0 else "base"} for k in range(1, n_cats + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def per_image_limit(dets: list[dict], max_dets: int) -> list[dict]:
    """The per-image rule by a third party: LVIS's ``LVISResults.limit_dets_per_image`` (the top
    ``max_dets`` scores of each image, ties in list order; it does not use ``self``)."""
    from lvis.results import LVISResults

    return LVISResults.limit_dets_per_image(None, copy.deepcopy(dets), max_dets)


def _prec_all(gt, dets, max_dets=100, img_ids=None):
    """Precision [T, R, K] of our evaluators and of the references, all given the untruncated
    ``dets``: ``stream`` (the streaming evaluator, which applies the per-image limit itself),
    ``pycocotools_backend`` (our pycocotools path: ``top_results`` + COCOeval), and the
    references ``faster`` / ``pycocotools`` on the list limited by LVIS's code."""
    from distill.eval.results import top_results

    limited = per_image_limit(dets, max_dets)
    out = {"stream": run_stream(copy.deepcopy(gt), copy.deepcopy(dets), max_dets, img_ids)[0]}
    out["pycocotools_backend"] = run_coco(copy.deepcopy(gt), top_results(copy.deepcopy(dets), max_dets), "bbox", max_dets, "pycocotools", img_ids)[0]
    for b in ("faster", "pycocotools"):
        out[b] = run_coco(copy.deepcopy(gt), copy.deepcopy(limited), "bbox", max_dets, b, img_ids)[0]
    return out


def test_constants_are_pycocotools():
    from pycocotools.cocoeval import Params

    p = Params(iouType="bbox")
    assert np.array_equal(p.iouThrs, IOU_THRS) and np.array_equal(p.recThrs, REC_THRS)
    assert p.areaRng[p.areaRngLbl.index("all")] == [0, 1e10]


@pytest.mark.parametrize("seed", range(8))
def test_precision_equals_faster_and_pycocotools_on_corner_cases(seed):
    gt, dets = random_world(seed)
    max_dets = [100, 10, 20, 7][seed % 4]
    img_ids = None if seed % 3 else sorted(im["id"] for im in gt["images"])[::2]
    p = _prec_all(gt, dets, max_dets, img_ids)
    assert p["stream"].shape == p["faster"].shape == p["pycocotools"].shape == p["pycocotools_backend"].shape
    # bit-identical to the reference implementation, 1e-6 to faster-coco-eval
    np.testing.assert_array_equal(p["stream"], p["pycocotools"])
    np.testing.assert_array_equal(p["pycocotools_backend"], p["pycocotools"])
    np.testing.assert_allclose(p["stream"], p["faster"], atol=1e-6, rtol=0)
    per_img = {}
    for d in dets:
        per_img[d["image_id"]] = per_img.get(d["image_id"], 0) + 1
    if max_dets < 100:  # the limit bites: images beyond it, and it changes the numbers
        assert max(per_img.values()) > max_dets
        untruncated = run_coco(copy.deepcopy(gt), copy.deepcopy(dets), "bbox", max_dets, "pycocotools", img_ids)[0]
        assert not np.array_equal(untruncated, p["pycocotools"])  # pycocotools' own maxDets is per image and category
    # the fixture is not trivial: categories without GT (-1), imperfect and perfect matches
    assert (p["stream"][0, 0] == -1).sum() >= 2
    valid = p["stream"][p["stream"] > -1]
    assert 0 < valid.mean() < 1


def test_fixture_has_the_corner_cases():
    from pycocotools import mask as mask_util

    gt, dets = random_world(0)
    a = gt["annotations"]
    assert any(x.get("iscrowd") for x in a) and any("iscrowd" not in x for x in a)
    crowds = [x for x in a if x.get("iscrowd")]
    assert all(isinstance(x["segmentation"], dict) for x in crowds)  # RLE masks
    assert {type(x["segmentation"]["counts"]) for x in crowds} == {list, str}  # uncompressed (COCO's) and compressed
    for x in crowds:  # box and area are the mask's
        seg = x["segmentation"]
        rle = mask_util.frPyObjects(seg, *seg["size"]) if isinstance(seg["counts"], list) else dict(seg, counts=seg["counts"].encode())
        assert float(mask_util.area(rle)) == x["area"] > 0
        assert [float(v) for v in mask_util.toBbox(rle)] == x["bbox"]
    assert any(x["bbox"][2] * x["bbox"][3] > 1e10 for x in a) and any(x["bbox"][2] < 0.01 for x in a)
    scores = [d["score"] for d in dets]
    assert len(set(scores)) < len(scores)  # ties
    with_gt = {x["image_id"] for x in a}
    with_dets = {d["image_id"] for d in dets}
    assert with_dets - with_gt and with_gt - with_dets
    per_img = {}
    for d in dets:
        per_img[d["image_id"]] = per_img.get(d["image_id"], 0) + 1
    assert max(per_img.values()) > 20


@pytest.mark.parametrize("seed", range(3))
def test_metrics_equal_on_the_shapes_fixture(tmp_path, seed):
    gt, masks = make_gt(seed=seed)
    res = noisy_results(gt, masks, seed=seed + 1)
    add_crowds(gt, res, seed)
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 8
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(res))
    ms = {b: evaluate_detection(gt_path, res_path, backend=b) for b in ("auto", "stream", "faster", "pycocotools")}
    assert ms["auto"] == ms["stream"]
    for b in ("faster", "pycocotools"):
        assert ms["stream"].keys() == ms[b].keys()
        for k in ms[b]:
            assert ms["stream"][k] == pytest.approx(ms[b][k], abs=1e-6), (b, k)
    # in memory (list of results) == from the file, item by item
    assert evaluate_detection(gt, res) == ms["stream"]
    # with masks: boxes by the streaming evaluator, masks by faster-coco-eval, against pycocotools
    both = evaluate_detection(gt_path, res_path, iou_types=("bbox", "segm"))
    for b in ("faster", "pycocotools"):
        ref = evaluate_detection(gt_path, res_path, iou_types=("bbox", "segm"), backend=b)
        assert both.keys() == ref.keys()
        for k in ref:
            assert both[k] == pytest.approx(ref[k], abs=1e-6), (b, k)
    # and pycocotools' own summary on the raw files (no limit needed: < 100 detections an image)
    from .test_detection import _pycocotools_stats

    for t in ("bbox", "segm"):
        st = _pycocotools_stats(gt, res, t)
        assert (both[f"{t}/AP"], both[f"{t}/AP50"], both[f"{t}/AP75"]) == pytest.approx(tuple(st[:3]), abs=1e-6), t


def test_results_file_forms(tmp_path):
    gt, dets = random_world(3, n_images=10)
    ref = evaluate_detection(gt, dets, backend="pycocotools")
    p = tmp_path / "r.json"
    p.write_text(json.dumps(dets, indent=2))
    assert evaluate_detection(gt, p) == pytest.approx(ref, abs=1e-12)
    p.write_text(json.dumps({"images": [], "annotations": dets}))  # a COCO-style file of predictions
    assert evaluate_detection(gt, p) == pytest.approx(ref, abs=1e-12)
    p.write_text("[]")
    m = evaluate_detection(gt, p)
    assert m["bbox/AP"] == 0.0 and m == evaluate_detection(gt, [], backend="faster")
    bad = copy.deepcopy(dets)
    bad[5]["score"] = "x"
    p.write_text(json.dumps(bad))
    with pytest.raises(DistillError, match=r"r\.json: \[5\]\.score"):
        evaluate_detection(gt, p)
    p.write_text(json.dumps(dets)[:-30])
    with pytest.raises(DistillError, match=r"r\.json: not valid json"):
        evaluate_detection(gt, p)


def test_ground_truth_dict_is_not_modified():
    gt, dets = random_world(1, n_images=10)
    before = json.dumps(gt), json.dumps(dets)
    evaluate_detection(gt, dets)
    assert (json.dumps(gt), json.dumps(dets)) == before


def _predictions(gt, dets, vocab_ids):
    """COCO results -> per image xyxy boxes, scores, label indices (float32 as a model gives them)."""
    idx = {c: i for i, c in enumerate(vocab_ids)}
    out = {im["id"]: ([], [], []) for im in gt["images"]}
    for d in dets:
        x, y, w, h = d["bbox"]
        b, s, lab = out[d["image_id"]]
        b.append([x, y, x + w, y + h])
        s.append(d["score"])
        lab.append(idx[d["category_id"]])
    return {i: {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(s, dtype=torch.float32),
                "labels": torch.tensor(lab, dtype=torch.int64)} for i, (b, s, lab) in out.items()}


def test_streaming_evaluator_equals_faster_evaluator():
    gt, dets = random_world(5)
    ids = [c["id"] for c in gt["categories"]]
    preds = _predictions(gt, dets, ids)
    img_ids = list(preds)
    ev_s = DetectionEvaluator(gt, max_dets=20)
    ev_f = DetectionEvaluator(gt, max_dets=20, backend="faster")
    ev_p = DetectionEvaluator(gt, max_dets=20, backend="pycocotools")
    assert ev_s.streaming and not ev_f.streaming
    for ev in (ev_s, ev_f, ev_p):
        for s in range(0, len(img_ids) - 6, 7):  # the last 6 images are not processed
            batch = img_ids[s : s + 7]
            ev.process(batch, [preds[i] for i in batch])
    ms, mf, mp = ev_s.evaluate(), ev_f.evaluate(), ev_p.evaluate()
    assert ms.keys() == mf.keys() == mp.keys()
    for k in mf:
        assert ms[k] == pytest.approx(mf[k], abs=1e-6), k
        assert ms[k] == pytest.approx(mp[k], abs=1e-12), k
    assert ev_s._results == [] and ev_s._matcher.n_records > 0
    assert ev_s.evaluate() == ms  # evaluate does not consume the state
    # an image given again counts once (DistributedSampler padding), with a warning
    ev_s.process(img_ids[:2], [preds[i] for i in img_ids[:2]])
    assert ev_s.evaluate() == ms
    ev_s.reset()
    with pytest.raises(DistillError, match="no images were processed"):
        ev_s.evaluate()


def test_streaming_evaluator_without_detections_and_unknown_category(caplog):
    gt, _ = random_world(2, n_images=6)
    ev = DetectionEvaluator(gt)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    ids = [im["id"] for im in gt["images"]]
    ev.process(ids, [empty] * len(ids))
    with caplog.at_level(logging.WARNING, logger="distill.eval.detection"):
        m = ev.evaluate()
    assert any("no predictions" in r.getMessage() for r in caplog.records)
    assert m == evaluate_detection(gt, [], backend="faster")
    from distill.vocab import Vocabulary

    vocab = Vocabulary(("a", "b", "zzz"), split=("base", "base", "novel"), ids=(1, 2, 99))
    ev = DetectionEvaluator(gt, vocab=vocab)
    one = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "scores": torch.ones(1), "labels": torch.tensor([2])}
    with pytest.raises(DistillError, match="category_id 99"):
        ev.process(ids[:1], [one])


def test_records_are_compact():
    """What is kept per detection: 20 bytes, whatever the image holds."""
    gt, dets = random_world(4)
    box_gt = BoxGT(gt)
    ev = StreamingBoxEval(box_gt)
    by_img = {}
    for d in dets:
        by_img.setdefault(d["image_id"], []).append(d)
    for i, ds in by_img.items():
        ds = ds[:100]
        ev.add([box_gt.img_index[i]], np.full(len(ds), box_gt.img_index[i]), [box_gt.cat_index[d["category_id"]] for d in ds],
               np.array([d["bbox"] for d in ds]).reshape(-1, 4), [d["score"] for d in ds])
    rec = ev.records()
    assert sum(v.nbytes for v in rec.values()) == 20 * ev.n_records
    assert not any(v.dtype == object for v in rec.values())
    assert all(isinstance(v, np.ndarray) for v in vars(box_gt).values() if not isinstance(v, (list, dict, int)))


def _ddp_worker(rank, world, port, gt, dets, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        preds = _predictions(gt, dets, [c["id"] for c in gt["categories"]])
        ids = list(preds)
        mine = ids[rank::world]
        if rank == 1:
            mine = mine + ids[:1]  # the padding of a DistributedSampler repeats an image of rank 0
        ev = DetectionEvaluator(gt)
        assert ev.streaming
        for s in range(0, len(mine), 4):
            ev.process(mine[s : s + 4], [preds[i] for i in mine[s : s + 4]])
        (out_dir / f"rank{rank}.json").write_text(json.dumps(ev.evaluate()))
    finally:
        dist.destroy_process_group()


def test_streaming_evaluator_gathers_across_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    gt, dets = random_world(6, n_images=20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, gt, dets, tmp_path), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1 == {}
    single = DetectionEvaluator(gt)
    preds = _predictions(gt, dets, [c["id"] for c in gt["categories"]])
    single.process(list(preds), list(preds.values()))
    ref = single.evaluate()
    assert r0.keys() == ref.keys()
    for k in ref:
        assert r0[k] == pytest.approx(ref[k], abs=1e-12), k


def test_small_chunks_give_the_same_precision(monkeypatch):
    import distill.eval.coco_stream as cs

    gt, dets = random_world(7)
    ref = run_stream(gt, dets, 20)[0]
    monkeypatch.setattr(cs, "CHUNK_DETS", 5)  # many chunks; images with more detections than a chunk
    np.testing.assert_array_equal(run_stream(gt, dets, 20)[0], ref)
    np.testing.assert_array_equal(ref, _prec_all(gt, dets, 20)["pycocotools"])


def test_annotation_id_zero_is_an_ordinary_box():
    """COCOeval marks matches with the GT annotation id, so id 0 reads as 'unmatched' there (a
    known pycocotools flaw, warned about by faster-coco-eval); the streaming evaluator uses flags."""
    gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 0, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
                          {"id": 5, "image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10]}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.8}]
    assert evaluate_detection(gt, dets)["bbox/AP"] == 1.0
    assert evaluate_detection(gt, dets, backend="pycocotools")["bbox/AP"] < 0.3
