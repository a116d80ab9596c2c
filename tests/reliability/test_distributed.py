"""Distributed: two processes under torchrun on the gloo backend (CPU) against one process.

- DDP training (``distill train seg``): the per-step loss curve of 2 ranks x 2 images is close to
  that of 1 process x 4 images (same global batch; BatchNorm statistics are per rank, so not equal);
- rank-sharded labeling (``distill label``): labels.json, YOLO files and semantic PNGs are
  byte-identical to the single-process run;
- rank-sharded CAM (``distill cam``): masks and seeds are byte-identical;
- rank-sharded region embedding (``distill teacher embed-regions``): every cache shard and the
  index are byte-identical, and reading the cache streams the same tensors; a rerun with the index
  and one shard deleted (a killed run) redoes only that shard.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ._fixtures import REPO, cli_cmd, env, make_teacher_dir, make_tiny_world, seg_overrides, teacher_overrides, world_overrides

pytestmark = pytest.mark.slow


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "distill.cli", *args]


def torchrun_env() -> dict:
    """The environment for :func:`torchrun` with no port chosen in advance. ``--standalone``
    rendezvouses on localhost:0 and its agent serves the workers' store on a port it binds as 0
    (``TORCHELASTIC_USE_AGENT_STORE``: the workers join it, none binds one of its own), so the OS
    picks every port at bind time and no other program can take one in between. That holds
    unless the store sharing is switched off or a port is forced, hence these are removed."""
    e = env()
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_USE_AGENT_STORE",
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "PET_MASTER_PORT", "PET_MASTER_ADDR", "PET_RDZV_ENDPOINT"):
        e.pop(k, None)
    e["OMP_NUM_THREADS"] = "1"
    return e


def run_ok(cmd: list[str], timeout: float = 400) -> str:
    e = torchrun_env()
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


def _write_proposals(work_dir: Path) -> None:
    """Seeded random proposals (12 per image, some degenerate) for every training image, where
    ``distill propose`` would put them (no RPN training: the embedding is under test)."""
    import torch

    from distill.config import load_config
    from distill.detection.proposals import proposals_dir, save_proposals

    cfg = load_config(str(REPO / "configs/shapes/vild.yaml"), world_overrides(work_dir))
    ids = sorted(im["id"] for im in json.loads(Path(cfg.data.train_json).read_text())["images"])
    g = torch.Generator().manual_seed(3)
    boxes = []
    for _ in ids:
        xy = torch.randint(-4, 56, (12, 2), generator=g).float()
        wh = torch.randint(0, 30, (12, 2), generator=g).float()
        boxes.append(torch.cat([xy, xy + wh], 1))
    save_proposals(proposals_dir(cfg) / "proposals_train.safetensors", ids, boxes, [torch.linspace(1, 0, 12)] * len(ids))


def test_rank_sharded_region_embedding_equals_single_process(tmp_path, teacher_model):
    from distill.teacher.cache import EmbeddingCache

    make_tiny_world(tmp_path / "single")  # 8 training images -> shards of 3: 3 + 3 + 2
    _write_proposals(tmp_path / "single")
    shutil.copytree(tmp_path / "single", tmp_path / "ddp")
    args = lambda w: ("teacher", "embed-regions", str(REPO / "configs/shapes/vild.yaml"), *world_overrides(w),  # noqa: E731
                      *teacher_overrides(teacher_model), "regions.shard_size=3", "det.num_image_distill=10")
    out1 = run_ok(cli_cmd(*args(tmp_path / "single")))
    out2 = run_ok(torchrun(*args(tmp_path / "ddp")))
    assert "embedded 8 images in 3 shards, 0 finished shards skipped" in out1 and out2.count("embedded 8 images in 3 shards") == 1, out2
    roots = [next((tmp_path / n / "embeddings" / "regions").iterdir()) for n in ("single", "ddp")]
    assert roots[0].name == roots[1].name  # the same key
    a, b = _visible(roots[0]), _visible(roots[1])
    assert sorted(a) == ["index.json"] + [f"shard-{k:05d}.safetensors" for k in range(3)]
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []  # the index records nothing run-specific
    index = json.loads(a["index.json"])
    assert index["complete"] and [len(s["image_ids"]) for s in index["shards"]] == [3, 3, 2]
    key = {k: v for k, v in index["key"].items() if k != "dtype"}
    ca, cb = (EmbeddingCache(r, key, dtype=index["dtype"], readonly=True) for r in roots)
    ca.verify(), cb.verify()
    sa, sb = list(ca), list(cb)
    assert [i for i, _ in sa] == [i for i, _ in sb] == ca.image_ids() and len(sa) == 8
    assert all(ta.shape == (10, 16) and ta.equal(tb) for (_, ta), (_, tb) in zip(sa, sb))
    assert all(bool((ta.norm(dim=1) > 0).any()) for _, ta in sa)
    # a killed 2-rank run: the index never written, one shard missing -> only that shard is redone
    (roots[1] / "index.json").unlink()
    (roots[1] / "shard-00001.safetensors").unlink()
    out3 = run_ok(torchrun(*args(tmp_path / "ddp")))
    assert "embedded 3 images in 1 shards, 2 finished shards skipped" in out3, out3
    assert _visible(roots[1]) == a


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_shards_cover_every_shard_once(world):
    from distill.engine.distributed import rank_shards

    for n in (0, 1, 3, 7, 8, 13):
        got = [k for r in range(world) for k in rank_shards(n, r, world)]
        assert sorted(got) == list(range(n))  # every shard exactly once
        assert all(rank_shards(n, r, world) == list(range(r, n, world)) for r in range(world))
    with pytest.raises(ValueError):
        rank_shards(3, world, world)
