"""The runner (distill/pipeline/runner.py): manifests, stage keys, skip, force / until, resume."""

import dataclasses
import json
from pathlib import Path

import pytest

from distill.config import load_config
from distill.errors import DistillError
from distill.pipeline.runner import Pipeline, Stage, stage_timings


def make(tmp_path, calls, fail_at=None):
    def writer(name, text_from):
        def fn(cfg):
            calls.append(name)
            if fail_at == name:
                raise RuntimeError("killed")
            out = tmp_path / "w" / f"{name}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text_from(cfg))

        return fn

    return Pipeline(
        [
            Stage("a", writer("a", lambda c: f"seed={c.world.seed}"), sections=("world",), outputs=("a.txt",)),
            Stage("b", writer("b", lambda c: (tmp_path / "w" / "a.txt").read_text() + "+b"), deps=("a",), sections=("teacher",), outputs=("b.txt",)),
            Stage("c", writer("c", lambda c: "c"), deps=("b",), sections=("det",), outputs=("c.txt",)),
        ]
    )


def test_skip_rerun_force_until(tmp_path):
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}"])
    calls: list[str] = []
    p = make(tmp_path, calls)
    assert [r.status for r in p.run(cfg)] == ["ran", "ran", "ran"]
    assert calls == ["a", "b", "c"]
    calls.clear()
    assert [r.status for r in p.run(cfg)] == ["skipped"] * 3 and calls == []
    # a config change in one section reruns that stage and everything downstream of it
    cfg2 = load_config(None, [f"work_dir={tmp_path / 'w'}", "teacher.batch_size=3"])
    p.run(cfg2)
    assert calls == ["b", "c"]
    calls.clear()
    p.run(cfg2, force=["a"])
    assert calls == ["a", "b", "c"]
    calls.clear()
    cfg3 = load_config(None, [f"work_dir={tmp_path / 'w'}", "world.seed=9", "teacher.batch_size=3"])
    res = p.run(cfg3, until="a")
    assert calls == ["a"] and [r.name for r in res] == ["a"]
    with pytest.raises(DistillError, match="valid stages: a, b, c"):
        p.run(cfg3, until="zz")


def test_tampered_output_reruns(tmp_path):
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}"])
    calls: list[str] = []
    p = make(tmp_path, calls)
    p.run(cfg)
    (tmp_path / "w" / "b.txt").write_text("garbage")
    calls.clear()
    p.run(cfg)
    # b is rebuilt; it writes what it wrote before, so c (keyed by b's output digest) stays fresh
    assert calls == ["b"]
    assert (tmp_path / "w" / "b.txt").read_text() == "seed=0+b"


def test_killed_stage_reruns_and_manifest(tmp_path):
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}"])
    calls: list[str] = []
    with pytest.raises(RuntimeError):
        make(tmp_path, calls, fail_at="b").run(cfg)
    assert not (tmp_path / "w" / "manifests" / "b.json").exists()
    calls.clear()
    make(tmp_path, calls).run(cfg)
    assert calls == ["b", "c"]
    m = json.loads((tmp_path / "w" / "manifests" / "b.json").read_text())
    assert set(m) >= {"key", "config_hash", "deps", "outputs", "versions", "wall_time_s"}
    assert m["deps"]["a"] is not None and "b.txt" in m["outputs"]
    assert set(stage_timings(cfg)) == {"a", "b", "c"}


def test_missing_output_is_an_error(tmp_path):
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}"])
    p = Pipeline([Stage("x", lambda c: None, outputs=("nothing.txt",))])
    with pytest.raises(DistillError, match="without writing"):
        p.run(cfg)


def test_graph_validation():
    with pytest.raises(ValueError, match="unknown stage"):
        Pipeline([Stage("a", lambda c: None, deps=("zz",))])
    with pytest.raises(ValueError, match="cycle"):
        Pipeline([Stage("a", lambda c: None, deps=("b",)), Stage("b", lambda c: None, deps=("a",))])


def test_resuming_only_after_a_kill_with_the_same_inputs(tmp_path):
    from distill.pipeline.runner import resuming

    seen = []
    state = {"fail": True}

    def fn(cfg):
        seen.append(resuming())
        if state["fail"]:
            raise RuntimeError("killed")
        (tmp_path / "w").mkdir(exist_ok=True)
        (tmp_path / "w" / "x.txt").write_text("x")

    p = Pipeline([Stage("x", fn, sections=("det",), outputs=("x.txt",))])
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}"])
    with pytest.raises(RuntimeError):
        p.run(cfg)
    with pytest.raises(RuntimeError):
        p.run(cfg)  # same inputs, killed before: resume
    with pytest.raises(RuntimeError):
        p.run(load_config(None, [f"work_dir={tmp_path / 'w'}", "det.train.lr=0.5"]))  # inputs changed: fresh
    state["fail"] = False
    p.run(load_config(None, [f"work_dir={tmp_path / 'w'}", "det.train.lr=0.5"]))
    assert seen == [False, True, False, True]
    assert not (tmp_path / "w" / "manifests" / "x.started").exists()
    assert resuming() is False


