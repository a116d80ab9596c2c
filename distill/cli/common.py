"""Shared argument types for the sub-commands."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ConfigArg = Annotated[str, typer.Argument(help="A YAML config file (configs/...).")]
VOCAB_HELP = ("Vocabulary: a .txt (one class a line, or one comma-separated line), a .json list or COCO/LVIS file, "
              "or inline names separated by commas or newlines; 'crimson star=red star' adds a synonym. A value with "
              "'/' or a file extension must be a file; .yaml / .csv / .tsv files are refused.")
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides, e.g. det.train.max_steps=100")]


def shipped_config(rel: str, who: str) -> str:
    """A default config of the repository (``rel``, e.g. ``configs/shapes/pipeline.yaml``): the one
    beside the ``distill`` package (so the command runs from any folder), else the one under the
    current folder, else a one-line error naming ``who`` (the command)."""
    from pathlib import Path

    import distill
    from distill.errors import DistillError

    for path in (Path(distill.__file__).resolve().parents[1] / rel, Path(rel)):
        if path.is_file():
            return str(path)
    raise DistillError(f"{who}: {rel} not found beside the installed package; run it from the repository root (or give a config)")


def load(config: str | None, overrides: list[str] | None):
    from distill.config import load_config

    return load_config(config, overrides or [])
