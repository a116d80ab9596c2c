"""Thin script: train / evaluate the ViLD detector (same as `distill train det`).

    python tools/train_net.py configs/shapes/vild.yaml [key=value ...] [--resume] [--eval-only]
    torchrun --nproc_per_node 8 tools/train_net.py configs/coco/vild_r50_ovcoco.yaml
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distill.config import load_config  # noqa: E402
from distill.detection.train import train_detector  # noqa: E402
from distill.errors import DistillError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eval-only", action="store_true")
    a = ap.parse_args(argv)
    try:
        m = train_detector(load_config(a.config, a.overrides), resume=a.resume, eval_only=a.eval_only)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in m.items() if k.startswith("bbox/") and k.count("/") == 1}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
