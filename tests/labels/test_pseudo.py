"""Pseudo-labels: filtering, proposals, formats, quality metrics, sharded resumable labeling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.config import load_config
from distill.errors import DistillError
from distill.labels import formats
from distill.labels.pseudo import FilterOptions, filter_predictions, label, parse_class_thresh
from distill.labels.sources import TeacherSource, component_proposals
from distill.labels.quality import label_quality
from distill.vocab import load_vocab

VOCAB = "red square, blue circle, crimson square=red square, green cross"
COLORS = {"red": (220, 30, 30), "blue": (30, 70, 225), "green": (30, 170, 40)}


@pytest.fixture(scope="module")
def teacher():
    from distill.teacher.clip import build_random_teacher

    return build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, heads=2, text_width=32, text_layers=1, seed=3)


def _scene(rng, size=48):
    """Muted textured background with 1-3 saturated rectangles / discs."""
    img = (rng.uniform(90, 140, (size, size, 1)) + rng.uniform(-8, 8, (size, size, 3))).astype(np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        col = COLORS[list(COLORS)[int(rng.integers(3))]]
        x, y = (int(v) for v in rng.integers(0, size - 14, 2))
        s = int(rng.integers(8, 14))
        img[y : y + s, x : x + s] = col
    return img


def _folder(tmp_path, n=7, bad=True):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    names = []
    for i in range(n):
        rel = f"cam{i % 2}/{i // 2:04d}.png"  # cam0/0000.png and cam1/0000.png: same base names
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_scene(rng)).save(p)
        names.append(rel)
    if bad:
        (root / "cam0" / "zero.png").write_bytes(b"")
        (root / "cam1" / "notes.jpg").write_text("not an image")
        buf = root / "cam1" / "trunc.png"
        Image.fromarray(_scene(rng)).save(buf)
        buf.write_bytes(buf.read_bytes()[:120])
    return root


def _cfg(images, out, **kw):
    ov = [f"label.images={images}", f"label.out={out}", f"label.vocab={VOCAB}", "label.source=teacher",
          "label.score_thresh=0.0", "label.min_area=10", "label.shard_size=2", "label.batch_size=3",
          "teacher.templates=", "label.format=[coco, yolo, png]"]
    ov += [f"label.{k}={v}" for k, v in kw.items()]
    return load_config(None, ov)


# ------------------------------------------------------------------------------ vocab, thresholds


def test_inline_vocab_prompt_mapping_and_class_thresh():
    v = load_vocab(VOCAB)
    assert v.names == ("red square", "blue circle", "green cross")
    assert v.prompts[0] == ("red square", "crimson square")
    t = parse_class_thresh(["crimson square=0.5", "green cross=0.25,blue circle=1"], v)
    assert t == ((0, 0.5), (1, 1.0), (2, 0.25))
    with pytest.raises(DistillError, match="label.class_thresh: class 'pink star' is not in the vocabulary"):
        parse_class_thresh(["pink star=0.5"], v)
    with pytest.raises(DistillError, match="expected 'class name=threshold'"):
        parse_class_thresh(["red square"], v)
    with pytest.raises(DistillError, match=r"must be in \[0, 1\]"):
        parse_class_thresh(["red square=3"], v)


def _nms_reference(boxes, scores, labels, thr):
    """Brute-force class-wise greedy NMS (independent of torchvision)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for j in keep:
            if labels[i] != labels[j]:
                continue
            a, b = boxes[i], boxes[j]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_filter_predictions_matches_bruteforce():
    g = torch.Generator().manual_seed(1)
    n = 60
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 20 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    opts = FilterOptions(score_thresh=0.2, class_thresh=((1, 0.6),), top_k=7, nms=0.3, min_area=40.0)
    out = filter_predictions({"boxes": boxes, "scores": scores, "labels": labels}, opts, 3)
    b, s, lab = boxes.tolist(), scores.tolist(), labels.tolist()
    cand = [i for i in range(n) if s[i] >= (0.6 if lab[i] == 1 else 0.2) and (b[i][2] - b[i][0]) * (b[i][3] - b[i][1]) >= 40.0]
    keep = _nms_reference([b[i] for i in cand], [s[i] for i in cand], [lab[i] for i in cand], 0.3)
    ref = [cand[k] for k in keep][:7]
    assert len(ref) == 7 and out["scores"].tolist() == [s[i] for i in ref]
    assert torch.equal(out["boxes"], boxes[ref]) and out["labels"].tolist() == [lab[i] for i in ref]
    # Mask areas replace box areas when masks are given.
    masks = torch.zeros(n, 8, 8, dtype=torch.bool)
    masks[:5, :2, :2] = True  # area 4
    masks[5:, :7, :7] = True  # area 49
    out = filter_predictions({"boxes": boxes, "scores": scores, "labels": labels, "masks": masks},
                             FilterOptions(score_thresh=0.0, top_k=0, nms=0.0, min_area=10.0), 3)
    assert len(out["scores"]) == n - 5 and out["masks"].shape == (n - 5, 8, 8)


