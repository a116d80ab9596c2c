"""The default graph (distill/pipeline/stages.py): stage wiring, views, weights as outputs."""

import dataclasses
from pathlib import Path

import pytest

from distill.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_backbone_stage_runs_only_for_its_own_weights(tmp_path):
    """The shapes detector starts from the backbone stage's file; an external file (ImageNet's, as
    the COCO configs) or random init makes the stage a no-op, and the det stages depend on it."""
    from distill.detection.backbone import uses_pretrained_backbone
    from distill.pipeline.stages import STAGES, build_pipeline, st_backbone

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
    from distill.pipeline.stages import build_pipeline

    w = f"work_dir={tmp_path / 'w'}"
    cfg = load_config(REPO / "configs/shapes/pipeline.yaml", [w])
    assert backbone_readers(cfg) == ("det", "seg")
    p = build_pipeline(cfg)
    for name in ("seg", "cam"):  # the cam stage trains LSeg on the CAM masks: the same encoder
        assert "backbone" in p.stages[name].deps and p.order.index("backbone") < p.order.index(name)
    only_seg = load_config(REPO / "configs/shapes/pipeline.yaml", [w, "det.pretrained_backbone="])
    assert backbone_readers(only_seg) == ("seg",)
    assert build_pipeline(only_seg).stages["backbone"].outputs == ("backbone/base_crops.pth",)
    for other in ("seg.backbone=dense_tower", "seg.arch=clipseg", "seg.pretrained_backbone=", f"seg.pretrained_backbone={tmp_path / 'imagenet.pth'}"):
        c = load_config(REPO / "configs/shapes/pipeline.yaml", [w, other])
        assert backbone_readers(c) == ("det",), other
        assert "backbone" not in build_pipeline(c).stages["seg"].deps and "backbone" not in build_pipeline(c).stages["cam"].deps, other
    # a pipeline without the backbone stage (an external encoder) keeps seg's other deps
    c = load_config(REPO / "configs/shapes/pipeline.yaml", [w, "pipeline.stages=[world,teacher,clipself,seg]"])
    assert build_pipeline(c).stages["seg"].deps == ("teacher", "clipself")


def test_plain_teacher_blanks_the_dense_tower_only(tmp_path):
    """Stages before clipself (and those that read crops / text) see teacher.dense_tower
    blank; everything else in the config reaches them unchanged, and a blank config passes as is."""
    from distill.pipeline.stages import STAGES, plain_teacher

    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}", f"teacher.dense_tower={tmp_path / 'dense.safetensors'}", "teacher.batch_size=7"])
    got = plain_teacher(cfg)
    assert got.teacher.dense_tower == "" and cfg.teacher.dense_tower == str(tmp_path / "dense.safetensors")
    assert got.teacher.batch_size == 7 and got.work_dir == cfg.work_dir and got.seg == cfg.seg and got.cam == cfg.cam
    assert got.teacher == dataclasses.replace(cfg.teacher, dense_tower="")
    blank = load_config(None, [f"work_dir={tmp_path / 'w'}", "teacher.dense_tower="])
    assert plain_teacher(blank) is blank
    # the stages that need the dense tower (clipself makes it; seg and cam read it) see it
    plain = {s.name for s in STAGES if s.view is plain_teacher}
    assert plain == {"teacher", "text", "regions", "det_text", "det", "detpro", "label", "selftrain"}


