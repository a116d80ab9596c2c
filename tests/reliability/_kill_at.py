"""Run a Python program and SIGKILL it at a chosen write: a kill test's deterministic trigger.

    python tests/reliability/_kill_at.py GLOB N WHEN -m distill.cli train seg ...
    python tests/reliability/_kill_at.py GLOB N WHEN script.py args ...

Every file the package writes goes through ``distill.files.atomic_path``: a temporary file, then
``os.replace`` onto the final name. This wrapper counts the ``os.replace`` calls whose destination's
name matches ``GLOB`` (fnmatch on the file name) and at the ``N``-th one kills its own process with
SIGKILL, ``before`` the rename (the temporary file is whole but not in place: what a kill during
the write leaves) or ``after`` it (the file is in place, whatever the program writes next is not:
e.g. a checkpoint and its ``last_checkpoint`` pointer, a cache shard and its index). The kill is
the real ``kill -9`` (no handler, no cleanup) at a point chosen by the test, not at a wall-clock
moment, so the test cannot pass or fail by timing. Test-only: the package knows nothing of it.
"""

from __future__ import annotations

import fnmatch
import os
import runpy
import signal
import sys


def main() -> None:
    pattern, nth, when, *rest = sys.argv[1:]
    nth = int(nth)
    if when not in ("before", "after") or nth < 1 or not rest:
        raise SystemExit("usage: _kill_at.py GLOB N before|after (-m MODULE | SCRIPT) ARGS...")
    real = os.replace
    seen = 0

    def replace(src, dst, *a, **kw):
        nonlocal seen
        if fnmatch.fnmatch(os.path.basename(os.fspath(dst)), pattern):
            seen += 1
            if seen == nth and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, *a, **kw)
            if seen == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return
        real(src, dst, *a, **kw)

    os.replace = replace
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
