"""Vocabularies as a user gives them to the installed ``distill`` command (a subprocess, from a
folder outside the repository, with a tiny random teacher): newline-separated inline lists, a
one-line comma-separated .txt, a file saved with a byte-order mark, two spellings of one class,
and an LVIS-sized vocabulary (more than 254 classes) labelled to COCO, YOLO and 16-bit PNGs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reliability._fixtures import REPO, make_teacher_dir, teacher_overrides

EXE = shutil.which("distill") or str(Path(sys.executable).parent / "distill")
CONFIG = str(REPO / "configs" / "shapes" / "teacher.yaml")


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("vocab_cli")
    return teacher_overrides(make_teacher_dir(root / "teacher")) + [f"work_dir={root / 'work'}"]


def _run(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def _embed(tmp_path, overrides, vocab) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "emb"
    return _run(["teacher", "embed-text", CONFIG, *overrides, "--vocab", vocab, "--out", str(out)], tmp_path), out


def _classes(r) -> int:
    assert r.returncode == 0, r.stderr
    m = re.search(r"^(\d+) classes x \d+ dims", r.stdout, re.M)
    assert m, r.stdout
    return int(m.group(1))


def test_inline_list_on_several_lines(tmp_path, overrides):
    r, out = _embed(tmp_path, overrides, "cat\ndog\nbird\n")
    assert _classes(r) == 3 and len(list(out.glob("*.safetensors"))) == 1


def test_txt_with_one_comma_separated_line(tmp_path, overrides):
    (tmp_path / "animals.txt").write_text("# what to find\ncat,dog, bird\n", encoding="utf-8")
    r, _ = _embed(tmp_path, overrides, "animals.txt")
    assert _classes(r) == 3


def test_file_saved_with_a_byte_order_mark(tmp_path, overrides):
    """Notepad's UTF-8 puts a BOM before the first line (here a comment)."""
    (tmp_path / "animals.txt").write_bytes("\ufeff# animals\r\ncat\r\ndog\r\n".encode("utf-8"))
    r, out = _embed(tmp_path, overrides, "animals.txt")
    assert _classes(r) == 2
    (tmp_path / "inline").mkdir()
    r2, out2 = _embed(tmp_path / "inline", overrides, "cat, dog")
    assert _classes(r2) == 2
    # the same names as typed inline, so the same embedding file (named by the vocabulary hash)
    assert [p.name for p in out.glob("*.safetensors")] == [p.name for p in out2.glob("*.safetensors")]


def test_two_spellings_of_one_class_are_one_line_exit_2(tmp_path, overrides):
    (tmp_path / "shapes.txt").write_text("red star\nblue circle\nred  star\n", encoding="utf-8")
    r, out = _embed(tmp_path, overrides, "shapes.txt")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "duplicate class 'red  star' (line 3)" in lines[0] and "'red star' (line 1)" in lines[0], lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["shapes.txt"]


def test_lvis_sized_vocabulary_labels_to_coco_yolo_and_16_bit_png(tmp_path, overrides):
    (tmp_path / "lvis_names.txt").write_text("".join(f"thing_{i}\n" for i in range(1203)), encoding="utf-8")
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    r = _run(["label", *overrides, "--images", "imgs", "--vocab", "lvis_names.txt", "--model", "teacher", "--out", "labels",
              "--format", "coco,yolo,png"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "labels"
    assert len(json.loads((out / "labels.json").read_text())["categories"]) == 1203
    assert len((out / "yolo" / "classes.txt").read_text().splitlines()) == 1203
    with Image.open(out / "semantic" / "a.png") as im:
        assert im.mode == "I;16"
