"""``det.train.eval_period``: the detector is evaluated DURING training (the OV-COCO and LVIS
configs evaluate every 10k / 20k steps), over the whole vocabulary, and training then goes on
exactly as if nothing had happened: the evaluation swaps in every class's text embeddings and
puts the model in eval mode, and must restore both (a training step on the swapped classifier or
in eval mode would change the losses, or fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reliability._fixtures import REPO, make_tiny_world, world_overrides

TINY = [
    "det.backbone=resnet18_fpn", "det.pretrained_backbone=", "det.fpn_channels=16", "det.returned_layers=[3,4]",
    "det.anchor_sizes=[16,32,64]", "det.box_head_dim=32", "det.min_size=64", "det.max_size=64", "det.rpn_pre_nms_train=50",
    "det.rpn_post_nms_train=20", "det.rpn_pre_nms_test=50", "det.rpn_post_nms_test=10", "det.roi_batch_size=16",
    "det.use_image=false", "det.inference=text", "det.augment=none", "det.train.max_steps=3", "det.train.batch_size=2",
    "det.train.lr=0.002", "det.train.warmup=0", "det.train.checkpoint_period=0", "det.train.log_period=1", "det.train.device=cpu",
    "det.train.seed=0", "det.train.deterministic=true", "data.num_workers=0", "teacher.templates=",
]


@pytest.mark.parametrize("config", ["configs/coco/vild_r50_ovcoco.yaml", "configs/lvis/vild_r50.yaml"])
def test_the_real_configs_evaluate_during_training(config):
    from distill.config import load_config

    t = load_config(REPO / config).det.train
    assert 0 < t.eval_period < t.max_steps  # the path below is live in these configs


def test_eval_period_evaluates_the_detector_mid_training_without_disturbing_it(tmp_path):
    from distill.config import load_config
    from distill.detection.train import train_detector
    from distill.vocab import resolve_vocab
    from distill.teacher.clip import build_random_teacher

    make_tiny_world(tmp_path)
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    runs = {}
    for name, period in (("plain", 0), ("evaluated", 1)):
        cfg = load_config(REPO / "configs/shapes/vild.yaml", world_overrides(tmp_path) + TINY + [f"det.name={name}", f"det.train.eval_period={period}"])
        torch.manual_seed(0)
        runs[name] = train_detector(cfg, progress=False, teacher=teacher)
    out = Path(tmp_path) / "det"
    rows = {n: [json.loads(l) for l in (out / n / "metrics.jsonl").read_text().splitlines()] for n in runs}
    evals = [r for r in rows["evaluated"] if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]  # after steps 1 and 2, and the final evaluation
    assert [r["step"] for r in rows["plain"] if "eval" in r] == [3]
    vocab = resolve_vocab(cfg.data, need_base=True)
    for r in evals:
        m = r["eval"]
        assert {"bbox/AP50", "bbox/AP50_base", "bbox/AP50_novel", "region/top1"} <= set(m), sorted(m)
    res = json.loads((out / "evaluated" / "results_val.json").read_text())
    assert {r["category_id"] for r in res} <= set(vocab.ids)
    # the training steps after each evaluation are the steps of the run that never evaluated. Not
    # bit for bit: the evaluation's allocations in between can shift a training kernel's memory
    # alignment and so its summation order (measured: 1 ulp of the step-3 loss, weights within
    # 2e-4 of their scale after 3 steps); a step on the all-class classifier the evaluation swaps
    # in, or in eval mode, is a different loss (a softmax over other classes) or no loss at all
    loss = {n: {r["step"]: r["loss"] for r in rows[n] if "loss" in r} for n in runs}
    assert sorted(loss["plain"]) == sorted(loss["evaluated"]) == [1, 2, 3]
    assert loss["evaluated"][1] == loss["plain"][1]  # before any evaluation: the same computation
    for s in (2, 3):
        assert loss["evaluated"][s] == pytest.approx(loss["plain"][s], rel=1e-4, abs=0), (s, loss)
