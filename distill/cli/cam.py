"""`distill cam ...`"""

from __future__ import annotations

import typer


def register(root: typer.Typer) -> None:
    """Add the `cam` command(s) to the root app."""
