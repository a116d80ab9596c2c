"""`distill train ...`"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


def register_propose(root: typer.Typer) -> None:
    """``distill propose CONFIG``: class-agnostic proposals (filled in by the ViLD work)."""
