"""Pseudo-labels end to end: sharded resumable labeling of an image folder by each source."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.config import load_config
from distill.errors import DistillError
from distill.labels import formats
from distill.labels.candidates import component_proposals
from distill.labels.filtering import FilterOptions, filter_predictions
from distill.labels.pseudo import label
from distill.labels.sources import TeacherSource
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
    from distill.labels.job import make_job
    from distill.labels.pseudo import run_labeling

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


@pytest.mark.parametrize("arch", ["faster_rcnn", "fcos"])
def test_vild_source_from_checkpoint_matches_direct_inference(tmp_path, arch):
    """A tiny random ViLD (or one-stage, det.arch=fcos) checkpoint + its config.yaml: `label
    --source vild` gives the model's own detections over the NEW vocabulary, filtered."""
    from safetensors.torch import save_file

    from distill.config import save_config
    from distill.detection.build import build_detector
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
                              "data.vocab=red square, blue circle", f"det.arch={arch}",
                              *(["det.inference=text", "det.score_thresh=0.0", "det.objectness_thresh=0.0"] if arch == "fcos" else [])])
    trained = load_vocab("red square, blue circle")
    model = build_detector(mcfg.det, teacher.embed_dim, text_embeddings(teacher, trained), teacher=teacher)
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
    heads = m.head if arch == "fcos" else m.roi_heads
    assert heads.novel_mask.tolist() == [False, False, True]
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
