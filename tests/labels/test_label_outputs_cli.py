"""``distill label``'s output folder and image listing, as a user runs it: the installed entry
point in a subprocess, from a folder outside the repository, with a tiny random teacher
(issue 25, items 4 and 6).

- ``--out`` inside ``--images`` (the next run would label its own masks), ``--out`` equal to the
  image folder and ``--images`` inside ``--out`` are one-line errors; nothing is written;
- the labeler owns ``--out``: ``manifest.json`` lists what the run wrote; rerun into the same
  folder for another image folder, only the new labels remain (old PNG / YOLO files and shards
  removed); a non-empty folder it did not write is refused, untouched;
- a deleted semantic PNG or YOLO file is redone on rerun, byte-identical, even though the shards
  holding the predictions are cached;
- hidden files and folders, links to folders and a (animated) GIF are counted in the summary
  (``labels/skipped_*``, printed and in summary.json) and named in ``skipped.txt``;
- a COCO json given as ``--images`` is a short one-line error that does not echo the file.

Each item is checked once through the subprocess (a ``distill`` start costs seconds: torch is
imported); its variants run the same CLI in-process (``distill.cli.main``).
"""

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

from reliability._fixtures import cli_error, make_teacher_dir, teacher_overrides

EXE = shutil.which("distill") or str(Path(sys.executable).parent / "distill")
VOCAB = "red square, blue circle"


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("label_outputs_cli")
    return teacher_overrides(make_teacher_dir(root / "teacher"))


def _run(args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def _argv(overrides, images, out, *extra, vocab=VOCAB, fmt="coco,yolo,png") -> list[str]:
    return ["label", "--images", str(images), "--vocab", vocab, "--model", "teacher", "--out", str(out),
            "--format", fmt, "--score-thresh", "0", "--min-area", "4", "label.shard_size=1", *overrides, *extra]


def _label(cwd, overrides, images, out, *extra, **kw) -> subprocess.CompletedProcess:
    """``distill label`` as a user runs it: the installed command, in ``cwd``."""
    return _run(_argv(overrides, images, out, *extra, **kw), cwd)


def _label_here(overrides, images, out, *extra, **kw) -> None:
    """The same in-process (the current directory is the test's; see the ``here`` fixture)."""
    from distill.cli import main

    assert main(_argv(overrides, images, out, *extra, **kw)) == 0


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[:3000])
    assert lines[0].startswith("error: "), lines[0][:300]
    return lines[0]


