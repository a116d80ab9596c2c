"""configs/coco/pipeline_ovcoco.yaml, the real OV-COCO run, wired end to end on a tiny COCO-format
fixture: the config file as written, with its local paths pointed at the fixture, a random
``distill-tiny-vit`` saved as a weights file in place of ViT-B/32, and tiny model sizes / step counts
(the TINY overrides of tests/detection/test_configs.py). Every listed stage runs through
``run_pipeline``; a rerun skips them all; a missing local file is a one-line error before any
stage starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from detection.test_configs import TINY, make_fixture
from distill.config import load_config
from distill.errors import DistillError
from distill.report.tables import fmt as _fmt
from distill.pipeline.run import run_pipeline
from reliability._fixtures import cli_error

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs/coco/pipeline_ovcoco.yaml"
VOCAB = REPO / "configs/vocab/coco_48_17.json"


def _manifests(work) -> dict:
    """Each stage manifest -> (inode, bytes). A stage that runs again rewrites its manifest through
    an atomic rename (a new file: another inode, another wall time), so equal before and after a
    rerun means no stage ran again, whatever the machine's speed."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted((Path(work) / "manifests").glob("*.json"))}


def _tiny_clip_weights(path: Path) -> Path:
    """A seeded random ``distill-tiny-vit`` state dict as .safetensors: what
    /data/weights/open_clip_vit_b32.safetensors is to ``ViT-B-32``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from distill.teacher.clip import register_model_configs

    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("distill-tiny-vit", device="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _coco(root: Path) -> dict:
    """train / val jsons over the 65 OV-COCO categories (no split field: the vocabulary file has
    it), objects of person and car (base) and airplane and bus (novel), and an unlabeled folder."""
    entries = json.loads(VOCAB.read_text())
    cats = [{"id": e["id"], "name": e["name"], "supercategory": ""} for e in entries]
    files = make_fixture(root, cats, [1, 3, 5, 6])
    unl = root / "images" / "unlabeled2017"
    unl.mkdir(parents=True)
    for i, p in enumerate(sorted((root / "images" / "val").glob("*.png"))):
        shutil.copyfile(p, unl / f"u{i:03d}.png")
    files["unlabeled"] = unl
    files["weights"] = _tiny_clip_weights(root / "weights" / "tiny_clip.safetensors")
    return files


def _overrides(tmp_path: Path, files: dict) -> list[str]:
    root = tmp_path / "coco"
    return [
        f"work_dir={tmp_path / 'run'}",
        f"data.image_root={root / 'images'}",
        f"data.train_json={files['train']}",
        f"data.train_full_json={files['train']}",
        f"data.val_json={files['val']}",
        f"data.vocab={VOCAB}",
        "teacher.model=distill-tiny-vit",
        f"teacher.pretrained={files['weights']}",
        "teacher.dense_image_size=64",
        "teacher.device=cpu",
        f"label.images={files['unlabeled']}",
        "label.num_workers=0",
        "label.score_thresh=0.0",  # a random student scores low: keep its boxes to check them
        *TINY,
    ]


@pytest.mark.slow
def test_ovcoco_pipeline_runs_every_listed_stage_then_skips(tmp_path):
    files = _coco(tmp_path / "coco")
    overrides = _overrides(tmp_path, files)
    listed = list(load_config(CONFIG).pipeline.stages)
    assert "world" not in listed and {"teacher", "det", "label", "report"} <= set(listed)
    cfg = load_config(CONFIG, overrides)
    assert cfg.pretrain.steps == 0 and cfg.det.inference == "ensemble" and cfg.label.gt == ""
    work = Path(cfg.work_dir)

    res = run_pipeline(str(CONFIG), overrides)
    assert [r.name for r in res] == listed
    assert all(r.status == "ran" for r in res), [(r.name, r.status) for r in res]
    for name in listed:
        m = json.loads((work / "manifests" / f"{name}.json").read_text())
        assert m["key"] and m["stage"] == name

    # teacher: the given weights were evaluated, not pretrained; MaskCLIP is absent, not a number
    tm = json.loads((work / "teacher" / "metrics.json").read_text())
    assert not (work / "teacher" / "teacher.safetensors").exists()
    assert 0.0 <= tm["zeroshot/top1_ens"] <= 1.0 and tm["zeroshot/num_objects"] == 4
    assert tm["zeroshot/top1_ens_novel"] >= 0.0 and tm["zeroshot/top1_ens_base"] >= 0.0  # split from the vocab file
    assert "maskclip/absent" in tm and not any(k.startswith("maskclip/miou") for k in tm)

    # detection: ViLD-text, ViLD, ensemble; generalized evaluation over base + novel ids
    vocab = json.loads(VOCAB.read_text())
    novel_ids = {e["id"] for e in vocab if e["split"] == "novel"}
    base_ids = {e["id"] for e in vocab if e["split"] == "base"}
    det = {}
    for name in ("vild_text", "vild", "vild_ensemble"):
        det[name] = json.loads((work / "det" / name / "metrics.json").read_text())
        for k in ("bbox/AP50_base", "bbox/AP50_novel", "bbox/AP50"):
            v = det[name][k]
            assert 0.0 <= v <= 1.0, (name, k, v)  # NaN fails
        cats = {r["category_id"] for r in json.loads((work / "det" / name / "results_val.json").read_text())}
        assert cats & novel_ids and cats & base_ids and cats <= novel_ids | base_ids, name

    # pseudo-labels of the unlabeled folder by the ViLD student; no ground truth, so no quality
    labels = json.loads((work / "labels" / "unlabeled" / "labels.json").read_text())
    assert len(labels["images"]) == 2 and labels["info"]["source"] == "vild" and labels["annotations"]
    assert {c["name"] for c in labels["categories"]} <= {e["name"] for e in vocab}
    assert not (work / "labels" / "unlabeled" / "metrics.json").exists()

    # the report's numbers are the metrics files' numbers
    report = (work / "report.md").read_text()
    for name, m in det.items():
        assert f"| {name} | {_fmt(m['bbox/AP50_novel'])} | {_fmt(m['bbox/AP50_base'])} | {_fmt(m['bbox/AP50'])} |" in report, name
    assert f"| zeroshot/top1_ens | {_fmt(tm['zeroshot/top1_ens'])} |" in report
    assert "Vocabulary: 65 classes, 17 novel" in report
    assert "MaskCLIP pixel mIoU: not measured" in report
    assert f"{len(labels['images'])} images, {len(labels['annotations'])} boxes" in report

    # a rerun skips every stage
    before = _manifests(work)
    again = run_pipeline(str(CONFIG), overrides)
    assert [r.status for r in again] == ["skipped"] * len(listed)
    assert _manifests(work) == before and before  # no stage reran (its manifest would be a new file)


@pytest.mark.parametrize(
    "key,missing",
    [("label.images", "coco/images/unlabeled2017_missing"), ("data.val_json", "coco/instances_val_missing.json"), ("teacher.pretrained", "weights/vit_b32_missing.safetensors")],
)
def test_missing_local_file_is_a_one_line_error_before_any_stage(tmp_path, capsys, key, missing):
    files = {
        "train": tmp_path / "coco" / "train.json",
        "val": tmp_path / "coco" / "val.json",
        "unlabeled": tmp_path / "coco" / "images" / "unlabeled2017",
        "weights": tmp_path / "weights" / "tiny.safetensors",
    }
    for k in ("train", "val", "weights"):
        files[k].parent.mkdir(parents=True, exist_ok=True)
        files[k].write_text("{}")
    files["unlabeled"].mkdir(parents=True)
    overrides = _overrides(tmp_path, files) + [f"{key}={tmp_path / missing}"]
    with pytest.raises(DistillError, match=f"^{key}: .*{Path(missing).name} not found"):
        run_pipeline(str(CONFIG), overrides)
    line = cli_error(capsys, ["run", str(CONFIG), *overrides])
    assert key in line and str(tmp_path / missing) in line
    assert not (tmp_path / "run").exists()  # nothing ran: checked before the first stage