def test_stage_runs_on_and_is_keyed_on_its_view(tmp_path):
    """A stage with a view runs on the view, and a key the view blanks cannot rerun it: moving the
    dense tower changes the keys of seg and cam (they read it) but not of the detector stages."""
    from distill.pipeline.runner import Pipeline, Stage
    from distill.pipeline.stages import STAGES, plain_teacher

    seen = []
    pipe = Pipeline([Stage("a", lambda c: seen.append(c.teacher.dense_tower), (), ("teacher",), (), view=plain_teacher)])
    cfg = load_config(None, [f"work_dir={tmp_path / 'w'}", f"teacher.dense_tower={tmp_path / 'd1'}"])
    pipe.run(cfg)
    assert seen == [""]

    full = Pipeline(STAGES)
    moved = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, dense_tower=str(tmp_path / "d2")))
    for name in ("teacher", "text", "det_text", "det", "label"):
        assert full.stage_key(cfg, name) == full.stage_key(moved, name), name
    for name in ("clipself", "seg", "cam"):
        assert full.stage_key(cfg, name) != full.stage_key(moved, name), name
    # and a key the view does not blank still counts
    bigger = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, batch_size=cfg.teacher.batch_size + 1))
    assert full.stage_key(cfg, "det") != full.stage_key(bigger, "det")


def test_clipself_stage_runs_only_for_its_own_weights(tmp_path):
    """The clipself stage writes the dense tower only when teacher.dense_tower is clipself.out;
    then the file and its MaskCLIP metrics are its outputs, and seg / cam depend on it."""
    from distill.pipeline.stages import STAGES, build_pipeline, st_clipself
    from distill.teacher.clipself import uses_clipself

    w = tmp_path / "w"
    deps = {s.name: s.deps for s in STAGES}
    assert "clipself" in deps["seg"] and "clipself" in deps["cam"] and deps["clipself"] == ("teacher",)
    cfg = load_config(REPO / "configs/shapes/pipeline.yaml", [f"work_dir={w}"])
    assert uses_clipself(cfg) and cfg.teacher.dense_tower == cfg.clipself.out == f"{w}/teacher/dense_tower.safetensors"
    assert build_pipeline(cfg).stages["clipself"].outputs == ("teacher/dense_tower.safetensors", "teacher/dense_tower/metrics.json")
    # clipself.out elsewhere under the work dir: the outputs follow it
    moved = load_config(REPO / "configs/shapes/pipeline.yaml", [f"work_dir={w}", f"clipself.out={w}/cs/tower.safetensors",
                                                                f"teacher.dense_tower={w}/cs/tower.safetensors"])
    assert build_pipeline(moved).stages["clipself"].outputs == ("cs/tower.safetensors", "teacher/dense_tower/metrics.json")
    ext = tmp_path / "external.safetensors"
    for others in (["teacher.dense_tower="], [f"teacher.dense_tower={ext}"],
                   [f"clipself.out={ext}", f"teacher.dense_tower={ext}"]):  # last: used, but outside the work dir
        c = load_config(REPO / "configs/shapes/pipeline.yaml", [f"work_dir={w}", *others])
        assert build_pipeline(c).stages["clipself"].outputs == ()
        if c.teacher.dense_tower != c.clipself.out:
            assert not uses_clipself(c)
            assert st_clipself(c).startswith("skipped")
    assert not w.exists() and not ext.exists()  # a skipped stage builds and writes nothing


def test_detpro_stage_only_when_prompts_enabled():
    """DetPro is optional: absent from the default graph; with prompts.enabled it follows the
    region cache and leaves the prompt file and both ViLD-with-prompts metrics."""
    from distill.config import load_config
    from distill.errors import DistillError
    from distill.pipeline.stages import build_pipeline

    off = build_pipeline(load_config("configs/shapes/pipeline.yaml", ["work_dir=w"]))
    assert "detpro" not in off.order
    on = build_pipeline(load_config("configs/shapes/pipeline.yaml", ["work_dir=w", "prompts.enabled=true"]))
    st = on.stages["detpro"]
    assert set(st.deps) == {"text", "regions", "backbone"}
    assert st.outputs == ("prompts/detpro.safetensors", "det/vild_detpro/metrics.json", "det/vild_detpro_ensemble/metrics.json")
    with pytest.raises(DistillError, match="detpro stage runs only with prompts.enabled=true"):
        build_pipeline(load_config("configs/shapes/pipeline.yaml", ["work_dir=w", "pipeline.stages=[world,detpro]"]))
