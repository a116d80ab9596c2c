"""Thin script: the same as `distill run CONFIG [overrides] [--quick] [--force STAGE] [--until STAGE] [--list]`
(see `python tools/run_pipeline.py --help`)."""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
