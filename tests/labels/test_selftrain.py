"""Self-training input: pseudo labels -> a training json rebased onto data.image_root."""

from __future__ import annotations

import json

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
