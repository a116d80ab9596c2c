"""The ``distill`` command. Sub-commands live in ``distill/cli/<area>.py``; each one parses its
arguments, loads the config and makes one call into the package.

A :class:`~distill.errors.DistillError` (a user's mistake) prints one line and exits with 2.
"""

from __future__ import annotations

import logging
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

from distill.cli import ablate as _ablate  # noqa: E402
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
app.add_typer(_ablate.app, name="ablate", help="Ablation tables (vild | seg | selftrain | cam).")
_train.register_propose(app)
_label.register(app)
_cam.register(app)
_run.register(app)


# typer >= 0.29 bundles its own click (``typer._click``): its usage errors are typer.TyperException
# subclasses, not the separately installed click's. Both are caught, so either layout gives one line.
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort, KeyboardInterrupt)
_USAGE = (click.ClickException, typer.TyperException)


def _usage_line(e: Exception) -> str:
    """A click / typer usage error as one line, with the command to ask for help."""
    ctx = getattr(e, "ctx", None)
    fmt = getattr(e, "format_message", None)
    msg = " ".join((fmt() if fmt else str(e)).split())
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {msg}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: one-line errors, exit 2 for a user's mistake, 130 for
    Ctrl-C / end of input."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        rv = app(args=argv, standalone_mode=False)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        print("aborted", file=sys.stderr)
        return 130
    except _USAGE as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # `distill`, `distill train`: the help
            print(ctx.get_help())
            return 0
        print(_usage_line(e), file=sys.stderr)
        return 2
    if rv == 130:  # typer turns Ctrl-C into Exit(130), which non-standalone mode returns
        print("aborted", file=sys.stderr)
    return rv if isinstance(rv, int) else 0


def _log_to_stderr() -> None:
    """The package's warnings as ``warning: <message>`` lines on stderr, and only those: a library
    calling the module-level ``logging.warning`` (open_clip does) installs a root handler that would
    otherwise prefix every later line with ``WARNING:distill.<module>:``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    log = logging.getLogger("distill")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False


def _console() -> None:
    _log_to_stderr()
    sys.exit(main())
