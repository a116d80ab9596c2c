"""Self-training gain of the teacher vs VL-PLM pseudo-labels of the unlabeled split (default-seed run):
ViLD fine-tuned selftrain.steps on base GT alone (control) / + novel pseudo-labels of the unlabeled split."""
import dataclasses, json, sys
from distill.config import load_config
from distill.pipeline.stages import selftrain_inputs
from distill.ablate.selftrain import selftrain_ablation

# python tools/selftrain_sources.py RUN OUT: RUN a finished pipeline run, OUT/lab_vlplm/labels.json the
# VL-PLM labels of its unlabeled split (distill label --source vlplm); writes OUT/selftrain_sources.json
W, A = sys.argv[1], sys.argv[2]
cfg = load_config("configs/shapes/pipeline.yaml", [f"work_dir={W}"])
vild, pseudo, _ = selftrain_inputs(cfg, label_train=False)
out = {}
for src, pj in (("vlplm", f"{A}/lab_vlplm/labels.json"), ("teacher", str(pseudo))):
    v = dataclasses.replace(vild, det=dataclasses.replace(vild.det, name=f"vild_{src}"))
    variants = ("unlabeled",) if src == "vlplm" else ("control", "unlabeled")
    out[src] = selftrain_ablation(v, pj, None, variants=variants, keep=cfg.selftrain.keep, score_thresh=cfg.selftrain.score_thresh)
    json.dump(out, open(f"{A}/selftrain_sources.json", "w"), indent=1)
print(json.dumps(out, indent=1))
