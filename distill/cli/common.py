"""Shared argument types for the sub-commands."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ConfigArg = Annotated[str, typer.Argument(help="A YAML config file (configs/...).")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides, e.g. det.train.max_steps=100")]


def load(config: str | None, overrides: list[str] | None):
    from distill.config import load_config

    return load_config(config, overrides or [])
