"""Semantic segmentation evaluation: confusion matrix by hand, ignore, hIoU, streaming, PNG folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.errors import DistillError
from distill.eval.segmentation import SemSegEvaluator, evaluate_semseg_dirs


def test_hand_computed_confusion_and_ious():
    gt = np.array([[0, 0, 1, 1],
                   [0, 2, 2, 255],
                   [3, 3, 3, 255]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 2],
                     [3, 3, 2, 0]])
    ev = SemSegEvaluator(4, base=[0, 1, 2], names=["bg", "a", "b", "c"])
    ev.process(pred, gt)
    # rows = GT, cols = prediction (+ one column for out-of-range predictions); 255 ignored
    expected = np.array([[2, 1, 0, 0, 0],
                         [0, 2, 0, 0, 0],
                         [1, 0, 1, 0, 0],
                         [0, 0, 1, 2, 0]])
    np.testing.assert_array_equal(ev.conf.numpy(), expected)
    m = ev.evaluate()
    # IoU = TP / (GT + pred - TP): bg 2/(3+3-2), a 2/(2+3-2), b 1/(2+2-1), c 2/(3+2-2)
    iou = {"bg": 2 / 4, "a": 2 / 3, "b": 1 / 3, "c": 2 / 3}
    for k, v in iou.items():
        assert m[f"iou/{k}"] == pytest.approx(v)
    S = (iou["bg"] + iou["a"] + iou["b"]) / 3
    U = iou["c"]
    assert m["miou/base"] == pytest.approx(S)
    assert m["miou/novel"] == pytest.approx(U)
    assert m["miou/all"] == pytest.approx(sum(iou.values()) / 4)
    assert m["miou/hiou"] == pytest.approx(2 * S * U / (S + U))
    assert m["pixel_acc"] == pytest.approx(7 / 10)


def test_ignore_out_of_range_predictions_and_absent_classes():
    gt = torch.tensor([[1, 1, 255, 255], [1, 1, 255, 255]])
    pred = torch.tensor([[1, 255, 3, 0], [1, 1, 2, 2]])  # 255 predicted = a miss for class 1
    ev = SemSegEvaluator(5, base=[0, 1, 2])
    ev.process(pred, gt)
    assert int(ev.conf.sum()) == 4  # only the 4 non-ignored GT pixels count
    assert int(ev.conf[1, 5]) == 1  # the out-of-range prediction column
    m = ev.evaluate()
    assert m["iou/1"] == pytest.approx(3 / 4)
    # classes 0, 2, 3, 4: absent from the GT and (on non-ignored pixels) from the predictions
    assert "iou/0" not in m and "iou/2" not in m and "iou/4" not in m
    assert m["miou/base"] == pytest.approx(3 / 4)
    assert m["miou/novel"] == -1.0 and m["miou/hiou"] == -1.0  # no novel class to average
    assert m["pixel_acc"] == pytest.approx(3 / 4)
    # a predicted-only class counts with IoU 0 (absent from GT, present in prediction)
    ev.process(torch.tensor([[4]]), torch.tensor([[1]]))
    m = ev.evaluate()
    assert m["iou/4"] == 0.0 and m["miou/novel"] == 0.0 and m["miou/hiou"] == 0.0
    with pytest.raises(ValueError, match="ground-truth value 7"):
        ev.process(torch.tensor([[1]]), torch.tensor([[7]]))
    with pytest.raises(ValueError, match="shape"):
        ev.process(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


def test_hiou_formula_and_perfect_prediction():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, (3, 20, 20))
    ev = SemSegEvaluator(6, base=[0, 1, 2, 3])
    ev.process(gt, gt)
    m = ev.evaluate()
    for k in ("miou/base", "miou/novel", "miou/all", "miou/hiou", "pixel_acc"):
        assert m[k] == 1.0
    pred = np.where(gt >= 4, 0, gt)  # novel classes never predicted
    ev.reset()
    ev.process(pred, gt)
    m = ev.evaluate()
    assert m["miou/novel"] == 0.0 and m["miou/hiou"] == 0.0 and 0 < m["miou/base"] < 1


def _reference_ious(preds, gts, C, ignore=255):
    """Brute force: per class, count pixels with numpy over everything at once."""
    p, g = np.concatenate([x.ravel() for x in preds]), np.concatenate([x.ravel() for x in gts])
    keep = g != ignore
    p, g = p[keep], g[keep]
    out = {}
    for c in range(C):
        inter = np.sum((p == c) & (g == c))
        union = np.sum((p == c) | (g == c))
        if union:
            out[c] = inter / union
    return out


def test_streaming_equals_one_shot_and_brute_force():
    rng = np.random.default_rng(1)
    C = 7
    gts = [rng.integers(0, C, (int(rng.integers(8, 30)), int(rng.integers(8, 30)))) for _ in range(12)]
    for g in gts:
        g[rng.random(g.shape) < 0.1] = 255
    preds = [np.where(rng.random(g.shape) < 0.6, np.where(g == 255, 0, g), rng.integers(0, C, g.shape)) for g in gts]
    stream = SemSegEvaluator(C, base=[0, 1, 2, 3, 4])
    for p, g in zip(preds, gts):
        stream.process(torch.from_numpy(p), torch.from_numpy(g))
    once = SemSegEvaluator(C, base=[0, 1, 2, 3, 4])
    once.process(np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in gts]))
    assert torch.equal(stream.conf, once.conf)
    assert stream.evaluate() == once.evaluate()
    ref = _reference_ious(preds, gts, C)
    m = stream.evaluate()
    for c, v in ref.items():
        assert m[f"iou/{c}"] == pytest.approx(v)
    assert m["miou/all"] == pytest.approx(np.mean(list(ref.values())))
    # batched (B, C, H, W) logits give the same as their argmax
    logits = torch.randn(2, C, 9, 9, generator=torch.Generator().manual_seed(0))
    g = torch.randint(0, C, (2, 9, 9), generator=torch.Generator().manual_seed(1))
    a, b = SemSegEvaluator(C, base=[0]), SemSegEvaluator(C, base=[0])
    a.process(logits, g)
    b.process(logits.argmax(1), g)
    assert torch.equal(a.conf, b.conf)


def _world(tmp_path, n=5, H=16, W=20):
    """GT json with categories (split), a GT folder and a noisy prediction folder."""
    cats = [{"id": 1, "name": "red star", "split": "base"}, {"id": 2, "name": "blue circle", "split": "base"},
            {"id": 3, "name": "blue star", "split": "novel"}]
    gt_json = tmp_path / "instances_val.json"
    gt_json.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    rng = np.random.default_rng(0)
    gdir, pdir = tmp_path / "gt", tmp_path / "pred"
    gdir.mkdir()
    pdir.mkdir()
    gts, preds = [], []
    for i in range(n):
        g = rng.integers(0, 4, (H, W)).astype(np.uint8)
        g[0, :3] = 255
        p = np.where(rng.random((H, W)) < 0.7, np.where(g == 255, 0, g), rng.integers(0, 4, (H, W))).astype(np.uint8)
        Image.fromarray(g).save(gdir / f"{i:06d}.png")
        Image.fromarray(p).save(pdir / f"{i:06d}.png")
        gts.append(g)
        preds.append(p)
    return gt_json, gdir, pdir, gts, preds


def test_evaluate_dirs(tmp_path):
    gt_json, gdir, pdir, gts, preds = _world(tmp_path)
    out = tmp_path / "out"
    m = evaluate_semseg_dirs(gdir, pdir, gt_json=gt_json, out_dir=out)
    ref = _reference_ious(preds, gts, 4)
    assert m["iou/background"] == pytest.approx(ref[0]) and m["iou/blue star"] == pytest.approx(ref[3])
    assert m["miou/novel"] == pytest.approx(ref[3])
    assert m["miou/base"] == pytest.approx(np.mean([ref[0], ref[1], ref[2]]))
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(m)
    conf = np.load(out / "confusion.npy")
    assert conf.shape == (4, 5) and conf.sum() == sum(int((g != 255).sum()) for g in gts)
    # GT as prediction -> 1.0
    m = evaluate_semseg_dirs(gdir, gdir, gt_json=gt_json)
    assert m["miou/all"] == 1.0 and m["miou/hiou"] == 1.0 and m["pixel_acc"] == 1.0


def test_evaluate_dirs_bad_input(tmp_path):
    gt_json, gdir, pdir, _, _ = _world(tmp_path)
    Image.fromarray(np.zeros((16, 21), np.uint8)).save(pdir / "000002.png")
    out = tmp_path / "out"
    with pytest.raises(DistillError, match=r"000002.png: size 21x16 \(WxH\), expected 20x16"):
        evaluate_semseg_dirs(gdir, pdir, gt_json=gt_json, out_dir=out)
    assert not (out / "metrics.json").exists()
    (pdir / "000002.png").unlink()
    with pytest.raises(DistillError, match="000002.png: prediction missing"):
        evaluate_semseg_dirs(gdir, pdir, gt_json=gt_json)
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(pdir / "000002.png")
    with pytest.raises(DistillError, match="000002.png: label PNG has mode RGB"):
        evaluate_semseg_dirs(gdir, pdir, gt_json=gt_json)
    with pytest.raises(DistillError, match="nothere.*not found"):
        evaluate_semseg_dirs(tmp_path / "nothere", pdir, gt_json=gt_json)


def test_cli_seg(tmp_path, capsys):
    from distill.cli import main

    gt_json, gdir, pdir, _, _ = _world(tmp_path)
    out = tmp_path / "cli"
    assert main(["eval", "seg", "--gt", str(gdir), "--pred", str(gdir), "--gt-json", str(gt_json), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["miou/all"] == 1.0
    assert "| 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |" in capsys.readouterr().out
    (pdir / "000001.png").unlink()
    out2 = tmp_path / "cli2"
    assert main(["eval", "seg", "--gt", str(gdir), "--pred", str(pdir), "--gt-json", str(gt_json), "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "000001.png" in err and len(err.strip().splitlines()) == 1
    assert not out2.exists()
    assert main(["eval", "seg", "--gt", str(gdir), "--pred", str(pdir)]) == 2


@pytest.mark.gpu
def test_cuda_inputs_equal_cpu():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 6, (2, 33, 47), generator=g)
    gt[:, :3] = 255
    pred = torch.randint(-1, 7, (2, 33, 47), generator=g)
    a, b = SemSegEvaluator(6, base=[0, 1, 2]), SemSegEvaluator(6, base=[0, 1, 2])
    a.process(pred, gt)
    b.process(pred.cuda(), gt.cuda())
    assert torch.equal(a.conf, b.conf) and b.conf.device.type == "cpu"
    assert a.evaluate() == b.evaluate()
