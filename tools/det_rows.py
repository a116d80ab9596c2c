"""A markdown table of detector rows read from their metrics files: each ROW is ``label=name``, the
run's ``det/<name>/metrics.json`` (what `distill train det` and `distill ablate vild` write).

    python tools/det_rows.py RUN "ViLD=vild" "+ block=ablation_oadp_block" ...
"""
import argparse
import json
import os

ap = argparse.ArgumentParser(description="Print AP50 / AP novel and base of detector rows from a run's metrics files.")
ap.add_argument("run", help="the work dir")
ap.add_argument("rows", nargs="+", help="label=name: det/<name>/metrics.json of the run")
args = ap.parse_args()
COLS = ("bbox/AP50_novel", "bbox/AP50_base", "bbox/AP_novel", "bbox/AP_base")
print("| row | AP50 novel | AP50 base | AP novel | AP base |\n|---|---|---|---|---|")
for row in args.rows:
    label, _, name = row.rpartition("=")
    path = os.path.join(args.run, "det", name, "metrics.json")
    m = json.load(open(path)) if os.path.isfile(path) else {}
    print(f"| {label or name} | " + " | ".join(f"{100 * m[k]:.1f}" if m.get(k) is not None else "n/a" for k in COLS) + " |")
