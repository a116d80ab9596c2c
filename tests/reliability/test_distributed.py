"""Distributed: two processes under torchrun on the gloo backend (CPU) against one process.

- DDP training (``distill train seg``): the per-step loss curve of 2 ranks x 2 images is close to
  that of 1 process x 4 images (same global batch; BatchNorm statistics are per rank, so not equal);
- rank-sharded labeling (``distill label``): labels.json, YOLO files and semantic PNGs are
  byte-identical to the single-process run;
- rank-sharded CAM (``distill cam``): masks and seeds are byte-identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ._fixtures import REPO, cli_cmd, env, make_teacher_dir, make_tiny_world, seg_overrides, teacher_overrides

pytestmark = pytest.mark.slow


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "distill.cli", *args]


def run_ok(cmd: list[str], timeout: float = 400) -> str:
    e = env()
    e["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, env=e, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def _visible(root: Path, skip=("summary.json", "config.yaml")) -> dict[str, bytes]:
    """Visible files -> bytes, without run summaries (wall time; one per rank under torchrun)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.name not in skip and not p.name.startswith("summary")}


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "t", seed=0)


def _step_losses(path: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_ddp_training_loss_curve_close_to_single_process(tmp_path, teacher_model):
    cfg = str(REPO / "configs/shapes/lseg.yaml")
    extra = {"seg.train.max_steps": 8, "seg.train.batch_size": 4, "seg.train.checkpoint_period": 4}
    curves = {}
    for name, launch in (("single", cli_cmd), ("ddp", torchrun)):
        w = tmp_path / name
        make_tiny_world(w)
        run_ok(launch("train", "seg", cfg, *seg_overrides(w, teacher_model, **extra)))
        curves[name] = _step_losses(w / "seg" / "lseg" / "metrics.jsonl")
        assert (w / "seg" / "lseg" / "model_final.pt").is_file()
    a, b = curves["single"], curves["ddp"]
    assert sorted(a) == sorted(b) == list(range(1, 9))
    la, lb = np.array([a[s] for s in sorted(a)]), np.array([b[s] for s in sorted(b)])
    assert np.isfinite(lb).all()
    print(f"\nloss single: {np.round(la, 4).tolist()}\nloss ddp x2: {np.round(lb, 4).tolist()}")
    # the same data order and global batch: step 1 (same weights, same images) nearly equal, the
    # curve close throughout, and both runs learn
    assert abs(la[0] - lb[0]) / la[0] < 0.05, (la, lb)
    assert np.abs(la - lb).mean() / la.mean() < 0.15, (la, lb)
    assert la[-3:].mean() < la[:3].mean() and lb[-3:].mean() < lb[:3].mean()


def _image_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(11)
    root.mkdir(parents=True)
    for i in range(n):
        img = rng.integers(100, 140, size=(48, 48, 3), dtype=np.uint8)
        y, x = rng.integers(0, 30, 2)
        img[y : y + 14, x : x + 14] = [(220, 30, 30), (30, 70, 225), (30, 170, 40)][i % 3]
        Image.fromarray(img).save(root / f"{i:03d}.png")
    (root / "zero.png").write_bytes(b"")
    return root


def test_rank_sharded_labeling_equals_single_process(tmp_path, teacher_model):
    imgs = _image_folder(tmp_path / "imgs", 9)
    args = lambda out: ("label", "--images", str(imgs), "--vocab", "red square, blue square, green square", "--model", "teacher",  # noqa: E731
                        "--out", str(out), "--format", "coco,yolo,png", "--score-thresh", "0", "--batch-size", "2",
                        "label.shard_size=2", *teacher_overrides(teacher_model))
    run_ok(cli_cmd(*args(tmp_path / "single")))
    run_ok(torchrun(*args(tmp_path / "ddp")))
    a, b = _visible(tmp_path / "single"), _visible(tmp_path / "ddp")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    coco = json.loads(a["labels.json"])
    assert len(coco["images"]) == 9 and len(coco["annotations"]) > 0
    assert len(list((tmp_path / "ddp" / "shards").glob("shard-*.json"))) == 5  # 10 images, 2 per shard, both ranks wrote


def test_rank_sharded_cam_equals_single_process(tmp_path, teacher_model):
    imgs = _image_folder(tmp_path / "imgs", 6)
    (imgs / "zero.png").unlink()
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"image_id": i, "file_name": f"{i:03d}.png", "category_ids": [1 + i % 3]} for i in range(6)]))
    args = lambda out: ("cam", str(REPO / "configs/shapes/cam.yaml"), "--images", str(imgs), "--labels", str(labels),  # noqa: E731
                        *teacher_overrides(teacher_model), f"cam.out={out}", "cam.vocab=red square, blue square, green square",
                        "cam.background=", "cam.num_panels=0", "cam.image_size=32", "cam.batch_size=2")
    run_ok(cli_cmd(*args(tmp_path / "single")))
    run_ok(torchrun(*args(tmp_path / "ddp")))
    skip = ("summary.json", "config.yaml", "metrics.json", "manifest.json")
    a, b = _visible(tmp_path / "single", skip), _visible(tmp_path / "ddp", skip)
    masks = [k for k in a if k.startswith("masks/")]
    assert len(masks) == 6
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
