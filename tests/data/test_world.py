"""The shapes world: determinism, the base/novel split, and agreement between every view of it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from distill.config import load_config
from distill.data import world as W
from distill.data.coco import load_coco
from distill.data.world_draw import MIN_VISIBLE_PIXELS
from distill.errors import DistillError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes" / "world.yaml"
TINY = ["world.num_train=8", "world.num_val=6", "world.num_unlabeled=4"]


def _cfg(work_dir: Path, *overrides: str):
    return load_config(None, [f"work_dir={work_dir}", *TINY, *overrides])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return W.make_world(_cfg(tmp_path_factory.mktemp("w0") / "run"))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(ann: dict) -> np.ndarray:
    return mask_utils.decode(ann["segmentation"]).astype(bool)


def _png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny, tmp_path):
    again = W.make_world(_cfg(tmp_path / "again"))
    a, b = _files(tiny), _files(again)
    assert a.keys() == b.keys()
    # manifest.json holds the wall time, world.yaml the work dir: every other file is identical.
    differ = sorted(k for k in a if a[k] != b[k])
    assert differ == ["manifest.json", "world.yaml"]
    assert json.loads(a["manifest.json"])["world_hash"] == json.loads(b["manifest.json"])["world_hash"]

    other = _files(W.make_world(_cfg(tmp_path / "seed3", "world.seed=3")))
    images = [k for k in a if k.startswith("images/")]
    assert len(images) == 18
    assert sum(a[k] != other[k] for k in images) == len(images)
    assert a["instances_train.json"] != other["instances_train.json"]


def test_val_images_do_not_depend_on_num_train(tiny, tmp_path):
    fewer = W.make_world(_cfg(tmp_path / "fewer", "world.num_train=3"))
    big, small = COCO(str(tiny / "instances_val.json")), COCO(str(fewer / "instances_val.json"))
    for i_big, i_small in zip(sorted(big.imgs), sorted(small.imgs)):
        assert i_big - i_small == 5  # ids are sequential over the splits
        pix_a = _png(tiny / "images" / big.imgs[i_big]["file_name"])
        pix_b = _png(fewer / "images" / small.imgs[i_small]["file_name"])
        assert np.array_equal(pix_a, pix_b)


# --- vocabulary and split ------------------------------------------------------------------


def test_vocab_is_colour_major_with_ids_in_order():
    wcfg = load_config(None, []).world
    v = W.world_vocab(wcfg)
    assert len(v) == 36 and v.ids == tuple(range(1, 37))
    assert v.names[:7] == ("red circle", "red square", "red triangle", "red star", "red hexagon", "red cross", "green circle")
    assert sum(s == "novel" for s in v.split) == 8


@pytest.mark.parametrize("seed", range(25))
def test_seeded_split_keeps_every_colour_and_shape_in_base(seed):
    wcfg = load_config(None, [f"world.seed={seed}"]).world
    v = W.world_vocab(wcfg)
    base = [n for n, s in zip(v.names, v.split) if s == "base"]
    assert {n.split()[0] for n in base} == set(wcfg.colors)
    assert {n.split()[1] for n in base} == set(wcfg.shapes)
    assert len(v) - len(base) == wcfg.num_novel


def test_seeded_splits_differ_between_seeds():
    splits = {tuple(W.novel_names(load_config(None, [f"world.seed={s}"]).world)) for s in range(10)}
    assert len(splits) == 10


def test_novel_names_are_honoured(tmp_path):
    cfg = _cfg(tmp_path, "world.novel=[Red Star, blue  circle]")
    v = W.world_vocab(cfg.world)
    assert [n for n, s in zip(v.names, v.split) if s == "novel"] == ["red star", "blue circle"]
    out = W.make_world(cfg)
    cats = {c["name"]: c["split"] for c in json.loads((out / "instances_val.json").read_text())["categories"]}
    assert cats["red star"] == "novel" and cats["blue circle"] == "novel" and cats["red circle"] == "base"
    assert json.loads((out / "manifest.json").read_text())["novel"] == ["red star", "blue circle"]


def test_bad_split_settings_are_clear_errors():
    with pytest.raises(DistillError, match=r"world.novel: unknown category 'red stra' \(valid: red circle, "):
        W.world_vocab(load_config(None, ["world.novel=[red stra]"]).world)
    with pytest.raises(DistillError, match="world.num_novel: 31 is too many .* at most 30"):
        W.world_vocab(load_config(None, ["world.num_novel=31"]).world)
    with pytest.raises(DistillError, match="world.colors: unknown colour 'teal'"):
        W.world_vocab(load_config(None, ["world.colors=[red, teal]"]).world)


# --- the files agree with each other -------------------------------------------------------


def test_layout_and_coco_files(tiny):
    vocab = json.loads((tiny / "vocab.json").read_text())
    ids_seen = set()
    for split, n in (("train", 8), ("val", 6), ("unlabeled", 4)):
        data = load_coco(tiny / f"instances_{split}.json")  # our validator accepts it
        assert [c["id"] for c in data["categories"]] == list(range(1, 37))
        assert [(c["name"], c["split"]) for c in data["categories"]] == [(c["name"], c["split"]) for c in vocab]
        assert len(data["images"]) == n
        assert data["info"]["world_hash"] == W.world_hash(load_config(None, TINY).world)
        for im in data["images"]:
            assert im["file_name"] == f"{split}/{im['id']:06d}.png"
            img = _png(tiny / "images" / im["file_name"])
            assert img.shape == (128, 128, 3) and img.dtype == np.uint8
            assert im["id"] not in ids_seen
            ids_seen.add(im["id"])
        per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=max(ids_seen) + 1)
        assert all(1 <= per_image[im["id"]] <= 6 for im in data["images"])
        assert all(a["iscrowd"] == 0 for a in data["annotations"])
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["counts"]["train"]["images"] == 8
    assert manifest["counts"]["val"]["annotations"] == len(json.loads((tiny / "instances_val.json").read_text())["annotations"])
    assert load_config(tiny / "world.yaml", []).world == load_config(None, TINY).world


def test_masks_boxes_areas_and_semantic_agree(tiny):
    sizes = []
    for split in ("train", "val", "unlabeled"):
        coco = COCO(str(tiny / f"instances_{split}.json"))
        for iid, im in coco.imgs.items():
            sem = _png(tiny / "semantic" / im["file_name"])
            assert sem.shape == (128, 128) and sem.dtype == np.uint8
            ref = np.zeros_like(sem)
            for a in coco.imgToAnns[iid]:
                m = _decode(a)
                assert not ref[m].any(), "instance masks overlap"
                ref[m] = a["category_id"]
                ys, xs = np.nonzero(m)  # tight box, computed here from the pixels
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert a["area"] == m.sum() >= MIN_VISIBLE_PIXELS
                sizes.append(max(a["bbox"][2:]))
            ref[sem == 255] = 255  # objects dropped as almost fully occluded (rare)
            assert np.array_equal(ref, sem)
            labels = json.loads((tiny / f"image_labels_{split}.json").read_text())
            entry = next(e for e in labels if e["image_id"] == iid)
            assert entry["file_name"] == im["file_name"]
            assert entry["category_ids"] == sorted({a["category_id"] for a in coco.imgToAnns[iid]})
    assert max(sizes) <= 62 and min(sizes) >= 5
    assert np.median(sizes) > 15


def test_train_base_drops_novel_annotations_and_pixels(tiny):
    full = json.loads((tiny / "instances_train.json").read_text())
    base = json.loads((tiny / "instances_train_base.json").read_text())
    novel = {c["id"] for c in full["categories"] if c["split"] == "novel"}
    assert base["images"] == full["images"]  # OV-COCO: images stay
    assert base["annotations"] == [a for a in full["annotations"] if a["category_id"] not in novel]
    assert len(base["annotations"]) < len(full["annotations"])  # the tiny world has some novel objects
    base_labels = json.loads((tiny / "image_labels_train_base.json").read_text())
    for im, lab in zip(full["images"], base_labels):
        sem = _png(tiny / "semantic" / im["file_name"])
        sem_base = _png(tiny / "semantic" / "train_base" / Path(im["file_name"]).name)
        expected = np.where(np.isin(sem, sorted(novel)), 255, sem)
        assert np.array_equal(sem_base, expected)
        assert not set(lab["category_ids"]) & novel


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") or shape.endswith("x") else shape + "s"


def test_captions_name_every_object(tiny):
    caps = {c["image_id"]: c for c in json.loads((tiny / "captions.json").read_text())}
    words = ["zero", "one", "two", "three", "four", "five", "six"]
    forms = set()
    for split in ("train", "val", "unlabeled"):
        coco = COCO(str(tiny / f"instances_{split}.json"))
        for iid in coco.imgs:
            entry = caps[iid]
            assert entry["split"] == split and entry["file_name"] == coco.imgs[iid]["file_name"]
            assert len(entry["captions"]) >= 2 and len(set(entry["captions"])) == len(entry["captions"])
            counts: dict[str, int] = {}
            for a in coco.imgToAnns[iid]:
                name = coco.cats[a["category_id"]]["name"]
                counts[name] = counts.get(name, 0) + 1
            for cap in entry["captions"]:
                forms.add(cap.split(" ")[0])
                for name, k in counts.items():
                    color, shape = name.split()
                    if k == 1:
                        phrase = f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
                    else:
                        phrase = f"{words[k]} {color} {_plural(shape)}"
                    assert phrase in cap, (phrase, cap)
    assert len(forms) >= 3  # varied sentence forms


def test_captions_json_names_the_background_and_clutter_boxes(tiny):
    """Each entry carries its background texture and clutter items; a clutter box holds pixels of
    the clutter colour (gray or brown) that no object or the background explains."""
    entries = json.loads((tiny / "captions.json").read_text())
    n_items = 0
    for e in entries:
        assert e["background"] in ("plain", "gradient", "striped", "blotchy")
        for c in e["clutter"]:
            tone, kind = c["name"].split()
            assert tone in ("gray", "brown") and kind in ("line", "blob", "ellipse")
            x, y, w, h = c["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 128.01 and y + h <= 128.01 and w >= 1 and h >= 1
            n_items += 1
    assert n_items > 0


# --- the command line ----------------------------------------------------------------------


def test_cli_make_with_overrides(tmp_path, capsys):
    from distill.cli import main

    rc = main(["world", "make", str(CONFIG), f"work_dir={tmp_path}", "world.num_train=2", "world.num_val=1",
               "world.num_unlabeled=1", "world.seed=3", "world.novel=[red star,blue circle]"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "novel (2): red star, blue circle" in out and "train:     2 images" in out
    m = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert m["counts"]["val"]["images"] == 1 and m["novel"] == ["red star", "blue circle"]
    assert load_config(tmp_path / "data" / "world.yaml", []).world.seed == 3


@pytest.mark.parametrize("override,needle", [("world.sed=3", "did you mean 'seed'"), ("world.novel=[red stra]", "unknown category 'red stra'")])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, override, needle):
    from distill.cli import main

    rc = main(["world", "make", str(CONFIG), f"work_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "data").exists()


# --- world.fill ----------------------------------------------------------------------------


def test_pattern_fill_textures_objects_only_and_keeps_the_layout(tiny, tmp_path):
    """fill=pattern (the default) darkens a shape-specific texture inside objects; fill=flat draws
    the same world without it."""
    pat, tiny = tiny, W.make_world(_cfg(tmp_path / "flat", "world.fill=flat"))
    for name in ("instances_train.json", "instances_val.json"):
        a, b = json.loads((pat / name).read_text()), json.loads((tiny / name).read_text())
        assert a["info"]["world_hash"] != b["info"]["world_hash"]
        assert {k: v for k, v in a.items() if k != "info"} == {k: v for k, v in b.items() if k != "info"}
    for name in ("captions.json", "image_labels_val.json"):
        assert (pat / name).read_bytes() == (tiny / name).read_bytes()
    coco = json.loads((tiny / "instances_val.json").read_text())
    shapes = {c["id"]: c["name"].split(" ", 1)[1] for c in coco["categories"]}
    seen = set()
    for im in coco["images"]:
        flat = _png(tiny / "images" / im["file_name"]).astype(np.int16)
        tex = _png(pat / "images" / im["file_name"]).astype(np.int16)
        sem = _png(tiny / "semantic" / im["file_name"])
        changed = np.abs(flat - tex).max(2) > 25
        # away from objects (2 px margin for anti-aliased edges) the images agree up to the noise
        near = cv2.dilate((sem > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert not changed[~near].any()
        for a in coco["annotations"]:
            if a["image_id"] != im["id"]:
                continue
            inner = cv2.erode(_decode(a).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            if inner.sum() < 30:
                continue
            frac = changed[inner].mean()
            assert 0.1 < frac < 0.8, (shapes[a["category_id"]], frac)  # a texture, not a flat recolour
            seen.add(shapes[a["category_id"]])
    assert len(seen) >= 3


def test_unknown_fill_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="world.fill: expected one of flat, pattern"):
        W.make_world(_cfg(tmp_path / "bad", "world.fill=stripes"))
