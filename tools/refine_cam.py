"""Thin script: the same as `distill cam ...` (see `python tools/refine_cam.py --help`)."""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["cam", *sys.argv[1:]]))
