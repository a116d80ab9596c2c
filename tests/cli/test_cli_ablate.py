"""`distill ablate {vild,seg,selftrain,cam}` as a user runs it: the installed command from a folder
outside the repository (the default configs are found beside the package), one-line errors with
nothing written, and the thin tools/ablate_*.py scripts giving the same answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import one_line_error, run

REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_ablate_lists_its_four_tables(tmp_path):
    r = run(["ablate", "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("vild", "seg", "selftrain", "cam"):
        assert name in r.stdout


@pytest.mark.parametrize("args, says", [
    (["ablate", "vild", "--variants", "vild,vlid"], "--variants: vlid: expected a comma-separated subset of supervised, vild_text"),
    (["ablate", "selftrain", "--variants", "control,nope"], "--variants: nope: expected a comma-separated subset of control, unlabeled"),
    (["ablate", "vild", "--seeds", "0,one"], "--seeds '0,one': expected comma-separated integers"),
    (["ablate", "cam", str(REPO / "configs" / "shapes" / "cam.yaml"), "cam.tower=dense"], "cam.tower: 'dense' was renamed: use cam.tower=dense_tower"),
    (["cam", str(REPO / "configs" / "shapes" / "cam.yaml"), "--ablation"], "--ablation moved: use `distill ablate cam CONFIG --images SPLIT`"),
    (["ablate", "seg", "--lseg", "nosuch.yaml"], "nosuch.yaml: config file not found"),
])
def test_ablate_mistakes_are_one_line_errors_with_nothing_written(tmp_path, args, says):
    before = _files(tmp_path)
    one_line_error(run(args + ["work_dir=w"], tmp_path), says)
    assert _files(tmp_path) == before


def test_thin_tool_is_the_command(tmp_path):
    """tools/ablate_vild.py passes its arguments to `distill ablate vild`: the same error line."""
    r = subprocess.run([sys.executable, str(REPO / "tools" / "ablate_vild.py"), "--variants", "nope", "work_dir=w"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert one_line_error(r, "--variants: nope: expected") == one_line_error(run(["ablate", "vild", "--variants", "nope", "work_dir=w"], tmp_path))
