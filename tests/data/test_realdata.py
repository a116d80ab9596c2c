"""The real-photo fixtures of tests/realdata.py (COCO / OV-COCO, LVIS v1, VOC 2012, a photo
folder), read back with the project's own readers: the boxes written by hand come back out of
``CocoDetection`` (EXIF applied, grayscale expanded), the OV-COCO split comes from
configs/vocab/coco_48_17.json, LVIS rare = novel, VOC palette PNGs decode to class ids with 255
ignore, and the evaluator scores the ground truth as perfect predictions."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")  # the photos come from scikit-image's bundled data (pyproject [dev])

import realdata as rd  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.data.coco import CocoDetection, load_coco, vocab_from_coco  # noqa: E402
from distill.data.images import list_images, load_image  # noqa: E402
from distill.data.semseg import SemSegDataset, read_mask  # noqa: E402
from distill.eval.detection import evaluate_detection  # noqa: E402
from distill.vocab import load_vocab  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("realdata")
    return {
        "coco": rd.make_coco(root / "coco"),
        "lvis": rd.make_lvis(root / "lvis"),
        "voc": rd.make_voc(root / "voc"),
        "folder": rd.make_photo_folder(root / "folder"),
    }


def _xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _expected(key: str, field: str, keep=lambda o: True) -> list[dict]:
    return [o for o in rd.scaled_objects(key) if o[field] is not None and not o["crowd"] and keep(o)]


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# the photos themselves


def test_builders_are_fast_deterministic_and_small(tmp_path):
    for name, fn in (("coco", rd.make_coco), ("lvis", rd.make_lvis), ("voc", rd.make_voc), ("folder", rd.make_photo_folder)):
        rd.make_coco(tmp_path / "warm")  # source photos decoded once (lru_cache), as in a test session
        t0 = time.perf_counter()
        fn(tmp_path / "a" / name)
        assert time.perf_counter() - t0 < 2.0, name
        fn(tmp_path / "b" / name)
        a, b = _digest(tmp_path / "a" / name), _digest(tmp_path / "b" / name)
        assert a == b and a, name
        assert sum(p.stat().st_size for p in (tmp_path / "a" / name).rglob("*") if p.is_file()) < 1_000_000, name


def test_photo_sizes_and_annotation_frame():
    sizes = {p.key: rd.photo_size(p.key) for p in rd.PHOTOS}
    assert sizes == {
        "grace_hopper": (328, 384), "astronaut": (384, 384), "chelsea": (451, 300), "coffee": (384, 256),
        "motorcycle": (384, 259), "camera": (320, 320), "rocket": (384, 256),
    }
    assert rd.source_size("grace_hopper") == (512, 600) and rd.source_size("motorcycle") == (741, 500)
    for p in rd.PHOTOS:
        w, h = sizes[p.key]
        for o in rd.scaled_objects(p.key):
            x0, y0, x1, y1 = _xyxy(o["box"])
            xs, ys = o["polygon"][0::2], o["polygon"][1::2]
            assert 0 <= x0 < x1 <= w + 0.011 and 0 <= y0 < y1 <= h + 0.011, (p.key, o["word"])
            # the polygon lies in its box and touches all four sides (within 1 px)
            e = 0.011  # boxes and polygons are rounded to 0.01 px separately
            assert x0 - e <= min(xs) <= x0 + 1 and x1 - 1 <= max(xs) <= x1 + e, (p.key, o["word"])
            assert y0 - e <= min(ys) <= y0 + 1 and y1 - 1 <= max(ys) <= y1 + e, (p.key, o["word"])


def test_exif_photo_is_stored_sideways_and_loads_upright(tmp_path):
    path = rd.save_photo("chelsea", tmp_path / "cat.jpg")
    with Image.open(path) as im:
        assert im.size == (300, 451)  # stored: rotated 90 degrees counter-clockwise
        assert im.getexif()[rd.EXIF_ORIENTATION] == 6
    arr = load_image(path)
    assert arr.shape == (300, 451, 3)  # upright: the frame of the annotations
    ref = np.asarray(rd.photo_image("chelsea"), np.float32)
    assert np.abs(arr.astype(np.float32) - ref).mean() < 3.0  # JPEG error only, not a rotation
    wrong = np.asarray(rd.photo_image("chelsea").transpose(Image.Transpose.ROTATE_180), np.float32)
    assert np.abs(arr.astype(np.float32) - wrong).mean() > 20.0


def test_grayscale_photo_is_mode_l_and_loads_as_rgb(tmp_path):
    path = rd.save_photo("camera", tmp_path / "gray.jpg")
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (320, 320)
    arr = load_image(path)
    assert arr.shape == (320, 320, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


# --------------------------------------------------------------------------------------------
# COCO / OV-COCO


def test_coco_layout_and_json(built):
    c = built["coco"]
    train, val, val65 = load_coco(c["train_json"]), load_coco(c["val_json"]), load_coco(c["val_ov65_json"])
    assert [im["file_name"] for im in train["images"]] == [
        "train2017/000000000002.jpg", "train2017/000000000003.jpg", "train2017/000000000005.jpg", "train2017/000000000006.jpg"]
    assert [im["file_name"] for im in val["images"]] == ["val2017/000000000001.jpg", "val2017/000000000004.jpg"]
    for d in (train, val):
        assert all((c["image_root"] / im["file_name"]).is_file() for im in d["images"])
    assert sorted(p.name for p in c["unlabeled"].iterdir()) == ["000000000007.jpg"]
    assert len(train["categories"]) == len(val["categories"]) == 80
    assert {x["id"]: x["name"] for x in train["categories"]}[17] == "cat"
    # astronaut person, chelsea cat, motorcycle motorcycle + bicycle + crowd bottle, camera person
    assert [(a["image_id"], a["category_id"], a["iscrowd"]) for a in train["annotations"]] == [
        (2, 1, 0), (3, 17, 0), (5, 4, 0), (5, 2, 0), (5, 44, 1), (6, 1, 0)]
    crowd = train["annotations"][4]
    assert isinstance(crowd["segmentation"]["counts"], list) and crowd["segmentation"]["size"] == [259, 384]
    assert [(a["image_id"], a["category_id"]) for a in val["annotations"]] == [(1, 1), (1, 32), (4, 47), (4, 50), (4, 67)]
    assert len(val65["categories"]) == 65 and [a["category_id"] for a in val65["annotations"]] == [1, 32, 47, 50]
    tie = val["annotations"][1]
    assert tie["bbox"] == [142.22, 259.2, 49.97, 64.0]  # (222, 405, 78, 100) * (328 / 512, 384 / 600)
    assert tie["area"] == pytest.approx(rd.polygon_area(tie["segmentation"][0]), abs=0.01)


def test_coco_split_comes_from_the_ov_vocabulary(built):
    vocab = load_vocab(rd.OV_COCO_VOCAB)
    assert len(vocab) == 65 and len(vocab.novel_indices) == 17
    cats = {x["id"]: x for x in load_coco(built["coco"]["train_json"])["categories"]}
    for cid, name, split in zip(vocab.ids, vocab.names, vocab.split):
        assert cats[cid]["name"] == name and cats[cid]["split"] == split
    assert "split" not in cats[67]  # dining table: one of the 15 classes outside OV-COCO
    assert vocab_from_coco(load_coco(built["coco"]["val_ov65_json"])).split == vocab.split
    novel = {vocab.names[i] for i in vocab.novel_indices}
    assert {"cat", "tie", "cup"} <= novel and not {"person", "spoon", "motorcycle", "bicycle"} & novel


@pytest.mark.parametrize("split", ["train_json", "val_json"])
def test_coco_detection_yields_the_hand_written_boxes(built, split):
    c = built["coco"]
    ds = CocoDetection(c[split], c["image_root"])  # vocabulary = the file's 80 categories
    keys = {p.image_id: p.key for p in rd.PHOTOS}
    for i in range(len(ds)):
        img, target = ds[i]
        key = keys[target["image_id"]]
        w, h = rd.photo_size(key)
        assert tuple(img.shape) == (3, h, w), key
        exp = _expected(key, "coco")
        np.testing.assert_allclose(target["boxes"].numpy(), np.array([_xyxy(o["box"]) for o in exp], np.float32).reshape(-1, 4), atol=1e-3)
        assert [ds.vocab.names[k] for k in target["labels"].tolist()] == [rd.COCO_NAMES[o["coco"]] for o in exp]


def test_coco_detection_numbers(built):
    c = built["coco"]
    train = CocoDetection(c["train_json"], c["image_root"])
    img, t = train[1]  # chelsea: stored sideways with EXIF 6
    assert tuple(img.shape) == (3, 300, 451) and t["boxes"].tolist() == [[0.0, 0.0, 400.0, 300.0]]
    img, t = train[3]  # cameraman: grayscale JPEG
    assert tuple(img.shape) == (3, 320, 320) and bool((img[0] == img[2]).all())
    np.testing.assert_allclose(t["boxes"].numpy(), [[0.0, 42.5, 206.25, 320.0]], atol=1e-4)
    img, t = train[2]  # motorcycle: the crowd region is left out of the targets
    assert [train.vocab.names[k] for k in t["labels"].tolist()] == ["motorcycle", "bicycle"]
    np.testing.assert_allclose(t["boxes"].numpy(), [[47.68, 51.8, 354.98, 234.14], [0.0, 72.52, 23.32, 121.73]], atol=1e-3)


def test_coco_with_ov_vocabulary_skips_the_other_classes(built):
    c = built["coco"]
    vocab = load_vocab(rd.OV_COCO_VOCAB)
    with pytest.warns(UserWarning, match="outside the vocabulary"):
        val = CocoDetection(c["val_json"], c["image_root"], vocab=vocab, skip_unknown=True)
    assert val.skipped_unknown == 1  # coffee's dining table
    labels = [[vocab.names[k] for k in val[i][1]["labels"].tolist()] for i in range(len(val))]
    assert labels == [["person", "tie"], ["cup", "spoon"]]
    assert [[vocab.split[k] for k in val[i][1]["labels"].tolist()] for i in range(len(val))] == [["base", "novel"], ["novel", "base"]]
    train = CocoDetection(c["train_json"], c["image_root"], vocab=vocab, skip_unknown=True)
    assert train.skipped_unknown == 0
    novel = [vocab.names[k] for i in range(len(train)) for k in train[i][1]["labels"].tolist() if vocab.is_novel[k]]
    assert novel == ["cat"]


def test_coco_masks_match_area_and_box(built):
    c = built["coco"]
    ds = CocoDetection(c["val_json"], c["image_root"], masks=True)
    for i in range(len(ds)):
        _, t = ds[i]
        anns = ds.annotations(i)
        assert t["masks"].shape[0] == len(anns)
        for m, box, a in zip(t["masks"].numpy(), t["boxes"].numpy(), anns):
            assert m.sum() == pytest.approx(a["area"], rel=0.05)
            ys, xs = np.nonzero(m)
            assert xs.min() >= np.floor(box[0]) - 1 and xs.max() <= np.ceil(box[2]) and ys.min() >= np.floor(box[1]) - 1 and ys.max() <= np.ceil(box[3])


def _gt_as_results(path: Path) -> list[dict]:
    d = json.loads(path.read_text(encoding="utf-8"))
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in d["annotations"] if not a.get("iscrowd", 0)]


def test_ov_coco_evaluation_of_ground_truth_is_perfect(built):
    path = built["coco"]["val_ov65_json"]
    m = evaluate_detection(path, _gt_as_results(path), vocab=load_vocab(rd.OV_COCO_VOCAB))
    assert m["bbox/AP50"] == pytest.approx(1.0) and m["bbox/AP"] == pytest.approx(1.0)
    assert m["bbox/AP50_novel"] == pytest.approx(1.0) and m["bbox/AP50_base"] == pytest.approx(1.0)
    assert m["bbox/AP50/tie"] == pytest.approx(1.0) and m["bbox/AP50/cup"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# LVIS v1


def test_lvis_json_and_vocabulary(built):
    lv = built["lvis"]
    train, val = load_coco(lv["train_json"]), load_coco(lv["val_json"])
    cat_ids = {x["id"] for x in val["categories"]}
    for d in (train, val):
        assert {"frequency", "synonyms", "def", "synset", "image_count", "instance_count"} <= set(d["categories"][0])
        for im in d["images"]:
            assert (lv["image_root"] / im["file_name"]).is_file()
            assert im["coco_url"].endswith("/" + im["file_name"])
            assert set(im["neg_category_ids"]) <= cat_ids and set(im["not_exhaustive_category_ids"]) <= cat_ids
        assert all("iscrowd" not in a for a in d["annotations"])
    assert [im["file_name"].split("/")[0] for im in val["images"]] == ["train2017", "train2017", "val2017", "val2017"]
    vocab = load_vocab(lv["train_json"])
    assert len(vocab) == 23
    assert [vocab.names[i] for i in vocab.novel_indices] == ["pin_(non_jewelry)", "space_shuttle", "trench_coat"]
    assert vocab.names[vocab.index("tie (necktie)")] == "necktie"  # LVIS synonyms, underscores read as spaces
    freq = {x["id"]: x["frequency"] for x in val["categories"]}
    rare_in_val = sorted(a["category_id"] for a in val["annotations"] if freq[a["category_id"]] == "r")
    assert rare_in_val == [991, 1118]
    assert all(freq[a["category_id"]] != "r" for a in train["annotations"])
    motorcycle = next(im for im in train["images"] if im["id"] == 5)
    assert motorcycle["not_exhaustive_category_ids"] == [143]


def test_lvis_detection_yields_the_hand_written_boxes(built):
    lv = built["lvis"]
    vocab = load_vocab(lv["val_json"])
    ds = CocoDetection(lv["val_json"], lv["image_root"], vocab=vocab)
    _, t = ds[0]  # astronaut
    assert t["image_id"] == 2
    names = [vocab.names[k] for k in t["labels"].tolist()]
    assert names == ["person", "helmet", "flag", "space_shuttle", "jumpsuit"]
    np.testing.assert_allclose(t["boxes"][3].numpy(), [264.75, 0.0, 350.25, 206.25], atol=1e-4)
    assert [vocab.split[k] for k in t["labels"].tolist()] == ["base", "base", "base", "novel", "base"]
    for i in range(len(ds)):
        img, t = ds[i]
        key = {p.image_id: p.key for p in rd.PHOTOS}[t["image_id"]]
        exp = _expected(key, "lvis")
        np.testing.assert_allclose(t["boxes"].numpy(), np.array([_xyxy(o["box"]) for o in exp], np.float32), atol=1e-3)


def test_lvis_evaluation_of_ground_truth_is_perfect(built):
    path = built["lvis"]["val_json"]
    m = evaluate_detection(path, _gt_as_results(path), vocab=load_vocab(path), max_dets=300)
    assert m["bbox/AP"] == pytest.approx(1.0)
    aps = {k: v for k, v in m.items() if k.startswith("bbox/AP")}
    assert all(v == pytest.approx(1.0) or v == -1 for v in aps.values()), aps


def test_lvis_prompts_are_natural_words(built):
    vocab = load_vocab(built["lvis"]["val_json"])
    assert all("_" not in p for prompts in vocab.prompts for p in prompts)
    assert vocab.names[vocab.index("space_shuttle")] == "space_shuttle"  # names still identify the class


# --------------------------------------------------------------------------------------------
# PASCAL VOC 2012


def _voc_vocab():
    return load_vocab(load_config(REPO / "configs/voc/clip_es.yaml").data.vocab)


def _at(key: str, x: float, y: float) -> tuple[int, int]:
    """Source-photo pixel (x, y) -> (row, col) in the downscaled photo."""
    (w0, h0), (w, h) = rd.source_size(key), rd.photo_size(key)
    return int(y * h / h0), int(x * w / w0)


def test_voc_layout_and_palette_masks(built):
    voc = built["voc"]
    assert voc["train_list"].read_text().split() == ["2012_000002", "2012_000003", "2012_000005", "2012_000004"]
    assert voc["val_list"].read_text().split() == ["2012_000001", "2012_000006"]
    expected_ids = {"grace_hopper": {15}, "astronaut": {15}, "chelsea": {8}, "coffee": {11}, "motorcycle": {14, 2}, "camera": {15}}
    pal = rd.voc_palette()
    assert pal[3:6] == [128, 0, 0] and pal[15 * 3:16 * 3] == [192, 128, 128] and pal[255 * 3:] == [224, 224, 192]
    for key, ids in expected_ids.items():
        png = voc["masks"] / f"{rd.VOC_NAMES[key]}.png"
        with Image.open(png) as im:
            assert im.mode == "P" and im.getpalette()[:63] == pal[:63]
            assert im.size == rd.photo_size(key)
        m = read_mask(png)
        assert set(np.unique(m).tolist()) == ids | {0, 255}, key
        band = (m == 255).mean()
        assert 0.002 < band < 0.15, (key, band)
    m = {k: read_mask(voc["masks"] / f"{rd.VOC_NAMES[k]}.png") for k in expected_ids}
    assert m["chelsea"][_at("chelsea", 200, 150)] == 8 and m["chelsea"][_at("chelsea", 440, 150)] == 0
    assert m["grace_hopper"][_at("grace_hopper", 265, 260)] == 15  # her face
    assert m["grace_hopper"][_at("grace_hopper", 480, 100)] == 0  # the blue backdrop
    assert m["grace_hopper"][_at("grace_hopper", 60, 100)] == 0  # the flag: not a VOC class
    assert m["motorcycle"][_at("motorcycle", 400, 320)] == 14 and m["motorcycle"][_at("motorcycle", 20, 190)] == 2
    assert m["coffee"][_at("coffee", 500, 300)] == 11 and m["coffee"][_at("coffee", 10, 5)] == 0
    assert m["camera"][_at("camera", 80, 350)] == 15 and m["camera"][_at("camera", 450, 400)] == 0
    # the ignore band straddles the outline: 255 just at the cat's right edge, cat / background either side
    r, c = _at("chelsea", 365, 200)
    assert m["chelsea"][r, c] == 255 and m["chelsea"][r, c - 5] == 8 and m["chelsea"][r, c + 5] == 0


def test_voc_semseg_dataset_and_image_labels(built):
    voc = built["voc"]
    vocab = _voc_vocab()
    assert len(vocab) == 20 and vocab.ids == tuple(range(1, 21)) and vocab.names[7] == "cat"
    for split in ("train", "val"):
        ds = SemSegDataset(voc["images"], voc[f"{split}_labels"], voc["masks"], num_classes=21)
        stems = voc[f"{split}_list"].read_text().split()
        assert [Path(f).stem for f in ds.file_names] == stems
        for i in range(len(ds)):
            img, mask = ds[i]
            assert img.shape[1:] == mask.shape
    img, mask = SemSegDataset(voc["images"], voc["train_labels"], voc["masks"], num_classes=21)[1]  # chelsea, EXIF 6
    assert tuple(img.shape) == (3, 300, 451) and set(mask.unique().tolist()) == {0, 8, 255}

    from distill.cam.run import read_image_labels

    entries = read_image_labels(voc["train_labels"], vocab)
    assert [(e.image_id, e.file_name) for e in entries][:2] == [(2012000002, "2012_000002.jpg"), (2012000003, "2012_000003.jpg")]
    assert [[vocab.names[k] for k in e.labels] for e in entries] == [["person"], ["cat"], ["bicycle", "motorbike"], ["diningtable"]]


def test_voc_segmentation_folder_reader(built):
    from distill.segmentation.train import SemSegFolder

    voc = built["voc"]
    stems = voc["val_list"].read_text().split()
    ds = SemSegFolder(voc["images"], voc["masks"], class_ids=range(1, 21), stems=stems)
    assert len(ds) == 2
    x, t = ds[1]  # the grayscale cameraman
    assert tuple(x.shape) == (3, 320, 320) and set(t["masks"].unique().tolist()) == {0, 15, 255}


def test_cam_ablation_finds_voc_ground_truth(built):
    """VOC is flat (JPEGImages/ + SegmentationClass(Aug)/{stem}.png): the split is the one the labels
    json (cam.labels) lists, and the ground truth is found without a {split}/ folder."""
    from distill.cam.run import _gt_path, _resolve_inputs

    voc = built["voc"]
    cfg = load_config(REPO / "configs/voc/clip_es.yaml", [
        f"data.image_root={voc['images']}", f"data.semantic_root={voc['masks']}", f"cam.labels={voc['val_labels']}"])
    root, labels, split = _resolve_inputs(cfg, "val", None)  # what cam_ablation(cfg, split="val") does first
    assert root == Path(voc["images"]) and labels == Path(voc["val_labels"]) and split == "val"
    gt = _gt_path(Path(cfg.data.semantic_root), "2012_000001.jpg", split)
    assert gt.is_file() and gt == Path(voc["masks"]) / "2012_000001.png"


# --------------------------------------------------------------------------------------------
# the photo folder


def test_photo_folder_for_label(built):
    folder = built["folder"]
    paths = list_images(folder)
    names = [p.relative_to(folder.resolve()).as_posix() for p in paths]
    assert names == ["astronaut.png", "cameraman_gray.jpg", "coffee.png", "grace_hopper.jpg", "motorcycle.jpg",
                     "phone/chelsea_exif6.jpg", "rocket.jpg"]
    by_name = {v: k for k, v in rd.PHOTO_FILES.items()}
    for p, n in zip(paths, names):
        arr = load_image(p)
        assert arr.shape[:2][::-1] == rd.photo_size(by_name[n]), n
    vocab = load_vocab(folder.parent / "vocab.txt")
    assert vocab.names == rd.PHOTO_VOCAB
    gt = load_coco(folder.parent / "gt.json")
    assert len(gt["images"]) == 7 and len(gt["annotations"]) == 23
    ds = CocoDetection(folder.parent / "gt.json", folder, vocab=vocab)
    _, t = ds[2]  # chelsea
    assert t["boxes"].tolist() == [[0.0, 0.0, 400.0, 300.0]] and vocab.names[int(t["labels"][0])] == "cat"

    from distill.labels.quality import label_quality

    m = label_quality(folder.parent / "gt.json", folder.parent / "gt.json")
    assert m["labels/precision_all"] == pytest.approx(1.0) and m["labels/recall_all"] == pytest.approx(1.0)


def test_overlays_render(built, tmp_path):
    c, lv = built["coco"], built["lvis"]
    outs = [
        rd.draw_overlay(c["val_json"], c["image_root"], tmp_path / "coco.png"),
        rd.draw_overlay(lv["val_json"], lv["image_root"], tmp_path / "lvis.png"),
        rd.draw_overlay(built["folder"].parent / "gt.json", built["folder"], tmp_path / "folder.png"),
        rd.draw_voc_overlay(built["voc"], tmp_path / "voc.png"),
    ]
    with Image.open(outs[0]) as im:
        assert im.size == (2 * 384, 384)  # two val images side by side, tiles of the largest size
    assert all(p.stat().st_size > 10_000 for p in outs)
