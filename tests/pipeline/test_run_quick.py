"""`distill run configs/shapes/pipeline.yaml --quick`: every stage on a tiny world, then a rerun
that skips everything. Slow (minutes on 2 cores); CI runs it."""

import json
from pathlib import Path

import pytest

from distill.pipeline.run import run_pipeline
from distill.pipeline.stages import STAGES

DEFAULT = [s for s in STAGES if s.name != "detpro"]  # detpro is in the graph only with prompts.enabled


def _manifests(work) -> dict:
    """Each stage manifest -> (inode, bytes). A stage that runs again rewrites its manifest through
    an atomic rename (a new file: another inode, another wall time), so equal before and after a
    rerun means no stage ran again, whatever the machine's speed."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted((Path(work) / "manifests").glob("*.json"))}


# on top of pipeline.quick_overrides: fewer images and steps (every stage still runs and writes
# everything the assertions read; the test's time is the suite's longest)
SMALLER = ["world.num_train=24", "world.num_val=12", "world.num_unlabeled=8", "pretrain.steps=30", "clipself.steps=5",
           "det.backbone_pretrain.steps=5", "proposals.train.max_steps=10", "det.train.max_steps=10", "seg.train.max_steps=5",
           "selftrain.steps=5", "cam.num_panels=1"]


@pytest.mark.slow
def test_quick_pipeline_runs_every_stage_then_skips(tmp_path):
    work = tmp_path / "quick"
    res = run_pipeline("configs/shapes/pipeline.yaml", [f"work_dir={work}", *SMALLER], quick=True)
    assert [r.name for r in res] == [s.name for s in DEFAULT]
    assert all(r.status == "ran" for r in res), [(r.name, r.status) for r in res]
    for s in DEFAULT:
        m = json.loads((work / "manifests" / f"{s.name}.json").read_text())
        assert m["key"] and m["wall_time_s"] >= 0
    # the report's numbers are the metrics files' numbers
    report = (work / "report.md").read_text()
    det = json.loads((work / "det" / "vild" / "metrics.json").read_text())
    row = f"| vild | {100 * det['bbox/AP50_novel']:.1f} | {100 * det['bbox/AP50_base']:.1f} |"
    assert row in report
    seg = json.loads((work / "seg" / "lseg_distill" / "metrics.json").read_text())
    assert f"| lseg_distill | {100 * seg['miou/base']:.1f} | {100 * seg['miou/novel']:.1f} |" in report
    # CLIP-ES: the CAM masks of the training images train an LSeg student, reported beside the others
    cam_seg = json.loads((work / "seg" / "lseg_cam" / "metrics.json").read_text())
    assert f"| lseg_cam | {100 * cam_seg['miou/base']:.1f} | {100 * cam_seg['miou/novel']:.1f} |" in report
    n_train = len(list((work / "data" / "images" / "train").glob("*.png")))
    assert len(list((work / "cam" / "masks" / "train").glob("*.png"))) == n_train > 0
    cam = json.loads((work / "cam" / "metrics.json").read_text())
    assert cam["cam/final_step"] == "conf_ignore_no_caa"  # the shapes config: cam.caa=false
    assert (work / "figures" / "loss_curves.png").stat().st_size > 1000
    # a rerun skips every stage
    before = _manifests(work)
    res = run_pipeline("configs/shapes/pipeline.yaml", [f"work_dir={work}", *SMALLER], quick=True)
    assert all(r.status == "skipped" for r in res)
    assert _manifests(work) == before and before  # no stage reran (its manifest would be a new file)
