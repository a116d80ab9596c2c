import subprocess
import sys

from distill.cli import main


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["run", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().count("\n") == 0 and "missing.yaml" in err and "not found" in err


def test_bad_override_key(capsys):
    rc = main(["run", "configs/shapes/pipeline.yaml", "wrold.seed=1", "--list"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean 'world'" in err and "Traceback" not in err


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distill.cli", "run", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
