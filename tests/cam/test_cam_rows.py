"""tools/cam_rows.py: the CAM ablation rows of several `distill ablate cam` metrics files side by side."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cam_rows_side_by_side_and_a_bad_file(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"images": 3, "rows": [{"step": "clims", "miou": 0.25, "miou_base": 0.5, "miou_novel": None},
                                                    {"step": "clims_crf", "miou": None}]}))
    b.write_text(json.dumps({"rows": [{"step": "clims", "miou": 0.125}, {"step": "gradcam", "miou": 0.5}]}))
    run = lambda *x: subprocess.run([sys.executable, str(REPO / "tools/cam_rows.py"), *x], cwd=tmp_path, capture_output=True, text=True)
    r = run("--split", f"T=0.75={a}", f"val={b}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["| step | T=0.75 (3 images) | val |", "|---|---|---|",
                                     "| clims | 25.0 / 50.0 / n/a | 12.5 / n/a / n/a |", "| clims_crf | n/a | n/a |", "| gradcam | n/a | 50.0 / n/a / n/a |"]
    (tmp_path / "c.json").write_text("[]")
    for bad in (f"x={tmp_path / 'missing.json'}", f"x={tmp_path / 'c.json'}"):
        r = run(bad)
        assert r.returncode == 2 and "metrics" in r.stderr.strip().splitlines()[-1]
