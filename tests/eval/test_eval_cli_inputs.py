"""`distill eval det` / `distill eval seg` on inputs as users bring them, through the installed
``distill`` entry point in a subprocess from a folder outside the repository: upper-case ``.PNG``
ground truth, the labeler's semantic/ folder (legend.png, legend.json, its own PNG values), string
ids, degenerate ground-truth boxes, and a vocabulary that does not name the ground truth's classes.
Bad input is one line on stderr (exit 2, no traceback, nothing written); a warning or note is one
line and the evaluation goes on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_run import lines as _lines
from cli_run import one_line_error as _one_line_error
from cli_run import run as _run


# ------------------------------------------------------------------------------ eval seg

CATS = [{"id": 1, "name": "cat", "split": "base"}, {"id": 2, "name": "dog", "split": "base"},
        {"id": 3, "name": "bird", "split": "novel"}]


def _gt_json(tmp_path: Path) -> Path:
    p = tmp_path / "instances_val.json"
    p.write_text(json.dumps({"images": [], "annotations": [], "categories": CATS}))
    return p


def _label_map(seed: int, H=12, W=16) -> np.ndarray:
    """Category ids 0..3 (0 = background) in blocks."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 4, (H // 4, W // 4)), np.ones((4, 4), np.int64)).astype(np.uint8)


def _labeler_folder(folder: Path, maps: dict[str, np.ndarray], vocab_names: list[str]) -> None:
    """What ``distill label --format png`` writes into ``semantic/``: the label PNGs (values of
    :func:`formats.semantic_values` for its vocabulary), legend.json and legend.png."""
    from distill.labels import formats
    from distill.vocab import load_vocab

    vocab = load_vocab(", ".join(vocab_names))
    values = formats.semantic_values(vocab)
    folder.mkdir(parents=True)
    for stem, cat_ids in maps.items():  # the maps hold GT category ids: name -> the labeler's value
        sem = np.zeros_like(cat_ids)
        for c in CATS:
            sem[cat_ids == c["id"]] = values[vocab.index(c["name"])]
        formats.write_semantic_png(folder / f"{stem}.png", sem, values)
    formats.write_legend(folder, vocab)


def test_seg_upper_case_png_ground_truth(tmp_path):
    gt_json = _gt_json(tmp_path)
    gdir, pdir = tmp_path / "gt", tmp_path / "pred"
    gdir.mkdir()
    pdir.mkdir()
    for i in range(2):
        m = _label_map(i)
        Image.fromarray(m).save(gdir / f"IMG_{i}.PNG")
        Image.fromarray(m).save(pdir / f"IMG_{i}.png")  # the labeler writes lower-case .png
    r = _run(["eval", "seg", "--gt", gdir, "--pred", pdir, "--gt-json", gt_json, "--out", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["num_images"] == 2 and m["miou/all"] == 1.0


def test_seg_labeler_folder_evaluates_directly(tmp_path):
    """The labeler's semantic/ folder, legend.png and legend.json included, as the prediction and
    as the ground truth."""
    gt_json = _gt_json(tmp_path)
    maps = {f"{i:06d}": _label_map(i) for i in range(3)}
    sem = tmp_path / "labels" / "semantic"
    _labeler_folder(sem, maps, ["cat", "dog", "bird"])
    gdir = tmp_path / "gt"
    gdir.mkdir()
    for stem, m in maps.items():
        Image.fromarray(m).save(gdir / f"{stem}.png")
    r = _run(["eval", "seg", "--gt", gdir, "--pred", sem, "--gt-json", gt_json, "--out", "a"], tmp_path)
    assert r.returncode == 0 and _lines(r.stderr) == [], r.stderr
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["miou/all"] == 1.0
    r = _run(["eval", "seg", "--gt", sem, "--pred", sem, "--gt-json", gt_json, "--out", "b"], tmp_path)
    assert r.returncode == 0 and _lines(r.stderr) == [], r.stderr
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["num_images"] == 3 and m["miou/all"] == 1.0


def test_seg_labeler_values_are_read_through_its_legend(tmp_path):
    """A labeler run whose vocabulary lists the classes in another order than the ground truth's
    ids writes other PNG values (dog = 1); its legend.json says which value is which class, and
    the evaluation follows it instead of scoring dog pixels as cat."""
    gt_json = _gt_json(tmp_path)
    maps = {f"{i:06d}": _label_map(i) for i in range(3)}
    sem = tmp_path / "labels" / "semantic"
    _labeler_folder(sem, maps, ["dog", "bird", "cat", "fish"])  # fish: no class of the ground truth
    legend = json.loads((sem / "legend.json").read_text())
    assert [(e["value"], e["name"]) for e in legend][:2] == [(0, "background"), (1, "dog")]
    gdir = tmp_path / "gt"
    gdir.mkdir()
    for stem, m in maps.items():
        Image.fromarray(m).save(gdir / f"{stem}.png")
    r = _run(["eval", "seg", "--gt", gdir, "--pred", sem, "--gt-json", gt_json, "--out", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["miou/all"] == 1.0 and m["iou/dog"] == 1.0 and m["iou/cat"] == 1.0, m
    lines = _lines(r.stderr)  # one note: fish is not a class of the evaluation
    assert len(lines) == 1 and "legend.json" in lines[0] and "fish" in lines[0], r.stderr


def test_seg_legend_naming_an_unknown_class_in_the_ground_truth_is_an_error(tmp_path):
    gt_json = _gt_json(tmp_path)
    sem = tmp_path / "labels" / "semantic"
    _labeler_folder(sem, {"000000": _label_map(0)}, ["cat", "dog", "bird", "fish"])
    r = _run(["eval", "seg", "--gt", sem, "--pred", sem, "--gt-json", gt_json, "--out", "out"], tmp_path)
    _one_line_error(r, "legend.json", "'fish'", "instances_val.json")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ eval det


def _det_gt(**over) -> dict:
    gt = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}],
        "categories": [{"id": 1, "name": "cat", "split": "base"}, {"id": 2, "name": "dog", "split": "novel"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 20, 20, 30], "area": 600, "iscrowd": 0},
        ],
    }
    gt.update(over)
    return gt


