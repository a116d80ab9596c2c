"""The tables of docs/experiments.md "Faithful variants (issue 29)", printed from the metrics files
the commands there write: RUN is the finished pipeline run, OUT the folder of the --out outputs
(maskclip_s0_<tower>_ks<KS>_pd<PD>/, lab_vild/, lab_vlplm/, labels_unl_low/, selftrain_sources.json).

    python tools/issue29_tables.py RUN OUT
    python tools/issue29_tables.py RUN_S1 OUT_S1 --seed 1 --vild ablation_vild --teacher-labels OUT_S1/lab_teacher
"""
import argparse
import json
import os

ap = argparse.ArgumentParser(description="Print the issue-29 ablation tables from a run's metrics files.")
ap.add_argument("run", help="the finished pipeline run (work dir)")
ap.add_argument("out", help="the folder of the ablation commands' --out outputs")
ap.add_argument("--seed", default="0", help="the run's world seed (named in the tables' headers)")
ap.add_argument("--vild", default="vild", help="the det/ folder of the ViLD row (the pipeline's det stage: vild)")
ap.add_argument("--teacher-labels", default="", help="the teacher's pseudo-labels of the unlabeled split (default RUN/labels/unlabeled)")
args = ap.parse_args()
W, A = args.run, args.out
SEED = f"(seed {args.seed})"
TEACHER_LABELS = args.teacher_labels or f"{W}/labels/unlabeled"
def j(p):
    return json.load(open(p)) if os.path.isfile(p) else None
def pct(m, k):
    return f"{100 * m[k]:.1f}" if m and k in m and m[k] is not None else "n/a"
print(f"| MaskCLIP on the dense tower, val {SEED} | mIoU base | novel | all | hIoU |\n|---|---|---|---|---|")
for name, ks, pd in (("none", "0", "0"), ("key smoothing (ks 1.0)", "1.0", "0"), ("prompt denoising (pd 0.5)", "0", "0.5"), ("both (kspd)", "1.0", "0.5")):
    for tower in ("dense", "plain"):
        m = j(f"{A}/maskclip_s0_{tower}_ks{ks}_pd{pd}/metrics.json")
        if tower == "dense":
            print(f"| {name} | " + " | ".join(pct(m, f"maskclip/miou_{k}") for k in ("base", "novel", "all", "hiou")) + " |")
print()
print(f"| LSeg, val {SEED} | mIoU base | novel | all | hIoU |\n|---|---|---|---|---|")
for label, n in (("base only (learnable scale)", "lseg"), ("+ pixel distillation (learnable scale)", "lseg_distill"), ("MaskCLIP+ (learnable scale)", "lseg_maskclip_plus"),
                 ("base only, fixed logit scale", "lseg_fixed_scale"), ("+ pixel distillation, fixed logit scale", "lseg_distill_fixed_scale")):
    m = j(f"{W}/seg/{n}/metrics.json")
    print(f"| {label} | " + " | ".join(pct(m, f"miou/{k}") for k in ("base", "novel", "all", "hiou")) + " |")
print()
print("| Pseudo-labels of the unlabeled split (300 images, hidden GT) | precision base | recall base | precision novel | recall novel | labels |\n|---|---|---|---|---|---|")
for label, d in (("teacher (score 0.5, NMS 0.5)", TEACHER_LABELS), ("ViLD student (score 0.5, NMS 0.5)", f"{A}/lab_vild"), ("VL-PLM (score 0.8, NMS 0.6)", f"{A}/lab_vlplm")):
    m, lab = j(f"{d}/metrics.json"), j(f"{d}/labels.json")
    n = len(lab["annotations"]) if lab else "n/a"
    print(f"| {label} | " + " | ".join(pct(m, f"labels/{k}") for k in ("precision_base", "recall_base", "precision_novel", "recall_novel")) + f" | {n} |")
print()
print(f"| ViLD (text inference), val {SEED} | AP50 base | AP50 novel |\n|---|---|---|")
for label, n in (("shapes templates, mlp2 head", args.vild), ("ViLD prompts (vild.txt)", "vild_prompts"), ("4conv1fc head (64 ch)", "vild_4conv1fc")):
    m = j(f"{W}/det/{n}/metrics.json")
    print(f"| {label} | {pct(m, 'bbox/AP50_base')} | {pct(m, 'bbox/AP50_novel')} |")
st = j(f"{A}/selftrain_sources.json")
if st:
    print()
    print(f"| ViLD fine-tuned 300 steps, val {SEED} | AP50 novel | AP50 base |\n|---|---|---|")
    rows = [("before (ViLD)", st["teacher"].get("before"))]
    rows += [("base GT only (control)", st["teacher"].get("control")), ("+ teacher pseudo-labels (unlabeled split)", st["teacher"].get("unlabeled")),
             ("+ VL-PLM pseudo-labels (unlabeled split)", st["vlplm"].get("unlabeled"))]
    for label, m in rows:
        print(f"| {label} | {pct(m, 'AP50_novel')} | {pct(m, 'AP50_base')} |")
sw = j(f"{A}/labels_unl_low/sweep.json")
if sw:
    print()
    print("| teacher labels, score >= | precision base | recall base | precision novel | recall novel | F1 novel |\n|---|---|---|---|---|---|")
    for r in sw:
        print(f"| {r['score_thresh']:g} | " + " | ".join(f"{r[k]:.3f}" for k in ("labels/precision_base", "labels/recall_base", "labels/precision_novel", "labels/recall_novel", "labels/f1_novel")) + " |")
