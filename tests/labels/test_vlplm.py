"""VL-PLM pseudo-labels (distill/labels/vlplm.py) pinned to the reference (github xiaofeng94/VL-PLM,
tools/gen_PLs.py + tools/utils.py): the fused score, the threshold and NMS, the RoI head applied
``--roi_num`` times, the 1x + 1.5x crops with the CLIP softmax at temperature 0.01, the 5 px rule;
and ``distill label --source vlplm`` on a tiny checkpoint, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.errors import DistillError
from distill.labels.filtering import FilterOptions, filter_predictions, source_thresholds
from distill.labels.vlplm import fuse_scores
from distill.vocab import load_vocab

DET = ["det.min_size=48", "det.max_size=48", "det.detections_per_img=20", "det.backbone=resnet18_fpn"]
VOCAB = "red square, blue circle, green cross"


def test_fused_score_threshold_and_nms_are_the_references():
    """gen_PLs.py: rpnScore * lamda + clipScores * (1 - lamda), lamda 0.5; kept above --thres 0.8,
    then class-wise NMS at --nms_thres 0.6 (the labeler's filter, with the source's defaults)."""
    rpn = torch.tensor([0.9, 0.6, 0.99, 0.95])
    clip = torch.tensor([0.8, 0.95, 0.9, 0.7])
    fused = fuse_scores(rpn, clip)
    torch.testing.assert_close(fused, torch.tensor([0.85, 0.775, 0.945, 0.825]))
    torch.testing.assert_close(fuse_scores(rpn, clip, 0.3), 0.3 * rpn + 0.7 * clip)  # --lamda 0.3
    assert source_thresholds("vlplm", None, None) == (0.8, 0.6)
    assert source_thresholds("teacher", None, None) == (0.3, 0.5)  # the other sources keep theirs
    assert source_thresholds("vlplm", 0.5, 0.0) == (0.5, 0.0)  # a value given wins
    # a, b: same class at IoU 0.71 (> 0.6): b goes; c: a's box, another class: stays; d: under 0.8;
    # e, f: same class at IoU 0.54: both stay (the other sources' NMS 0.5 would drop f)
    boxes = torch.tensor([[0, 0, 20, 20], [2, 2, 22, 21], [0, 0, 20, 20], [40, 40, 60, 60], [40, 0, 60, 20], [46, 0, 66, 20]],
                         dtype=torch.float32)
    pred = {"boxes": boxes, "scores": torch.tensor([0.945, 0.85, 0.825, 0.775, 0.9, 0.88]), "labels": torch.tensor([0, 0, 1, 0, 0, 0])}
    s, n = source_thresholds("vlplm", None, None)
    kept = filter_predictions(pred, FilterOptions(score_thresh=s, nms=n, min_area=0, top_k=100), 2)
    assert kept["boxes"].tolist() == [[0, 0, 20, 20], [40, 0, 60, 20], [46, 0, 66, 20], [0, 0, 20, 20]]
    assert kept["labels"].tolist() == [0, 0, 0, 1]
    assert len(filter_predictions(pred, FilterOptions(score_thresh=s, nms=0.5, min_area=0), 2)["scores"]) == 3


def test_config_defaults_are_the_references():
    """gen_PLs.py: --roi_num 10, --lamda 0.5, pp_topK 100; the thresholds are left to the source."""
    from distill.config import load_config

    lc = load_config(None).label
    assert (lc.refine_steps, lc.rpn_weight, lc.max_proposals, lc.score_thresh, lc.nms) == (10, 0.5, 100, None, None)


def _tiny_detector(embed_dim: int = 8):
    from distill.config import load_config
    from distill.detection.build import build_vild_detector

    cfg = load_config(None, DET)
    torch.manual_seed(0)
    return build_vild_detector(cfg.det, embed_dim, load_weights=False).eval()


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_refinement_applies_the_box_head_n_times(steps):
    """A box regression fixed to dx = 0.5 (box coder weight 10: a shift of 0.05 x the box width):
    after N passes every box has moved N times, each by 0.05 of its (unchanged) width; the
    objectness stays the RPN's."""
    model = _tiny_detector()
    bp = model.roi_heads.box_predictor.bbox_pred
    with torch.no_grad():
        bp.weight.zero_()
        bp.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    img = torch.rand(3, 48, 48)
    (b0, s0), = model.scored_proposals([img], 20)
    (bn, sn), = model.scored_proposals([img], 20, refine_steps=steps)
    assert len(b0) > 0
    w = b0[:, 2] - b0[:, 0]
    shift = torch.stack([w, torch.zeros_like(w), w, torch.zeros_like(w)], 1) * 0.05 * steps
    torch.testing.assert_close(bn, b0 + shift, atol=1e-4, rtol=0)
    torch.testing.assert_close(sn, s0)
    assert float(s0.min()) >= 0 and float(s0.max()) <= 1  # sigmoid of the RPN logit
    # the RPN's settings are the call's only; propose() = the unrefined scored proposals
    before = model.rpn.nms_thresh, dict(model.rpn._post_nms_top_n)
    model.scored_proposals([img], 5, rpn_nms=0.3, rpn_post_nms=1000)
    assert (model.rpn.nms_thresh, model.rpn._post_nms_top_n) == before
    torch.testing.assert_close(model.propose([img], 20)[0], b0)