def _results(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]


def _write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_det_string_image_id_in_annotations_says_the_types_differ(tmp_path):
    gt = _det_gt()
    res = _write(tmp_path, "res.json", _results(gt))
    gt["annotations"][1]["image_id"] = "2"
    g = _write(tmp_path, "gt.json", gt)
    r = _run(["eval", "det", "--gt", g, "--pred", res, "--out", "out"], tmp_path)
    _one_line_error(r, "gt.json", "annotations[1].image_id", "'2' is a string", "integer")
    assert not (tmp_path / "out").exists()


def test_det_string_ids_throughout_are_refused(tmp_path):
    gt = _det_gt()
    for im in gt["images"]:
        im["id"] = str(im["id"])
    for a in gt["annotations"]:
        a["image_id"] = str(a["image_id"])
    g = _write(tmp_path, "gt.json", gt)
    res = _write(tmp_path, "res.json", _results(gt))
    for backend in ("auto", "pycocotools"):
        r = _run(["eval", "det", "--gt", g, "--pred", res, "--out", "out", "--backend", backend], tmp_path)
        _one_line_error(r, "gt.json", "images[0].id", "'1' is a string", "integer")
    assert not (tmp_path / "out").exists()


def test_det_result_with_a_string_image_id_says_the_types_differ(tmp_path):
    gt = _det_gt()
    g = _write(tmp_path, "gt.json", gt)
    res = _results(gt)
    res[1]["image_id"] = "2"
    r = _run(["eval", "det", "--gt", g, "--pred", _write(tmp_path, "res.json", res)], tmp_path)
    _one_line_error(r, "res.json", "[1]: image_id '2' is a string", "integer")


def test_det_zero_size_and_outside_boxes_warn_once_and_score_as_pycocotools(tmp_path):
    gt = _det_gt()
    res = _results(gt)
    gt["annotations"] += [
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [60, 40, 0, 10], "area": 0, "iscrowd": 0},  # zero width
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [120, 10, 20, 20], "area": 400, "iscrowd": 0},  # right of the 100-px image
        {"id": 5, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 0], "area": 0, "iscrowd": 0},  # zero height
    ]
    g = _write(tmp_path, "gt.json", gt)
    p = _write(tmp_path, "res.json", res)
    out = {}
    for backend in ("auto", "pycocotools"):
        r = _run(["eval", "det", "--gt", g, "--pred", p, "--out", backend, "--backend", backend], tmp_path)
        assert r.returncode == 0, r.stderr
        lines = _lines(r.stderr)
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "gt.json" in lines[0] and "2 " in lines[0] and "zero" in lines[0] and "1 " in lines[0] and "outside" in lines[0], lines
        out[backend] = json.loads((tmp_path / backend / "metrics.json").read_text())
    assert out["auto"]["bbox/AP"] == out["pycocotools"]["bbox/AP"] < 1.0  # kept and scored as the reference does


def test_det_vocab_names_the_ground_truth_classes_by_name(tmp_path):
    """A vocabulary listing dog before cat (ids by position: dog = 1) gives each ground-truth
    category its own split, not the one of whatever class has the same id."""
    gt = _det_gt()
    g = _write(tmp_path, "gt.json", gt)
    res = _write(tmp_path, "res.json", [r for r in _results(gt) if r["category_id"] == 1])  # only the cat is found
    vocab = _write(tmp_path, "vocab.json", [{"name": "dog", "split": "novel"}, {"name": "cat", "split": "base"}])
    r = _run(["eval", "det", "--gt", g, "--pred", res, "--vocab", vocab, "--out", "out"], tmp_path)
    assert r.returncode == 0 and _lines(r.stderr) == [], r.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["bbox/AP50/cat"] == pytest.approx(1.0) and m["bbox/AP50/dog"] == 0.0, m
    assert m["bbox/AP_base"] == pytest.approx(1.0) and m["bbox/AP_novel"] == 0.0, m


def test_det_vocab_without_a_ground_truth_class_is_an_error_naming_both(tmp_path):
    gt = _det_gt()
    g = _write(tmp_path, "gt.json", gt)
    res = _write(tmp_path, "res.json", _results(gt))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\nbird\n")  # id 2 = bird here, dog in the ground truth
    r = _run(["eval", "det", "--gt", g, "--pred", res, "--vocab", vocab, "--out", "out"], tmp_path)
    _one_line_error(r, "gt.json", "vocab.txt", "'dog'", "'bird'")
    assert not (tmp_path / "out").exists()


def test_det_vocab_with_extra_classes_is_a_one_line_note(tmp_path):
    gt = _det_gt()
    g = _write(tmp_path, "gt.json", gt)
    res = _write(tmp_path, "res.json", _results(gt))
    vocab = _write(tmp_path, "vocab.json", [{"name": "cat", "split": "base"}, {"name": "dog", "split": "novel"},
                                            {"name": "fish", "split": "novel"}])
    r = _run(["eval", "det", "--gt", g, "--pred", res, "--vocab", vocab, "--out", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "vocab.json" in lines[0] and "fish" in lines[0] and "gt.json" in lines[0], r.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["bbox/AP"] == pytest.approx(1.0)
