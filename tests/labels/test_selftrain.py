"""Self-training input: pseudo labels -> a training json rebased onto data.image_root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.labels.selftrain import ID_OFFSET, pseudo_to_extra
from distill.vocab import load_vocab


def test_pseudo_to_extra_keeps_novel_rebases_and_reuses_ids(tmp_path):
    root = tmp_path / "data" / "images"
    (root / "unlabeled").mkdir(parents=True)
    vocab = load_vocab("red star, blue circle, green cross").with_split(["blue circle"])
    pseudo = {
        "info": {"images_root": str(root / "unlabeled")},
        "categories": [{"id": 1, "name": "red star"}, {"id": 2, "name": "blue circle"}, {"id": 9, "name": "pink heart"}],
        "images": [{"id": 1, "file_name": "000300.png", "width": 8, "height": 8},
                   {"id": 2, "file_name": "new.png", "width": 8, "height": 8}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 2, 2], "score": 0.9},  # novel: kept
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.9},  # base: dropped
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [1, 1, 2, 2], "score": 0.2},  # below 0.5: dropped
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [1, 1, 3, 3], "score": 0.6},  # kept
            {"id": 5, "image_id": 2, "category_id": 9, "bbox": [1, 1, 3, 3], "score": 0.9},  # unknown class
        ],
    }
    (tmp_path / "p.json").write_text(json.dumps(pseudo))
    ids = {"images": [{"id": 300, "file_name": "unlabeled/000300.png"}, {"id": 301, "file_name": "unlabeled/000301.png"}]}
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    counts = pseudo_to_extra(tmp_path / "p.json", tmp_path / "x.json", image_root=root, vocab=vocab,
                             score_thresh=0.5, id_json=tmp_path / "ids.json")
    assert counts == {"images": 2, "annotations": 2}
    out = json.loads((tmp_path / "x.json").read_text())
    assert [(im["id"], im["file_name"]) for im in out["images"]] == [(300, "unlabeled/000300.png"), (ID_OFFSET + 301 + 2, "unlabeled/new.png")]
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in out["annotations"]] == [(300, 2, [0, 0, 2, 2]), (ID_OFFSET + 303, 2, [1, 1, 3, 3])]
    assert [a["id"] for a in out["annotations"]] == [1, 2]
    assert [c["name"] for c in out["categories"]] == ["red star", "blue circle", "green cross"]
    # Images labeled outside data.image_root cannot be trained on: a clear error.
    with pytest.raises(DistillError, match="is not under data.image_root"):
        pseudo_to_extra(tmp_path / "p.json", tmp_path / "y.json", image_root=tmp_path / "elsewhere", vocab=vocab)


def test_merge_pseudo_adds_novel_labels_to_the_training_images(tmp_path):
    """VL-PLM style: novel pseudo-labels of the base split join its ground truth on the same images
    (same ids, fresh annotation ids); labels on an image outside the ground truth are an error."""
    from distill.labels.selftrain import merge_pseudo

    gt = {
        "info": {"description": "world"},
        "categories": [{"id": 1, "name": "red star"}, {"id": 2, "name": "blue circle"}],
        "images": [{"id": 5, "file_name": "train/a.png", "width": 8, "height": 8}, {"id": 7, "file_name": "train/b.png", "width": 8, "height": 8}],
        "annotations": [{"id": 40, "image_id": 5, "category_id": 1, "bbox": [0, 0, 2, 2], "iscrowd": 0}],
    }
    extra = {"images": gt["images"], "categories": gt["categories"],
             "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [1, 1, 3, 3], "score": 0.8},
                             {"id": 2, "image_id": 5, "category_id": 2, "bbox": [4, 4, 2, 2], "score": 0.7}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    counts = merge_pseudo(tmp_path / "gt.json", tmp_path / "extra.json", tmp_path / "m.json")
    assert counts == {"images": 2, "annotations": 1, "pseudo_annotations": 2}
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["images"] == gt["images"] and m["categories"] == gt["categories"]
    assert [(a["id"], a["image_id"], a["category_id"]) for a in m["annotations"]] == [(40, 5, 1), (41, 7, 2), (42, 5, 2)]
    assert m["info"]["description"] == "world" and m["info"]["merged_pseudo_annotations"] == 2
    extra["annotations"].append({"id": 3, "image_id": 99, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.9})
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    with pytest.raises(DistillError, match="not in"):
        merge_pseudo(tmp_path / "gt.json", tmp_path / "extra.json", tmp_path / "m2.json")
    assert not (tmp_path / "m2.json").exists()


def test_self_train_rejects_repeat_below_one(tmp_path):
    from distill.config import load_config
    from distill.labels.selftrain import self_train

    cfg = load_config(None, [f"work_dir={tmp_path}"])
    with pytest.raises(DistillError, match="selftrain repeat: expected an integer >= 1, got 0"):
        self_train(cfg, tmp_path / "labels.json", repeat=0)


def test_selftrain_ablation_runs_each_variant_from_the_same_weights(tmp_path, monkeypatch):
    """control = plain fine-tuning (no pseudo-labels); the others call self_train with their
    repeat / training-image labels, each under its own name and output folder; the row 'before'
    is the init detector's metrics; bad variants and missing inputs are one-line errors."""
    import dataclasses

    import distill.detection.train as det_train
    import distill.labels.selftrain as S
    from distill.config import load_config

    init = tmp_path / "det" / "vild" / "model_final.pt"
    init.parent.mkdir(parents=True)
    init.write_bytes(b"x")
    (init.parent / "metrics.json").write_text(json.dumps({"bbox/AP50_novel": 0.1, "bbox/AP50_base": 0.2}))
    cfg = load_config(None, [f"work_dir={tmp_path}", f"det.init={init}"])
    calls = []

    def fake_train(c, **kw):
        calls.append(("train", c.det.name, c.det.init, tuple(c.data.extra)))
        return {"bbox/AP50_novel": 0.11, "bbox/AP50_base": 0.25}

    def fake_self_train(c, pseudo, *, keep, score_thresh, repeat, train_pseudo_json, progress, out_dir):
        calls.append(("self_train", c.det.name, repeat, train_pseudo_json, Path(out_dir).name))
        return {"selftrain/AP50_novel_after": 0.2 + repeat / 100, "selftrain/AP50_novel_before": 0.1}

    monkeypatch.setattr(det_train, "train_detector", fake_train)
    monkeypatch.setattr(S, "self_train", fake_self_train)
    rows = S.selftrain_ablation(cfg, "p.json", "t.json")
    assert list(rows) == ["before", "control", "unlabeled", "unlabeled_x5", "unlabeled+train", "unlabeled_x5+train"]
    assert rows["before"] == {"AP50_novel": 0.1, "AP50_base": 0.2}
    assert rows["control"] == {"AP50_novel": 0.11, "AP50_base": 0.25}
    assert rows["unlabeled_x5"] == {"AP50_novel": 0.25}
    assert calls == [
        ("train", "vild_st_control", str(init), ()),
        ("self_train", "vild_st_unlabeled", 1, None, "unlabeled"),
        ("self_train", "vild_st_unlabeled_x5", 5, None, "unlabeled_x5"),
        ("self_train", "vild_st_unlabeled_train", 1, "t.json", "unlabeled_train"),
        ("self_train", "vild_st_unlabeled_x5_train", 5, "t.json", "unlabeled_x5_train"),
    ]
    assert json.loads((tmp_path / "selftrain" / "ablation" / "metrics.json").read_text()) == rows
    with pytest.raises(DistillError, match="valid are control"):
        S.selftrain_ablation(cfg, "p.json", variants=("nope",))
    with pytest.raises(DistillError, match="need pseudo-labels of the training images"):
        S.selftrain_ablation(cfg, "p.json", None)
    with pytest.raises(DistillError, match="det.init must name"):
        S.selftrain_ablation(dataclasses.replace(cfg, det=dataclasses.replace(cfg.det, init="")), "p.json", "t.json")