class _StubDetector(torch.nn.Module):
    """scored_proposals -> fixed boxes and objectness; records its arguments."""

    def __init__(self, boxes, scores):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.boxes, self.scores, self.calls = boxes, scores, []

    def scored_proposals(self, images, k, refine_steps=0, rpn_nms=None, rpn_post_nms=None):
        self.calls.append({"k": k, "refine_steps": refine_steps, "rpn_nms": rpn_nms, "rpn_post_nms": rpn_post_nms})
        return [(self.boxes.clone(), self.scores.clone())]


@pytest.fixture(scope="module")
def teacher():
    from distill.config import load_config
    from distill.teacher.clip import build_teacher

    torch.manual_seed(0)
    return build_teacher(load_config(None, ["teacher.pretrained=", "teacher.device=cpu"]).teacher)


def test_source_crops_softmax_min_side_and_fusion(teacher, monkeypatch):
    """The whole source on a stub detector: the reference's proposal settings reach the detector
    (top 100, 10 RoI passes, RPN NMS 0.3, 1000 after NMS); boxes are clipped and those under 5 px a
    side dropped; crops at 1x and 1.5x; softmax of cos / 0.01 over the vocabulary alone (no
    background prompt); score = 0.5 RPN + 0.5 CLIP."""
    import distill.teacher.regions as regions
    from distill.labels.vlplm import VLPLMSource
    from distill.teacher.text import text_embeddings

    vocab = load_vocab(VOCAB)
    boxes = torch.tensor([[-4, 2, 20, 30], [10, 10, 14, 40], [30, 5, 70, 40], [50, 50, 56, 56]], dtype=torch.float32)
    det = _StubDetector(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6]))
    src = VLPLMSource(teacher, vocab, det)
    seen = {}
    emb = torch.nn.functional.normalize(torch.randn(2, teacher.embed_dim), dim=1)

    def fake(t, images, bxs, mode="crop", scales=(1.0, 1.5), **kw):
        seen.update(scales=tuple(scales), mode=mode, boxes=[b.cpu() for b in bxs])
        return [emb.to(t.device)]

    monkeypatch.setattr(regions, "region_embeddings", fake)
    out = src([torch.zeros(3, 48, 64, dtype=torch.uint8)])[0]
    assert det.calls == [{"k": 100, "refine_steps": 10, "rpn_nms": 0.3, "rpn_post_nms": 1000}]
    assert seen["scales"] == (1.0, 1.5) and seen["mode"] == "crop"
    # box 1 is 4 px wide, box 3 lies outside (clipped to 48 x 64 it is empty): dropped; the others clipped
    assert seen["boxes"][0].tolist() == [[0, 2, 20, 30], [30, 5, 64, 40]]
    assert out["boxes"].tolist() == [[0, 2, 20, 30], [30, 5, 64, 40]]
    text = text_embeddings(teacher, vocab, None).float()
    torch.testing.assert_close(src.text.cpu(), text)  # the vocabulary alone: no background row
    prob = (100.0 * emb @ text.T).softmax(-1)
    clip, labels = prob.max(1)
    assert out["labels"].tolist() == labels.tolist()
    torch.testing.assert_close(out["scores"], 0.5 * torch.tensor([0.9, 0.7]) + 0.5 * clip, atol=1e-5, rtol=0)