# ------------------------------------------------------------------------------ proposals, formats


def test_component_proposals_hand_image():
    img = np.full((40, 50, 3), 120, np.uint8)
    img[5:15, 10:30] = (220, 30, 30)  # red 20x10
    img[20:36, 30:46] = (30, 70, 225)  # blue 16x16
    img[2:4, 2:4] = (30, 170, 40)  # 4 px: below min_area
    boxes, masks = component_proposals(img, min_area=16)
    got = sorted(map(tuple, boxes.astype(int).tolist()))
    assert got == [(10, 5, 30, 15), (30, 20, 46, 36)]
    assert sorted(int(m.sum()) for m in masks) == [200, 256]
    boxes, masks = component_proposals(img, min_area=16, windows=True)
    # + 3x3 windows of 12x10 (stride 6x5: 7 x 7 positions) and 25x20 (3 x 3), no duplicates of the two
    assert len(boxes) == 2 + 7 * 7 + 3 * 3


def test_yolo_and_rle_hand_example():
    anns = [{"category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0]}, {"category_id": 3, "bbox": [0.0, 0.0, 100.0, 200.0]}]
    txt = formats.yolo_lines(anns, width=100, height=200, cat_to_index={3: 0, 7: 2})
    # cx = (10 + 15) / 100, cy = (20 + 20) / 200, w = 30 / 100, h = 40 / 200
    assert txt == "2 0.250000 0.200000 0.300000 0.200000\n0 0.500000 0.500000 1.000000 1.000000\n"
    m = np.zeros((5, 7), bool)
    m[1:3, 2:6] = True
    np.testing.assert_array_equal(formats.rle_to_mask(formats.mask_to_rle(m)), m)


# ------------------------------------------------------------------------------ quality


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
    assert m["labels/miou_seen"] == pytest.approx((4 / 10 + 4 / 8) / 2)
    assert m["labels/miou_unseen"] == pytest.approx(2 / 4)
    assert m["labels/miou_all"] == pytest.approx((4 / 10 + 4 / 8 + 2 / 4) / 3)
    assert m["labels/pixel_acc"] == pytest.approx(10 / 16)


# ------------------------------------------------------------------------------ end to end


def _reference_scores(teacher, vocab, img_u8, min_area, background):
    """Independent recomputation of one image's zero-shot scores from the public pieces."""
    from distill.teacher.regions import region_embeddings
    from distill.teacher.text import text_embeddings

    boxes, masks = component_proposals(img_u8, min_area=min_area)
    t = text_embeddings(teacher, vocab, None)
    tb = text_embeddings(teacher, load_vocab(",".join(background)), None)
    x = torch.from_numpy(img_u8).permute(2, 0, 1).float() / 255
    e = region_embeddings(teacher, [x], [torch.from_numpy(boxes)], mode="crop")[0]
    logits = teacher.model.logit_scale.exp() * e @ torch.cat([t, tb]).T
    p = logits.softmax(-1)[:, : len(vocab)]
    s, lab = p.max(1)
    return boxes, s, lab


def test_label_folder_end_to_end(tmp_path, teacher):
    root = _folder(tmp_path, n=5)
    out = tmp_path / "out"
    cfg = _cfg(root, out, class_thresh='"green cross=0.99"')
    vocab = load_vocab(VOCAB)
    src = TeacherSource(teacher, vocab, background=("background", "texture"), min_area=10)
    summary = label(cfg, source=src)
    coco = json.loads((out / "labels.json").read_text())
    names = [im["file_name"] for im in coco["images"]]
    assert names == ["cam0/0000.png", "cam0/0001.png", "cam0/0002.png", "cam1/0000.png", "cam1/0001.png"]
    assert [im["id"] for im in coco["images"]] == [1, 2, 3, 5, 6]  # 1 + index in the sorted list of all 8 files
    assert summary["labels/failures"] == 3 and summary["labels/images"] == 5
    fails = (out / "failures.txt").read_text().splitlines()
    assert [f.split("\t")[0] for f in fails] == ["cam0/zero.png", "cam1/notes.jpg", "cam1/trunc.png"]
    assert "empty file (0 bytes)" in fails[0] and "not an image" in fails[1] and "truncated or corrupt" in fails[2]
    assert [c["name"] for c in coco["categories"]] == list(vocab.names)
    info = coco["info"]
    assert info["vocab_hash"] == vocab.hash and info["model_hash"] == src.fingerprint
    assert info["class_thresh"] == {"green cross": 0.99} and info["nms"] == 0.5 and info["min_area"] == 10.0
    anns = coco["annotations"]
    assert len(anns) == summary["labels/annotations"] > 0
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    assert all(a["category_id"] != 3 or a["score"] >= 0.99 for a in anns)
    # Scores equal an independent recomputation for one image (after the same filter).
    img = np.asarray(Image.open(root / "cam1/0000.png").convert("RGB"))
    boxes, s, lab = _reference_scores(teacher, vocab, img, 10, ("background", "texture"))
    mine = sorted((a for a in anns if a["image_id"] == 5), key=lambda a: -a["score"])
    ref = filter_predictions({"boxes": torch.from_numpy(boxes), "scores": s, "labels": lab},
                             FilterOptions(0.0, ((2, 0.99),), 100, 0.5, 10.0), 3)
    assert len(mine) == len(ref["scores"]) > 0
    np.testing.assert_allclose([a["score"] for a in mine], ref["scores"].numpy(), atol=2e-5)
    assert [a["category_id"] for a in mine] == [vocab.ids[i] for i in ref["labels"].tolist()]
    # Duplicate base names in different folders: separate PNG and YOLO files.
    for d in ("cam0", "cam1"):
        assert (out / "semantic" / d / "0000.png").is_file() and (out / "yolo" / "labels" / d / "0000.txt").is_file()
    assert (out / "yolo" / "classes.txt").read_text().splitlines() == list(vocab.names)
    legend = json.loads((out / "semantic" / "legend.json").read_text())
    assert [e["value"] for e in legend] == [0, 1, 2, 3] and (out / "semantic" / "legend.png").is_file()
    # YOLO lines agree with the COCO boxes.
    lines = (out / "yolo" / "labels" / "cam1" / "0000.txt").read_text().splitlines()
    assert len(lines) == len(mine)
    first = [a for a in anns if a["image_id"] == 5][0]
    c, cx, cy, w, h = lines[0].split()
    x, y, bw, bh = first["bbox"]
    assert int(c) == first["category_id"] - 1 and float(cx) == pytest.approx((x + bw / 2) / 48, abs=1e-6)
    assert float(h) == pytest.approx(bh / 48, abs=1e-6)
    # The PNG holds the top-scoring label of each instance pixel.
    sem = np.asarray(Image.open(out / "semantic" / "cam1" / "0000.png"))
    top = mine[0]
    m = formats.rle_to_mask(top["segmentation"])
    assert (sem[m] == top["category_id"]).all() and top["area"] == int(m.sum())


class _Kill(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted(tmp_path, teacher):
    root = _folder(tmp_path, n=7, bad=True)  # 10 files -> 5 shards of 2
    vocab = load_vocab(VOCAB)
    src = TeacherSource(teacher, vocab, background=("background",), min_area=10)
    full = tmp_path / "full"
    label(_cfg(root, full, num_workers=2), source=src)  # with 2 decoding workers

    out = tmp_path / "killed"
    seen = []

    def kill_after_two(k):
        seen.append(k)
        if len(seen) == 2:
            raise _Kill

    with pytest.raises(_Kill):
        label(_cfg(root, out), source=src, on_shard=kill_after_two)
    assert sorted(p.name for p in (out / "shards").glob("shard-*.json")) == ["shard-00000.json", "shard-00001.json"]
    assert not (out / "labels.json").exists()
    rerun = []
    summary = label(_cfg(root, out), source=src, on_shard=rerun.append)
    assert rerun == [2, 3, 4] and summary["labels/shards_skipped"] == 2
    assert (out / "labels.json").read_bytes() == (full / "labels.json").read_bytes()
    assert (out / "failures.txt").read_text() == (full / "failures.txt").read_text()
    for p in sorted((full / "semantic").rglob("*.png")) + sorted((full / "yolo").rglob("*.txt")):
        q = out / p.relative_to(full)
        assert q.read_bytes() == p.read_bytes(), p
    # Changing an option invalidates the shards (their key), nothing stale is reused.
    again = []
    label(_cfg(root, out, top_k=1), source=src, on_shard=again.append)
    assert again == [0, 1, 2, 3, 4]
    coco = json.loads((out / "labels.json").read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])
    assert per_image.max() == 1 and coco["info"]["top_k"] == 1


def test_rank_sharding_covers_everything_once(tmp_path, teacher):
    from distill.labels.pseudo import make_job, run_labeling

    root = _folder(tmp_path, n=5, bad=False)
    vocab = load_vocab(VOCAB)
    src = TeacherSource(teacher, vocab, min_area=10)
    job = make_job(_cfg(root, tmp_path / "o", shard_size=1), vocab, src.fingerprint)
    done = {0: [], 1: []}
    for r in (0, 1):
        run_labeling(job, src, rank=r, world_size=2, on_shard=done[r].append)
    assert done == {0: [0, 2, 4], 1: [1, 3]}


def test_bad_inputs_are_clear_errors(tmp_path, teacher):
    vocab = load_vocab(VOCAB)
    src = TeacherSource(teacher, vocab, min_area=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="empty: no images found"):
        label(_cfg(tmp_path / "empty", tmp_path / "o"), source=src)
    root = _folder(tmp_path, n=1, bad=False)
    with pytest.raises(DistillError, match="label.format: 'pdf' is not one of coco, yolo, png"):
        label(_cfg(root, tmp_path / "o", format="coco,pdf"), source=src)
    with pytest.raises(DistillError, match="label.source: 'magic'"):
        from distill.labels.sources import build_source

        build_source(_cfg(root, tmp_path / "o", source="magic"), vocab)


def test_cli_label_inline_vocab(tmp_path):
    from distill.cli import main

    root = _folder(tmp_path, n=2, bad=False)
    out = tmp_path / "cli"
    rc = main(["label", "--images", str(root), "--vocab", "red square,crimson square=red square,blue circle",
               "--model", "teacher", "--out", str(out), "--format", "coco,yolo", "--score-thresh", "0",
               "--class-thresh", "crimson square=0.2", "--top-k", "3", "--min-area", "10",
               "teacher.pretrained=", "teacher.templates=", "teacher.device=cpu"])
    assert rc == 0
    coco = json.loads((out / "labels.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["red square", "blue circle"]
    assert coco["categories"][0]["synonyms"] == ["crimson square"]
    assert coco["info"]["class_thresh"] == {"red square": 0.2} and coco["info"]["top_k"] == 3
    assert len(coco["images"]) == 2 and (out / "yolo" / "classes.txt").is_file()
    assert not (out / "semantic").exists()
    assert main(["label", "--images", str(tmp_path / "nothing"), "--vocab", "a", "--model", "teacher", "--out", str(out)]) == 2


class _FakeSeg(torch.nn.Module):
    """semantic_logits(images, text) -> fixed (1, 1 + C, H, W) logits: two blobs of class 0 and one
    of class 1 on background (stands in for an LSeg / CLIPSeg student)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def semantic_logits(self, images, text):
        b, _, h, w = images.shape
        lo = torch.zeros(b, 1 + text.shape[0], h, w)
        lo[:, 0] = 2.0
        lo[:, 1, 2:6, 2:8] = 4.0  # class 0, 24 px
        lo[:, 1, 10:12, 10:12] = 4.0  # class 0, 4 px
        lo[:, 2, 8:16, 0:4] = 3.0  # class 1, 32 px (overlaps nothing)
        return lo


def test_seg_source_instances_from_components():
    from distill.labels.sources import SegSource

    src = SegSource(_FakeSeg(), torch.randn(2, 8), load_vocab("a,b"))
    pred = src([torch.zeros(3, 16, 16, dtype=torch.uint8)])[0]
    order = np.argsort(pred["boxes"][:, 0].numpy() * 100 + pred["boxes"][:, 1].numpy())
    boxes = pred["boxes"][order].tolist()
    assert boxes == [[0, 8, 4, 16], [2, 2, 8, 6], [10, 10, 12, 12]]
    assert pred["labels"][order].tolist() == [1, 0, 0]
    assert [int(m.sum()) for m in pred["masks"][order]] == [32, 24, 4]
    # score = mean softmax probability of the class over its component
    p_a = np.exp(4) / (np.exp(2) + np.exp(4) + np.exp(0))
    p_b = np.exp(3) / (np.exp(2) + np.exp(0) + np.exp(3))
    np.testing.assert_allclose(pred["scores"][order].numpy(), [p_b, p_a, p_a], rtol=1e-5)
    kept = filter_predictions(pred, FilterOptions(score_thresh=0.0, min_area=5.0, nms=0.5, top_k=10), 2)
    assert len(kept["scores"]) == 2  # the 4 px blob is below min_area


def test_vild_source_from_checkpoint_matches_direct_inference(tmp_path):
    """A tiny random ViLD checkpoint + its config.yaml: `label --source vild` gives the model's own
    detections over the NEW vocabulary, filtered."""
    from safetensors.torch import save_file

    from distill.config import save_config
    from distill.detection.build import build_vild_detector
    from distill.engine.checkpoint import save
    from distill.labels.sources import load_vild
    from distill.teacher.clip import build_teacher
    from distill.teacher.text import text_embeddings

    base = load_config(None, ["teacher.pretrained=", "teacher.templates=", "teacher.device=cpu", f"work_dir={tmp_path}",
                              "det.min_size=48", "det.max_size=48", "det.detections_per_img=20", "det.backbone=resnet18_fpn"])
    teacher = build_teacher(base.teacher)
    save_file({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    mcfg = load_config(None, ["teacher.templates=", "teacher.device=cpu", f"teacher.pretrained={tmp_path / 't.safetensors'}",
                              f"work_dir={tmp_path}", "det.min_size=48", "det.max_size=48", "det.detections_per_img=20",
                              "data.vocab=red square, blue circle"])
    trained = load_vocab("red square, blue circle")
    model = build_vild_detector(mcfg.det, teacher.embed_dim, text_embeddings(teacher, trained), teacher=teacher)
    (tmp_path / "det").mkdir()
    save(tmp_path / "det" / "model_final.pt", model)
    save_config(mcfg, tmp_path / "det" / "config.yaml")
    root = _folder(tmp_path, n=2, bad=False)
    cfg = _cfg(root, tmp_path / "out", source="vild", model=str(tmp_path / "det" / "model_final.pt"), nms=0, top_k=0, min_area=0)
    summary = label(cfg)
    coco = json.loads((tmp_path / "out" / "labels.json").read_text())
    # Direct: the same checkpoint on the new vocabulary (green cross is novel: not a training class).
    vocab = load_vocab(VOCAB)
    m, _, fp = load_vild(cfg, vocab)
    assert m.roi_heads.novel_mask.tolist() == [False, False, True]
    x = torch.from_numpy(np.asarray(Image.open(root / "cam0/0000.png").convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    d = m([x])[0]
    mine = [a for a in coco["annotations"] if a["image_id"] == 1]
    assert coco["info"]["model_hash"] == fp and summary["labels/annotations"] == len(coco["annotations"])
    assert len(mine) == len(d["scores"]) > 0
    np.testing.assert_allclose(sorted(a["score"] for a in mine), sorted(d["scores"].tolist()), atol=1e-5)


def test_same_stem_different_extension_do_not_collide(tmp_path, teacher):
    rng = np.random.default_rng(5)
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(_scene(rng)).save(root / "a.png")
    Image.fromarray(_scene(rng)).save(root / "a.jpg", quality=95)
    Image.fromarray(_scene(rng)).save(root / "b.bmp")
    out = tmp_path / "out"
    label(_cfg(root, out), source=TeacherSource(teacher, load_vocab(VOCAB), min_area=10))
    assert sorted(p.relative_to(out / "semantic").as_posix() for p in (out / "semantic").rglob("*.png") if p.name != "legend.png") == [
        "a.jpg.png", "a.png.png", "b.png"]
    assert sorted(p.name for p in (out / "yolo" / "labels").rglob("*.txt")) == ["a.jpg.txt", "a.png.txt", "b.txt"]


# ------------------------------------------------------------------------------ working resolution


def _photo(h, w, seed):
    """A small photo-like image: colour gradients, noise, five saturated discs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([120 + 60 * np.sin(x / 37.0), 110 + 50 * np.cos(y / 23.0), 100 + 40 * np.sin((x + y) / 51.0)], -1)
    img += rng.normal(0, 6, img.shape)
    for k in range(5):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = int(rng.integers(6, 30))
        col = [(220, 30, 30), (30, 70, 225), (30, 170, 40), (230, 200, 20), (200, 40, 200)][k]
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = col
    return np.clip(img, 0, 255).astype(np.uint8)


# Computed by the labeler before the working-resolution change (full-size masks per candidate):
# [image_id, category_id, bbox, score, area] of every annotation, and digests of the RLE counts,
# the semantic PNGs' pixels and the YOLO files.
_SMALL_REFERENCE = [
    [1, 2, [15.0, 59.0, 6.0, 8.0], 0.52094, 32], [1, 2, [5.0, 66.0, 7.0, 4.0], 0.52034, 21],
    [1, 2, [10.0, 60.0, 8.0, 5.0], 0.51859, 29], [1, 2, [22.0, 52.0, 3.0, 4.0], 0.51727, 12],
    [1, 2, [7.0, 72.0, 11.0, 11.0], 0.51713, 72], [1, 2, [173.0, 11.0, 27.0, 39.0], 0.517, 913],
    [1, 2, [42.0, 59.0, 4.0, 4.0], 0.51486, 15], [1, 2, [13.0, 47.0, 21.0, 46.0], 0.5133, 420],
    [1, 2, [7.0, 84.0, 10.0, 7.0], 0.51167, 45], [1, 2, [0.0, 60.0, 11.0, 31.0], 0.51035, 198],
    [2, 2, [92.0, 34.0, 10.0, 16.0], 0.53051, 79], [2, 2, [96.0, 24.0, 10.0, 7.0], 0.52567, 49],
    [2, 2, [109.0, 25.0, 4.0, 5.0], 0.52516, 17], [2, 2, [105.0, 24.0, 5.0, 4.0], 0.52496, 18],
    [2, 2, [104.0, 49.0, 4.0, 3.0], 0.5244, 12], [2, 2, [114.0, 30.0, 4.0, 10.0], 0.5239, 38],
    [2, 2, [95.0, 30.0, 23.0, 20.0], 0.51619, 276], [2, 2, [111.0, 45.0, 7.0, 5.0], 0.51202, 32],
    [2, 2, [0.0, 50.0, 15.0, 46.0], 0.5118, 551], [2, 2, [0.0, 52.0, 6.0, 42.0], 0.50987, 216],
]
_SMALL_DIGESTS = {"rle": "c9a7262e108f0695", "a.png": "36700a2dddb236f4", "b.png": "70127107775dd508", "yolo": "87cef1712df83cdd"}


def test_small_image_labels_unchanged(tmp_path):
    """Images within label.max_side are labeled exactly as before the working-resolution path."""
    import hashlib

    from distill.teacher.clip import build_random_teacher

    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(_photo(150, 200, 0)).save(root / "a.png")
    Image.fromarray(_photo(96, 128, 1)).save(root / "b.jpg", quality=90)
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, heads=2, text_width=32, text_layers=1, seed=3)
    out = tmp_path / "o"
    cfg = load_config(None, [f"label.images={root}", f"label.out={out}", f"label.vocab={VOCAB}", "label.source=teacher",
                             "label.score_thresh=0.0", "label.min_area=10", "label.top_k=10", "teacher.templates=",
                             "label.format=[coco, yolo, png]"])
    label(cfg, source=TeacherSource(teacher, load_vocab(VOCAB), background=("background",), min_area=10))
    coco = json.loads((out / "labels.json").read_text())
    assert [(im["width"], im["height"]) for im in coco["images"]] == [(200, 150), (128, 96)]
    rows = [[a["image_id"], a["category_id"], a["bbox"], a["score"], a["area"]] for a in coco["annotations"]]
    assert [r[:3] + r[4:] for r in rows] == [r[:3] + r[4:] for r in _SMALL_REFERENCE]
    np.testing.assert_allclose([r[3] for r in rows], [r[3] for r in _SMALL_REFERENCE], atol=2e-5)
    digest = lambda b: hashlib.sha256(b).hexdigest()[:16]  # noqa: E731
    assert digest(json.dumps([a["segmentation"]["counts"] for a in coco["annotations"]]).encode()) == _SMALL_DIGESTS["rle"]
    for n in ("a.png", "b.png"):
        assert digest(np.asarray(Image.open(out / "semantic" / n)).tobytes()) == _SMALL_DIGESTS[n]
    assert digest(b"".join((out / "yolo" / "labels" / n).read_bytes() for n in ("a.txt", "b.txt"))) == _SMALL_DIGESTS["yolo"]


def test_box_masks_nearest_mapping_matches_bruteforce():
    from distill.labels.sources import BoxMasks

    rng = np.random.default_rng(2)
    h, w = 13, 17
    dense = rng.random((4, h, w)) < 0.4
    dense[3] = False
    bm = BoxMasks.from_dense(dense)
    for i in range(4):
        np.testing.assert_array_equal(bm[i], dense[i])  # at its own size: the mask itself
    for H, W in ((13, 17), (40, 51), (29, 100), (7, 9)):
        big = bm.at((H, W))
        ys = ((2 * np.arange(H) + 1) * h) // (2 * H)  # the source pixel of each output pixel's centre
        xs = ((2 * np.arange(W) + 1) * w) // (2 * W)
        for i in range(4):
            ref = dense[i][np.ix_(ys, xs)]
            np.testing.assert_array_equal(big[i], ref)
            assert big.area(i) == int(ref.sum())
            np.testing.assert_array_equal(formats.rle_to_mask(big.rle(i)), ref)
            assert big.rle(i) == formats.mask_to_rle(ref)
        sub = big[torch.tensor([2, 0])]
        assert len(sub) == 2 and sub.shape == (2, H, W)
        np.testing.assert_array_equal(sub[1], big[0])


def test_large_image_labeled_at_working_size_in_full_pixels(tmp_path, teacher):
    """An image over label.max_side: candidates and crops at the working size, labels in the full
    image's pixels. At an exact factor 2 they equal the working image's own labels scaled by 2
    (boxes x 2, areas x 4, every mask pixel a 2 x 2 block), with the same scores."""
    from distill.data.images import load_image_scaled

    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(_photo(150, 200, 4)).save(big / "p.png")
    work, full = load_image_scaled(big / "p.png", 100)
    assert work.shape == (75, 100, 3) and full == (150, 200)
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(work).save(small / "p.png")
    vocab = load_vocab(VOCAB)
    coco = {}
    for name, root in (("big", big), ("small", small)):
        src = TeacherSource(teacher, vocab, min_area=10, max_side=100)
        label(_cfg(root, tmp_path / f"o_{name}", min_area=0, format="coco,png,yolo"), source=src)
        coco[name] = json.loads((tmp_path / f"o_{name}" / "labels.json").read_text())
    assert [(i["width"], i["height"]) for i in coco["big"]["images"]] == [(200, 150)]
    A, B = coco["small"]["annotations"], coco["big"]["annotations"]
    assert len(A) == len(B) > 0
    for a, b in zip(A, B):
        assert b["category_id"] == a["category_id"] and b["score"] == pytest.approx(a["score"], abs=2e-5)
        assert b["bbox"] == [2 * v for v in a["bbox"]] and b["area"] == 4 * a["area"]
        assert b["segmentation"]["size"] == [150, 200]
        ma = formats.rle_to_mask(a["segmentation"])
        np.testing.assert_array_equal(formats.rle_to_mask(b["segmentation"]), np.kron(ma, np.ones((2, 2), bool)))
    sa = np.asarray(Image.open(tmp_path / "o_small" / "semantic" / "p.png"))
    sb = np.asarray(Image.open(tmp_path / "o_big" / "semantic" / "p.png"))
    np.testing.assert_array_equal(sb, np.kron(sa, np.ones((2, 2), np.uint8)))
    assert (tmp_path / "o_big" / "yolo" / "labels" / "p.txt").read_text() == (tmp_path / "o_small" / "yolo" / "labels" / "p.txt").read_text()


def test_decompression_bomb_header_is_a_counted_failure(tmp_path, teacher):
    """A PNG whose header declares 20000 x 9000 (180 MP, over the pixel limit) is one failure line,
    never decoded."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    root = _folder(tmp_path, n=1, bad=False)
    ihdr = struct.pack(">IIBBBBB", 20000, 9000, 8, 2, 0, 0, 0)
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    summary = label(_cfg(root, tmp_path / "o"), source=TeacherSource(teacher, load_vocab(VOCAB), min_area=10))
    assert summary["labels/failures"] == 1 and summary["labels/images"] == 1
    (line,) = (tmp_path / "o" / "failures.txt").read_text().splitlines()
    assert line.startswith("bomb.png\t") and "decompression bomb" in line
