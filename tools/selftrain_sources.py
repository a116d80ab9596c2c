"""Self-training gain of the teacher vs VL-PLM pseudo-labels of the unlabeled split (default-seed run):
ViLD fine-tuned selftrain.steps on base GT alone (control) / + novel pseudo-labels of the unlabeled split."""
import argparse
import dataclasses
import json

ap = argparse.ArgumentParser(description="Self-training: control vs teacher vs VL-PLM pseudo-labels of the unlabeled split.")
ap.add_argument("run", help="a finished pipeline run (configs/shapes/pipeline.yaml)")
ap.add_argument("out", help="folder holding lab_vlplm/labels.json (distill label --source vlplm); gets selftrain_sources.json")
ap.add_argument("overrides", nargs="*", help="config overrides of the run, e.g. world.seed=1 teacher.dense_tower=")
ap.add_argument("--vild", default="vild", help="the det/ folder of the ViLD to fine-tune (the pipeline's det stage: vild)")
ap.add_argument("--teacher-labels", default="", help="the teacher's labels.json of the unlabeled split (default: the pipeline's label stage)")
args = ap.parse_args()
W, A = args.run, args.out

from distill.ablate.selftrain import selftrain_ablation  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.pipeline.stages import selftrain_inputs  # noqa: E402

cfg = load_config("configs/shapes/pipeline.yaml", [f"work_dir={W}", *args.overrides])
vild, pseudo, _ = selftrain_inputs(cfg, label_train=False)
vild = dataclasses.replace(vild, det=dataclasses.replace(vild.det, init=f"{W}/det/{args.vild}/model_final.pt"))
pseudo = args.teacher_labels or pseudo
out = {}
for src, pj in (("vlplm", f"{A}/lab_vlplm/labels.json"), ("teacher", str(pseudo))):
    v = dataclasses.replace(vild, det=dataclasses.replace(vild.det, name=f"vild_{src}"))
    variants = ("unlabeled",) if src == "vlplm" else ("control", "unlabeled")
    out[src] = selftrain_ablation(v, pj, None, variants=variants, keep=cfg.selftrain.keep, score_thresh=cfg.selftrain.score_thresh)
    json.dump(out, open(f"{A}/selftrain_sources.json", "w"), indent=1)
print(json.dumps(out, indent=1))

