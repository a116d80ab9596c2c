"""Thin script: `distill ablate seg` (distill/cli/ablate.py; logic in distill/ablate/). Same arguments:

    python tools/ablate_seg.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", "seg", *sys.argv[1:]]))
