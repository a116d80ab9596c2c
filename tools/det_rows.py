"""A markdown table of detector rows read from their metrics files: each ROW is ``label=name``, the
run's ``det/<name>/metrics.json`` (what `distill train det` and `distill ablate vild` write).

    python tools/det_rows.py RUN "ViLD=vild" "+ block=ablation_oadp_block" ...

With ``--runs`` the same rows across several runs (worlds, novel splits): a column of AP50 novel /
base per run and their mean.

    python tools/det_rows.py --runs "world seed 0=RUN_0" "split B=RUN_B" -- "ViLD=ablation_vild" ...
"""
import argparse
import json
import os

COLS = ("bbox/AP50_novel", "bbox/AP50_base", "bbox/AP_novel", "bbox/AP_base")


def metrics(run: str, name: str) -> dict:
    path = os.path.join(run, "det", name, "metrics.json")
    return json.load(open(path)) if os.path.isfile(path) else {}


def split(text: str) -> tuple[str, str]:
    label, _, value = text.rpartition("=")
    return label or value, value


ap = argparse.ArgumentParser(description="Print AP50 / AP novel and base of detector rows from a run's metrics files.")
ap.add_argument("run", nargs="?", help="the work dir (without --runs)")
ap.add_argument("rows", nargs="+", help="label=name: det/<name>/metrics.json of the run")
ap.add_argument("--runs", nargs="+", metavar="LABEL=RUN", help="several work dirs: one AP50 novel / base column each, and their mean")
args = ap.parse_args()
rows = [split(r) for r in ([args.run] if args.runs and args.run else []) + args.rows]
if not args.runs:
    print("| row | AP50 novel | AP50 base | AP novel | AP base |\n|---|---|---|---|---|")
    for label, name in rows:
        m = metrics(args.run, name)
        print(f"| {label} | " + " | ".join(f"{100 * m[k]:.1f}" if m.get(k) is not None else "n/a" for k in COLS) + " |")
else:
    runs = [split(r) for r in args.runs]
    print("| row (AP50 novel / base) | " + " | ".join(label for label, _ in runs) + " | mean |")
    print("|---" * (len(runs) + 2) + "|")
    for label, name in rows:
        ms = [metrics(run, name) for _, run in runs]
        cells = [" / ".join(f"{100 * m[k]:.1f}" if m.get(k) is not None else "n/a" for k in COLS[:2]) for m in ms]
        full = all(m.get(k) is not None for m in ms for k in COLS[:2])
        mean = " / ".join(f"{100 * sum(m[k] for m in ms) / len(ms):.1f}" for k in COLS[:2]) if full else "n/a"
        print(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
