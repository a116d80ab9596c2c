"""Thin script: the self-training ablation on the shapes world (logic in distill/labels/selftrain.py).

    python tools/ablate_selftrain.py [CONFIG] [key=value ...] [--variants control,unlabeled+train]

Needs a finished `distill run CONFIG` up to the selftrain stage (ViLD's weights, the pseudo-labels
of the unlabeled split and, for the +train variants, of the training images). Fine-tunes the same
ViLD weights for selftrain.steps once per variant: base ground truth only (control), + novel
pseudo-labels of the unlabeled split (drawn 1x or 5x per epoch), + those of the training images
(VL-PLM); prints AP50 novel / base on val and writes {work_dir}/selftrain/ablation/metrics.json.
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill.config import load_config  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.labels.selftrain import ABLATION, selftrain_ablation  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="configs/shapes/pipeline.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ap.add_argument("--variants", default=",".join(ABLATION), help=f"comma-separated subset of {','.join(ABLATION)}")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    a = ap.parse_args(argv)
    try:
        from distill.pipeline.stages import selftrain_inputs

        cfg = load_config(a.config, a.overrides)
        vild, pseudo, train_pseudo = selftrain_inputs(cfg)
        rows = selftrain_ablation(vild, pseudo, train_pseudo, variants=tuple(v.strip() for v in a.variants.split(",") if v.strip()),
                                  keep=cfg.selftrain.keep, score_thresh=cfg.selftrain.score_thresh, progress=a.progress)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| fine-tuning data | AP50 novel | AP50 base |\n|---|---|---|")
    for v, m in rows.items():
        print(f"| {v} | {100 * m.get('AP50_novel', float('nan')):.1f} | {100 * m.get('AP50_base', float('nan')):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