def _image(path: Path, seed: int, size: int = 24) -> None:
    rng = np.random.default_rng(seed)
    img = rng.integers(100, 140, size=(size, size, 3), dtype=np.uint8)
    y, x = (int(v) for v in rng.integers(0, size - 10, 2))
    img[y : y + 9, x : x + 9] = [(220, 30, 30), (30, 70, 225)][seed % 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _folder(root: Path, names: list[str], seed: int = 0) -> Path:
    for i, n in enumerate(names):
        _image(root / n, seed + i)
    return root


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


# ---------------------------------------------------------------------------------- output folder


def test_out_inside_the_image_folder_is_refused(here, overrides, capsys):
    imgs = _folder(here / "imgs", ["a.png", "sub/b.png"])
    before = _files(here)
    line = _one_line_error(_label(here, overrides, "imgs", "imgs/labels"))
    assert "label.out" in line and "label.images" in line and "imgs/labels" in line, line
    line = cli_error(capsys, _argv(overrides, "imgs", "imgs"))  # the image folder itself
    assert "label.out: imgs is the image folder label.images imgs" in line, line
    # the other way round: images inside the folder the run owns
    line = cli_error(capsys, _argv(overrides, "imgs/sub", "imgs"))
    assert "label.images: imgs/sub is inside label.out imgs" in line, line
    lst = here / "list.txt"
    lst.write_text("imgs/a.png\nimgs/sub/b.png\n")  # a list file naming an image inside --out
    line = cli_error(capsys, _argv(overrides, "list.txt", "imgs/sub"))
    assert "label.images: list.txt names" in line and "b.png" in line and "label.out imgs/sub" in line, line
    assert _files(here) == before | {"list.txt"} and not (imgs / "labels").exists()


def test_out_reused_for_another_image_folder_keeps_only_the_new_labels(here, overrides):
    tmp_path = here
    _folder(tmp_path / "first", ["a0.png", "a1.png", "sub/a2.png"])
    _folder(tmp_path / "second", ["b0.png"], seed=5)
    out = tmp_path / "out"
    _label_here(overrides, "first", "out")
    assert (out / "semantic" / "sub" / "a2.png").is_file() and (out / "yolo" / "labels" / "a1.txt").is_file()
    # another folder, another vocabulary order (old YOLO class indices would be wrong)
    _ok(_label(tmp_path, overrides, "second", "out", vocab="blue circle, red square"))
    want = {"labels.json", "failures.txt", "skipped.txt", "summary.json", "config.yaml", "manifest.json",
            "shards/shard-00000.json", "semantic/legend.json", "semantic/legend.png", "semantic/b0.png",
            "yolo/classes.txt", "yolo/labels/b0.txt"}
    assert _files(out) == want
    assert not (out / "semantic" / "sub").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(want - {"manifest.json"}) and manifest["state"] == "complete"
    assert manifest["key"]["images"] == str((tmp_path / "second").resolve()) and manifest["key"]["formats"] == ["coco", "yolo", "png"]
    assert (out / "yolo" / "classes.txt").read_text().splitlines() == ["blue circle", "red square"]
    # a labels-only rerun removes the PNG and YOLO outputs the run no longer writes
    _label_here(overrides, "second", "out", fmt="coco")
    assert _files(out) == {"labels.json", "failures.txt", "skipped.txt", "summary.json", "config.yaml", "manifest.json",
                           "shards/shard-00000.json"}


def test_out_folder_holding_files_it_did_not_write_is_refused(here, overrides, capsys):
    tmp_path = here
    _folder(tmp_path / "imgs", ["a.png"])
    mine = tmp_path / "mine"
    (mine / "semantic").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes\n")
    _image(mine / "semantic" / "gt.png", 9)
    before = {p: (mine / p).read_bytes() for p in _files(mine)}
    line = _one_line_error(_label(tmp_path, overrides, "imgs", "mine"))
    assert "label.out" in line and "mine" in line and "notes.txt" in line and "empty" in line, line
    assert {p: (mine / p).read_bytes() for p in _files(mine)} == before
    # a folder holding only names the labeler uses, but no manifest of a labeling run: refused too
    shutil.rmtree(mine)
    (mine / "semantic").mkdir(parents=True)
    _image(mine / "semantic" / "gt.png", 9)
    line = cli_error(capsys, _argv(overrides, "imgs", "mine"))
    assert "label.out: mine is not empty ('semantic') and holds no manifest.json" in line, line
    assert _files(mine) == {"semantic/gt.png"}
    # a manifest.json of something else: refused, not overwritten
    (mine / "manifest.json").write_text('{"files": ["mine"]}')
    line = cli_error(capsys, _argv(overrides, "imgs", "mine"))
    assert "manifest.json is not a manifest of distill label" in line, line
    assert (mine / "manifest.json").read_text() == '{"files": ["mine"]}'
    # hidden entries alone (.DS_Store) do not make a folder foreign; the user's notes beside a
    # finished run's labels are left alone by the next run
    shutil.rmtree(mine)
    mine.mkdir()
    (mine / ".DS_Store").write_bytes(b"x")
    _label_here(overrides, "imgs", "mine")
    (mine / "notes.txt").write_text("about these labels\n")
    _label_here(overrides, "imgs", "mine")
    assert (mine / "notes.txt").read_text() == "about these labels\n" and (mine / ".DS_Store").is_file()


def test_deleted_png_and_yolo_files_are_redone_on_rerun(here, overrides):
    tmp_path = here
    _folder(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    _label_here(overrides, "imgs", "out")
    ref = {p: (out / p).read_bytes() for p in _files(out) if p.startswith(("semantic/", "yolo/"))}
    assert "semantic/a.png" in ref and "yolo/labels/b.txt" in ref
    (out / "semantic" / "a.png").unlink()
    (out / "yolo" / "labels" / "b.txt").unlink()
    r = _ok(_label(tmp_path, overrides, "imgs", "out"))
    assert {p: (out / p).read_bytes() for p in ref if (out / p).is_file()} == ref
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels/shards_skipped"] == 2, r.stdout  # only a.png's shard was labeled again


# ---------------------------------------------------------------------------------------- listing


def test_skipped_files_are_counted_in_the_summary(tmp_path, overrides):
    imgs = _folder(tmp_path / "imgs", ["a.png", "sub/b.png"])
    frames = [Image.new("RGB", (16, 16), c) for c in ((220, 30, 30), (30, 70, 225), (30, 170, 40))]
    frames[0].save(imgs / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    _image(imgs / ".hidden.png", 3)
    _image(imgs / ".cache" / "c.png", 4)
    _folder(tmp_path / "elsewhere", ["x.png"], seed=7)
    (imgs / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    out = tmp_path / "out"
    r = _ok(_label(tmp_path, overrides, "imgs", "out"))
    s = json.loads((out / "summary.json").read_text())
    assert s["labels/images"] == 2 and s["labels/failures"] == 0
    assert (s["labels/skipped_hidden"], s["labels/skipped_folder_links"], s["labels/skipped_unsupported"]) == (2, 1, 1), s
    printed = {ln.split(":")[0].strip(): ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines() if ":" in ln}
    assert printed["labels/skipped_hidden"] == "2" and printed["labels/skipped_folder_links"] == "1"
    assert printed["labels/skipped_unsupported"] == "1"
    skipped = dict(ln.split("\t", 1) for ln in (out / "skipped.txt").read_text().splitlines())
    assert sorted(skipped) == [".cache/", ".hidden.png", "anim.gif", "linked/"]
    assert "GIF" in skipped["anim.gif"] and "link" in skipped["linked/"] and "hidden" in skipped[".hidden.png"]


def test_coco_json_as_images_is_a_short_one_line_error(here, overrides, capsys):
    tmp_path = here
    coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(20000)],
            "annotations": [], "categories": [{"id": 1, "name": "red square"}]}
    text = json.dumps(coco)
    assert len(text) > 1_000_000
    (tmp_path / "instances_val.json").write_text(text)
    line = _one_line_error(_label(tmp_path, overrides, "instances_val.json", "out"))
    assert len(line) < 300 and "instances_val.json" in line and "image folder" in line and "list file" in line, line[:300]
    # the same content under a list file's name
    (tmp_path / "images.txt").write_text(text)
    line = cli_error(capsys, _argv(overrides, "images.txt", "out"))
    assert len(line) < 300 and "images.txt" in line and "list file" in line, line[:300]
    # a list file with one very long non-image line: the line is cut, not echoed whole
    (tmp_path / "long.txt").write_text("x" * 100_000 + "\n")
    line = cli_error(capsys, _argv(overrides, "long.txt", "out"))
    assert len(line) < 400 and "long.txt:1: 'xxxx" in line and "(100000 characters)" in line, line[:400]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- unit (no CLI)


def test_scan_images_says_what_it_skipped(tmp_path):
    from distill.data.images import scan_images

    _folder(tmp_path, ["a.png", "d/b.jpg"])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "clip.GIF").write_bytes(b"GIF89a")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.png").write_bytes(b"x")
    paths, skipped = scan_images(tmp_path)
    assert [p.name for p in paths] == ["a.png", "b.jpg"]
    assert [(n, k) for n, k, _ in skipped] == [(".git/", "hidden"), ("clip.GIF", "unsupported"), ("notes.txt", "unsupported")]
    # a list file whose first name starts with '[' is a list, not json
    _image(tmp_path / "[2020] c.png", 3)
    (tmp_path / "list.txt").write_text("[2020] c.png\na.png\n")
    assert [p.name for p in scan_images(tmp_path / "list.txt")[0]] == ["[2020] c.png", "a.png"]
