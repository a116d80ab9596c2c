"""The self-training ablation (distill/ablate/selftrain.py): every variant from the same weights."""

import json
from pathlib import Path

import pytest

from distill.errors import DistillError


def test_selftrain_ablation_runs_each_variant_from_the_same_weights(tmp_path, monkeypatch):
    """control = plain fine-tuning (no pseudo-labels); the others call self_train with their
    repeat / training-image labels, each under its own name and output folder; the row 'before'
    is the init detector's metrics; bad variants and missing inputs are one-line errors."""
    import dataclasses

    import distill.detection.train as det_train
    import distill.ablate.selftrain as S
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
    md = (tmp_path / "selftrain" / "ablation" / "table.md").read_text().splitlines()
    assert md[0] == "| fine-tuning data | AP50 novel | AP50 base | AP50 all |" and md[3] == "| control | 11.0 | 25.0 | n/a |"
    with pytest.raises(DistillError, match="valid are control"):
        S.selftrain_ablation(cfg, "p.json", variants=("nope",))
    with pytest.raises(DistillError, match="need pseudo-labels of the training images"):
        S.selftrain_ablation(cfg, "p.json", None)
    with pytest.raises(DistillError, match="det.init must name"):
        S.selftrain_ablation(dataclasses.replace(cfg, det=dataclasses.replace(cfg.det, init="")), "p.json", "t.json")
