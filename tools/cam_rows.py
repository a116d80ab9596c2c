"""A markdown table of CAM ablation rows read from their metrics files, one column per file: each
COLUMN is ``label=path``, a ``metrics.json`` that `distill ablate cam` writes (``{cam.out}/metrics.json``
for CLIP-ES's chain, ``{cam.out}/clims_ablation/metrics.json`` for CLIMS's rows).

    python tools/cam_rows.py "CBS 0.75=RUN/cam_cbs0.75/clims_ablation/metrics.json" "CBS 0.78=..."

Cells are mIoU (all classes); ``--split`` adds base / novel after it.
"""
import argparse
import json
import os

ap = argparse.ArgumentParser(description="Print CAM ablation rows (mIoU) side by side from `distill ablate cam` metrics files.")
ap.add_argument("columns", nargs="+", metavar="LABEL=METRICS", help="a column: its label and a metrics.json of `distill ablate cam`")
ap.add_argument("--split", action="store_true", help="mIoU / base / novel in each cell")
args = ap.parse_args()
cols = []
for text in args.columns:
    label, _, path = text.rpartition("=")
    if not os.path.isfile(path):
        ap.error(f"{path}: no such metrics file (from `distill ablate cam`)")
    m = json.load(open(path))
    if not isinstance(m, dict) or not isinstance(m.get("rows"), list):
        ap.error(f"{path}: not a `distill ablate cam` metrics file (no 'rows')")
    cols.append((label or path, {r["step"]: r for r in m["rows"]}, m.get("images")))
steps = list(dict.fromkeys(s for _, rows, _ in cols for s in rows))


def cell(r: dict | None) -> str:
    if not r or r.get("miou") is None:
        return "n/a"
    keys = ("miou", "miou_base", "miou_novel") if args.split else ("miou",)
    return " / ".join(f"{100 * r[k]:.1f}" if r.get(k) is not None else "n/a" for k in keys)


print("| step | " + " | ".join(f"{label} ({n} images)" if n else label for label, _, n in cols) + " |")
print("|---|" + "---|" * len(cols))
for s in steps:
    print(f"| {s} | " + " | ".join(cell(rows.get(s)) for _, rows, _ in cols) + " |")
