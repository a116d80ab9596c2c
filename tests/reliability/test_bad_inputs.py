"""Bad inputs a user can hand to ``distill``, tried at the level the user meets them: through the
CLI (``distill.cli.main``) in-process. Every file is generated here, in ``tmp_path``.

Each bad input gets either a one-line error (``error: ...`` on stderr, exit code 2, no traceback)
or a counted skip (the run finishes, the file is listed in ``failures.txt`` with its reason and
counted in ``labels/failures``). Inputs that are odd but valid are handled and checked.

=====  ==========================================  ===============================  ======================
 #     bad input                                   command                          handling
=====  ==========================================  ===============================  ======================
 1     truncated JPEG                              distill label --images DIR       counted skip "truncated or corrupt"
 2     zero-byte PNG                               distill label --images DIR       counted skip "empty file (0 bytes)"
 3     text file named .jpg                        distill label --images DIR       counted skip "not an image"
 4     decompression-bomb header (100000x100000)   distill label --images DIR       counted skip "decompression bomb"
 5     1x1 image                                   distill label --images DIR       handled (labeled, 1x1)
 6     CMYK JPEG                                   distill label --images DIR       handled (RGB, labeled)
 7     16-bit PNG                                  distill label --images DIR       handled (labeled)
 8     RGBA PNG                                    distill label --images DIR       handled (labeled)
 9     EXIF-rotated JPEG (orientation 6)           distill label --images DIR       handled (upright: w/h swapped)
 10    folder with only bad images                 distill label --images DIR       counted skips, 0 images, exit 0
 11    COCO json missing "annotations"             distill eval det --gt            exit 2 "missing key 'annotations'"
 12    COCO json negative box width                distill eval det --gt            exit 2 "bbox"
 13    COCO json NaN box                           distill eval det --gt            exit 2 "bbox"
 14    COCO json duplicate annotation ids          distill eval det --gt            exit 2 "duplicate"
 15    COCO json duplicate image ids               distill eval det --gt            exit 2 "duplicate"
 16    COCO json unknown category id               distill eval det --gt            exit 2 "category"
 17    COCO json not json at all                   distill eval det --gt            exit 2 "not valid json"
 18    COCO file_name with ../                     distill train det (loaders)      exit 2 "file_name" (test_security.py)
 19    COCO file_name absolute                     distill train det (loaders)      exit 2 "file_name" (test_security.py)
 20    YAML unknown key                            distill world make CFG           exit 2 "unknown config key" + valid keys
 21    YAML wrong type                             distill world make CFG           exit 2 "expected an int"
 22    YAML !!python/object/apply tag              distill world make CFG           exit 2 "not valid YAML"; code not run
 23    YAML that is a list, not a mapping          distill world make CFG           exit 2 "expected a mapping"
 24    override with unknown key                   distill world make CFG k=v       exit 2 "unknown config key"
 25    empty vocabulary file                       distill label --vocab FILE       exit 2 "empty vocabulary"
 26    duplicated class (case differs, or ids)     distill label --vocab            exit 2 "duplicate class"/"duplicate"
 26b   exact repeat of a class in an inline list   distill label --vocab            handled (merged into one class)
 27    unicode class names                         distill label --vocab            handled (names kept in labels.json)
 28    very long class name (2000 chars)           distill label --vocab            handled (prompt truncated by tokenizer)
 29    checkpoint of another model                 distill label --source seg       exit 2 "does not fit"
 30    checkpoint carrying pickled code            distill label --source seg       exit 2 "not a readable checkpoint"; code not run
 31    teacher weights carrying pickled code       distill label teacher.pretrained exit 2 "cannot read weights"; code not run
 32    teacher weights of another model            distill label teacher.pretrained exit 2 naming the file
 33    --images folder that does not exist         distill label --images           exit 2 "not found"
 34    --out below a regular file                  distill label --out              exit 2 "cannot create" (test_kills.py)
 35    full disk (ENOSPC injected at fsync)        distill label                    exit 2 "No space left on device" (test_kills.py)
 36    read-only output folder (chmod 0o500)       distill label --out              exit 2; skipped when run as root (test_kills.py)
=====  ==========================================  ===============================  ======================

37 bad inputs: 5 counted skips (1-4, 10), 8 odd inputs handled (5-9, 26b, 27, 28), 24 one-line errors
(11-26, 29-36; 18 and 19 in test_security.py, 34-36 in test_kills.py; 36 is skipped as root, where
chmod does not stop writes). Pickled code never runs (22, 30, 31 assert it).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import main
from ._fixtures import REPO, cli_error, make_teacher_dir, seg_overrides, teacher_overrides

VOCAB = "red square, blue square, green circle"


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "t", seed=0)


def _scene(rng, h=48, w=48):
    img = rng.integers(100, 140, size=(h, w, 3), dtype=np.uint8)
    y, x = rng.integers(0, min(h, w) - 16, 2)
    img[y : y + 14, x : x + 14] = (220, 30, 30)
    return img


def _bomb_png(path: Path, w: int = 100_000, h: int = 100_000) -> None:
    """A valid PNG signature + IHDR claiming w x h (8-bit RGB) and a tiny IDAT: a bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def make_bad_image_folder(root: Path) -> dict[str, str]:
    """Good, odd-but-valid and bad images. Returns {relative name: expected failure reason} for the bad."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_scene(rng)).save(root / "good_a.png")
    Image.fromarray(_scene(rng)).save(root / "good_b.jpg", quality=95)
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(root / "one_by_one.png")
    Image.fromarray(_scene(rng)).convert("CMYK").save(root / "cmyk.jpg", "JPEG", quality=95)
    a16 = (rng.integers(0, 65535, size=(40, 40))).astype(np.uint16)
    Image.fromarray(a16).save(root / "sixteen.png")  # mode I;16
    rgba = np.dstack([_scene(rng), np.full((48, 48), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    im = Image.fromarray(_scene(rng, h=24, w=40))  # stored 40 wide x 24 high
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display: upright it is 24 wide x 40 high
    im.save(root / "exif6.jpg", "JPEG", quality=95, exif=exif.tobytes())
    buf = io.BytesIO()
    Image.fromarray(_scene(rng)).save(buf, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is a text file, not a photo\n")
    _bomb_png(root / "bomb.png")
    return {"truncated.jpg": "truncated or corrupt", "zero.png": "empty file (0 bytes)", "text.jpg": "not an image",
            "bomb.png": "decompression bomb"}


def _label_argv(images, out, teacher_model, vocab=VOCAB, *extra):
    return ["label", "--images", str(images), "--vocab", vocab, "--model", "teacher", "--out", str(out),
            "--format", "coco,png", "--score-thresh", "0", "--batch-size", "4", *teacher_overrides(teacher_model), *extra]


def test_bad_images_are_counted_skips_and_odd_images_are_labeled(tmp_path, teacher_model, capsys):
    bad = make_bad_image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    assert main(_label_argv(tmp_path / "imgs", out, teacher_model)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels/failures"] == len(bad) == 4
    assert summary["labels/images"] == 7
    fails = dict(line.split("\t", 1) for line in (out / "failures.txt").read_text().splitlines())
    assert set(fails) == set(bad)
    for name, reason in bad.items():
        assert reason in fails[name] and name in fails[name], (name, fails[name])
        assert "\n" not in fails[name]
    coco = json.loads((out / "labels.json").read_text())
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in coco["images"]}
    assert sizes == {"good_a.png": (48, 48), "good_b.jpg": (48, 48), "one_by_one.png": (1, 1), "cmyk.jpg": (48, 48),
                     "sixteen.png": (40, 40), "rgba.png": (48, 48), "exif6.jpg": (24, 40)}
    # a semantic PNG per labeled image, with the upright size
    assert Image.open(out / "semantic" / "exif6.png").size == (24, 40)
    assert not any((out / "semantic").glob("truncated*"))


def test_folder_of_only_bad_images(tmp_path, teacher_model, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("nope")
    out = tmp_path / "out"
    assert main(_label_argv(d, out, teacher_model)) == 0
    assert "Traceback" not in capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert (s["labels/images"], s["labels/failures"], s["labels/annotations"]) == (0, 2, 0)
    assert json.loads((out / "labels.json").read_text())["images"] == []


def test_missing_image_folder(tmp_path, teacher_model, capsys):
    line = cli_error(capsys, _label_argv(tmp_path / "nowhere", tmp_path / "out", teacher_model))
    assert "nowhere" in line and "not found" in line


# ------------------------------------------------------------------------------------------ COCO


def _coco():
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}, {"id": 2, "file_name": "b.png", "width": 32, "height": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 8, 8], "area": 64, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue circle", "split": "novel"}],
    }


def _del(k):
    return lambda d: d.pop(k)


def _set_ann(i, k, v):
    def f(d):
        d["annotations"][i][k] = v
    return f


def _dup_image(d):
    d["images"][1]["id"] = 1
    d["annotations"][1]["image_id"] = 1


COCO_CASES = {
    "missing_annotations": (_del("annotations"), "missing key 'annotations'"),
    "negative_box": (_set_ann(0, "bbox", [2, 2, -10, 10]), "bbox"),
    "nan_box": (_set_ann(0, "bbox", [2, float("nan"), 10, 10]), "bbox"),
    "duplicate_ann_ids": (_set_ann(1, "id", 1), "duplicate"),
    "duplicate_image_ids": (_dup_image, "duplicate"),
    "unknown_category": (_set_ann(1, "category_id", 7), "category"),
}


def test_good_coco_evaluates(tmp_path, capsys):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(_coco()))
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9}]))
    assert main(["eval", "det", "--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "m")]) == 0
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert m["bbox/AP_base"] == pytest.approx(1.0) and m["bbox/AP_novel"] == pytest.approx(0.0)


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_bad_coco_through_eval_is_one_line(tmp_path, capsys, case):
    mutate, expect = COCO_CASES[case]
    d = _coco()
    mutate(d)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(d))  # json.dumps writes NaN as the literal NaN, as many tools do
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9}]))
    line = cli_error(capsys, ["eval", "det", "--gt", str(gt), "--pred", str(pred)])
    assert "gt.json" in line and expect in line, line


def test_coco_not_json(tmp_path, capsys):
    gt = tmp_path / "gt.json"
    gt.write_text("{ not json")
    pred = tmp_path / "pred.json"
    pred.write_text("[]")
    line = cli_error(capsys, ["eval", "det", "--gt", str(gt), "--pred", str(pred)])
    assert "gt.json" in line and "json" in line


# ------------------------------------------------------------------------------------------ YAML


def test_yaml_unknown_key_wrong_type_and_not_a_mapping(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"work_dir: {tmp_path / 'w'}\nwrold:\n  seed: 1\n")
    line = cli_error(capsys, ["world", "make", str(cfg)])
    assert "unknown config key 'wrold'" in line and "did you mean 'world'" in line and "valid keys:" in line
    cfg.write_text(f"work_dir: {tmp_path / 'w'}\nworld:\n  seed: three\n")
    line = cli_error(capsys, ["world", "make", str(cfg)])
    assert "world.seed" in line and "expected an int" in line
    cfg.write_text(f"work_dir: {tmp_path / 'w'}\nworld:\n  num_train: [1, 2]\n")
    line = cli_error(capsys, ["world", "make", str(cfg)])
    assert "world.num_train" in line
    cfg.write_text("- world\n- seed\n")
    line = cli_error(capsys, ["world", "make", str(cfg)])
    assert "c.yaml" in line and "expected a mapping" in line
    cfg.write_text(f"work_dir: {tmp_path / 'w'}\n")
    line = cli_error(capsys, ["world", "make", str(cfg), "world.sede=3"])
    assert "unknown config key 'world.sede'" in line and "seed" in line
    assert not (tmp_path / "w" / "data").exists()  # nothing was built from a bad config


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system", "!!python/name:os.system"])
def test_yaml_python_tags_are_refused_and_never_run(tmp_path, capsys, tag):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "c.yaml"
    arg = f'["touch {marker}"]' if "name:" not in tag else "''"
    cfg.write_text(f"work_dir: {tmp_path / 'w'}\nworld:\n  seed: {tag} {arg}\n")
    line = cli_error(capsys, ["world", "make", str(cfg)])
    assert "c.yaml" in line and "not valid YAML" in line
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ vocabularies


def _tiny_folder(root: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_scene(rng)).save(root / f"{i}.png")
    return root


def test_empty_and_duplicated_vocabularies(tmp_path, teacher_model, capsys):
    imgs = _tiny_folder(tmp_path / "imgs")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    line = cli_error(capsys, _label_argv(imgs, tmp_path / "o1", teacher_model, str(empty)))
    assert "empty.txt" in line and "empty vocabulary" in line
    line = cli_error(capsys, _label_argv(imgs, tmp_path / "o2", teacher_model, "red square, blue circle, Red Square"))
    assert "duplicate class 'Red Square'" in line
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]))
    line = cli_error(capsys, _label_argv(imgs, tmp_path / "o3", teacher_model, str(dup)))
    assert "dup.json" in line and "duplicate" in line
    assert not (tmp_path / "o1" / "labels.json").exists()
    # an exact repeat is refused too (README "Words": nothing is merged), before anything is written
    line = cli_error(capsys, _label_argv(imgs, tmp_path / "o4", teacher_model, "red square, blue circle, red square"))
    assert "duplicate class 'red square'" in line
    assert not (tmp_path / "o4").exists() or not any((tmp_path / "o4").iterdir())


def test_unicode_and_very_long_vocabularies_are_handled(tmp_path, teacher_model, capsys):
    imgs = _tiny_folder(tmp_path / "imgs")
    names = ["étoile rouge", "红色 正方形", "квадрат", "🟥 square", "x" * 2000]
    vf = tmp_path / "v.txt"
    vf.write_text("\n".join(names) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(_label_argv(imgs, out, teacher_model, str(vf))) == 0
    assert "Traceback" not in capsys.readouterr().err
    coco = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in coco["categories"]] == names
    assert len(coco["images"]) == 2 and len(coco["annotations"]) > 0
    assert {a["category_id"] for a in coco["annotations"]} <= {c["id"] for c in coco["categories"]}


# ------------------------------------------------------------------------------------------ checkpoints


class Evil:
    """Unpickling this runs ``touch <marker>`` (what weights_only=True must refuse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _seg_model_dir(tmp_path, teacher_model) -> Path:
    """A folder that looks like a trained seg student (config.yaml beside the checkpoint)."""
    from distill.config import load_config, save_config

    d = tmp_path / "seg"
    d.mkdir()
    save_config(load_config(REPO / "configs/shapes/lseg.yaml", seg_overrides(tmp_path / "w", teacher_model)), d / "config.yaml")
    return d


def test_checkpoint_of_another_model(tmp_path, teacher_model, capsys):
    imgs = _tiny_folder(tmp_path / "imgs")
    d = _seg_model_dir(tmp_path, teacher_model)
    torch.save(torch.nn.Linear(3, 4).state_dict(), d / "model_final.pt")
    line = cli_error(capsys, ["label", "--images", str(imgs), "--vocab", VOCAB, "--model", str(d / "model_final.pt"), "--source", "seg",
                        "--out", str(tmp_path / "out"), *teacher_overrides(teacher_model)])
    assert "model_final.pt" in line and "does not fit" in line


def test_checkpoint_carrying_pickled_code_is_refused_and_never_run(tmp_path, teacher_model, capsys):
    imgs = _tiny_folder(tmp_path / "imgs")
    d = _seg_model_dir(tmp_path, teacher_model)
    marker = tmp_path / "pwned"
    torch.save({"model": Evil(marker)}, d / "model_final.pt")
    # sanity: the payload really runs code when unpickled (what __reduce__ hands to pickle)
    fn, args = Evil(marker).__reduce__()
    fn(*args)
    assert marker.exists()
    marker.unlink()
    line = cli_error(capsys, ["label", "--images", str(imgs), "--vocab", VOCAB, "--model", str(d / "model_final.pt"), "--source", "seg",
                              "--out", str(tmp_path / "out"), *teacher_overrides(teacher_model)])
    assert "model_final.pt" in line and "not a readable checkpoint" in line
    assert not marker.exists()


def test_teacher_weights_with_pickled_code_or_of_another_model(tmp_path, capsys):
    imgs = _tiny_folder(tmp_path / "imgs")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"visual.proj": Evil(marker)}, evil)
    base = ["label", "--images", str(imgs), "--vocab", VOCAB, "--model", "teacher", "--out", str(tmp_path / "out"),
            "teacher.model=distill-tiny-vit", "teacher.templates=", "teacher.device=cpu"]
    line = cli_error(capsys, base + [f"teacher.pretrained={evil}"])
    assert "evil.pt" in line and "cannot read weights" in line
    assert not marker.exists()
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), other)
    line = cli_error(capsys, base + [f"teacher.pretrained={other}"])
    assert "other.pt" in line