def test_a_dotted_section_keys_a_stage_on_that_key_only(tmp_path):
    """sections may name a key inside a section (the backbone stage keys on det.backbone_pretrain,
    not on all of det): changing another det key leaves it fresh, changing that key reruns it."""
    calls: list[str] = []

    def fn(cfg):
        calls.append("s")
        (tmp_path / "w").mkdir(exist_ok=True)
        (tmp_path / "w" / "s.txt").write_text(str(cfg.det.backbone_pretrain.steps))

    p = Pipeline([Stage("s", fn, sections=("det.backbone_pretrain",), outputs=("s.txt",))])
    p.run(load_config(None, [f"work_dir={tmp_path / 'w'}"]))
    p.run(load_config(None, [f"work_dir={tmp_path / 'w'}", "det.train.max_steps=7"]))
    assert calls == ["s"]
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}", "det.backbone_pretrain.steps=7"])
    p.run(cfg)
    assert calls == ["s", "s"]
    assert list(p.read_manifest(cfg, "s")["config_hash"]) == ["det.backbone_pretrain"]


def test_declared_checkpoints_go_when_a_stage_starts_afresh(tmp_path):
    """A stage's declared training folders lose their checkpoints and model_final.pt when it starts
    with new inputs (another config's weights must never be resumed), and keep them when a killed
    run with the same inputs resumes; files beside them and other folders are untouched."""
    w = tmp_path / "w"
    seen = []
    state = {"fail": True}

    def fn(cfg):
        d = w / "det" / "x"
        seen.append(sorted(p.name for p in d.iterdir()) if d.is_dir() else [])
        (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        (d / "checkpoints" / "step_1.pt").write_text("weights")
        (d / "model_final.pt").write_text("weights")
        (d / "metrics.json").write_text("{}")
        if state["fail"]:
            raise RuntimeError("killed")

    (w / "det" / "other" / "checkpoints").mkdir(parents=True)
    p = Pipeline([Stage("x", fn, sections=("det",), outputs=("det/x/metrics.json",), checkpoints=("det/x",))])
    cfg = load_config(None, [f"work_dir={w}"])
    with pytest.raises(RuntimeError):
        p.run(cfg)
    with pytest.raises(RuntimeError):
        p.run(cfg)  # same inputs: resumes with the checkpoints in place
    with pytest.raises(RuntimeError):
        p.run(load_config(None, [f"work_dir={w}", "det.train.lr=0.5"]))  # new inputs: they go first
    assert seen == [[], ["checkpoints", "metrics.json", "model_final.pt"], ["metrics.json"]]
    assert (w / "det" / "other" / "checkpoints").is_dir()


@pytest.mark.parametrize("stage, folder", [("teacher", "teacher/teacher_train"), ("clipself", "elsewhere/dense_train"),
                                           ("backbone", "backbone/base_crops_train")])
def test_trainer_stages_resume_their_own_training_folder(tmp_path, stage, folder):
    """The teacher, clipself and backbone stages declare the training folder beside their product
    (engine/train.run_dir, following the config key that names the product): a killed run of the
    same config resumes from it, a changed config starts afresh without it."""
    from distill.pipeline.stages import STAGES

    stages = {s.name: s for s in STAGES}
    w = tmp_path / "w"
    cfg = load_config(None, [f"work_dir={w}", f"clipself.out={w}/elsewhere/dense.safetensors"])
    declared = stages[stage].checkpoints
    assert [Path(f) for f in declared(stages[stage].config(cfg))] == [w / folder]
    seen = []

    def fn(c):
        seen.append((w / folder / "checkpoints" / "step_1.pt").is_file())
        (w / folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        (w / folder / "checkpoints" / "step_1.pt").write_text("weights")
        raise RuntimeError("killed")

    p = Pipeline([dataclasses.replace(stages[stage], fn=fn, deps=(), outputs=())])
    for c in (cfg, cfg, load_config(None, [f"work_dir={w}", f"clipself.out={w}/elsewhere/dense.safetensors", "pretrain.lr=0.5",
                                           "clipself.lr=0.5", "det.backbone_pretrain.lr=0.5"])):
        with pytest.raises(RuntimeError):
            p.run(c)
    assert seen == [False, True, False]


def test_plan_lists_forced_stale_and_downstream(tmp_path):
    """plan() is what run() would execute: nothing when fresh, a stage and its downstream when
    forced or stale, cut at until; unknown names name the option."""
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}"])
    calls: list[str] = []
    p = make(tmp_path, calls)
    assert p.plan(cfg) == ["a", "b", "c"]
    p.run(cfg)
    assert p.plan(cfg) == [] and p.plan(cfg, force=["b"]) == ["b", "c"] and p.plan(cfg, force=["b"], until="b") == ["b"]
    assert p.plan(load_config(None, [f"work_dir={tmp_path / 'w'}", "world.seed=4"])) == ["a", "b", "c"]
    with pytest.raises(DistillError, match="--force: unknown stage 'bb'; valid stages: a, b, c; did you mean 'b'"):
        p.plan(cfg, force=["bb"])
