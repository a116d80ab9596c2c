"""``distill run``: load a config, build its stage graph (:func:`~distill.pipeline.stages.build_pipeline`),
list it or run it through the runner, and print each stage's progress and a summary table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from distill.config import load_config, save_config
from distill.pipeline.eta import Estimate, format_seconds
from distill.pipeline.runner import Pipeline, StageResult
from distill.pipeline.stages import build_pipeline, check_inputs, check_stage_name


def _printer(console, pipe: Pipeline, est: Estimate):
    """The runner's ``on_event``: one line (or a rule) per stage event, numbered in graph order,
    with the stage's expected time and the run's time left when ``est`` has them."""
    n = len(pipe.order)
    done: dict[str, float] = {}

    def on_event(r: StageResult) -> None:
        i = pipe.order.index(r.name) + 1
        if r.status == "running":
            left = est.remaining(done)
            when = f" [dim](~{format_seconds(est.expected[r.name])}; run ~{format_seconds(left)} left)[/]" if left is not None and r.name in est.expected else ""
            console.rule(f"[bold]stage {i}/{n}: {r.name}[/] — {pipe.stages[r.name].description}{when}")
        elif r.status == "skipped":
            console.print(f"[dim]stage {i}/{n}: {r.name} up to date, skipped[/]")
        elif r.status == "ran":
            done[r.name] = r.seconds
            console.print(f"[green]stage {i}/{n}: {r.name} done in {r.seconds:.1f} s[/] {r.note}")
        elif r.status == "failed":
            console.print(f"[red]stage {i}/{n}: {r.name} failed after {r.seconds:.1f} s[/]")

    return on_event


def run_pipeline(config: str, overrides: list[str], *, force: Sequence[str] = (), until: str | None = None,
                 quick: bool = False, list_only: bool = False) -> list[StageResult]:
    """Run (or with ``list_only`` list) the stages of ``config``; ``quick`` applies
    ``pipeline.quick_overrides`` before the command line's own overrides."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    for f in force:  # stage names checked before anything is imported or read
        check_stage_name(f, "--force")
    if until:
        check_stage_name(until, "--until")
    cfg = load_config(config, overrides)
    if quick:
        cfg = load_config(config, list(cfg.pipeline.quick_overrides) + list(overrides))
    pipe = build_pipeline(cfg)
    for name, where in [(f, "--force") for f in force] + ([(until, "--until")] if until else []):
        check_stage_name(name, where, pipe)
    to_run = pipe.plan(cfg, force=force, until=until)
    if list_only:
        shown = pipe.order[: pipe.order.index(until) + 1] if until else pipe.order
        for name in shown:
            console.print(f"{name:12s} {'to run' if name in to_run else 'up to date'}  {pipe.stages[name].description}")
        return []
    check_inputs(cfg, pipe, to_run)
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.work_dir) / "config.yaml")
    est = Estimate.for_run(cfg, to_run)
    if to_run:
        console.print(f"[bold]{len(to_run)} of {len(pipe.order)} stages to run[/]; "
                      + (f"expected ~{format_seconds(est.total())} on this machine ({est.source})" if est.total() is not None
                         else "no measured stage times for this config, so no estimate"))
    t0 = time.perf_counter()
    results = pipe.run(cfg, force=force, until=until, on_event=_printer(console, pipe, est))
    table = Table(title=f"distill run: {cfg.work_dir} ({time.perf_counter() - t0:.1f} s)")
    for col in ("stage", "status", "seconds", "note"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", r.note)
    console.print(table)
    report = Path(cfg.work_dir) / "report.md"
    if report.is_file():
        console.print(f"Report: {report}")
    return results


def report_run(work_dir: str, readme: str | None = None, results: str | None = None, stage_times: str | None = None) -> list[Path]:
    """``distill report``: the report of the finished run in ``work_dir`` (its saved
    ``config.yaml``), and with ``readme`` / ``results`` the README's results table and
    docs/results.md (:func:`distill.report.report.publish`); with ``stage_times`` the run's stage
    times go to that table of measured runs (:func:`distill.pipeline.eta.record`)."""
    from distill.errors import DistillError
    from distill.pipeline.runner import stage_timings
    from distill.report.report import publish

    if stage_times:  # checked before anything is written
        from distill.pipeline.eta import read_runs

        if Path(stage_times).is_dir():
            raise DistillError(f"--stage-times {stage_times}: is a folder (expected a .json file to add the run's stage times to)")
        read_runs(stage_times)
    saved = Path(work_dir) / "config.yaml"
    if not saved.is_file():
        raise DistillError(f"{saved}: not found (expected the work dir of a `distill run`)")
    cfg = load_config(str(saved), stored=True)
    timings = stage_timings(cfg)
    written = publish(cfg, Path(readme) if readme else None, Path(results) if results else None, timings=timings)
    if stage_times:
        from distill.pipeline.eta import record

        written.append(record(cfg, timings, stage_times))
    return written
