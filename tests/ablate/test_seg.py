"""The ablation runner on the tiny world (1 step per student): table, metrics.json, deltas."""

import json
import math

import pytest

from distill.config import load_config
from distill.ablate.seg import ablate_seg, format_table


def test_format_table_percent():
    t = format_table({"a": {"miou/base": 0.5, "miou/novel": 0.25, "miou/all": 0.4, "miou/hiou": 1 / 3, "pixel_acc": 0.9}})
    assert t.splitlines()[2] == "| a | 50.0 | 25.0 | 40.0 | 33.3 | 90.0 |"


@pytest.mark.slow
def test_ablation_tiny_world(tiny_world, tiny_teacher, overrides, capsys):
    root, data = tiny_world
    over = overrides(root, data, **{"seg.train.max_steps": 1, "teacher.background": str(root / "bg.txt")})
    (root / "bg.txt").write_text("gray background\nnoise\n")
    cfgs = [load_config(f"configs/shapes/{n}.yaml", over) for n in ("lseg", "lseg_distill", "clipseg")]
    res = ablate_seg(*cfgs, out_dir=root / "abl", teacher=tiny_teacher)
    saved = json.loads((root / "abl" / "metrics.json").read_text())
    assert list(saved["rows"]) == ["maskclip_teacher", "lseg_base_only", "lseg_pixel_distill", "clipseg"]
    for row in saved["rows"].values():
        for k in ("miou/base", "miou/novel", "miou/all", "miou/hiou"):
            assert 0.0 <= row[k] <= 1.0
        s, u = row["miou/base"], row["miou/novel"]
        assert math.isclose(row["miou/hiou"], 0.0 if s + u == 0 else 2 * s * u / (s + u), abs_tol=1e-6)
    gain = saved["rows"]["lseg_pixel_distill"]["miou/novel"] - saved["rows"]["lseg_base_only"]["miou/novel"]
    assert saved["deltas"]["distill_novel_gain_points"] == round(100 * gain, 2)
    assert res["rows"] == saved["rows"]
    out = capsys.readouterr().out
    assert "| lseg_pixel_distill |" in out and (root / "abl" / "table.md").read_text() in out
