"""`distill run CONFIG` (the stage graph) and `distill demo` (the embedded default)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from distill.cli.common import ConfigArg, Overrides


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
        from distill.stages import run_pipeline

        run_pipeline(config, overrides or [], force=force or [], until=until, quick=quick, list_only=list_stages)

    @root.command("demo")
    def demo(quick: Annotated[bool, typer.Option("--quick")] = False) -> None:
        """The embedded default: `distill run configs/shapes/pipeline.yaml`."""
        from distill.stages import run_pipeline

        run_pipeline("configs/shapes/pipeline.yaml", [], quick=quick)
