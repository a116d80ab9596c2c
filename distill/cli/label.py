"""`distill label ...`"""

from __future__ import annotations

import typer


def register(root: typer.Typer) -> None:
    """Add the `label` command(s) to the root app."""
