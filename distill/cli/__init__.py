"""The ``distill`` command. Sub-commands live in ``distill/cli/<area>.py``; each one parses its
arguments, loads the config and makes one call into the package.

A :class:`~distill.errors.DistillError` (a user's mistake) prints one line and exits with 2.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from distill.errors import DistillError

app = typer.Typer(
    name="distill",
    help="Open-vocabulary detectors and segmenters distilled from a frozen CLIP teacher.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

from distill.cli import cam as _cam  # noqa: E402
from distill.cli import eval as _eval  # noqa: E402
from distill.cli import label as _label  # noqa: E402
from distill.cli import run as _run  # noqa: E402
from distill.cli import teacher as _teacher  # noqa: E402
from distill.cli import train as _train  # noqa: E402
from distill.cli import world as _world  # noqa: E402

app.add_typer(_world.app, name="world", help="Make the procedural shapes world.")
app.add_typer(_teacher.app, name="teacher", help="The CLIP teacher: pretrain, evaluate, embed, clipself (dense tower).")
app.add_typer(_train.app, name="train", help="Train a student (det | seg).")
app.add_typer(_eval.app, name="eval", help="Evaluate predictions (det | seg).")
_train.register_propose(app)
_label.register(app)
_cam.register(app)
_run.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: one-line errors, exit 2 for a user's mistake."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        rv = app(args=argv, standalone_mode=False)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return rv if isinstance(rv, int) else 0


def _console() -> None:
    sys.exit(main())
