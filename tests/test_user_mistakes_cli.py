"""A new user's mistakes, met through the installed ``distill`` entry point (a subprocess, from a
folder outside the repository): each is ONE line on stderr (``error: ...``) naming the file / key
and what was expected, exit code 2, no traceback and nothing written. Every case fails before a
model loads, except the class-threshold one, which labels one tiny image with a tiny random
teacher to show that a class name holding commas gets its threshold.

Found by a new-user sweep: non-UTF-8 and folder configs (a traceback, "config file not found");
a folder or missing path as --vocab (became a class named after the path); YAML / CSV
vocabularies read as lines; 'a=b=c' entries; exact duplicate names merged silently; typos in
pipeline.stages (ran nothing, exit 0) and in --force / --until under --list (ignored);
--class-thresh splitting class names at commas; misleading label.model / label.format /
teacher.pretrained / Hugging Face folder messages; --nms and label.max_side unchecked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reliability._fixtures import make_teacher_dir, teacher_overrides

REPO = Path(__file__).resolve().parents[1]
EXE = shutil.which("distill") or str(Path(sys.executable).parent / "distill")
TEACHER_CFG = str(REPO / "configs" / "shapes" / "teacher.yaml")
PIPELINE_CFG = str(REPO / "configs" / "shapes" / "pipeline.yaml")
CAM_CFG = str(REPO / "configs" / "shapes" / "cam.yaml")
VILD_CFG = str(REPO / "configs" / "shapes" / "vild.yaml")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _setup(tmp: Path) -> None:
    """What the user has in their folder: one image, a few vocabulary files, a binary file, a
    Latin-1 YAML, an empty folder, a tiny Hugging Face CLIP folder (config.json only: the
    architecture check comes before the weights are read)."""
    (tmp / "imgs").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp / "imgs" / "a.png")
    (tmp / "vocabs").mkdir()
    (tmp / "v.yaml").write_text("- red star\n- blue circle\n", encoding="utf-8")
    (tmp / "v.csv").write_text("id,name\n1,red star\n2,blue circle\n", encoding="utf-8")
    (tmp / "dup.txt").write_text("red star\nblue circle\nred star\n", encoding="utf-8")
    (tmp / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\x80\x81\xfe\xff" * 16)
    (tmp / "latin1.yaml").write_bytes("label:\n  vocab: caf\u00e9\n".encode("latin-1"))
    (tmp / "hfclip").mkdir()
    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_act": "quick_gelu"}
    (tmp / "hfclip" / "config.json").write_text(json.dumps({
        "model_type": "clip", "projection_dim": 32,
        "text_config": {**tower, "max_position_embeddings": 77, "vocab_size": 49408},
        "vision_config": {**tower, "image_size": 64, "patch_size": 16},
    }))


LABEL = ["label", "--images", "imgs", "--out", "out"]
TEACHER = ["--model", "teacher"]
EMBED = ["teacher", "embed-text", TEACHER_CFG, "teacher.device=cpu", "--out", "emb"]

# case -> (arguments, what the one line must say, what it must not say)
CASES = {
    # A. configs that are not UTF-8 text, or a folder
    "binary file as --config": (LABEL + ["--vocab", "cat", "--config", "weights.safetensors"],
                                ["weights.safetensors: not UTF-8 text (expected a YAML config)"], []),
    "Latin-1 YAML as --config": (LABEL + ["--vocab", "cat", "--config", "latin1.yaml"],
                                 ["latin1.yaml: not UTF-8 text (expected a YAML config)"], []),
    "binary file as world make's config": (["world", "make", "weights.safetensors", "work_dir=w"],
                                           ["weights.safetensors: not UTF-8 text (expected a YAML config)"], []),
    "folder as --config": (LABEL + ["--vocab", "cat", "--config", "vocabs"],
                           ["vocabs: is a folder (expected a YAML config file)"], ["not found"]),
    # F. --vocab values that name a file that is not there, a folder, or an unread format
    "folder as --vocab": (LABEL + TEACHER + ["--vocab", "vocabs/"], ["vocabs: is a folder (expected a vocabulary file"], []),
    "folder as embed-text --vocab": (EMBED + ["--vocab", "{tmp}/vocabs"], ["vocabs: is a folder"], []),
    "missing .csv path as --vocab": (LABEL + TEACHER + ["--vocab", "{tmp}/voc/missing.csv"],
                                     ["voc/missing.csv: vocabulary file not found"], []),
    "missing .yaml name as --vocab": (LABEL + TEACHER + ["--vocab", "words.yaml"], ["words.yaml: vocabulary file not found"], []),
    "missing path without extension": (EMBED + ["--vocab", "lists/animals"], ["lists/animals: vocabulary file not found"], []),
    "YAML vocabulary": (EMBED + ["--vocab", "v.yaml"], ["v.yaml: a YAML vocabulary is not read", ".txt", ".json"], []),
    "CSV vocabulary": (EMBED + ["--vocab", "v.csv"], ["v.csv: a CSV vocabulary is not read", "renamed to .txt"], []),
    # N. two '=' in one entry
    "two '=' in an entry": (EMBED + ["--vocab", "crimson=red star=blue circle"],
                            ["entry 'crimson=red star=blue circle': expected one 'prompt=class'"], []),
    # exact duplicates are refused, as the README says
    "exact duplicate inline": (LABEL + TEACHER + ["--vocab", "red star, blue circle, red star"],
                               ["inline vocabulary: duplicate class 'red star' (entry 3) is already entry 1; keep one"], []),
    "exact duplicate in a .txt": (EMBED + ["--vocab", "dup.txt"], ["dup.txt: duplicate class 'red star' (line 3) is already line 1"], []),
    # G. stage names, with or without --list
    "typo in pipeline.stages": (["run", PIPELINE_CFG, "work_dir=w", "pipeline.stages=[wrld]"],
                                ["pipeline.stages: unknown stage 'wrld'", "did you mean 'world'?"], []),
    "typo in pipeline.stages, --list": (["run", PIPELINE_CFG, "work_dir=w", "--list", "pipeline.stages=[world,techer]"],
                                        ["pipeline.stages: unknown stage 'techer'", "did you mean 'teacher'?"], []),
    "bogus --force with --list": (["run", PIPELINE_CFG, "work_dir=w", "--list", "--force", "nostage"],
                                  ["--force: unknown stage 'nostage'; valid stages: world"], []),
    "typo in --until with --list": (["run", PIPELINE_CFG, "work_dir=w", "--list", "--until", "reprot"],
                                    ["--until: unknown stage 'reprot'", "did you mean 'report'?"], []),
    # I. label.model / label.format
    "no --model": (LABEL + ["--vocab", "cat"], ["label.model: required (a student checkpoint model_final.pt, or 'teacher'"], [": .:"]),
    "--proposals rpn with --model teacher": (LABEL + TEACHER + ["--vocab", "cat", "--proposals", "rpn"],
                                             ["label.proposals: rpn needs --model <a ViLD checkpoint>"], ["checkpoint not found"]),
    "empty --format": (LABEL + TEACHER + ["--vocab", "cat", "--format", ""],
                       ["label.format: empty (expected one or more of coco, yolo, png)"], ["'empty'"]),
    # M. numeric ranges
    "negative --nms": (LABEL + TEACHER + ["--vocab", "cat", "--nms", "-0.5"], ["label.nms: expected an IoU threshold in [0, 1]", "-0.5"], []),
    "negative label.max_side": (LABEL + TEACHER + ["--vocab", "cat", "label.max_side=-1"], ["label.max_side: expected >= 0", "got -1"], []),
    # J. the teacher's checkpoint
    "custom teacher path missing": (EMBED + ["--vocab", "cat", "teacher.pretrained=weights/clip.safetensors"],
                                    ["teacher.pretrained: weights/clip.safetensors not found (expected a checkpoint of 'distill-tiny-vit'"],
                                    ["writes it there"]),
    "default teacher path missing": (EMBED + ["--vocab", "cat", "work_dir=run"],
                                     ["teacher.pretrained: run/teacher/teacher.safetensors not found; pretrain the tiny teacher first"], []),
    "Hugging Face folder under the default teacher.model": (
        EMBED + ["--vocab", "cat", "teacher.pretrained=hfclip"],
        ["hfclip: the folder's architecture differs from teacher.model 'distill-tiny-vit' (", "give teacher.model= (empty) to read it from the folder"],
        ["-quickgelu"]),
    # negative counts: '-1' used to drop the last image (images[:-1])
    "teacher evaluate --max-images -1": (["teacher", "evaluate", TEACHER_CFG, "work_dir=w", "--max-images", "-1"],
                                         ["'--max-images'", "greater than or equal to 0"], []),
    "cam --max-images -1": (["cam", CAM_CFG, "work_dir=w", "--max-images", "-1"], ["'--max-images'", "greater than or equal to 0"], []),
    "train det --num-gpus 0": (["train", "det", VILD_CFG, "work_dir=w", "--num-gpus", "0"], ["'--num-gpus'", "greater than or equal to 1"], []),
    # --proposals with a student source was ignored; a class given twice: the last threshold won
    "--proposals with a ViLD checkpoint": (LABEL + ["--model", "weights.safetensors", "--vocab", "cat", "--proposals", "windows"],
                                           ["label.proposals: --proposals applies to --source teacher", "'vild'"], []),
    "same class twice in --class-thresh": (LABEL + TEACHER + ["--vocab", "red star, blue circle", "--class-thresh", "red star=0.0",
                                                              "--class-thresh", "Red Star=0.99"],
                                           ["label.class_thresh: class 'red star' is given twice (0.0 and 0.99); keep one"], []),
    "distill run with a missing config": (["run", "nosuch/pipeline.yaml"], ["nosuch/pipeline.yaml: config file not found"], []),
    # keys and choices renamed to one name for the CLIPSelf tower: the old name says the new one
    "old key teacher.dense_pretrained": (["run", PIPELINE_CFG, "work_dir=w", "--list", "teacher.dense_pretrained=t.safetensors"],
                                         ["config key 'teacher.dense_pretrained' was renamed: use 'teacher.dense_tower'"], []),
    "old choice cam.tower=dense": (["cam", CAM_CFG, "work_dir=w", "cam.tower=dense"],
                                   ["cam.tower: 'dense' was renamed: use cam.tower=dense_tower"], []),
    "old choice seg.backbone=teacher_dense": (["run", PIPELINE_CFG, "work_dir=w", "--list", "seg.backbone=teacher_dense"],
                                              ["seg.backbone: 'teacher_dense' was renamed: use seg.backbone=dense_tower"], []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_one_line_exit_2_nothing_written(tmp_path, case):
    args, expected, unexpected = CASES[case]
    _setup(tmp_path)
    before = _files(tmp_path)
    r = _run([a.replace("{tmp}", str(tmp_path)) for a in args], tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (case, r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, (case, r.stderr[-3000:])
    for want in expected:
        assert want in lines[0], (case, want, lines[0])
    for not_want in unexpected:
        assert not_want not in lines[0], (case, not_want, lines[0])
    assert r.stdout == "" and _files(tmp_path) == before, (case, sorted(_files(tmp_path) - before))


def test_class_thresh_for_a_class_whose_name_holds_a_comma(tmp_path):
    """'cat, domestic' is one class of a one-a-line .txt vocabulary; --class-thresh gives it its
    threshold (a comma separates two entries only after a threshold)."""
    teacher = teacher_overrides(make_teacher_dir(tmp_path / "teacher"))
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "animals.txt").write_text("cat, domestic\ndog\n", encoding="utf-8")
    r = _run(LABEL + TEACHER + ["--vocab", "animals.txt", "--class-thresh", "cat, domestic=0.5", "--class-thresh", "dog=0.2",
                                *teacher, f"work_dir={tmp_path / 'w'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "out" / "labels.json").read_text())["info"]
    assert info["class_thresh"] == {"cat, domestic": 0.5, "dog": 0.2}


def test_negative_max_images_refused_for_library_callers(tmp_path):
    """evaluate_teacher / run_cam / cam_ablation refuse max_images < 0 before reading anything
    (a negative slice silently dropped the last images)."""
    from distill.ablate.cam import cam_ablation
    from distill.cam.run import run_cam
    from distill.config import load_config
    from distill.errors import DistillError
    from distill.teacher.evaluate import evaluate_teacher

    cfg = load_config(CAM_CFG, [f"work_dir={tmp_path / 'w'}"])
    for call in (lambda: evaluate_teacher(cfg, teacher=object(), max_images=-1),
                 lambda: run_cam(cfg, "val", max_images=-1), lambda: cam_ablation(cfg, "val", max_images=-1)):
        with pytest.raises(DistillError, match=r"max_images: expected >= 0 \(0 = all images\), got -1"):
            call()
    assert not (tmp_path / "w").exists()


def test_segmentation_checkpoint_without_source_seg(tmp_path):
    """A segmentation student's model_final.pt given without --source seg (the default source is
    vild) says so in one line, instead of a ViLDDetector key mismatch."""
    from distill.config import load_config
    from distill.engine.checkpoint import save_model
    from distill.segmentation.build import build_segmenter
    from distill.teacher.clip import build_teacher, student_meta

    teacher_model = make_teacher_dir(tmp_path / "teacher")
    cfg = load_config(None, teacher_overrides(teacher_model) + ["seg.image_size=32", "seg.features=16"])
    teacher = build_teacher(cfg.teacher)
    save_model(tmp_path / "seg" / "model_final.pt", build_segmenter(cfg.seg, teacher), student_meta(cfg, teacher, trained_classes=["cat"]))
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    before = _files(tmp_path)
    r = _run(LABEL + ["--model", "seg/model_final.pt", "--vocab", "cat, dog", "teacher.device=cpu", f"work_dir={tmp_path / 'w'}"], tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0] == "error: label.model: seg/model_final.pt: a segmentation checkpoint: add --source seg", lines[0]
    assert r.stdout == "" and _files(tmp_path) == before, sorted(_files(tmp_path) - before)


def test_demo_config_found_from_any_folder(tmp_path, monkeypatch):
    """`distill demo` reads the repository's configs/shapes/pipeline.yaml beside the package, from
    any folder; without one (beside the package or under the current folder) a one-line error
    says to run it from the repository root."""
    import distill
    from distill.cli.run import demo_config
    from distill.errors import DistillError

    monkeypatch.chdir(tmp_path)
    assert Path(demo_config()) == Path(PIPELINE_CFG).resolve()
    monkeypatch.setattr(distill, "__file__", str(tmp_path / "site" / "distill" / "__init__.py"))
    with pytest.raises(DistillError, match=r"^distill demo: configs/shapes/pipeline.yaml not found beside the installed package; run it from the repository root"):
        demo_config()
    assert _files(tmp_path) == set()


def test_cam_tower_teacher_does_not_need_the_dense_tower(tmp_path):
    """cam.tower=teacher reads the teacher's own tower: a teacher.dense_tower that is not
    there (configs/shapes/cam.yaml names the clipself stage's output) is not demanded; with
    cam.tower=dense_tower the same setting is a one-line error naming teacher.dense_tower."""
    teacher = teacher_overrides(make_teacher_dir(tmp_path / "teacher"))
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "labels.json").write_text(json.dumps([{"image_id": 1, "file_name": "a.png", "categories": ["red star"]}]))
    args = ["cam", CAM_CFG, "--images", "imgs", "--labels", "labels.json", *teacher, "cam.vocab=red star, blue circle",
            "cam.crf=false", "cam.image_size=32", f"work_dir={tmp_path / 'w'}", "teacher.dense_tower=missing/dense_tower.safetensors"]
    before = _files(tmp_path)
    r = _run(args + ["cam.tower=dense_tower"], tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: teacher.dense_tower"), r.stderr[-3000:]
    assert _files(tmp_path) == before, sorted(_files(tmp_path) - before)
    r = _run(args + ["cam.tower=teacher"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "w" / "cam" / "masks" / "imgs" / "a.png").is_file(), sorted(_files(tmp_path) - before)
