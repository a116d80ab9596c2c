"""`python -m distill.cli ...` (e.g. under torchrun)."""

from distill.cli import _console

_console()
