"""Faults: ``kill -9`` in the middle of training, region-embedding caching, labeling and the
pipeline runner; the rerun (``--resume`` for training) ends with the same outputs as an
uninterrupted run, and nothing half-written is ever read as complete. A read-only output folder
and a full disk (ENOSPC injected on the write path) give one-line errors.

Each kill lands at a point the test chooses, not at a wall-clock moment: the run is started under
``_kill_at.py``, which SIGKILLs the process at the N-th atomic rename onto a given file name (after
the 3rd checkpoint pointer, before the 3rd checkpoint's rename, after the 5th cache shard, ...).
So the test neither depends on the machine's speed nor can pass vacuously: it asserts the process
died of SIGKILL and exactly which files the kill left behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ._fixtures import REPO, cli_cmd, cli_error, env, make_teacher_dir, make_tiny_world, seg_overrides, teacher_overrides, world_overrides

KILL_AT = Path(__file__).resolve().parent / "_kill_at.py"


def killed_at(cmd: list[str], pattern: str, nth: int, when: str = "after") -> list[str]:
    """``cmd`` (``[python, -m, module, ...]`` or ``[python, script, ...]``) run under _kill_at.py:
    SIGKILLed at the ``nth`` rename onto a file named like ``pattern``, ``when`` = before / after it."""
    assert cmd[0] == sys.executable
    return [sys.executable, str(KILL_AT), pattern, str(nth), when, *cmd[1:]]


def run_killed(cmd: list[str], log: Path, timeout: float = 240) -> None:
    """Run a :func:`killed_at` command; assert it died of SIGKILL (it reached the chosen write)."""
    with open(log, "w") as f:
        r = subprocess.run(cmd, env=env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    assert r.returncode == -signal.SIGKILL, f"exit {r.returncode}, not killed at the chosen write:\n" + log.read_text()[-3000:]


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


STEPS, PERIOD = 10, 2  # checkpoints at steps 2, 4, 6, 8 and the final one at 10


@pytest.fixture(scope="module")
def seg_reference(tmp_path_factory, teacher_model):
    """The uninterrupted run the killed + resumed ones must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    make_tiny_world(root)
    run_ok(_seg_cmd(root, teacher_model), root / "ref.log")
    return root / "seg" / "lseg"


def _seg_cmd(work: Path, teacher_model: str) -> list[str]:
    return cli_cmd("train", "seg", str(REPO / "configs/shapes/lseg.yaml"),
                   *seg_overrides(work, teacher_model, **{"seg.train.max_steps": STEPS, "seg.train.checkpoint_period": PERIOD}))