def test_bad_detector_is_a_one_line_error(tmp_path):
    """No checkpoint, a missing file, and the class-agnostic proposal network (torchvision's
    per-class regression: background + object) are refused naming label.model."""
    from distill.config import load_config
    from distill.detection.build import build_plain_detector
    from distill.engine.checkpoint import save_model
    from distill.labels.sources import build_source

    vocab = load_vocab(VOCAB)
    base = ["label.source=vlplm", "teacher.device=cpu"]
    with pytest.raises(DistillError, match=r"^label\.model: label\.source=vlplm needs the base detector's checkpoint"):
        build_source(load_config(None, base), vocab)
    with pytest.raises(DistillError, match=r"^label\.model: .*nothere\.pt: detector checkpoint not found"):
        build_source(load_config(None, [*base, f"label.model={tmp_path / 'nothere.pt'}"]), vocab)
    cfg = load_config(None, DET)
    save_model(tmp_path / "rpn.pt", build_plain_detector(cfg.det, 1, class_agnostic=True))
    with pytest.raises(DistillError, match=r"^label\.model: .*rpn\.pt: its box regression has 8 outputs") as e:
        build_source(load_config(None, [*base, f"label.model={tmp_path / 'rpn.pt'}"]), vocab)
    assert "\n" not in str(e.value)
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(DistillError, match=r"^label\.model: .*other\.pt: no RoI box head"):
        build_source(load_config(None, [*base, f"label.model={tmp_path / 'other.pt'}"]), vocab)
    from distill.labels.vlplm import VLPLMSource

    with pytest.raises(DistillError, match=r"^label\.refine_steps: expected >= 0"):
        VLPLMSource(None, vocab, None, refine_steps=-1)


def test_pipeline_label_stage_takes_the_vild_text_student():
    from distill.config import load_config
    from distill.pipeline.stages import build_pipeline, label_cfg

    cfg = load_config(None, ["label.source=vlplm", "work_dir=/w"])
    assert label_cfg(cfg).label.model == "/w/det/vild_text/model_final.pt"
    assert "det_text" in build_pipeline(cfg).stages["label"].deps
    assert "det_text" not in build_pipeline(load_config(None, ["label.source=vild"])).stages["label"].deps
    given = load_config(None, ["label.source=vlplm", "label.model=/x/det.pt"])
    assert label_cfg(given).label.model == "/x/det.pt" and "det_text" not in build_pipeline(given).stages["label"].deps


# ------------------------------------------------------------------------------------ the CLI
EXE = shutil.which("distill") or str(Path(sys.executable).parent / "distill")


@pytest.fixture(scope="module")
def world(vild_checkpoint_world):
    return vild_checkpoint_world


def test_cli_label_source_vlplm_writes_labels(world, tmp_path):
    out = tmp_path / "out"
    args = ["label", "--images", world / "imgs", "--vocab", VOCAB, "--source", "vlplm", "--model", world / "det" / "model_final.pt",
            "--out", out, "--score-thresh", "0", "--min-area", "0", "teacher.device=cpu", f"teacher.pretrained={world / 't.safetensors'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    coco = json.loads((out / "labels.json").read_text())
    assert coco["info"]["source"] == "vlplm" and coco["info"]["nms"] == 0.6  # NMS: the source's default
    assert len(coco["images"]) == 2 and coco["annotations"]
    for a in coco["annotations"]:
        assert 0.0 <= a["score"] <= 1.0 and a["bbox"][2] >= 5 and a["bbox"][3] >= 5
