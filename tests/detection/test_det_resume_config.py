"""A refused ``--resume`` (a checkpoint of another det config, or past max_steps) leaves the run's
config.yaml as it was: it still describes model_final.pt (it was rewritten before the checkpoint
was read)."""

from __future__ import annotations

import pytest

from distill.errors import DistillError
from detection.test_det_eval_period import TINY
from reliability._fixtures import REPO, make_tiny_world, world_overrides


def test_refused_resume_leaves_config_yaml(tmp_path):
    from distill.config import load_config
    from distill.detection.train import train_detector
    from distill.teacher.clip import build_random_teacher

    make_tiny_world(tmp_path)
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    base = world_overrides(tmp_path) + TINY + ["det.name=r", "det.train.max_steps=2"]
    train_detector(load_config(REPO / "configs/shapes/vild.yaml", base), progress=False, teacher=teacher)
    out = tmp_path / "det" / "r"
    before = {p: p.read_bytes() for p in (out / "config.yaml", out / "model_final.pt")}
    for change, want in (("det.fpn_channels=32", "does not fit"), ("det.train.max_steps=1", "beyond max_steps 1")):
        cfg = load_config(REPO / "configs/shapes/vild.yaml", base + [change])
        with pytest.raises(DistillError, match=want):
            train_detector(cfg, resume=True, progress=False, teacher=teacher)
        assert {p: p.read_bytes() for p in before} == before, change
