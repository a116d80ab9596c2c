"""The one markdown table writer, and the one way a metric becomes a cell.

Used by the report (:mod:`distill.report.report`) and by the ablations (:mod:`distill.ablate`);
it imports nothing from the package, so every layer above can use it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table: one header line, the ``|---|`` line, one line a row (cells as ``str``);
    no trailing newline."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(v: Any, pct: bool = True, missing: str = "n/a") -> str:
    """A metric as a percentage with one decimal (``pct``) or a plain number; None, NaN and COCO's
    -1 ("undefined", with ``pct``) print as ``missing``."""
    if v is None or isinstance(v, bool) or (isinstance(v, float) and math.isnan(v)):
        return missing
    if isinstance(v, (int, float)):
        if pct and v == -1:
            return missing
        return f"{100 * v:.1f}" if pct else f"{v:.4g}"
    return str(v)
