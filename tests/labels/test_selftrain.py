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
