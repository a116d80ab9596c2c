"""Thin script: the same as `distill label ...` (see `python tools/pseudo_label.py --help`)."""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
