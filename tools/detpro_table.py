"""The DetPro tables of docs/experiments.md, printed from the metrics files of finished runs: each
RUN is a work dir where the det and detpro stages ran (`distill run configs/shapes/pipeline.yaml
prompts.enabled=true ...`): det/vild, det/vild_ensemble, det/vild_detpro, det/vild_detpro_ensemble
and prompts/<file>_metrics.json (one per prompt file). With several runs (world seeds, novel splits) a mean row follows.

    python tools/detpro_table.py RUN [RUN ...]
"""
import argparse
import json
import math
import os

ap = argparse.ArgumentParser(description="Print the DetPro vs hand-written prompt tables from finished runs.")
ap.add_argument("runs", nargs="+", help="work dirs of runs where the det and detpro stages finished")
args = ap.parse_args()


def j(p):
    return json.load(open(p)) if os.path.isfile(p) else None


def v(m, k):
    return 100 * m[k] if m and m.get(k) is not None and not (isinstance(m[k], float) and math.isnan(m[k])) else None


def f(x):
    return "n/a" if x is None else f"{x:.1f}"


ROWS = (("ViLD, hand-written templates (text)", "vild"), ("DetPro: ViLD, learned prompts (text)", "vild_detpro"),
        ("ViLD + teacher crops (ensemble)", "vild_ensemble"), ("DetPro + teacher crops (ensemble)", "vild_detpro_ensemble"))
COLS = ("bbox/AP50_novel", "bbox/AP50_base", "bbox/AP_novel", "bbox/AP_base")
print("| run | row | AP50 novel | AP50 base | AP novel | AP base |\n|---|---|---|---|---|---|")
sums: dict = {}
for run in args.runs:
    for label, name in ROWS:
        m = j(f"{run}/det/{name}/metrics.json")
        vals = [v(m, k) for k in COLS]
        for k, x in zip(COLS, vals):
            if x is not None:
                sums.setdefault((label, k), []).append(x)
        print(f"| {os.path.basename(os.path.normpath(run))} | {label} | " + " | ".join(f(x) for x in vals) + " |")
if len(args.runs) > 1:
    for label, _ in ROWS:
        print(f"| mean of {len(args.runs)} | {label} | " + " | ".join(f(sum(sums[(label, k)]) / len(sums[(label, k)]) if sums.get((label, k)) else None) for k in COLS) + " |")
print()
print("| run | prompts (file) | steps (group 0) | context init | GT-crop top-1 base, val | novel | group 0 loss_fg / loss_bg, first -> last logged step |")
print("|---|---|---|---|---|---|---|")
import glob  # noqa: E402


def losses(path):
    rows = [json.loads(ln) for ln in open(path)] if os.path.isfile(path) else []
    return f"{rows[0]['loss_fg']:.2f} / {rows[0]['loss_bg']:.2f} -> {rows[-1]['loss_fg']:.2f} / {rows[-1]['loss_bg']:.2f}" if rows else "n/a"


for run in args.runs:
    name = os.path.basename(os.path.normpath(run))
    files = sorted(glob.glob(f"{run}/prompts/*_metrics.json"))
    first = j(files[0]) if files else None
    print(f"| {name} | hand-written templates (teacher.templates) | | | {f(v(first, 'prompts/top1_templates_base'))} | {f(v(first, 'prompts/top1_templates_novel'))} | |")
    for path in files:
        m = j(path)
        stem = os.path.basename(m["prompts/file"]).replace(".safetensors", "")
        steps0 = (m.get("prompts/groups") or [{}])[0].get("steps")
        print(f"| {name} | {stem}.safetensors | {steps0} | {m.get('prompts/ctx_init') or 'random N(0, 0.02)'} | "
              f"{f(v(m, 'prompts/top1_learned_base'))} | {f(v(m, 'prompts/top1_learned_novel'))} | {losses(f'{run}/prompts/{stem}_train/group0/metrics.jsonl')} |")
print()
print("| run | prompts (file) | IoU group | positives | negatives | final loss |\n|---|---|---|---|---|---|")
for run in args.runs:
    for path in sorted(glob.glob(f"{run}/prompts/*_metrics.json")):
        m = j(path) or {}
        for g in m.get("prompts/groups", []):
            loss = g.get("loss_last")
            print(f"| {os.path.basename(os.path.normpath(run))} | {os.path.basename(m['prompts/file'])} | [{g['group'][0]:g}, {g['group'][1]:g}) | {g['positives']} | {g['negatives']} | "
                  + (g.get("skipped") or (f"{loss:.3f}" if loss is not None else "n/a")) + " |")
