"""The one-stage student (detection/one_stage.py, ZSD-YOLO's method on torchvision's FCOS): the
score is objectness x class probability, the text loss leaves self-labels out while objectness and
the image loss keep them, self-labels are chosen as documented, the vocabulary is an input, it
trains end to end with the teacher's box embeddings cached once, and a checkpoint of the other
architecture is one line through the installed command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.config import DetConfig
from distill.detection.one_stage import LOGIT_SCALE_INIT, OneStageHead, build_one_stage_detector, detection_logits, select_self_labels
from distill.errors import DistillError

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(arch="fcos", inference="text", backbone="resnet18_fpn", fpn_channels=32, returned_layers=(3, 4), min_size=64, max_size=64,
             objectness_thresh=0.0)  # random weights: every objectness is ~0.01 (the prior)


def test_score_is_objectness_times_class_probability():
    """ZSD-YOLO: confidence = objectness x softmax(cos x exp(t)); logit() of it goes to FCOS's
    post-processing, so its sigmoid must give the product back, finite at extreme values."""
    g = torch.Generator().manual_seed(0)
    obj = torch.randn(2, 7, 1, generator=g) * 6
    cls = torch.randn(2, 7, 4, generator=g) * 30
    got = torch.sigmoid(detection_logits(obj, cls))
    want = torch.sigmoid(obj) * torch.softmax(cls, -1)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    extreme = detection_logits(torch.tensor([[[40.0], [-40.0]]]), torch.tensor([[[0.0, 200.0], [0.0, -200.0]]]))
    assert torch.isfinite(extreme).all()


def test_class_logits_are_scaled_cosines():
    head = OneStageHead(32, embed_dim=8)
    text = F.normalize(torch.randn(3, 8), dim=1)
    head.text_embeddings = text
    emb = torch.randn(5, 8) * 7  # the norm of the embedding does not matter
    want = F.normalize(emb, dim=1) @ text.t() * float(np.exp(LOGIT_SCALE_INIT))
    assert torch.allclose(head.class_logits(emb), want, atol=1e-4)


def test_losses_on_a_hand_example():
    """Three locations: one on a base box of class 1 (with a teacher embedding), one on a
    self-label (class -1, teacher embedding), one on background. Text loss = CE of the first
    location alone; image loss = the mean L1 over the two boxed locations."""
    torch.manual_seed(0)
    d = 4
    head = OneStageHead(32, embed_dim=d, image_weight=0.5).train()
    head.text_embeddings = F.normalize(torch.randn(2, d), dim=1)
    emb = torch.randn(1, 3, d)
    teacher = F.normalize(torch.randn(2, d), dim=1)
    anchors = [torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8], [16, 0, 24, 8]])]
    targets = [{"boxes": torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8]]), "labels": torch.tensor([1, -1]), "box_embeddings": teacher}]
    outputs = {"cls_logits": torch.zeros(1, 3, 1), "embeddings": emb, "bbox_regression": torch.ones(1, 3, 4), "bbox_ctrness": torch.zeros(1, 3, 1)}
    losses = head.compute_loss(targets, outputs, anchors, [torch.tensor([0, 1, -1])])
    logits = F.normalize(emb[0, :1], dim=1) @ head.text_embeddings.t() * float(np.exp(LOGIT_SCALE_INIT))
    assert torch.allclose(losses["loss_text"], F.cross_entropy(logits, torch.tensor([1])), atol=1e-5)
    l1 = (F.normalize(emb[0, :2], dim=1) - teacher).abs().sum(1).mean()
    assert torch.allclose(losses["loss_image"], 0.5 * l1, atol=1e-6)
    # objectness: FCOS's focal loss with both boxed locations positive, normalised by 2
    from torchvision.ops import sigmoid_focal_loss

    want_obj = sigmoid_focal_loss(torch.zeros(3), torch.tensor([1.0, 1.0, 0.0]), reduction="sum") / 2
    assert torch.allclose(losses["loss_objectness"], want_obj, atol=1e-6)
    # no teacher embedding (zero rows) and no named box: the terms are 0 with a graph, never NaN
    targets[0]["box_embeddings"] = torch.zeros(2, d)
    targets[0]["labels"] = torch.tensor([-1, -1])
    losses = head.compute_loss(targets, outputs, anchors, [torch.tensor([0, 1, -1])])
    assert losses["loss_text"].item() == 0.0 and losses["loss_image"].item() == 0.0


def test_self_labels_are_confident_proposals_away_from_base_boxes():
    props = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70], [1, 1, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.4, 0.95, 0.99])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    # [0] and [4] overlap the base box (IoU 1, 0.81); [2] is below the score: [3], [1] remain, best first
    assert select_self_labels(props, scores, gt, 0.5, 0.3, 10).tolist() == [3, 1]
    assert select_self_labels(props, scores, gt, 0.5, 0.3, 1).tolist() == [3]
    assert select_self_labels(props, scores, torch.zeros(0, 4), 0.5, 0.3, 10).tolist() == [4, 3, 0, 1]


def test_vocabulary_is_an_input():
    torch.manual_seed(0)
    model = build_one_stage_detector(DetConfig(**SMALL), 16, torch.randn(2, 16)).eval()
    images = [torch.rand(3, 64, 64)]
    model.set_vocabulary(torch.randn(5, 16))
    with torch.no_grad():
        out = model(images)[0]
    assert out["labels"].max() <= 4 and out["labels"].max() >= 2  # the new classes are named
    assert not any("text_embeddings" in k for k in model.state_dict())  # no checkpoint holds a vocabulary
    with pytest.raises(DistillError, match="empty"):
        model.set_vocabulary(torch.zeros(0, 16))
    with pytest.raises(DistillError, match="outside the training vocabulary"):
        model.train()(images, [{"boxes": torch.tensor([[0.0, 0, 9, 9]]), "labels": torch.tensor([7])}])


def test_box_embeddings_move_with_the_flip():
    from distill.data.transforms import detection_train_transforms

    tf = detection_train_transforms(flip_p=1.0, scale=(1.0, 1.0), seed=0)
    t = {"boxes": np.array([[0, 0, 8, 8], [10, 10, 20, 20]], np.float32), "labels": np.array([1, -1]),
         "box_embeddings": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    _, out = tf(np.zeros((32, 32, 3), np.uint8), t)
    assert out["boxes"].tolist() == [[24, 0, 32, 8], [12, 10, 22, 20]]
    assert out["labels"].tolist() == [1, -1] and out["box_embeddings"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_one_stage_trains_end_to_end(tmp_path):
    from detection.test_configs import TINY, make_fixture

    from distill.config import load_config
    from distill.detection.proposals import proposals_dir, save_proposals
    from distill.detection.train import det_dir, train_detector
    from distill.files import sha256_file, sha256_json
    from distill.teacher.cache import EmbeddingCache
    from distill.teacher.clip import build_random_teacher

    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "green square", "split": "base"},
            {"id": 3, "name": "blue square", "split": "novel"}]  # two base classes: a text loss over one class is 0
    files = make_fixture(tmp_path / "d", cats, [1, 2, 3])
    cfg = load_config(REPO / "configs/shapes/one_stage.yaml", [
        f"work_dir={tmp_path / 'run'}", f"data.image_root={tmp_path / 'd' / 'images'}", f"data.train_json={files['train']}",
        f"data.train_full_json={files['train']}", f"data.val_json={files['val']}", *TINY, "det.self_labels=2", "det.num_image_distill=3"])
    data = json.loads(Path(files["train"]).read_text())
    ids = [int(im["id"]) for im in data["images"]]
    # proposals: a corner box far from the objects (a self-label), then one below the score
    boxes = [torch.tensor([[0.0, 0.0, 6.0, 6.0], [50.0, 50.0, 60.0, 60.0]]) for _ in ids]
    save_proposals(proposals_dir(cfg) / "proposals_train.safetensors", ids, boxes, [torch.tensor([0.9, 0.1]) for _ in ids])
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    m = train_detector(cfg, progress=False, teacher=teacher)
    out = det_dir(cfg)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss_image" in r][-1]
    for k in ("loss_objectness", "loss_box_giou", "loss_centerness", "loss_text", "loss_image"):
        assert k in last and np.isfinite(last[k]) and last[k] > 0, (k, last)
    assert 0.0 <= m["bbox/AP50"] <= 1.0 and "bbox/AP50_novel" in m
    assert 0.0 <= m["region/top1_base"] <= 1.0  # the student's zero-shot top-1 on GT boxes, as ViLD's
    # the teacher embedded every base box once, in annotation order
    from distill.detection.proposals import region_cache_key

    key = region_cache_key(teacher, "gt:" + sha256_file(files["train"]), 0, cfg.regions.mode, cfg.regions.scales)
    cache = EmbeddingCache(tmp_path / "run" / "embeddings" / "boxes" / sha256_json(key)[:16], key, readonly=True)
    per_image = {i: sum(1 for a in data["annotations"] if a["image_id"] == i) for i in ids}
    assert {i: cache.get(i).shape[0] for i in ids} == per_image
    ck = torch.load(out / "model_final.pt", weights_only=True)
    assert any(k.startswith("head.classification_head.embed") for k in ck.get("model", ck))
    # the self-label: the confident corner proposal (0.9) where no base box is, never the 0.1 one,
    # class -1, with the teacher's embedding of that proposal from the region cache
    from distill.detection.train import build_training_set
    from distill.vocab import resolve_vocab

    vocab = resolve_vocab(cfg.data, need_base=True)
    ds = build_training_set(cfg, vocab, teacher, vocab.base_indices)
    seen = 0
    for i in range(len(ds)):
        _, t = ds[i]
        self_rows = t["labels"] == -1
        assert t["box_embeddings"].shape == (len(t["labels"]), 16)
        if self_rows.any():
            assert t["boxes"][self_rows].tolist() == [[0.0, 0.0, 6.0, 6.0]]
            assert torch.allclose(t["box_embeddings"][self_rows][0], ds.cache.get(int(t["image_id"]))[0].float())
            seen += 1
    assert seen > 0


def test_bad_settings_and_the_other_architecture_are_one_line(tmp_path):
    """Through the installed command, from another folder: the teacher-crop ensemble asked of the
    one-stage student; a ViLD checkpoint evaluated as a one-stage student."""
    from reliability._fixtures import env, make_teacher_dir, make_tiny_world, teacher_overrides, world_overrides

    from detection.test_configs import TINY
    from distill.config import load_config
    from distill.detection.build import build_vild_detector

    make_tiny_world(tmp_path / "w")
    over = world_overrides(tmp_path / "w") + teacher_overrides(make_teacher_dir(tmp_path / "teacher")) + [o for o in TINY if not o.startswith("teacher.")]
    cfg = load_config(REPO / "configs/shapes/vild.yaml", over)
    vild = build_vild_detector(cfg.det, 32, torch.randn(2, 32))
    torch.save({"model": vild.state_dict()}, tmp_path / "vild.pt")
    exe = str(Path(sys.executable).with_name("distill"))
    one_stage = str(REPO / "configs/shapes/one_stage.yaml")
    cases = [
        (["train", "det", one_stage, *over, "det.inference=ensemble"], "det.inference: the one-stage student (det.arch=fcos) scores with its own embedding only"),
        (["train", "det", one_stage, *over, "det.use_image=false"], "det.self_labels: self-labels are distilled from the teacher's embeddings"),
        (["train", "det", one_stage, *over, "--eval-only", f"det.checkpoint={tmp_path / 'vild.pt'}"],
         "vild.pt: a ViLD (det.arch=faster_rcnn) checkpoint, but det.arch is fcos"),
    ]
    for args, msg in cases:
        r = subprocess.run([exe, *args], cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], (args, r.stdout, r.stderr)


def test_region_embeddings_read_the_location_fcos_assigns_the_box():
    """At a box's centre, FCOS's level is the one whose [4 x size, 8 x size) range holds half the
    box's longer side (sizes = strides 16, 32, 64 here): a 40 px box reads the stride-16 level, a
    300 px box the stride-32 level, at the cell under the centre."""
    torch.manual_seed(0)
    model = build_one_stage_detector(DetConfig(**{**SMALL, "min_size": 512, "max_size": 512}), 16, torch.randn(2, 16)).eval()
    image = torch.rand(3, 512, 512)
    boxes = torch.tensor([[100.0, 100, 140, 140], [50, 60, 350, 360]])
    got = model.region_embeddings([image], [boxes])[0]
    with torch.no_grad():
        feats = list(model.backbone(model.transform([image])[0].tensors).values())
        _, emb = model.head.classification_head(feats)
    n0 = feats[0].shape[-2] * feats[0].shape[-1]
    want0 = emb[0, (120 // 16) * feats[0].shape[-1] + 120 // 16]  # centre (120, 120) on the stride-16 level
    want1 = emb[0, n0 + (210 // 32) * feats[1].shape[-1] + 200 // 32]  # centre (200, 210) on the stride-32 level
    assert torch.allclose(got, F.normalize(torch.stack([want0, want1]), dim=1), atol=1e-6)


def test_locations_below_the_objectness_threshold_never_reach_nms():
    """ZSD-YOLO's --obj-conf-thresh: a location whose objectness is below det.objectness_thresh
    gets no detection, whatever its class probability."""
    head = OneStageHead(16, embed_dim=4, objectness_thresh=0.1).eval()
    head.text_embeddings = F.normalize(torch.randn(3, 4), dim=1)
    with torch.no_grad():
        head.classification_head.cls_logits.weight.zero_()
        head.classification_head.cls_logits.bias.fill_(0.0)  # objectness 0.5 everywhere
        kept = torch.sigmoid(head([torch.randn(1, 16, 4, 4)])["cls_logits"])
        head.classification_head.cls_logits.bias.fill_(-5.0)  # ~0.007 < 0.1
        dropped = torch.sigmoid(head([torch.randn(1, 16, 4, 4)])["cls_logits"])
    assert torch.allclose(kept.sum(-1), torch.full_like(kept.sum(-1), 0.5), atol=1e-4) and (dropped == 0).all()  # sum over classes = objectness
