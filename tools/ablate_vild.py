"""Thin script: `distill ablate vild` (distill/cli/ablate.py; logic in distill/ablate/). Same arguments:

    python tools/ablate_vild.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", "vild", *sys.argv[1:]]))
