"""`distill train ...`"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


def register_propose(root: typer.Typer) -> None:
    """``distill propose CONFIG``: class-agnostic proposals (filled in by the ViLD work)."""


@app.command("seg")
def seg(
    config: str = typer.Argument(..., help="A YAML config file (configs/shapes/lseg.yaml ...)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. seg.train.max_steps=100"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output folder."),
) -> None:
    """Train a segmentation student (LSeg / CLIPSeg) on base classes; writes {work_dir}/seg/{seg.name}/."""
    from distill.cli.common import load
    from distill.segmentation.train import train_seg

    metrics = train_seg(load(config, overrides), resume=resume)
    keys = ("miou/seen", "miou/unseen", "miou/all", "miou/hiou", "pixel_acc")
    typer.echo("  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics))
