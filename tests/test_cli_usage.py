"""The command line's own mistakes, as a user meets them: the installed ``distill`` entry point in a
subprocess, from a folder outside the repository. Each usage error is one line on stderr naming
the problem and the help command, exit code 2, no traceback, nothing written; Ctrl-C is one line
and exit code 130."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXE = shutil.which("distill") or str(Path(sys.executable).parent / "distill")

USAGE_ERRORS = {
    "unknown option": (["label", "--score-tresh", "0.3"], ["No such option: --score-tresh", "--score-thresh", "distill label --help"]),
    "badly typed option": (["label", "--score-thresh", "abc"], ["Invalid value for '--score-thresh'", "distill label --help"]),
    "unknown subcommand": (["trian", "det"], ["No such command 'trian'", "Did you mean 'train'"]),
    "missing argument": (["train", "det"], ["Missing argument", "distill train det --help"]),
    "missing option": (["eval", "det", "--pred", "p.json"], ["Missing option '--gt'"]),
    "option without its value": (["label", "--images"], ["requires an argument", "--images"]),
}


def _run(args, cwd, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120, **kw)


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line_exit_2(tmp_path, case):
    args, expected = USAGE_ERRORS[case]
    r = _run(args, tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (case, r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, (case, r.stderr)
    for want in expected:
        assert want in lines[0], (case, want, lines[0])
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


def test_no_arguments_prints_the_help(tmp_path):
    for args in ([], ["train"]):
        r = _run(args, tmp_path)
        assert r.returncode == 0 and r.stderr == "" and "Usage:" in r.stdout, (args, r.stderr)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """SIGINT while the pipeline's first stage (the world) is being made."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # a shell's background job (e.g. `make test &`) starts with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the command the default a terminal gives it
    p = subprocess.Popen([EXE, "run", str(REPO / "configs/shapes/pipeline.yaml"), f"work_dir={tmp_path / 'w'}"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "w").exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)  # the run has started its first stage once it made the work dir
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err and lines and lines[-1] == "aborted", err


def test_warnings_keep_their_format_after_a_library_logs_to_root(tmp_path):
    """open_clip calls the module-level ``logging.warning``, which installs a root handler; the
    command's own warnings stay ``warning: <message>`` lines, printed once."""
    code = (
        "import logging\n"
        "from distill.cli import _log_to_stderr\n"
        "_log_to_stderr()\n"
        "logging.warning('from a library')\n"
        "logging.getLogger('distill.eval.detection').warning('%s: a warning', 'gt.json')\n"
        "logging.getLogger('distill.eval.detection').info('not shown')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines.count("warning: gt.json: a warning") == 1, lines
    assert not any("WARNING:distill" in ln or "not shown" in ln for ln in lines), lines
