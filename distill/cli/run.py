"""`distill run ...`"""

from __future__ import annotations

import typer


def register(root: typer.Typer) -> None:
    """Add the `run` command(s) to the root app."""
