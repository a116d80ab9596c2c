"""The real configs, as written, end to end on real-format fixtures (tests/realdata.py: real photos in
the COCO / LVIS / VOC / plain-folder layouts) with FULL-SIZE architectures at random init: the
teacher is a random ViT-B/32 in OpenAI's TorchScript format (tests/checkpoints.py, loaded through
``teacher.model=ViT-B-32-quickgelu teacher.pretrained=<archive>`` as the configs do), the detector
an R50-FPN from scratch. Only what makes a CPU run slow is shrunk: steps, batch size (lr scaled
linearly), image size, proposals / regions, teacher batch sizes, workers, precision.

Every test is ``slow`` and takes at most ~3 minutes on 2 CPU cores (the archive is made once per
module)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import realdata
from checkpoints import VIT_B32, VIT_B32_TEXT, make_openai_archive

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _manifests(work) -> dict:
    """Each stage manifest -> (inode, bytes). A stage that runs again rewrites its manifest through
    an atomic rename (a new file: another inode, another wall time), so equal before and after a
    rerun means no stage ran again, whatever the machine's speed."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted((Path(work) / "manifests").glob("*.json"))}


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory) -> Path:
    """A random ViT-B/32 (QuickGELU, fp16 weights) as OpenAI's ``ViT-B-32.pt`` TorchScript archive."""
    archive, _ = make_openai_archive(tmp_path_factory.mktemp("weights"), VIT_B32, VIT_B32_TEXT, embed_dim=512, name="ViT-B-32.pt")
    return archive


@pytest.fixture(scope="module")
def one_template(tmp_path_factory) -> Path:
    """The first template of the ViLD configs' distill/prompts/vild.txt alone ("There is {article}
    {} in the scene."): its 63 templates x 65 classes cost minutes of the ViT-B/32 text tower on
    2 CPU cores."""
    from distill.teacher.text import load_templates

    path = tmp_path_factory.mktemp("prompts") / "one.txt"
    path.write_text(load_templates(REPO / "distill/prompts/vild.txt")[0] + "\n", encoding="utf-8")
    return path


def _finite_in(v, lo=-1.0, hi=1.0) -> bool:
    """A metric value: a number in [lo, hi], or NaN / -1 for 'no ground truth of that kind'."""
    return isinstance(v, (int, float)) and (v != v or lo <= v <= hi)


# shrink what is slow on CPU; architectures (R50-FPN, ViT-B/32) stay as configured
CPU_DET = [
    "det.pretrained_backbone=",
    "det.min_size=256",
    "det.max_size=256",  # min = max: the lsj canvas
    "det.rpn_pre_nms_train=200",
    "det.rpn_post_nms_train=100",
    "det.rpn_pre_nms_test=200",
    "det.rpn_post_nms_test=50",
    "det.roi_batch_size=64",
    "det.num_image_distill=10",
    "det.ensemble_candidates=10",
    "det.train.max_steps=2",
    "det.train.batch_size=2",
    "det.train.lr=0.0025",  # 0.32 is for 256 images a step (linear scaling rule)
    "det.train.precision=fp32",
    "det.train.checkpoint_period=0",
    "det.train.eval_period=0",
    "det.train.log_period=1",
    "proposals.top_k=10",
    "proposals.batch_size=2",
    "proposals.train.max_steps=2",
    "proposals.train.batch_size=2",
    "proposals.train.precision=fp32",
    "proposals.train.checkpoint_period=0",
    "regions.max_proposals=10",
    "data.num_workers=0",
    "teacher.precision=fp32",
    "teacher.batch_size=16",
    "teacher.device=cpu",
]


# --------------------------------------------------------------------------------------------
# 1. configs/coco/pipeline_ovcoco.yaml: every listed stage through run_pipeline


OVCOCO = REPO / "configs/coco/pipeline_ovcoco.yaml"


