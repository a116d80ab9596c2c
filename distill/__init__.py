"""distill: open-vocabulary detectors and segmenters distilled from a frozen CLIP teacher."""

__version__ = "0.1.0"

from distill.errors import DistillError  # noqa: E402,F401


def __getattr__(name: str):
    # ``from distill import load_teacher`` without importing torch / open_clip for every command
    if name == "load_teacher":
        from distill.teacher.clip import load_teacher

        return load_teacher
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


__all__ = ["DistillError", "load_teacher"]
