"""The one markdown table writer (distill/report/tables.py) and its cell format."""

import math

from distill.report.tables import fmt, table


def test_table_is_header_rule_rows():
    assert table(["a", "b"], [["1", "2"], [3, "x y"]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | x y |"
    assert table(["only"], []) == "| only |\n|---|"


def test_fmt_percent_plain_and_missing():
    assert fmt(0.4321) == "43.2" and fmt(1 / 3) == "33.3" and fmt(0.0) == "0.0"
    assert fmt(12345.678, pct=False) == "1.235e+04" and fmt(7, pct=False) == "7"
    for missing in (None, math.nan, True, -1):  # COCO's -1 is "undefined"
        assert fmt(missing) == "n/a"
    assert fmt(-1, pct=False) == "-1" and fmt(None, missing="-") == "-" and fmt("text") == "text"