def test_ovcoco_pipeline_on_real_coco_layout(tmp_path, vit_b32, one_template):
    from distill.config import load_config
    from distill.report.tables import fmt as _fmt
    from distill.pipeline.run import run_pipeline

    coco = realdata.make_coco(tmp_path / "coco")
    work = tmp_path / "run"
    overrides = [
        f"work_dir={work}",
        f"data.image_root={coco['image_root']}",
        f"data.train_json={coco['train_json']}",
        f"data.train_full_json={coco['train_json']}",
        f"data.val_json={coco['val_ov65_json']}",
        f"data.vocab={coco['vocab']}",
        "teacher.model=ViT-B-32-quickgelu",
        f"teacher.pretrained={vit_b32}",
        f"label.images={coco['unlabeled']}",
        "label.num_workers=0",
        "label.batch_size=2",
        "label.score_thresh=0.0",  # a random student scores low: keep its boxes to check them
        f"teacher.templates={one_template}",
        *CPU_DET,
    ]
    listed = list(load_config(OVCOCO).pipeline.stages)
    assert listed == ["teacher", "text", "propose", "regions", "det_text", "det", "label", "report"]
    cfg = load_config(OVCOCO, overrides)
    assert cfg.det.backbone == "resnet50_fpn" and cfg.det.augment == "lsj" and cfg.teacher.dense_image_size == 224

    res = run_pipeline(str(OVCOCO), overrides)
    assert [r.name for r in res] == listed
    assert all(r.status == "ran" for r in res), [(r.name, r.status) for r in res]
    for name in listed:
        m = json.loads((work / "manifests" / f"{name}.json").read_text())
        assert m["key"] and m["stage"] == name

    # teacher: the archive evaluated as given (no pretraining); zero-shot top-1 of the val GT boxes
    tm = json.loads((work / "teacher" / "metrics.json").read_text())
    assert not (work / "teacher" / "teacher.safetensors").exists()
    val = json.loads(Path(coco["val_ov65_json"]).read_text())
    for k in ("zeroshot/top1_ens", "zeroshot/top1_ens_base", "zeroshot/top1_ens_novel"):
        assert 0.0 <= tm[k] <= 1.0, (k, tm[k])
    assert tm["zeroshot/num_objects"] == sum(1 for a in val["annotations"] if not a.get("iscrowd"))
    assert "maskclip/absent" in tm and not any(k.startswith("maskclip/miou") for k in tm)

    # text embeddings of the 65 classes; proposals; region embeddings
    assert list((work / "embeddings" / "text").glob("*.safetensors"))
    assert [p for p in (work / "proposals" / "rpn").rglob("*") if p.is_file()]
    assert [p for p in (work / "embeddings" / "regions").rglob("*") if p.is_file()]

    # detection: ViLD-text, ViLD, ensemble; generalized evaluation over base + novel ids
    vocab = json.loads(Path(coco["vocab"]).read_text())
    novel_ids = {e["id"] for e in vocab if e["split"] == "novel"}
    base_ids = {e["id"] for e in vocab if e["split"] == "base"}
    det = {}
    for name in ("vild_text", "vild", "vild_ensemble"):
        d = work / "det" / name
        det[name] = m = json.loads((d / "metrics.json").read_text())
        for k in ("bbox/AP50_base", "bbox/AP50_novel", "bbox/AP50", "bbox/AP"):
            assert k in m and _finite_in(m[k]), (name, k, m.get(k))
        assert all(_finite_in(v, -1.0, 1e9) for v in m.values() if isinstance(v, float)), (name, m)
        results = json.loads((d / "results_val.json").read_text())
        assert results, name
        cats = {r["category_id"] for r in results}
        assert cats <= novel_ids | base_ids, name
        assert all(math.isfinite(r["score"]) and len(r["bbox"]) == 4 for r in results)
    assert (work / "det" / "vild_text" / "model_final.pt").exists() and (work / "det" / "vild" / "model_final.pt").exists()

    # pseudo-labels of unlabeled2017 (the rocket) by the ViLD student; no ground truth, no quality
    labels = json.loads((work / "labels" / "unlabeled" / "labels.json").read_text())
    assert len(labels["images"]) == len(list(Path(coco["unlabeled"]).iterdir())) and labels["info"]["source"] == "vild"
    assert {c["name"] for c in labels["categories"]} <= {e["name"] for e in vocab}
    for a in labels["annotations"]:
        assert len(a["bbox"]) == 4 and all(math.isfinite(x) for x in a["bbox"]) and 0.0 <= a["score"] <= 1.0
    assert not (work / "labels" / "unlabeled" / "metrics.json").exists()

    # the report's numbers are the metrics files' numbers
    report = (work / "report.md").read_text()
    for name, m in det.items():
        assert f"| {name} | {_fmt(m['bbox/AP50_novel'])} | {_fmt(m['bbox/AP50_base'])} | {_fmt(m['bbox/AP50'])} |" in report, name
    assert f"| zeroshot/top1_ens | {_fmt(tm['zeroshot/top1_ens'])} |" in report
    assert "Vocabulary: 65 classes, 17 novel" in report

    # a rerun skips every stage
    before = _manifests(work)
    again = run_pipeline(str(OVCOCO), overrides)
    assert [r.status for r in again] == ["skipped"] * len(listed)
    assert _manifests(work) == before and before  # no stage reran (its manifest would be a new file)


# --------------------------------------------------------------------------------------------
# 2. configs/lvis/vild_r50.yaml: propose + train det + LVIS federated evaluation


LVIS = REPO / "configs/lvis/vild_r50.yaml"


