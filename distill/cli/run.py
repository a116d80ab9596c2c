"""`distill run CONFIG` (the stage graph), `distill demo` (the embedded default) and
`distill report WORK_DIR` (the report of a finished run, the README's table, docs/results.md)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from distill.cli.common import ConfigArg, Overrides, shipped_config


DEMO_CONFIG = "configs/shapes/pipeline.yaml"


def demo_config() -> str:
    """The demo's pipeline config, found from any folder (:func:`shipped_config`)."""
    return shipped_config(DEMO_CONFIG, "distill demo")


def register(root: typer.Typer) -> None:
    @root.command("run")
    def run(
        config: ConfigArg,
        overrides: Overrides = None,
        force: Annotated[Optional[list[str]], typer.Option("--force", help="Rerun this stage and everything downstream (repeatable).")] = None,
        until: Annotated[Optional[str], typer.Option("--until", help="Stop after this stage.")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="Smaller world and fewer steps (pipeline.quick_overrides).")] = False,
        list_stages: Annotated[bool, typer.Option("--list", help="List the stages and whether each is up to date.")] = False,
    ) -> None:
        """Run the pipeline: world -> teacher -> ... -> report. Finished stages are skipped."""
        from distill.pipeline.run import run_pipeline

        run_pipeline(config, overrides or [], force=force or [], until=until, quick=quick, list_only=list_stages)

    @root.command("demo")
    def demo(quick: Annotated[bool, typer.Option("--quick")] = False) -> None:
        """The embedded default: `distill run configs/shapes/pipeline.yaml`."""
        from distill.pipeline.run import run_pipeline

        run_pipeline(demo_config(), [], quick=quick)

    @root.command("report")
    def report(
        work_dir: Annotated[str, typer.Argument(help="The work dir of a finished `distill run` (holds config.yaml).")],
        readme: Annotated[Optional[str], typer.Option("--readme", help="Replace this file's results block with the headline table.")] = None,
        results: Annotated[Optional[str], typer.Option("--results", help="Write every table of the report to this file.")] = None,
        stage_times: Annotated[Optional[str], typer.Option("--stage-times", help="Add the run's stage times to this table (what `distill run` estimates its time from).")] = None,
    ) -> None:
        """Rewrite WORK_DIR/report.md from the run's metrics files; --readme / --results publish it."""
        from distill.pipeline.run import report_run

        for path in report_run(work_dir, readme, results, stage_times):
            typer.echo(str(path))
