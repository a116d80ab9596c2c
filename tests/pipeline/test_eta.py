"""The run-time estimate: measured stage times keyed by config (not by work dir or world seed),
scaled by machine speed, then by how the finished stages compared; written by `distill report
--stage-times` from a run's manifests and printed by `distill run` as its header."""

from __future__ import annotations

import json

import pytest

from distill.config import load_config, save_config
from distill.pipeline.eta import Estimate, config_key, format_seconds, record


def test_config_key_ignores_work_dir_and_seed_not_settings():
    a = load_config(None, ["work_dir=runs/a"])
    assert config_key(a) == config_key(load_config(None, ["work_dir=/tmp/elsewhere/b", "world.seed=7"]))
    assert config_key(a) != config_key(load_config(None, ["work_dir=runs/a", "pretrain.steps=7"]))


def test_estimate_scales_by_machine_speed_then_by_finished_stages(tmp_path):
    cfg = load_config(None, ["work_dir=runs/a"])
    path = record(cfg, {"world": 10.0, "teacher": 100.0, "report": 2.0}, tmp_path / "t.json", gflops=100.0)
    # this machine is half as fast: every stage twice as long
    est = Estimate.for_run(load_config(None, ["work_dir=runs/b"]), ["world", "teacher"], path, gflops=50.0)
    assert est.expected == {"world": 20.0, "teacher": 200.0} and est.total() == 220.0
    assert est.remaining({}) == 220.0
    # world took 30 s where 20 were expected: the rest is scaled by 1.5
    assert est.remaining({"world": 30.0}) == pytest.approx(300.0)
    assert est.remaining({"world": 30.0, "teacher": 150.0}) == 0.0
    # a stage the measured run did not have, another config, or no table: no estimate
    assert Estimate.for_run(cfg, ["world", "seg"], path, gflops=50.0).total() is None
    assert Estimate.for_run(load_config(None, ["pretrain.steps=7"]), ["world"], path, gflops=50.0).total() is None
    assert Estimate.for_run(cfg, ["world"], tmp_path / "none.json", gflops=50.0).total() is None
    (tmp_path / "bad.json").write_text("{not json")
    assert Estimate.for_run(cfg, ["world"], tmp_path / "bad.json", gflops=50.0).total() is None
    # a second config is added beside the first
    other = load_config(None, ["pretrain.steps=7"])
    record(other, {"world": 1.0}, path, gflops=100.0)
    assert len(json.loads(path.read_text())["runs"]) == 2


def test_format_seconds():
    assert [format_seconds(s) for s in (42, 420, 3900)] == ["42 s", "7 min", "1 h 05 min"]


def test_report_records_the_runs_stage_times_and_run_prints_the_estimate(tmp_path, capsys):
    from distill.cli import main
    from report.test_report import _finished_run

    work = tmp_path / "w"
    _finished_run(work)
    cfg = load_config(None, [f"work_dir={work}"])
    save_config(cfg, work / "config.yaml")
    (work / "manifests").mkdir(exist_ok=True)
    for i, (stage, t) in enumerate((("world", 12.5), ("teacher", 300.0))):
        (work / "manifests" / f"{stage}.json").write_text(json.dumps({"stage": stage, "wall_time_s": t, "finished": f"2026-01-01T00:00:0{i}"}))
    table = tmp_path / "times.json"
    assert main(["report", str(work), "--stage-times", str(table)]) == 0
    assert str(table) in capsys.readouterr().out.split()
    run = json.loads(table.read_text())["runs"][config_key(cfg)]
    assert run["stages"] == {"world": 12.5, "teacher": 300.0} and run["machine"]["fp32_gflops"] > 0
    est = Estimate.for_run(load_config(None, ["work_dir=elsewhere"]), ["world", "teacher"], table, gflops=run["machine"]["fp32_gflops"])
    assert est.total() == pytest.approx(312.5)


def test_run_header_says_the_expected_time_and_each_stage_the_time_left(tmp_path, monkeypatch, capsys):
    import distill.pipeline.eta as eta
    from distill.pipeline.run import run_pipeline

    table = tmp_path / "times.json"
    monkeypatch.setattr(eta, "STAGE_TIMES", table)
    args = [f"work_dir={tmp_path / 'a'}", "world.num_train=4", "world.num_val=2", "world.num_unlabeled=2"]
    run_pipeline("configs/shapes/pipeline.yaml", args, until="world")
    assert "no measured stage times for this config, so no estimate" in capsys.readouterr().err
    record(load_config("configs/shapes/pipeline.yaml", args), {"world": 120.0}, table, gflops=eta.machine_gflops())
    run_pipeline("configs/shapes/pipeline.yaml", [f"work_dir={tmp_path / 'b'}", *args[1:]], until="world")
    err = " ".join(capsys.readouterr().err.split())
    assert "1 of 14 stages to run; expected ~" in err and "run ~" in err and "left)" in err, err
    # the stage's log file: its start and end
    text = (tmp_path / "b" / "logs" / "world.log").read_text()
    assert "stage world: started (key " in text and "stage world: done in " in text, text


def test_training_metrics_go_to_the_stage_log_not_the_console(tmp_path, capfd):
    """A training loop's JSON metric lines: in metrics.jsonl and the stage's log file; the console
    (the installed command's handler: warnings only) shows none of them."""
    import logging

    import torch

    from distill.cli import _log_to_stderr
    from distill.config import TrainConfig
    from distill.engine.train import DrawnBatches, train
    from distill.pipeline.runner import stage_log

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return {"loss_sq": (self.w * x).square().sum()}

    log = logging.getLogger("distill")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    try:
        _log_to_stderr()
        with stage_log(tmp_path / "logs" / "x.log"):
            train(Tiny(), DrawnBatches(lambda: (torch.ones(2),), {}), TrainConfig(max_steps=4, log_period=2, batch_size=1), tmp_path / "run", progress=False)
    finally:
        for h in list(log.handlers):
            if h not in handlers:
                log.removeHandler(h)
        log.setLevel(level)
        log.propagate = propagate
    lines = [ln for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"step"' in ln]
    assert lines and all(ln in (tmp_path / "logs" / "x.log").read_text() for ln in lines)
    out = capfd.readouterr()
    assert '"step"' not in out.err and '"step"' not in out.out


def test_stage_log_leaves_the_distill_loggers_level_and_the_root_handlers_alone(tmp_path):
    """Used from Python with a root handler (a library's logging.basicConfig): a stage neither
    lowers the distill logger's level nor sends its file-only lines to the root handler."""
    import io
    import logging

    from distill.pipeline.runner import stage_log

    buf = io.StringIO()
    root_handler = logging.StreamHandler(buf)
    logging.getLogger().addHandler(root_handler)
    log = logging.getLogger("distill")
    level = log.getEffectiveLevel()
    try:
        with stage_log(tmp_path / "s.log") as lines:
            lines.info("stage line")
            logging.getLogger("distill.some.module").info("module info")
            assert log.getEffectiveLevel() == level
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert "stage line" not in buf.getvalue() and "module info" not in buf.getvalue()
    assert "stage line" in (tmp_path / "s.log").read_text()
