"""``distill report`` through the installed command from a folder outside the repository: a
README without the results block or a folder as --results is one error line, exit 2, and nothing
is written (report.md was rewritten first); the README block quotes the command that was run."""

from __future__ import annotations

from distill.config import load_config, save_config
from report.test_report import README, _finished_run
from test_user_mistakes_cli import _run


def _work(tmp):
    work = tmp / "w"
    _finished_run(work)
    save_config(load_config(None, [f"work_dir={work}"]), work / "config.yaml")
    (tmp / "docs").mkdir()
    (tmp / "R.md").write_text("# project\n\nno markers\n")
    (tmp / "R2.md").write_text(README)


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_report_refusals_write_nothing(tmp_path):
    _work(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    before = _snapshot(tmp_path)
    for args, want in ((["--readme", "R.md"], "R.md: no '<!-- results:start -->'"), (["--results", "docs"], "docs: is a folder"),
                       (["--stage-times", "docs"], "--stage-times docs: is a folder"),
                       (["--results", "docs/r.md", "--stage-times", "bad.json"], "bad.json: not valid json"),
                       (["--results", "docs/r.md", "--stage-times", "list.json"], "list.json: not a stage-times table")):
        r = _run(["report", "w", *args], tmp_path)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and want in lines[0], (args, r.returncode, r.stderr[-2000:])
        assert _snapshot(tmp_path) == before, args


def test_readme_block_quotes_the_command_that_was_run(tmp_path):
    _work(tmp_path)
    r = _run(["report", "w", "--readme", "R2.md"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / "R2.md").read_text()
    assert f"Written by `distill report {tmp_path / 'w'} --readme R2.md` from" in text, text
    assert "docs/results.md" not in text
