"""The report (distill/report/report.py): report.md, docs/results.md and the README block, from metrics files."""

import json

import numpy as np
import pytest
from PIL import Image

from distill.config import load_config
from distill.report.report import write_report


def test_report_reads_numbers_from_metrics_files(tmp_path):
    work = tmp_path / "w"
    cfg = load_config(None, [f"work_dir={work}"])
    (work / "data" / "images" / "val").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(work / "data/images/val/000001.png")
    gt = {
        "images": [{"id": 1, "file_name": "val/000001.png", "width": 32, "height": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "red star", "split": "base"}, {"id": 2, "name": "blue circle", "split": "novel"}],
    }
    (work / "data" / "instances_val.json").write_text(json.dumps(gt))
    (work / "det" / "vild").mkdir(parents=True)
    (work / "det" / "vild" / "metrics.json").write_text(json.dumps({"bbox/AP50_novel": 0.4321, "bbox/AP50_base": 0.9, "bbox/AP50/red star": 0.9, "bbox/AP50/blue circle": 0.43}))
    (work / "det" / "vild" / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss_vild_text": 1.0 / (s + 1)}) for s in range(5)))
    (work / "det" / "vild" / "predictions_val.json").write_text(json.dumps([{"image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "score": 0.9}]))
    (work / "seg" / "lseg").mkdir(parents=True)
    (work / "seg" / "lseg" / "metrics.json").write_text(json.dumps({"miou/base": 0.5, "miou/novel": 0.25, "miou/hiou": 1 / 3}))
    out = write_report(cfg)
    text = out.read_text()
    assert "| vild | 43.2 | 90.0 |" in text
    assert "| lseg | 50.0 | 25.0 | n/a | 33.3 |" in text
    assert "No CAM metrics found." in text and "blue circle" in text
    for fig in ("ap_per_class_vild.png", "loss_curves.png", "detections_vild.png"):
        assert (work / "figures" / fig).stat().st_size > 1000, fig
        assert f"figures/{fig}" in text


def _seg_rows(text):
    """The rows of the segmentation table: {row name: cells}, in order."""
    sec = text.split("## Segmentation (val)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in sec.splitlines() if line.startswith("| ") and not line.startswith("| model |")]
    return {r.strip("| ").split(" | ")[0]: r.strip("| ").split(" | ")[1:] for r in rows}, [r.strip("| ").split(" | ")[0] for r in rows]


def test_report_lists_maskclip_on_the_dense_tower(tmp_path):
    """teacher/dense_tower/metrics.json (the clipself stage's MaskCLIP) adds a zero-shot row after the
    teacher's own MaskCLIP row and before the students; without the file (or its maskclip keys) no row."""
    work = tmp_path / "w"
    cfg = load_config(None, [f"work_dir={work}"])
    (work / "teacher" / "dense_tower").mkdir(parents=True)
    (work / "teacher" / "metrics.json").write_text(json.dumps(
        {"zeroshot/top1_1x": 0.5, "maskclip/miou_base": 0.007, "maskclip/miou_novel": 0.002, "maskclip/miou_all": 0.005,
         "maskclip/miou_hiou": 0.003, "maskclip/miou_all@128": 0.9}))
    for name, base in (("lseg", 0.5), ("lseg_distill", 0.6)):
        (work / "seg" / name).mkdir(parents=True)
        (work / "seg" / name / "metrics.json").write_text(json.dumps({"miou/base": base, "miou/novel": 0.25, "miou/hiou": 1 / 3}))
    dense_label = "MaskCLIP on the CLIPSelf dense tower (zero-shot)"

    rows, order = _seg_rows(write_report(cfg).read_text())
    assert dense_label not in rows and order == ["MaskCLIP teacher (zero-shot)", "lseg", "lseg_distill"]

    (work / "teacher" / "dense_tower" / "metrics.json").write_text(json.dumps({"maskclip/absent": "no semantic masks"}))
    rows, order = _seg_rows(write_report(cfg).read_text())
    assert dense_label not in rows

    (work / "teacher" / "dense_tower" / "metrics.json").write_text(json.dumps(
        {"maskclip/miou_base": 0.261, "maskclip/miou_novel": 0.232, "maskclip/miou_all": 0.25, "maskclip/miou_hiou": 0.2457,
         "maskclip/miou_all@128": 0.99, "zeroshot/top1_dense": 0.5}))
    rows, order = _seg_rows(write_report(cfg).read_text())
    assert order == ["MaskCLIP teacher (zero-shot)", dense_label, "lseg", "lseg_distill"]
    assert rows[dense_label][:4] == ["26.1", "23.2", "25.0", "24.6"]  # the @-sized keys are not read
    assert rows["MaskCLIP teacher (zero-shot)"][:4] == ["0.7", "0.2", "0.5", "0.3"]
    assert rows["lseg"][:4] == ["50.0", "25.0", "n/a", "33.3"]


README = """# project

Intro.

## Results

<!-- results:start -->
(run make demo to fill this table)
<!-- results:end -->

## After
Kept.
"""


def _finished_run(work):
    """The metrics files of a small finished run (a subset of the default's)."""
    files = {
        "teacher/metrics.json": {"zeroshot/top1_ens": 0.61, "zeroshot/top1_ens_base": 0.7, "zeroshot/top1_ens_novel": 0.4},
        "det/vild_text/metrics.json": {"bbox/AP50_novel": 0.1111, "bbox/AP50_base": 0.52, "bbox/AP50": 0.4},
        "det/vild/metrics.json": {"bbox/AP50_novel": 0.2345, "bbox/AP50_base": 0.5, "bbox/AP50": 0.45},
        "seg/lseg_distill/metrics.json": {"miou/base": 0.5, "miou/novel": 0.25, "miou/all": 0.4, "miou/hiou": 1 / 3},
        "selftrain/metrics.json": {"selftrain/AP50_novel_before": 0.2345, "selftrain/AP50_novel_after": 0.3, "selftrain/AP50_novel_delta": 0.0655},
    }
    for rel, m in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(json.dumps(m))
    return files


def _block(text):
    return text.split("<!-- results:start -->\n", 1)[1].split("<!-- results:end -->", 1)[0]


def test_publish_fills_the_readme_block_and_results_from_metrics(tmp_path):
    """The README's marked block becomes ONE table whose numbers are the metrics files' numbers
    (change a file, the table follows); the text outside the block is kept; docs/results.md holds
    every table of the report."""
    from distill.report.report import publish

    work = tmp_path / "w"
    cfg = load_config(None, [f"work_dir={work}"])
    files = _finished_run(work)
    readme, results = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    readme.write_text(README)
    written = publish(cfg, readme, results, timings={"world": 1.0, "det": 2.5})
    assert written == [work / "report.md", readme, results]
    text = readme.read_text()
    assert text.split("<!-- results:start -->")[0] == README.split("<!-- results:start -->")[0]
    assert text.split("<!-- results:end -->")[1] == README.split("<!-- results:end -->")[1]
    block = _block(text)
    assert "make demo to fill" not in block
    table_lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    assert table_lines[0] == "| model | metric | base | novel | all |" and sum(ln.startswith("|---") for ln in table_lines) == 1  # one table
    vild = files["det/vild/metrics.json"]
    assert f"| ViLD (text + image distillation) | box AP50 | {100 * vild['bbox/AP50_base']:.1f} | {100 * vild['bbox/AP50_novel']:.1f} | 45.0 |" in block
    assert "| ViLD-text | box AP50 | 52.0 | 11.1 | 40.0 |" in block
    assert "| Teacher, zero-shot (GT crops) | top-1 | 70.0 | 40.0 | 61.0 |" in block
    assert "| LSeg + MaskCLIP distillation | mIoU | 50.0 | 25.0 | 40.0 |" in block
    assert "LSeg (base masks)" not in block  # no metrics file, no row
    # the numbers come from metrics.json: change the file, publish again, the row follows
    (work / "det/vild/metrics.json").write_text(json.dumps({**vild, "bbox/AP50_novel": 0.3456}))
    publish(cfg, readme)
    assert "| ViLD (text + image distillation) | box AP50 | 50.0 | 34.6 | 45.0 |" in _block(readme.read_text())
    assert readme.read_text().count("<!-- results:start -->") == 1
    # docs/results.md: every table of the report, no figures
    res = results.read_text()
    for head in ("## Teacher (zero-shot)", "## Detection", "## Segmentation (val)", "## CAM refinement", "## Pseudo-labels", "## Self-training", "## Stage timings"):
        assert head in res, head
    delta = files["selftrain/metrics.json"]["selftrain/AP50_novel_delta"]
    assert f"| vild | {100 * vild['bbox/AP50_novel']:.1f} | 50.0 | 45.0 |" in res and f"| selftrain/AP50_novel_delta | {100 * delta:+.1f} |" in res
    assert "| det | 2.5 |" in res and "| total | 3.5 |" in res and "![" not in res


def test_publish_refuses_a_readme_without_the_block(tmp_path):
    from distill.errors import DistillError
    from distill.report.report import publish

    work = tmp_path / "w"
    cfg = load_config(None, [f"work_dir={work}"])
    _finished_run(work)
    readme, results = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text("# project\n\nno markers\n")
    with pytest.raises(DistillError, match="no '<!-- results:start -->'"):
        publish(cfg, readme, results)
    assert readme.read_text() == "# project\n\nno markers\n" and not results.exists() and not (work / "report.md").exists()
    empty = load_config(None, [f"work_dir={tmp_path / 'empty'}"])
    readme.write_text(README)
    with pytest.raises(DistillError, match="no metrics files of a finished run"):
        publish(empty, readme)
    assert readme.read_text() == README
