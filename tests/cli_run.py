"""The installed ``distill`` command as a user runs it: a subprocess from a given folder, and the
checks of its one-line errors (shared by the CLI tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

EXE = shutil.which("distill") or str(Path(sys.executable).parent / "distill")


def run(args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([EXE, *[str(a) for a in args]], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def one_line_error(r, *wants: str) -> str:
    """Exit 2, one ``error: ...`` line on stderr holding every string of ``wants``, no traceback."""
    got = lines(r.stderr)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(got) == 1 and got[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in wants:
        assert w in got[0], (w, got[0])
    return got[0]