def test_lvis_vild_on_real_lvis_layout(tmp_path, vit_b32, one_template):
    from distill.config import load_config
    from distill.detection.proposals import load_proposals, proposals_dir, run_proposals
    from distill.detection.train import det_dir, train_detector
    from distill.vocab import resolve_vocab

    lv = realdata.make_lvis(tmp_path / "lvis")
    cfg = load_config(LVIS, [
        f"work_dir={tmp_path / 'run'}",
        f"data.image_root={lv['image_root']}",
        f"data.train_json={lv['train_json']}",
        f"data.train_full_json={lv['train_json']}",
        f"data.val_json={lv['val_json']}",
        f"data.vocab={lv['train_json']}",
        "teacher.model=ViT-B-32-quickgelu",
        f"teacher.pretrained={vit_b32}",
        f"teacher.templates={one_template}",
        *CPU_DET,
    ])
    assert cfg.det.backbone == "resnet50_fpn" and cfg.det.masks and cfg.det.augment == "lsj"
    assert cfg.det.detections_per_img == 300

    # the vocabulary: the file's categories, rare = novel, prompts without underscores
    vocab = resolve_vocab(cfg.data, need_base=True)
    train = json.loads(Path(lv["train_json"]).read_text())
    rare = {c["name"] for c in train["categories"] if c["frequency"] == "r"}
    assert rare and {vocab.names[i] for i in vocab.novel_indices} == rare
    assert len(vocab) == len(train["categories"])
    assert all("_" not in p for prompts in vocab.prompts for p in prompts), vocab.prompts

    m_prop = run_proposals(cfg, progress=False)
    props, _ = load_proposals(proposals_dir(cfg) / "proposals_train.safetensors")
    assert len(props) == len(train["images"]) and all(len(b) <= cfg.proposals.top_k for b, _ in props.values())
    assert 0.0 <= m_prop[f"recall@{cfg.proposals.top_k}/all"] <= 1.0

    metrics = train_detector(cfg, progress=False)
    out = det_dir(cfg)
    assert (out / "model_final.pt").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["step"] == 2
    for task in ("bbox", "segm"):  # det.masks: true -> mask AP too
        for k in ("AP", "AP50", "AP_r", "AP_c", "AP_f", "AP_novel", "AP_base"):
            key = f"{task}/{k}"
            assert key in saved and _finite_in(saved[key]), (key, saved.get(key))
    assert saved["bbox/AP_r"] == metrics["bbox/AP_r"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss_mask" in rows[0] and all(math.isfinite(v) for v in rows[0].values() if isinstance(v, float))
    # the federated protocol: at most 300 detections per image, only vocabulary ids
    res = json.loads((out / "results_val.json").read_text())
    assert res
    per_image: dict[int, int] = {}
    for r in res:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 300
    assert {r["category_id"] for r in res} <= set(vocab.ids)
    assert all("segmentation" in r for r in res)


# --------------------------------------------------------------------------------------------
# 3. configs/voc/clip_es.yaml: `distill cam` (CLIP-ES) on the VOC2012 layout with a ViT-B/16 archive


CLIP_ES = REPO / "configs/voc/clip_es.yaml"


def _crf_installed() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def _distill() -> str:
    return shutil.which("distill") or str(Path(sys.executable).parent / "distill")


def test_clip_es_cam_on_real_voc_layout(tmp_path):
    from PIL import Image, ImageOps

    from distill.config import load_config

    voc = realdata.make_voc(tmp_path / "voc")
    # OpenAI's ViT-B/16 (QuickGELU) as the config names it: ViT-B-16-quickgelu, a TorchScript archive
    b16, _ = make_openai_archive(tmp_path / "weights", dict(image_size=224, patch_size=16, width=768, layers=12), VIT_B32_TEXT,
                                 embed_dim=512, name="ViT-B-16.pt")
    out = tmp_path / "cam"
    overrides = [
        f"work_dir={tmp_path / 'run'}",
        f"teacher.pretrained={b16}",
        "teacher.device=cpu",
        f"data.image_root={voc['images']}",
        f"data.semantic_root={voc['masks']}",
        f"cam.out={out}",
        f"cam.background={REPO / 'distill/prompts/background_voc.txt'}",
        f"cam.crf={str(_crf_installed()).lower()}",
    ]
    cfg = load_config(CLIP_ES, overrides)
    assert cfg.teacher.model == "ViT-B-16-quickgelu" and cfg.cam.resize == "patch_multiple" and cfg.cam.caa_layers == 8
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    p = subprocess.run([_distill(), "cam", str(CLIP_ES), "--images", str(voc["images"]), "--labels", str(voc["train_labels"]), *overrides],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    labels = json.loads(Path(voc["train_labels"]).read_text())
    summary = json.loads((out / f"summary_{Path(voc['images']).name}.json").read_text())
    assert summary["processed"] == len(labels) and summary["skipped_no_labels"] == 0
    assert 0.0 <= summary["ignored_fraction"] <= 1.0
    masks = sorted((out / "masks").rglob("*.png"))
    assert {m.stem for m in masks} == {Path(e["file_name"]).stem for e in labels}
    for e in labels:
        m = next(x for x in masks if x.stem == Path(e["file_name"]).stem)
        arr = np.asarray(Image.open(m))
        w, h = ImageOps.exif_transpose(Image.open(voc["images"] / e["file_name"])).size  # chelsea: EXIF 6
        assert arr.shape == (h, w), (m, arr.shape)
        vals = set(np.unique(arr).tolist())
        assert vals <= {0, 255, *e["category_ids"]}, (m, vals)  # background, ignore, the image's own classes
    assert len(list((out / "seeds").rglob("*.npz"))) == len(labels)

    # the ablation / evaluation on the flat VOC layout: split = the val labels json, GT = SegmentationClass/{stem}.png
    p = subprocess.run([_distill(), "ablate", "cam", str(CLIP_ES), "--images", "val", *overrides, f"cam.labels={voc['val_labels']}"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "val" and m["images"] == len(json.loads(Path(voc["val_labels"]).read_text()))
    for k in ("cam/miou_gradcam", "cam/miou_final", "cam/ignored_fraction"):
        assert 0.0 <= m[k] <= 1.0, (k, m[k])
    assert {r["step"] for r in m["rows"]} >= {"gradcam", "softmax_gradcam", "caa", "conf_ignore"}


# --------------------------------------------------------------------------------------------
# 4. `distill label` on a plain photo folder with the OpenAI ViT-B/32 teacher (no detector)


def test_label_photo_folder_with_openai_teacher(tmp_path, vit_b32, one_template):
    from PIL import Image

    folder = realdata.make_photo_folder(tmp_path / "data")
    vocab_file, gt = folder.parent / "vocab.txt", folder.parent / "gt.json"
    out = tmp_path / "labels"
    outside = tmp_path / "elsewhere"  # not the repository: no relative config path may be needed
    outside.mkdir()
    words = [w for w in vocab_file.read_text().splitlines() if w]
    cmd = [
        _distill(), "label", "--images", str(folder), "--vocab", str(vocab_file), "--model", "teacher", "--source", "teacher",
        "--out", str(out), "--format", "coco,yolo,png", "--gt", str(gt), "--score-thresh", "0.0", "--batch-size", "2",
        "teacher.model=ViT-B-32-quickgelu", f"teacher.pretrained={vit_b32}", "teacher.device=cpu", "teacher.precision=fp32",
        f"teacher.templates={one_template}",
        # photos have no saturated-colour components (the shapes world's candidates): sliding windows
        "label.proposals=windows", "label.max_proposals=20",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    p = subprocess.run(cmd, cwd=outside, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    gt_json = json.loads(gt.read_text())
    labels = json.loads((out / "labels.json").read_text())
    assert sorted(i["file_name"] for i in labels["images"]) == sorted(i["file_name"] for i in gt_json["images"])
    assert [c["name"] for c in sorted(labels["categories"], key=lambda c: c["id"])] == words
    assert labels["annotations"]
    size = {i["id"]: (i["width"], i["height"]) for i in labels["images"]}
    for i in labels["images"]:  # EXIF-upright sizes, as the ground truth
        g = next(x for x in gt_json["images"] if x["file_name"] == i["file_name"])
        assert (i["width"], i["height"]) == (g["width"], g["height"]), i["file_name"]
    for a in labels["annotations"]:
        x, y, w, h = a["bbox"]
        W, H = size[a["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W + 1e-3 and y + h <= H + 1e-3, a
        assert 0.0 <= a["score"] <= 1.0
    # YOLO txt and semantic PNGs
    yolo = [q for q in out.rglob("*.txt") if q.name != "classes.txt"]
    assert yolo
    for q in yolo:
        for line in q.read_text().splitlines():
            c, *xywh = line.split()
            assert 0 <= int(c) < len(words) and all(0.0 <= float(v) <= 1.0 for v in xywh[:4]), (q, line)
    pngs = sorted(out.rglob("*.png"))
    assert pngs
    for q in pngs:
        if q.name == "legend.png":  # the colour swatches, not a label map
            continue
        arr = np.asarray(Image.open(q))
        assert arr.ndim == 2 and int(arr.max()) <= max(len(words), 255)
    # label quality against the hidden ground truth
    m = json.loads((out / "metrics.json").read_text())
    q = {k: v for k, v in m.items() if k.startswith("labels/")}
    assert "labels/precision_all" in q and "labels/recall_all" in q, sorted(m)
    assert all(_finite_in(v, -1.0, 1e9) for v in q.values() if isinstance(v, float)), q  # -1: no ground truth of that split
