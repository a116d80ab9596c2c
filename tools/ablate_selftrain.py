"""Thin script: `distill ablate selftrain` (distill/cli/ablate.py; logic in distill/ablate/). Same arguments:

    python tools/ablate_selftrain.py --help
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", "selftrain", *sys.argv[1:]]))
