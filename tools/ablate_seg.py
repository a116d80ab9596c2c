"""Thin script: the segmentation ablation on the shapes world (logic in distill/ablate/seg.py).

    python tools/ablate_seg.py [key=value ...]            # overrides go to all three configs
    python tools/ablate_seg.py seg.train.max_steps=50 --out runs/shapes/seg/ablation_quick

Trains LSeg (base only), LSeg + pixel distillation and CLIPSeg with the step counts of their
configs, evaluates them and the MaskCLIP teacher on val, prints the mIoU base / novel / all and
hIoU table and writes metrics.json + table.md.
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill.config import load_config  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.ablate.seg import ablate_seg  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every config")
    ap.add_argument("--lseg", default="configs/shapes/lseg.yaml")
    ap.add_argument("--distill", default="configs/shapes/lseg_distill.yaml")
    ap.add_argument("--clipseg", default="configs/shapes/clipseg.yaml")
    ap.add_argument("--out", default=None, help="output folder (default {work_dir}/seg/ablation)")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        cfgs = [load_config(p, a.overrides) for p in (a.lseg, a.distill, a.clipseg)]
        ablate_seg(*cfgs, out_dir=a.out, progress=a.progress)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
