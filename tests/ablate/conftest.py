"""The ablation tests reuse the segmentation tests' tiny teacher and world (tests/segmentation/conftest.py)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_seg_fixtures", Path(__file__).resolve().parents[1] / "segmentation" / "conftest.py")
_seg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_seg)

tiny_teacher, tiny_world, overrides = _seg.tiny_teacher, _seg.tiny_world, _seg.overrides
