"""Numerical safety at the user's level: a training run whose loss turns non-finite stops with a
one-line error naming the step and the image ids of the batch, and keeps the last good checkpoint
(the engine's own unit test covers a toy model; this one goes through ``distill train seg``)."""

from __future__ import annotations

import re

import torch

from distill.cli import main

from ._fixtures import REPO, cli_error, make_teacher_dir, make_tiny_world, seg_overrides


def test_exploding_training_stops_naming_step_and_images_and_keeps_last_good_checkpoint(tmp_path, capsys):
    tm = make_teacher_dir(tmp_path / "t", seed=0)
    w = tmp_path / "w"
    make_tiny_world(w)
    cfg = str(REPO / "configs/shapes/lseg.yaml")
    # adamw at lr 1e30: step 1 is finite, its update overflows the weights, step 2's loss is not finite
    ov = seg_overrides(w, tm, **{"seg.train.lr": 1e30, "seg.train.max_steps": 6, "seg.train.checkpoint_period": 1})
    line = cli_error(capsys, ["train", "seg", cfg, *ov])
    m = re.match(r"error: step (\d+): non-finite loss", line)
    assert m, line
    step = int(m.group(1))
    assert step >= 2
    ids = re.search(r"image ids \[([\d, ]+)\]", line)
    assert ids, line
    ids = [int(x) for x in ids.group(1).split(",")]
    assert len(ids) == 2 and all(1 <= i <= 8 for i in ids), line  # batch 2; train images are ids 1..8
    ck = w / "seg" / "lseg" / "checkpoints"
    good = f"ckpt_{step - 1:07d}.pt"
    assert good in line
    state = torch.load(ck / good, weights_only=True)
    assert state["step"] == step - 1
    flat = torch.cat([v.float().flatten() for v in state["model"].values() if torch.is_tensor(v)])
    assert flat.numel() > 0 and bool(torch.isfinite(flat).all()), f"{good}: {int((~torch.isfinite(flat)).sum())} non-finite values"
    assert not (w / "seg" / "lseg" / "model_final.pt").exists()
    # a checkpoint of the bad step was not written
    assert not (ck / f"ckpt_{step:07d}.pt").exists()
