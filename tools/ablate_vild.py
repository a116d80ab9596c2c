"""Thin script: the ViLD ablation on the shapes world (logic in distill/ablate/vild.py).

    python tools/ablate_vild.py [CONFIG] [key=value ...] [--variants vild_text,vild]
    python tools/ablate_vild.py                 # configs/shapes/vild_ablation.yaml: 600 steps a row
    python tools/ablate_vild.py configs/shapes/vild.yaml   # the pipeline detector's 300 steps a row
    python tools/ablate_vild.py configs/shapes/vild.yaml det.train.max_steps=150 world.seed=3
    python tools/ablate_vild.py --seeds 0,1     # every row for both seeds; compared on the mean
    python tools/ablate_vild.py --seeds 0,1 --reuse   # rows already trained here (same settings) are read

Trains a supervised Faster R-CNN on base boxes, ViLD-text, ViLD-image, ViLD, ViLD-ensemble (ViLD
3.4: separate text / image heads, no teacher at test time) and an oracle on all classes, evaluates
ViLD with the teacher's crops too, prints the table of AP50 / AP novel, base, all and writes
{work_dir}/det/ablation/metrics.json + ablation.md.
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill.config import load_config  # noqa: E402
from distill.ablate.vild import VARIANTS, deltas, run_ablation, table_markdown  # noqa: E402
from distill.errors import DistillError  # noqa: E402


def _seeds(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip()) or None
    except ValueError:
        raise DistillError(f"--seeds {text!r}: expected comma-separated integers such as 0,1") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="configs/shapes/vild_ablation.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--seeds", default="", help="comma-separated training seeds (default: det.train.seed); the table is their mean")
    ap.add_argument("--reuse", action="store_true", help="read rows already trained in this work dir with the same settings instead of training them again")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        res = run_ablation(cfg, tuple(v.strip() for v in a.variants.split(",") if v.strip()), progress=a.progress, seeds=_seeds(a.seeds), reuse=a.reuse)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table_markdown(res))
    print("ViLD vs ViLD-text:", deltas(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
