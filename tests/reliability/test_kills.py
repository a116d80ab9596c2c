"""Faults: ``kill -9`` at a seeded random point of training, region-embedding caching, labeling
and the pipeline runner; the rerun (``--resume`` for training) ends with the same outputs as an
uninterrupted run, and nothing half-written is ever read as complete. A read-only output folder
and a full disk (ENOSPC injected on the write path) give one-line errors.

Each kill waits until the run has written its first unit of work (a checkpoint, a shard, the
world's staging folder), then a seeded random delay, then SIGKILL; the test asserts the process
really was killed mid-run, so it cannot pass vacuously.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import main

from ._fixtures import REPO, cli_cmd, cli_error, env, make_teacher_dir, make_tiny_world, seg_overrides, teacher_overrides, world_overrides

def run_and_kill(cmd: list[str], ready, rng: random.Random, max_delay: float, log: Path, timeout: float = 240) -> str:
    """Start ``cmd``; once ``ready()`` is true wait U(0, max_delay) s and SIGKILL it.
    Returns "killed" or "finished" (the run ended before the kill)."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.time()
        try:
            while p.poll() is None and not ready():
                if time.time() - t0 > timeout:
                    raise AssertionError(f"never became ready: {' '.join(cmd)}")
                time.sleep(0.02)
            if p.poll() is None:
                time.sleep(rng.uniform(0, max_delay))
            if p.poll() is not None:
                return "finished"
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            assert p.returncode == -signal.SIGKILL
            return "killed"
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_ok(cmd: list[str], log: Path, timeout: float = 300) -> None:
    r = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log.write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def _visible(root: Path) -> dict[str, bytes]:
    """Every non-hidden file under root (hidden = temp files of atomic writes) -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "t", seed=0)


# ------------------------------------------------------------------------------------ training


def _step_losses(path: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_kill_training_then_resume_gives_identical_weights(tmp_path, teacher_model):
    rng = random.Random(1234)
    seg_cfg = str(REPO / "configs/shapes/lseg.yaml")
    runs = {}
    for name in ("ref", "killed"):
        w = tmp_path / name
        make_tiny_world(w)
        runs[name] = cli_cmd("train", "seg", seg_cfg, *seg_overrides(w, teacher_model, **{"seg.train.max_steps": 20, "seg.train.checkpoint_period": 2}))
    run_ok(runs["ref"], tmp_path / "ref.log")
    out = tmp_path / "killed" / "seg" / "lseg"
    ck = out / "checkpoints"
    status = run_and_kill(runs["killed"], lambda: (ck / "last_checkpoint").is_file(), rng, 0.8, tmp_path / "k.log")
    assert status == "killed", (tmp_path / "k.log").read_text()[-2000:]
    # nothing half-written looks complete: every visible checkpoint loads, the pointer names one
    assert not (out / "model_final.pt").exists()
    names = sorted(p.name for p in ck.glob("ckpt_*.pt"))
    assert names, "no checkpoint before the kill"
    for n in names:
        torch.load(ck / n, weights_only=True, map_location="cpu")
    last = (ck / "last_checkpoint").read_text().strip()
    assert Path(last).name in names
    print(f"train: killed after {names[-1]}")  # where the kill landed (shown with -s)
    # steps up to the checkpoint are not executed again: their log rows, tagged here, survive the
    # resume (a rerun from scratch, which training's determinism would otherwise hide, rewrites them)
    k = int(Path(last).stem.split("_")[-1])
    log = out / "metrics.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    log.write_text("".join(json.dumps(dict(r, run="killed")) + "\n" for r in rows))
    run_ok(runs["killed"] + ["--resume"], tmp_path / "resume.log")
    assert f"at step {k}" in (tmp_path / "resume.log").read_text()
    resumed = [json.loads(x) for x in log.read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in resumed if r.get("run") == "killed"] == list(range(1, k + 1))
    assert [r["step"] for r in resumed if "run" not in r] == list(range(k + 1, 21))
    for r in resumed:
        r.pop("run", None)
    log.write_text("".join(json.dumps(r) + "\n" for r in resumed))

    ref_out = tmp_path / "ref" / "seg" / "lseg"
    a = torch.load(ref_out / "model_final.pt", weights_only=True)
    b = torch.load(out / "model_final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # identical on CPU in deterministic mode
    la, lb = _step_losses(ref_out / "metrics.jsonl"), _step_losses(out / "metrics.jsonl")
    assert sorted(la) == sorted(lb) == list(range(1, 21))
    assert la == lb
    ma, mb = json.loads((ref_out / "metrics.json").read_text()), json.loads((out / "metrics.json").read_text())
    keys = [k for k in ma if k.startswith(("miou", "pixel_acc"))]
    assert keys and {k: ma[k] for k in keys} == {k: mb[k] for k in keys}


# ------------------------------------------------------------------------------------ embedding cache

CACHE_SCRIPT = r"""
import sys, torch
from distill.teacher.cache import EmbeddingCache
from distill.teacher.clip import build_teacher
from distill.teacher.regions import embed_regions_to_cache
from distill.config import load_config
cfg = load_config(None, sys.argv[2:])
t = build_teacher(cfg.teacher)
torch.manual_seed(0)
g = torch.Generator().manual_seed(5)
items = []
for i in range(96):
    img = torch.rand(3, 48, 56, generator=g)
    xy = torch.randint(0, 24, (6, 2), generator=g).float()
    wh = torch.randint(8, 24, (6, 2), generator=g).float()
    items.append((1000 + i, img, torch.cat([xy, xy + wh], 1)))
