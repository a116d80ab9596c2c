import dataclasses
import json
import os
from pathlib import Path

import pytest

from distill.config import load_config
from distill.errors import DistillError
from distill.pipeline import Pipeline, Stage, stage_timings

REPO = Path(__file__).resolve().parents[1]


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
    from distill.pipeline import resuming

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


def test_tool_scripts_are_the_cli(tmp_path):
    """tools/run_pipeline.py is `distill run`: --list lists the shapes graph (nothing runs); every
    script in tools/ answers --help."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(repo / "tools/run_pipeline.py"), str(repo / "configs/shapes/pipeline.yaml"), f"work_dir={tmp_path}", "--list"],
                       capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    listed = [line.split()[0] for line in (r.stdout + r.stderr).splitlines() if "to run" in line]
    assert listed[0] == "world" and listed[-1] == "report" and len(listed) == 14 and "backbone" in listed and "clipself" in listed
    assert not any(tmp_path.iterdir())  # --list writes nothing
    for tool in sorted((repo / "tools").glob("*.py")):
        h = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, env=env, cwd=repo, timeout=120)
        assert h.returncode == 0 and "usage" in h.stdout.lower(), (tool.name, h.stderr[-500:])


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


def test_backbone_stage_runs_only_for_its_own_weights(tmp_path):
    """The shapes detector starts from the backbone stage's file; an external file (ImageNet's, as
    the COCO configs) or random init makes the stage a no-op, and the det stages depend on it."""
    from distill.detection.backbone import uses_pretrained_backbone
    from distill.stages import STAGES, build_pipeline, st_backbone

    deps = {s.name: s.deps for s in STAGES}
    assert "backbone" in deps["det"] and "backbone" in deps["det_text"] and "backbone" in deps["propose"]
    cfg = load_config(REPO / "configs/shapes/vild.yaml", [f"work_dir={tmp_path / 'w'}"])
    assert uses_pretrained_backbone(cfg) and cfg.det.pretrained_backbone.endswith("backbone/base_crops.pth")
    for other in ("det.pretrained_backbone=", f"det.pretrained_backbone={tmp_path / 'imagenet.pth'}"):
        c = load_config(REPO / "configs/shapes/vild.yaml", [f"work_dir={tmp_path / 'w'}", other])
        assert not uses_pretrained_backbone(c)
        assert st_backbone(c).startswith("skipped")
        assert next(s for s in build_pipeline(c).stages.values() if s.name == "backbone").outputs == ()
    assert not (tmp_path / "w" / "backbone").exists()
    # when used, the weights are the stage's output (a deleted file reruns it; downstream keys
    # carry its digest)
    assert build_pipeline(cfg).stages["backbone"].outputs == ("backbone/base_crops.pth",)


def test_lseg_encoder_from_the_backbone_stage(tmp_path):
    """The shapes pipeline's LSeg starts from the backbone stage's ResNet-18 (LSeg's ImageNet
    encoder): the seg stage then depends on it; another encoder, or another file, does not."""
    from distill.detection.backbone import backbone_readers
    from distill.stages import build_pipeline

    w = f"work_dir={tmp_path / 'w'}"
    cfg = load_config(REPO / "configs/shapes/pipeline.yaml", [w])
    assert backbone_readers(cfg) == ("det", "seg")
    p = build_pipeline(cfg)
    assert "backbone" in p.stages["seg"].deps and p.order.index("backbone") < p.order.index("seg")
    only_seg = load_config(REPO / "configs/shapes/pipeline.yaml", [w, "det.pretrained_backbone="])
    assert backbone_readers(only_seg) == ("seg",)
    assert build_pipeline(only_seg).stages["backbone"].outputs == ("backbone/base_crops.pth",)
    for other in ("seg.backbone=teacher_dense", "seg.arch=clipseg", "seg.pretrained_backbone=", f"seg.pretrained_backbone={tmp_path / 'imagenet.pth'}"):
        c = load_config(REPO / "configs/shapes/pipeline.yaml", [w, other])
        assert backbone_readers(c) == ("det",), other
        assert "backbone" not in build_pipeline(c).stages["seg"].deps, other
    # a pipeline without the backbone stage (an external encoder) keeps seg's other deps
    c = load_config(REPO / "configs/shapes/pipeline.yaml", [w, "pipeline.stages=[world,teacher,clipself,seg]"])
    assert build_pipeline(c).stages["seg"].deps == ("teacher", "clipself")


def test_plain_teacher_blanks_the_dense_tower_only(tmp_path):
    """Stages before clipself (and those that read crops / text) see teacher.dense_pretrained
    blank; everything else in the config reaches them unchanged, and a blank config passes as is."""
    from distill.stages import STAGES, plain_teacher

    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}", f"teacher.dense_pretrained={tmp_path / 'dense.safetensors'}", "teacher.batch_size=7"])
    got = plain_teacher(cfg)
    assert got.teacher.dense_pretrained == "" and cfg.teacher.dense_pretrained == str(tmp_path / "dense.safetensors")
    assert got.teacher.batch_size == 7 and got.work_dir == cfg.work_dir and got.seg == cfg.seg and got.cam == cfg.cam
    assert got.teacher == dataclasses.replace(cfg.teacher, dense_pretrained="")
    blank = load_config(None, [f"work_dir={tmp_path / 'w'}", "teacher.dense_pretrained="])
    assert plain_teacher(blank) is blank
    # the stages that need the dense tower (clipself makes it; seg and cam read it) see it
    plain = {s.name for s in STAGES if s.view is plain_teacher}
    assert plain == {"teacher", "text", "regions", "det_text", "det", "label", "selftrain"}


def test_stage_runs_on_and_is_keyed_on_its_view(tmp_path):
    """A stage with a view runs on the view, and a key the view blanks cannot rerun it: moving the
    dense tower changes the keys of seg and cam (they read it) but not of the detector stages."""
    from distill.pipeline import Pipeline, Stage
    from distill.stages import STAGES, plain_teacher

    seen = []
    pipe = Pipeline([Stage("a", lambda c: seen.append(c.teacher.dense_pretrained), (), ("teacher",), (), view=plain_teacher)])
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}", f"teacher.dense_pretrained={tmp_path / 'd1'}"])
    pipe.run(cfg)
    assert seen == [""]

    full = Pipeline(STAGES)
    moved = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, dense_pretrained=str(tmp_path / "d2")))
    for name in ("teacher", "text", "det_text", "det", "label"):
        assert full.stage_key(cfg, name) == full.stage_key(moved, name), name
    for name in ("clipself", "seg", "cam"):
        assert full.stage_key(cfg, name) != full.stage_key(moved, name), name
    # and a key the view does not blank still counts
    bigger = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, batch_size=cfg.teacher.batch_size + 1))
    assert full.stage_key(cfg, "det") != full.stage_key(bigger, "det")


def test_clipself_stage_runs_only_for_its_own_weights(tmp_path):
    """The clipself stage writes the dense tower only when teacher.dense_pretrained is clipself.out;
    then the file and its MaskCLIP metrics are its outputs, and seg / cam depend on it."""
    from distill.stages import STAGES, build_pipeline, st_clipself
    from distill.teacher.clipself import uses_clipself

    w = tmp_path / "w"
    deps = {s.name: s.deps for s in STAGES}
    assert "clipself" in deps["seg"] and "clipself" in deps["cam"] and deps["clipself"] == ("teacher",)
    cfg = load_config(REPO / "configs/shapes/pipeline.yaml", [f"work_dir={w}"])
    assert uses_clipself(cfg) and cfg.teacher.dense_pretrained == cfg.clipself.out == f"{w}/teacher/teacher_dense.safetensors"
    assert build_pipeline(cfg).stages["clipself"].outputs == ("teacher/teacher_dense.safetensors", "teacher/dense/metrics.json")
    # clipself.out elsewhere under the work dir: the outputs follow it
    moved = load_config(REPO / "configs/shapes/pipeline.yaml", [f"work_dir={w}", f"clipself.out={w}/cs/tower.safetensors",
                                                                f"teacher.dense_pretrained={w}/cs/tower.safetensors"])
    assert build_pipeline(moved).stages["clipself"].outputs == ("cs/tower.safetensors", "teacher/dense/metrics.json")
    ext = tmp_path / "external.safetensors"
    for others in (["teacher.dense_pretrained="], [f"teacher.dense_pretrained={ext}"],
                   [f"clipself.out={ext}", f"teacher.dense_pretrained={ext}"]):  # last: used, but outside the work dir
        c = load_config(REPO / "configs/shapes/pipeline.yaml", [f"work_dir={w}", *others])
        assert build_pipeline(c).stages["clipself"].outputs == ()
        if c.teacher.dense_pretrained != c.clipself.out:
            assert not uses_clipself(c)
            assert st_clipself(c).startswith("skipped")
    assert not w.exists() and not ext.exists()  # a skipped stage builds and writes nothing
