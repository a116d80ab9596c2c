"""`distill run` (distill/pipeline/run.py) through tools/run_pipeline.py."""

import os
from pathlib import Path


def test_tool_scripts_are_the_cli(tmp_path):
    """tools/run_pipeline.py is `distill run`: --list lists the shapes graph (nothing runs); every
    script in tools/ answers --help."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(repo / "tools/run_pipeline.py"), str(repo / "configs/shapes/pipeline.yaml"), f"work_dir={tmp_path}", "--list"],
                       capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    listed = [line.split()[0] for line in (r.stdout + r.stderr).splitlines() if "to run" in line]
    assert listed[0] == "world" and listed[-1] == "report" and len(listed) == 14 and "backbone" in listed and "clipself" in listed
    assert not any(tmp_path.iterdir())  # --list writes nothing
    for tool in sorted((repo / "tools").glob("*.py")):
        h = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, env=env, cwd=repo, timeout=120)
        assert h.returncode == 0 and "usage" in h.stdout.lower(), (tool.name, h.stderr[-500:])


def test_distill_report_publishes_a_finished_run(tmp_path, capsys):
    """`distill report WORK_DIR --readme --results` reads the run's saved config.yaml and writes
    report.md, the README block and docs/results.md; a folder that holds no run is one line, exit 2."""
    from distill.cli import main
    from distill.config import load_config, save_config
    from report.test_report import README, _finished_run

    work = tmp_path / "w"
    _finished_run(work)
    save_config(load_config(None, [f"work_dir={work}"]), work / "config.yaml")
    readme, results = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    readme.write_text(README)
    assert main(["report", str(work), "--readme", str(readme), "--results", str(results)]) == 0
    assert capsys.readouterr().out.split() == [str(work / "report.md"), str(readme), str(results)]
    assert "| ViLD-text | box AP50 | 52.0 | 11.1 | 40.0 |" in readme.read_text() and "## Detection" in results.read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'nothing' / 'config.yaml'}: not found (expected the work dir of a `distill run`)"]
