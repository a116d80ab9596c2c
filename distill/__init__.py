"""distill: open-vocabulary detectors and segmenters distilled from a frozen CLIP teacher."""

__version__ = "0.1.0"

from distill.errors import DistillError  # noqa: E402,F401
