"""distill/cli/train.py: ``distill train det --num-gpus N`` re-runs itself under torchrun.

The parent validates the config, then hands torchrun the same sub-command with every override
and flag (and no --num-gpus); each child sees WORLD_SIZE and trains instead of relaunching; the
children's exit code is the command's. The last test launches torchrun for real.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/shapes/vild.yaml")
OVERRIDES = ["det.train.max_steps=3", "det.name=relaunched", "work_dir=/nonexistent/work"]
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def spy(monkeypatch):
    """subprocess.call and train_detector recorded instead of run."""
    import distill.detection.train as det_train

    calls = {"launch": [], "train": [], "rc": 0}
    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)

    def call(cmd, env=None, **kw):
        calls["launch"].append((list(cmd), dict(env or {})))
        return calls["rc"]

    def train_detector(cfg, *, resume=False, eval_only=False, **kw):
        calls["train"].append((cfg, resume, eval_only))
        return {"bbox/AP50": 0.5}

    monkeypatch.setattr(subprocess, "call", call)
    monkeypatch.setattr(det_train, "train_detector", train_detector)
    return calls


def test_num_gpus_relaunches_itself_under_torchrun_with_every_argument(spy, monkeypatch):
    monkeypatch.setenv("DISTILL_PROBE", "kept")
    assert main(["train", "det", CONFIG, *OVERRIDES, "--resume", "--eval-only", "--num-gpus", "2"]) == 0
    assert spy["train"] == []  # the parent only launches
    [(cmd, env)] = spy["launch"]
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distill.cli",
                   "train", "det", CONFIG, *OVERRIDES, "--resume", "--eval-only"]
    assert env.get("DISTILL_PROBE") == "kept"  # the children get this environment

    # what each child then does with that command line: trains once, with the parent's config
    from distill.config import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    child = cmd[cmd.index("distill.cli") + 1 :]
    assert main(child) == 0
    assert len(spy["launch"]) == 1  # no relaunch from a child
    [(cfg, resume, eval_only)] = spy["train"]
    assert cfg == load_config(CONFIG, OVERRIDES) and cfg.det.name == "relaunched" and cfg.det.train.max_steps == 3
    assert resume and eval_only
    # --num-gpus inside a torchrun process (the user launched torchrun): trains, never nests torchrun
    assert main(["train", "det", CONFIG, *OVERRIDES, "--num-gpus", "2"]) == 0
    assert len(spy["launch"]) == 1 and len(spy["train"]) == 2


def test_flags_are_passed_only_when_given_and_one_gpu_trains_here(spy):
    assert main(["train", "det", CONFIG, "--num-gpus", "3"]) == 0
    [(cmd, _)] = spy["launch"]
    assert cmd[3:] == ["--standalone", "--nproc_per_node=3", "-m", "distill.cli", "train", "det", CONFIG]
    spy["launch"].clear()
    assert main(["train", "det", CONFIG, *OVERRIDES]) == 0  # --num-gpus 1 (default): no torchrun
    assert spy["launch"] == [] and len(spy["train"]) == 1 and spy["train"][0][1:] == (False, False)


def test_children_exit_code_is_the_commands(spy, capsys):
    spy["rc"] = 3
    assert main(["train", "det", CONFIG, "--num-gpus", "2"]) == 3
    assert spy["train"] == []


def test_bad_config_fails_before_anything_is_launched(spy, capsys):
    assert main(["train", "det", CONFIG, "det.train.max_stepz=3", "--num-gpus", "2"]) == 2
    assert spy["launch"] == [] and "max_stepz" in capsys.readouterr().err


def test_torchrun_really_starts_one_process_per_gpu(capfd, monkeypatch):
    """The relaunch command as torchrun runs it (2 CPU processes, a sub-command that needs no
    GPU): both children start ``distill`` and exit 0."""
    from distill.cli.train import _relaunch_distributed

    for k in DIST_ENV + ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE",):
        monkeypatch.delenv(k, raising=False)  # --standalone: every port picked by the OS at bind time
    assert _relaunch_distributed(2, ["train", "--help"]) == 0
    out = capfd.readouterr().out
    assert out.count("Usage: python -m distill.cli train") == 2, out[-2000:]


# ------------------------------------------------------------------------------------ propose

PROPOSE_TINY = [
    "det.backbone=resnet18_fpn", "det.pretrained_backbone=", "det.fpn_channels=16", "det.returned_layers=[3,4]",
    "det.anchor_sizes=[16,32,64]", "det.box_head_dim=32", "det.min_size=64", "det.max_size=64", "det.rpn_pre_nms_train=50",
    "det.rpn_post_nms_train=20", "det.rpn_pre_nms_test=50", "det.rpn_post_nms_test=20", "det.roi_batch_size=16",
    "det.augment=none", "det.num_image_distill=5", "proposals.top_k=7", "proposals.batch_size=4", "proposals.train.max_steps=2",
    "proposals.train.batch_size=2", "proposals.train.checkpoint_period=0", "proposals.train.log_period=1",
    "proposals.train.device=cpu", "data.num_workers=0",
]


def test_propose_writes_top_k_proposals_of_every_training_image(tmp_path, capsys):
    """``distill propose``: trains the class-agnostic network on the base boxes, writes at most
    top_k boxes (no smaller than min_size, inside the image) for EVERY training image, their
    recall on val; a rerun with the same config reuses the trained weights and writes the same file."""
    import json

    from reliability._fixtures import make_tiny_world, world_overrides

    from distill.config import load_config
    from distill.detection.proposals import load_proposals, proposals_dir

    make_tiny_world(tmp_path)
    args = [CONFIG, *world_overrides(tmp_path), *PROPOSE_TINY]
    assert main(["propose", *args]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    cfg = load_config(args[0], args[1:])
    out = proposals_dir(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"num_images={metrics['num_images']}" in line and f"proposals_hash={metrics['proposals_hash']}" in line
    train = json.loads(Path(cfg.data.train_json).read_text())["images"]
    props, digest = load_proposals(out / "proposals_train.safetensors")
    assert digest == metrics["proposals_hash"] and metrics["num_images"] == len(train) == 8
    assert sorted(props) == sorted(im["id"] for im in train)
    sizes = {im["id"]: (im["width"], im["height"]) for im in train}
    for iid, (boxes, scores) in props.items():
        assert len(boxes) == len(scores) <= 7
        if len(boxes):
            w, h = sizes[iid]
            wh = boxes[:, 2:] - boxes[:, :2]
            assert (wh >= 4.0).all() and (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert (scores[:-1] >= scores[1:]).all()  # best first: the top k are the first k
    assert {"recall@5/base", "recall@5/novel", "recall@7/all"} <= set(metrics)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # the network was trained, 2 steps
    weights = (out / "model_final.pt").stat().st_ino
    assert main(["propose", *args]) == 0
    assert (out / "model_final.pt").stat().st_ino == weights  # not retrained
    again, digest2 = load_proposals(out / "proposals_train.safetensors")  # (the header's key order varies)
    assert digest2 == digest and all(torch.equal(again[i][0], props[i][0]) for i in props)
