"""The stages of the default run (ARCHITECTURE.md), wired into :class:`distill.pipeline.Pipeline`.

Each stage function takes the resolved :class:`~distill.config.Config` and makes one call into the
package; the runner handles manifests, skipping and timing.
"""

from __future__ import annotations

import time
from pathlib import Path

from distill.config import Config, load_config, save_config
from distill.pipeline import Pipeline, Stage, StageResult


# ------------------------------------------------------------------------------------------- stages
def st_world(cfg: Config):
    from distill.data.world import make_world

    make_world(cfg)


def st_report(cfg: Config):
    from distill.report import write_report

    return str(write_report(cfg))


def build_pipeline(cfg: Config) -> Pipeline:
    stages = [
        Stage("world", st_world, sections=("world", "work_dir"), outputs=("data/instances_val.json", "data/instances_train_base.json"), description="procedural shapes world"),
        Stage("report", st_report, deps=("world",), sections=("work_dir",), outputs=("report.md",), description="report.md + figures"),
    ]
    if cfg.pipeline.stages:
        keep = set(cfg.pipeline.stages)
        stages = [s for s in stages if s.name in keep]
        names = {s.name for s in stages}
        stages = [Stage(s.name, s.fn, tuple(d for d in s.deps if d in names), s.sections, s.outputs, s.description) for s in stages]
    return Pipeline(stages)


# ------------------------------------------------------------------------------------------- runner
def run_pipeline(config: str, overrides: list[str], *, force=(), until=None, quick=False, list_only=False) -> list[StageResult]:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    cfg = load_config(config, overrides)
    if quick:
        cfg = load_config(config, list(cfg.pipeline.quick_overrides) + ["pipeline.quick=true"] + list(overrides))
    pipe = build_pipeline(cfg)
    if list_only:
        for name in pipe.order:
            console.print(f"{name:12s} {'up to date' if pipe.is_fresh(cfg, name) else 'to run'}  {pipe.stages[name].description}")
        return []
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.work_dir) / "config.yaml")
    t0 = time.perf_counter()
    n = len(pipe.order)

    def on_event(r: StageResult) -> None:
        i = pipe.order.index(r.name) + 1
        if r.status == "running":
            console.rule(f"[bold]stage {i}/{n}: {r.name}[/] — {pipe.stages[r.name].description}")
        elif r.status == "skipped":
            console.print(f"[dim]stage {i}/{n}: {r.name} up to date, skipped[/]")
        elif r.status == "ran":
            console.print(f"[green]stage {i}/{n}: {r.name} done in {r.seconds:.1f} s[/]")
        elif r.status == "failed":
            console.print(f"[red]stage {i}/{n}: {r.name} failed after {r.seconds:.1f} s[/]")

    results = pipe.run(cfg, force=force, until=until, on_event=on_event)
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
