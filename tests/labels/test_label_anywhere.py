"""Labeling gives the same labels from any working directory, with a checkpoint copied alone: the
student's ``model_final.pt`` carries its training config (prompt templates inline) and its
teacher's identity; what is missing is a one-line error naming the setting that supplies it.
Run as a user does: the installed ``distill`` command in a subprocess, from folders outside the
repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXE = shutil.which("distill") or str(Path(sys.executable).parent / "distill")
VOCAB = "red square, blue circle, green cross"


def _run(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([EXE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def _one_line_error(r, *words):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _annotations(out: Path) -> list:
    coco = json.loads((out / "labels.json").read_text())
    return sorted((a["image_id"], a["category_id"], round(a["score"], 5), *(round(v, 2) for v in a["bbox"])) for a in coco["annotations"])


@pytest.fixture(scope="module")
def world(vild_checkpoint_world):
    return vild_checkpoint_world


def _label(world, cwd, out, model, *extra):
    return _run(["label", "--images", world / "imgs", "--vocab", VOCAB, "--model", model, "--source", "vild",
                 "--out", out, "--score-thresh", "0", "--nms", "0", "--min-area", "0", "teacher.device=cpu", *extra], cwd)


def test_checkpoint_copied_alone_labels_the_same_from_any_folder(world, tmp_path):
    """From the repository and from an empty folder elsewhere, with only model_final.pt copied:
    the same labels (the templates travel in the checkpoint; before, outside the repository the
    labeler dropped them without a word and gave other scores)."""
    r1 = _label(world, REPO, tmp_path / "a", world / "det" / "model_final.pt")
    assert r1.returncode == 0, r1.stderr
    alone = tmp_path / "elsewhere" / "copy"
    alone.mkdir(parents=True)
    shutil.copy(world / "det" / "model_final.pt", alone / "student.pt")
    r2 = _label(world, tmp_path / "elsewhere", tmp_path / "b", alone / "student.pt")
    assert r2.returncode == 0, r2.stderr
    a, b = _annotations(tmp_path / "a"), _annotations(tmp_path / "b")
    assert a and a == b


def test_checkpoint_uses_the_templates_it_was_trained_with(world, tmp_path):
    """Direct: the labels' scores come from the shapes.txt templates (not the defaults, not none)."""
    import torch

    from distill.config import load_config
    from distill.labels.sources import load_vild
    from distill.teacher.text import DEFAULT_TEMPLATES, load_templates, text_embeddings
    from distill.vocab import load_vocab

    cfg = load_config(None, [f"label.model={world / 'det' / 'model_final.pt'}", "label.source=vild", "teacher.device=cpu"])
    vocab = load_vocab(VOCAB)
    model, teacher, _ = load_vild(cfg, vocab)
    used = model.roi_heads.text_embeddings
    shapes = text_embeddings(teacher, vocab, load_templates("shapes.txt")).float()
    default = text_embeddings(teacher, vocab, DEFAULT_TEMPLATES).float()
    assert not torch.allclose(shapes, default, atol=1e-4)  # the test can tell the template sets apart
    torch.testing.assert_close(used.float().cpu(), torch.nn.functional.normalize(shapes, dim=1), atol=1e-5, rtol=0)


def test_missing_teacher_names_the_setting_and_a_wrong_one_is_refused(world, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    ck = moved / "student.pt"
    shutil.copy(world / "det" / "model_final.pt", ck)
    # the recorded teacher is not there: say which file and which setting supplies it
    hidden = world / "t.safetensors.away"
    os.replace(world / "t.safetensors", hidden)
    try:
        r = _label(world, tmp_path, tmp_path / "o1", ck)
        _one_line_error(r, "t.safetensors", "teacher.pretrained=")
        assert not (tmp_path / "o1" / "labels.json").exists()
        # supplied by the user: it is checked by fingerprint and used
        shutil.copy(hidden, moved / "teacher.safetensors")
        r = _label(world, tmp_path, tmp_path / "o2", ck, f"teacher.pretrained={moved / 'teacher.safetensors'}")
        assert r.returncode == 0, r.stderr
        # another teacher with the same architecture: refused, naming both fingerprints
        import torch
        from safetensors.torch import load_file, save_file

        sd = load_file(str(hidden))
        sd = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
        save_file(sd, str(moved / "other.safetensors"))
        r = _label(world, tmp_path, tmp_path / "o3", ck, f"teacher.pretrained={moved / 'other.safetensors'}")
        _one_line_error(r, "not the teacher", "fingerprint")
    finally:
        os.replace(hidden, world / "t.safetensors")


def test_bare_state_dict_without_config_says_what_is_missing(world, tmp_path):
    import torch

    from distill.engine.checkpoint import read

    torch.save(read(world / "det" / "model_final.pt")["model"], tmp_path / "bare.pt")
    r = _label(world, tmp_path, tmp_path / "o", tmp_path / "bare.pt")
    _one_line_error(r, "bare.pt", "config.yaml")


def test_teacher_labeling_outside_the_repository(world, tmp_path):
    """`--model teacher` with the default config from an empty folder: the shipped templates and
    background words are found; a missing teacher file names teacher.pretrained."""
    base = ["label", "--images", world / "imgs", "--vocab", VOCAB, "--model", "teacher", "--out", tmp_path / "o",
            "--score-thresh", "0", "teacher.device=cpu", "label.proposals=windows"]
    r = _run(base, tmp_path)
    _one_line_error(r, "teacher.pretrained")
    r = _run([*base, f"teacher.pretrained={world / 't.safetensors'}"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "labels.json").read_text())["annotations"]
    r = _run([*base, "teacher.templates=nosuch.txt"], tmp_path)
    _one_line_error(r, "teacher.templates", "nosuch.txt", "shapes.txt")


def test_auto_proposals_are_components_for_the_embedded_teacher_and_windows_for_others(world, monkeypatch):
    from distill.config import load_config
    from distill.labels import sources
    from distill.teacher import clip
    from distill.vocab import load_vocab

    vocab = load_vocab(VOCAB)
    cfg = load_config(None, ["label.source=teacher", "label.model=teacher", "teacher.device=cpu", f"teacher.pretrained={world / 't.safetensors'}"])
    assert cfg.label.proposals == "auto"
    src, _ = sources.build_source(cfg, vocab)
    assert src.proposals == "components"  # the shapes world's flat-coloured objects
    monkeypatch.setattr(clip, "build_teacher", lambda *a, **k: clip.build_random_teacher(embed_dim=16, seed=1))
    src, _ = sources.build_source(cfg, vocab)
    assert src.proposals == "windows"  # any other teacher: photos
    src, _ = sources.build_source(load_config(None, ["label.source=teacher", "label.proposals=components", "teacher.device=cpu"]), vocab)
    assert src.proposals == "components"  # an explicit choice is kept