@pytest.mark.slow
@pytest.mark.parametrize("pattern, when, resumed_at", [
    ("last_checkpoint", "after", 6),  # after the 3rd checkpoint (step 6) and its pointer are in place
    ("ckpt_*.pt", "before", 4),  # the 3rd checkpoint fully written to its temporary name, not renamed
])
def test_kill_training_then_resume_gives_identical_weights(tmp_path, teacher_model, seg_reference, pattern, when, resumed_at):
    make_tiny_world(tmp_path)
    cmd = _seg_cmd(tmp_path, teacher_model)
    out = tmp_path / "seg" / "lseg"
    ck = out / "checkpoints"
    run_killed(killed_at(cmd, pattern, 3, when), tmp_path / "k.log")
    # nothing half-written looks complete: every visible checkpoint loads, the pointer names one
    assert not (out / "model_final.pt").exists()
    names = sorted(p.name for p in ck.glob("ckpt_*.pt"))
    assert names == [f"ckpt_{s:07d}.pt" for s in range(PERIOD, resumed_at + 1, PERIOD)], names
    for n in names:
        torch.load(ck / n, weights_only=True, map_location="cpu")
    assert (ck / "last_checkpoint").read_text().strip() == f"ckpt_{resumed_at:07d}.pt"
    hidden = [p.name for p in ck.iterdir() if p.name.startswith(".")]
    assert (hidden != []) == (when == "before"), hidden  # the killed write's temporary file, never read
    # steps up to the checkpoint are not executed again: their log rows, tagged here, survive the
    # resume (a rerun from scratch, which training's determinism would otherwise hide, rewrites them)
    log = out / "metrics.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    assert max(r["step"] for r in rows) >= resumed_at  # the kill came after these steps were logged
    log.write_text("".join(json.dumps(dict(r, run="killed")) + "\n" for r in rows))
    run_ok(cmd + ["--resume"], tmp_path / "resume.log")
    assert f"at step {resumed_at}" in (tmp_path / "resume.log").read_text()
    resumed = [json.loads(x) for x in log.read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in resumed if r.get("run") == "killed"] == list(range(1, resumed_at + 1))
    assert [r["step"] for r in resumed if "run" not in r] == list(range(resumed_at + 1, STEPS + 1))
    for r in resumed:
        r.pop("run", None)
    log.write_text("".join(json.dumps(r) + "\n" for r in resumed))

    from distill.engine.checkpoint import read

    a, b = read(seg_reference / "model_final.pt")["model"], read(out / "model_final.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # identical on CPU in deterministic mode
    la, lb = _step_losses(seg_reference / "metrics.jsonl"), _step_losses(out / "metrics.jsonl")
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    assert la == lb
    ma, mb = json.loads((seg_reference / "metrics.json").read_text()), json.loads((out / "metrics.json").read_text())
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
for i in range(24):
    img = torch.rand(3, 48, 56, generator=g)
    xy = torch.randint(0, 24, (6, 2), generator=g).float()
    wh = torch.randint(8, 24, (6, 2), generator=g).float()
    items.append((1000 + i, img, torch.cat([xy, xy + wh], 1)))
cache = EmbeddingCache(sys.argv[1], {"teacher": t.fingerprint, "mode": "crop"}, shard_size=2)
print(embed_regions_to_cache(t, items, cache, images_per_batch=2))
"""


@pytest.mark.slow
@pytest.mark.parametrize("when, listed_before_kill", [
    ("after", 4),  # shard 4 renamed into place, the index not yet rewritten: a finished, unlisted shard
    ("before", 4),  # shard 4 whole under its temporary name, never renamed
])
def test_kill_embedding_cache_then_rerun_is_byte_identical(tmp_path, teacher_model, when, listed_before_kill):
    from safetensors.torch import load_file

    from distill.teacher.cache import EmbeddingCache

    script = tmp_path / "fill.py"
    script.write_text(CACHE_SCRIPT)
    cmd = lambda root: [sys.executable, str(script), str(root), *teacher_overrides(teacher_model)]  # noqa: E731
    run_ok(cmd(tmp_path / "ref"), tmp_path / "ref.log")
    root = tmp_path / "run"
    run_killed(killed_at(cmd(root), "shard-*.safetensors", 5, when), tmp_path / "k.log")
    idx = json.loads((root / "index.json").read_text())
    assert not idx["complete"] and [s["file"] for s in idx["shards"]] == [f"shard-{k:05d}.safetensors" for k in range(listed_before_kill)]
    key = idx["key"]
    partial = EmbeddingCache(root, {k: v for k, v in key.items() if k != "dtype"}, readonly=True)
    partial.verify()  # every shard listed is complete (sha256 matches); a half-written one is not listed
    on_disk = sorted(p.name for p in root.glob("shard-*.safetensors"))
    # killed after the rename: the 5th shard is finished but no index lists it yet (the rerun's
    # shard_done takes it over); killed before: only its hidden temporary file exists
    assert on_disk == [f"shard-{k:05d}.safetensors" for k in range(5 if when == "after" else 4)]
    for name in on_disk:
        assert load_file(root / name), name
    assert bool([p for p in root.iterdir() if p.name.startswith(".shard-")]) == (when == "before")
    run_ok(cmd(root), tmp_path / "rerun.log")
    ref, got = _visible(tmp_path / "ref"), _visible(root)
    assert sorted(ref) == sorted(got) and len(ref) == 13  # 12 shards of 2 images + the index
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
    n = 12
    imgs = _image_folder(tmp_path / "imgs", n)
    run_ok(_label_cmd(imgs, tmp_path / "ref", teacher_model), tmp_path / "ref.log")
    out = tmp_path / "run"
    shards = out / "shards"
    # killed right after the 5th shard (of n + 1: one image each, broken.png included) is in place
    run_killed(killed_at(_label_cmd(imgs, out, teacher_model), "shard-*.json", 5), tmp_path / "k.log")
    assert not (out / "labels.json").exists()
    done = sorted(shards.glob("shard-*.json"))
    for p in done:
        json.loads(p.read_text())  # every visible shard is whole
    assert [p.name for p in done] == [f"shard-{k:05d}.json" for k in range(5)]
    run_ok(_label_cmd(imgs, out, teacher_model), tmp_path / "rerun.log")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels/shards_skipped"] == 5
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
    cfg = str(REPO / "configs/shapes/pipeline.yaml")
    stages = "pipeline.stages=[world, report]"  # the stages a kill test can afford; the runner is the same
    run_ok(cli_cmd("run", cfg, *world_overrides(tmp_path / "ref"), stages), tmp_path / "ref.log")
    w = tmp_path / "run"
    cmd = cli_cmd("run", cfg, *world_overrides(w), stages)
    # killed inside the world stage: its images and first split's COCO json are written (in the
    # staging folder), the other splits and the rename into place are not
    run_killed(killed_at(cmd, "instances_*.json", 1), tmp_path / "k.log")
    staged = [p for p in w.iterdir() if p.name.startswith(".data.tmp-")]
    assert len(staged) == 1 and list(staged[0].rglob("*.png")), sorted(p.name for p in w.iterdir())
    # the world is staged and renamed into place: a killed build leaves no data/ that looks done
    assert not (w / "data" / "manifest.json").exists()
    assert not (w / "manifests" / "world.json").exists()
    run_ok(cmd, tmp_path / "rerun.log")
    ref, got = _visible(tmp_path / "ref" / "data"), _visible(w / "data")
    assert len(ref) > 20 and sorted(ref) == sorted(got)
    volatile = {"manifest.json", "world.yaml"}
    assert [k for k in ref if k not in volatile and ref[k] != got[k]] == []
    assert (w / "report.md").is_file()
    # a second rerun reruns no stage: every manifest is the same file, every stage "skipped"
    manifests = {p.name: p.read_bytes() for p in (w / "manifests").glob("*.json")}
    assert sorted(manifests) == ["report.json", "world.json"]
    r = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "up to date, skipped" in r.stderr + r.stdout
    assert {p.name: p.read_bytes() for p in (w / "manifests").glob("*.json")} == manifests


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
    import distill.files as dio

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