cache = EmbeddingCache(sys.argv[1], {"teacher": t.fingerprint, "mode": "crop"}, shard_size=2)
print(embed_regions_to_cache(t, items, cache, images_per_batch=2))
"""


@pytest.mark.slow
def test_kill_embedding_cache_then_rerun_is_byte_identical(tmp_path, teacher_model):
    from distill.teacher.cache import EmbeddingCache

    rng = random.Random(99)
    script = tmp_path / "fill.py"
    script.write_text(CACHE_SCRIPT)
    cmd = lambda root: [sys.executable, str(script), str(root), *teacher_overrides(teacher_model)]  # noqa: E731
    run_ok(cmd(tmp_path / "ref"), tmp_path / "ref.log")
    root = tmp_path / "run"
    status = run_and_kill(cmd(root), lambda: (root / "index.json").is_file(), rng, 0.3, tmp_path / "k.log")
    assert status == "killed"
    idx = json.loads((root / "index.json").read_text())
    assert not idx["complete"] and 0 < len(idx["shards"]) < 48
    key = idx["key"]
    partial = EmbeddingCache(root, {k: v for k, v in key.items() if k != "dtype"}, readonly=True)
    partial.verify()  # every shard listed is complete (sha256 matches); a half-written one is not listed
    listed = {s["file"] for s in idx["shards"]}
    on_disk = {p.name for p in root.glob("shard-*.safetensors")}
    assert listed <= on_disk
    # a kill between a shard's rename and the index rewrite leaves finished shards that no index
    # lists yet (the rerun's shard_done takes them over): they are numbered after the listed ones
    # and complete (renamed only once written)
    from safetensors.torch import load_file

    for name in on_disk - listed:
        assert int(name[len("shard-") : -len(".safetensors")]) >= len(listed), name
        assert load_file(root / name), name
    print(f"cache: killed with {len(listed)}/48 shards written")  # where the kill landed (shown with -s)
    run_ok(cmd(root), tmp_path / "rerun.log")
    ref, got = _visible(tmp_path / "ref"), _visible(root)
    assert sorted(ref) == sorted(got) and len(ref) == 49
    assert all(ref[k] == got[k] for k in ref)


# ------------------------------------------------------------------------------------ labeling


def _image_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(7)
    root.mkdir(parents=True)
    for i in range(n):
        img = rng.integers(100, 140, size=(48, 48, 3), dtype=np.uint8)
        y, x = rng.integers(0, 30, 2)
        img[y : y + 14, x : x + 14] = [(220, 30, 30), (30, 70, 225), (30, 170, 40)][i % 3]
        Image.fromarray(img).save(root / f"{i:03d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a counted skip must survive resume too
    return root


def _label_cmd(images, out, teacher_model):
    return cli_cmd("label", "--images", str(images), "--vocab", "red square, blue square, green square", "--model", "teacher",
                   "--out", str(out), "--format", "coco,yolo,png", "--score-thresh", "0", "--batch-size", "1",
                   "label.shard_size=1", *teacher_overrides(teacher_model))


@pytest.mark.slow
def test_kill_labeling_then_rerun_is_byte_identical(tmp_path, teacher_model):
    rng = random.Random(7)
    n = 160  # enough shards that the kill lands mid-run even on an idle machine (~100 images/s)
    imgs = _image_folder(tmp_path / "imgs", n)
    run_ok(_label_cmd(imgs, tmp_path / "ref", teacher_model), tmp_path / "ref.log")
    out = tmp_path / "run"
    shards = out / "shards"
    status = run_and_kill(_label_cmd(imgs, out, teacher_model), lambda: shards.is_dir() and any(shards.glob("shard-*.json")), rng, 0.1, tmp_path / "k.log")
    assert status == "killed"
    assert not (out / "labels.json").exists()
    done = sorted(shards.glob("shard-*.json"))
    for p in done:
        json.loads(p.read_text())  # every visible shard is whole
    assert 0 < len(done) < n + 1, f"{len(done)} of {n + 1} shards written before the kill"
    print(f"label: killed with {len(done)}/{n + 1} shards written")  # where the kill landed (shown with -s)
    run_ok(_label_cmd(imgs, out, teacher_model), tmp_path / "rerun.log")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels/shards_skipped"] >= len(done)
    ref, got = _visible(tmp_path / "ref"), _visible(out)
    skip = {"summary.json", "config.yaml"}  # wall time / the out path itself
    assert sorted(k for k in ref if k not in skip) == sorted(k for k in got if k not in skip)
    diff = [k for k in ref if k not in skip and ref[k] != got[k]]
    assert diff == []
    assert json.loads(ref["labels.json"])["annotations"]
    fails = (out / "failures.txt").read_text().splitlines()
    assert len(fails) == 1 and fails[0].startswith("broken.png\t") and "not an image" in fails[0]


# ------------------------------------------------------------------------------------ pipeline


@pytest.mark.slow
def test_kill_pipeline_then_rerun_gives_identical_world(tmp_path):
    rng = random.Random(3)
    big = {"world.num_train": 240, "world.num_val": 40, "world.image_size": 96}
    cfg = str(REPO / "configs/shapes/pipeline.yaml")
    stages = "pipeline.stages=[world, report]"  # the stages a kill test can afford; the runner is the same
    run_ok(cli_cmd("run", cfg, *world_overrides(tmp_path / "ref", **big), stages), tmp_path / "ref.log")
    w = tmp_path / "run"
    cmd = cli_cmd("run", cfg, *world_overrides(w, **big), stages)
    status = run_and_kill(cmd, lambda: w.is_dir() and any(w.rglob("*.png")), rng, 0.25, tmp_path / "k.log")
    assert status == "killed"
    # the world is staged and renamed into place: a killed build leaves no data/ that looks done
    assert not (w / "data" / "manifest.json").exists()
    assert not (w / "manifests" / "world.json").exists()
    print("pipeline: killed inside the world stage")  # where the kill landed (shown with -s)
    run_ok(cmd, tmp_path / "rerun.log")
    ref, got = _visible(tmp_path / "ref" / "data"), _visible(w / "data")
    assert len(ref) > 400 and sorted(ref) == sorted(got)
    volatile = {"manifest.json", "world.yaml"}
    assert [k for k in ref if k not in volatile and ref[k] != got[k]] == []
    assert (w / "report.md").is_file()
    # a second rerun skips everything
    r = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "up to date, skipped" in r.stderr + r.stdout


# ------------------------------------------------------------------------------------ unwritable output


def test_read_only_output_folder_is_a_one_line_error(tmp_path, teacher_model, capsys):
    imgs = _image_folder(tmp_path / "imgs", 2)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        probe = ro / "probe"
        try:
            probe.write_text("x")
            writable = True
            probe.unlink()
        except OSError:
            writable = False
        if writable:
            pytest.skip("running as root: chmod 0o500 does not stop writes here")
        line = cli_error(capsys, ["label", "--images", str(imgs), "--vocab", "red square", "--model", "teacher",
                                  "--out", str(ro / "labels"), *teacher_overrides(teacher_model)])
        assert str(ro) in line
    finally:
        ro.chmod(0o700)


def test_output_folder_that_cannot_be_created_is_a_one_line_error(tmp_path, teacher_model, capsys):
    """Unwritable even for root: --out lies below a regular file."""
    imgs = _image_folder(tmp_path / "imgs", 2)
    (tmp_path / "afile").write_text("x")
    line = cli_error(capsys, ["label", "--images", str(imgs), "--vocab", "red square", "--model", "teacher",
                              "--out", str(tmp_path / "afile" / "labels"), *teacher_overrides(teacher_model)])
    assert str(tmp_path / "afile") in line and ("Not a directory" in line or "cannot" in line), line


def test_full_disk_is_a_one_line_error(tmp_path, teacher_model, capsys, monkeypatch):
    """A full disk cannot be made here; ENOSPC is injected where every atomic write flushes."""
    import distill.io as dio

    imgs = _image_folder(tmp_path / "imgs", 2)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dio.os, "fsync", no_space)
    line = cli_error(capsys, ["label", "--images", str(imgs), "--vocab", "red square", "--model", "teacher",
                              "--out", str(tmp_path / "out"), "--format", "coco", *teacher_overrides(teacher_model)])
    assert "No space left on device" in line and str(tmp_path / "out") in line
    monkeypatch.undo()
    # nothing that looks complete was left behind, only what a rerun redoes
    assert not (tmp_path / "out" / "labels.json").exists()
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file() and not p.name.startswith(".")] == []
