"""``distill teacher embed-text`` (distill/cli/teacher.py over distill/teacher/text.py): the file it
writes holds, per class, the L2-normalised mean of the teacher's unit embeddings of every
(template x synonym) sentence, computed here independently with open_clip's own ``encode_text``
(not the trimmed text tower the package uses); the vocabulary, templates and output folder come
from the options or, without them, from the config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distill.cli import main
from reliability._fixtures import REPO, make_teacher_dir, teacher_overrides

CONFIG = str(REPO / "configs/shapes/teacher.yaml")
TEMPLATES = ["a {} shape.", "a drawing of the {}."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_text")
    teacher = make_teacher_dir(root / "teacher", seed=3)
    (root / "templates.txt").write_text("".join(t + "\n" for t in TEMPLATES))
    return root, teacher_overrides(teacher) + [f"work_dir={root / 'work'}"]


def reference(overrides: list[str], classes: list[list[str]]) -> torch.Tensor:
    """CLIP's prompt ensemble by hand, through open_clip's encode_text on the full context."""
    from distill.config import load_config
    from distill.teacher.clip import build_teacher

    t = build_teacher(load_config(CONFIG, overrides).teacher)
    rows = []
    with torch.no_grad():
        for names in classes:
            sentences = [tpl.format(n) for n in names for tpl in TEMPLATES]
            f = F.normalize(t.model.encode_text(t.tokenize(sentences)).float(), dim=-1)
            rows.append(F.normalize(f.mean(0), dim=0))
    return torch.stack(rows)


def _written(capsys) -> tuple[int, int, Path]:
    out = capsys.readouterr().out
    m = re.search(r"^(\d+) classes x (\d+) dims -> (\S+)$", out, re.M)
    assert m, out
    return int(m.group(1)), int(m.group(2)), Path(m.group(3))


def test_embed_text_writes_the_prompt_ensemble_of_every_class_and_synonym(setup, tmp_path, capsys):
    root, ov = setup
    out = tmp_path / "emb"
    assert main(["teacher", "embed-text", CONFIG, *ov, "--vocab", "red star, crimson star=red star, blue circle",
                 "--templates", str(root / "templates.txt"), "--out", str(out)]) == 0
    n, d, path = _written(capsys)
    assert (n, d) == (2, 16) and path.parent == out and [p.name for p in out.iterdir()] == [path.name]
    emb = load_file(str(path))["embeddings"]
    ref = reference(ov, [["red star", "crimson star"], ["blue circle"]])
    # unit rows; the trimmed and the full text tower agree to float32 rounding (1e-7 relative on
    # unit vectors, a few of them summed): 1e-5 is loose for that and far below what a missing
    # synonym or template changes (checked below)
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-6)
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-5)
    without_synonym = reference(ov, [["red star"], ["blue circle"]])
    assert (without_synonym[0] - emb[0]).abs().max() > 1e-3


def test_embed_text_defaults_come_from_the_config(setup, capsys):
    """No --vocab / --templates / --out: data.vocab, teacher.templates and {work_dir}/embeddings/text;
    a second run finds its file and leaves it as it was."""
    root, ov = setup
    ov = ov + ["data.vocab=blue circle, green cross, red star", f"teacher.templates={root / 'templates.txt'}"]
    assert main(["teacher", "embed-text", CONFIG, *ov]) == 0
    n, _, path = _written(capsys)
    assert n == 3 and path.parent == root / "work" / "embeddings" / "text"
    emb = load_file(str(path))["embeddings"]
    torch.testing.assert_close(emb, reference(ov, [["blue circle"], ["green cross"], ["red star"]]), rtol=0, atol=1e-5)
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    assert main(["teacher", "embed-text", CONFIG, *ov]) == 0
    assert _written(capsys)[2] == path and (path.stat().st_mtime_ns, path.stat().st_ino) == stamp


def test_embed_text_without_any_vocabulary_is_a_one_line_error(setup, capsys, tmp_path):
    """vocab.resolve_vocab's order ends at data.val_json: with none of them, one line naming --vocab."""
    _, ov = setup
    rc = main(["teacher", "embed-text", CONFIG, *ov, "data.vocab=", "data.train_full_json=", "data.val_json=", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --vocab") and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists()
