"""Self-training's real path (distill/labels/selftrain.py ``self_train``), not a mocked trainer:
pseudo-labels of the unlabeled split -> a training json -> ``train_detector`` on base ground truth
plus ``repeat`` copies of the pseudo-labeled images, starting from ``det.init``.

The engine's ``train`` is wrapped (then run for real, one step) to see what it was handed: the
training set's size and image ids, the novel pseudo boxes as targets, and the weights it starts
from, which must be det.init's, not a fresh model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reliability._fixtures import REPO, make_teacher_dir, make_tiny_world, teacher_overrides, world_overrides

TINY = [
    "det.backbone=resnet18_fpn", "det.pretrained_backbone=", "det.fpn_channels=16", "det.returned_layers=[3,4]",
    "det.anchor_sizes=[16,32,64]", "det.box_head_dim=32", "det.min_size=64", "det.max_size=64", "det.rpn_pre_nms_train=50",
    "det.rpn_post_nms_train=20", "det.rpn_pre_nms_test=50", "det.rpn_post_nms_test=10", "det.roi_batch_size=16",
    "det.use_image=false", "det.inference=text", "det.augment=none", "det.train.max_steps=1", "det.train.batch_size=2",
    "det.train.lr=0.001", "det.train.checkpoint_period=0", "det.train.log_period=1", "det.train.device=cpu", "data.num_workers=0",
]


def _pseudo_labels(work: Path, vocab) -> tuple[Path, dict]:
    """labels.json as ``distill label`` writes it for the unlabeled split: per image one novel box
    (kept) and one base box (dropped: base classes have real ground truth), plus one novel box
    below the score threshold (dropped)."""
    unl = json.loads((work / "data" / "instances_unlabeled.json").read_text())
    root = work / "data" / "images"
    novel, base = vocab.novel_indices[0], vocab.base_indices[0]
    cats = [{"id": 100 + k, "name": n} for k, n in enumerate(vocab.names)]
    images, anns = [], []
    for k, im in enumerate(sorted(unl["images"], key=lambda i: i["id"])):
        images.append({"id": k + 1, "file_name": Path(im["file_name"]).name, "width": im["width"], "height": im["height"]})
        for c, score, box in ((novel, 0.9, [4.0 + k, 6.0, 20.0, 18.0]), (base, 0.9, [30.0, 30.0, 12.0, 12.0]), (novel, 0.1, [1.0, 1.0, 9.0, 9.0])):
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": 100 + c, "bbox": box, "score": score, "area": box[2] * box[3], "iscrowd": 0})
    folder = root / Path(unl["images"][0]["file_name"]).parent
    labels = {"info": {"images_root": str(folder), "source": "vild"}, "images": images, "annotations": anns, "categories": cats}
    path = work / "labels.json"
    path.write_text(json.dumps(labels))
    ids = {Path(im["file_name"]).name: im["id"] for im in unl["images"]}  # the world's own ids, by file name
    return path, {"ids": [ids[im["file_name"]] for im in images], "novel_box": {ids[im["file_name"]]: [4.0 + k, 6.0, 24.0 + k, 24.0] for k, im in enumerate(images)}}


@pytest.mark.parametrize("repeat", [2])
def test_self_train_trains_on_ground_truth_plus_repeated_pseudo_labels_from_det_init(tmp_path, monkeypatch, repeat):
    import distill.engine.train as engine
    from distill.config import load_config
    from distill.detection.build import build_vild_detector
    from distill.vocab import resolve_vocab
    from distill.engine.checkpoint import read, save_model
    from distill.labels.selftrain import self_train

    work = tmp_path / "w"
    make_tiny_world(work)
    teacher = make_teacher_dir(tmp_path / "teacher", seed=0)
    cfg = load_config(REPO / "configs/shapes/vild.yaml", world_overrides(work) + teacher_overrides(teacher) + TINY)
    vocab = resolve_vocab(cfg.data, need_base=True)
    # det.init: a detector of this architecture with seeded weights (what `distill train det` wrote)
    torch.manual_seed(123)
    init_path = tmp_path / "init" / "model_final.pt"
    save_model(init_path, build_vild_detector(cfg.det, 16, None, load_weights=False))
    init = read(init_path)["model"]
    (work / "det" / cfg.det.name).mkdir(parents=True)
    (work / "det" / cfg.det.name / "metrics.json").write_text(json.dumps({"bbox/AP50_novel": 0.125, "bbox/AP50_base": 0.5}))
    cfg = load_config(REPO / "configs/shapes/vild.yaml", world_overrides(work) + teacher_overrides(teacher) + TINY + [f"det.init={init_path}"])
    pseudo, expect = _pseudo_labels(work, vocab)

    seen = {}
    real_train = engine.train

    def spy(model, loader, tcfg, out_dir, **kw):
        ds = loader.dataset
        seen["n"], seen["ids"], seen["out"] = len(ds), list(ds.image_ids), Path(out_dir)
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["classes"] = int(model.roi_heads.text_embeddings.shape[0])
        seen["targets"] = {int(t["image_id"]): t for t in (ds[i][1] for i in range(len(ds)))}
        torch.manual_seed(999)  # a fresh model would differ; training itself must not depend on it
        return real_train(model, loader, tcfg, out_dir, **kw)

    monkeypatch.setattr(engine, "train", spy)
    torch.manual_seed(7)  # the model self_train builds starts from other random weights
    m = self_train(cfg, pseudo, score_thresh=0.5, repeat=repeat, progress=False)

    train_ids = sorted(im["id"] for im in json.loads(Path(cfg.data.train_json).read_text())["images"])
    # the training set: the base ground truth once, then the pseudo-labeled images `repeat` times,
    # under the unlabeled split's own image ids
    assert seen["n"] == len(train_ids) + repeat * len(expect["ids"]) == 8 + repeat * 4
    assert seen["ids"][: len(train_ids)] == [im["id"] for im in json.loads(Path(cfg.data.train_json).read_text())["images"]]
    assert seen["ids"][len(train_ids) :] == expect["ids"] * repeat
    # trained on every class (pseudo-labels are novel), the pseudo images' targets are the kept box
    assert seen["classes"] == len(vocab)
    for iid, box in expect["novel_box"].items():
        t = seen["targets"][iid]
        assert t["boxes"].tolist() == [box] and t["labels"].tolist() == [vocab.novel_indices[0]], (iid, t)
    # training started from det.init's weights (every parameter and buffer), not the fresh model's
    assert seen["state"].keys() == init.keys()
    assert all(torch.equal(seen["state"][k], init[k]) for k in init)
    assert seen["out"] == work / "det" / f"{cfg.det.name}_selftrain"
    # and it really trained: one step moved the weights, the run's files and metrics are there
    final = read(seen["out"] / "model_final.pt")["model"]
    assert any(not torch.equal(final[k], init[k]) for k in init if final[k].is_floating_point())
    after = json.loads((seen["out"] / "metrics.json").read_text())  # the self-trained detector's evaluation
    assert m["selftrain/AP50_novel_before"] == 0.125 and m["selftrain/AP50_novel_after"] == after["bbox/AP50_novel"]
    assert m["selftrain/AP50_novel_delta"] == pytest.approx(m["selftrain/AP50_novel_after"] - 0.125)
    counts = json.loads((work / "selftrain" / "counts.json").read_text())
    assert counts == {"images": 4, "annotations": 4, "repeat": repeat}
    assert json.loads((work / "selftrain" / "metrics.json").read_text()) == m
