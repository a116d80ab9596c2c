"""detection/build.py: a trained ViLD student loaded back from its file (load_detector) and its RPN
read as class-agnostic proposals (ViLDDetector.propose)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.config import DetConfig
from distill.detection.build import build_vild_detector, load_detector
from distill.engine.checkpoint import save_model
from distill.errors import DistillError

D = 16
TINY = dict(backbone="resnet18_fpn", fpn_channels=16, returned_layers=(3, 4), anchor_sizes=(16, 32, 64), box_head_dim=32,
            min_size=64, max_size=64, rpn_pre_nms_test=100, rpn_post_nms_test=50, roi_batch_size=32, ensemble_candidates=20)


@pytest.fixture(scope="module")
def teacher():
    from distill.teacher.clip import build_random_teacher

    return build_random_teacher(embed_dim=D, image_size=32, patch=8, width=32, layers=1, heads=2, text_width=32, text_layers=1, seed=3)


def test_load_detector_gives_back_the_saved_student_and_its_meta(tmp_path, teacher):
    det = DetConfig(**TINY)
    torch.manual_seed(0)
    text = F.normalize(torch.randn(3, D), dim=1)
    model = build_vild_detector(det, D, text, teacher=teacher).eval()
    path = save_model(tmp_path / "model_final.pt", model, {"trained_classes": ["a", "b", "c"]})
    loaded, meta = load_detector(path, det, teacher)
    assert meta["trained_classes"] == ["a", "b", "c"]
    assert not loaded.training and loaded.teacher is teacher
    own, got = model.state_dict(), loaded.state_dict()
    assert own.keys() == got.keys() and all(torch.equal(own[k], got[k]) for k in own)
    loaded.set_vocabulary(text)
    x = torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(1))
    a, b = model([x])[0], loaded([x])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    with pytest.raises(DistillError, match="checkpoint not found"):
        load_detector(tmp_path / "missing.pt", det, teacher)


def test_propose_is_the_rpn_top_k_in_input_pixels(teacher):
    torch.manual_seed(0)
    model = build_vild_detector(DetConfig(**TINY), D, teacher=teacher)
    model.train()
    x = torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(2))
    boxes = model.propose([x], 5)[0]
    assert model.training  # the mode is left as it was
    model.eval()
    with torch.no_grad():
        il, _ = model.transform([x])
        props, _ = model.rpn(il, model.backbone(il.tensors))
    nh, nw = il.image_sizes[0]
    ref = props[0][:5] * torch.tensor([70 / nw, 50 / nh, 70 / nw, 50 / nh])
    assert boxes.shape == (5, 4) and torch.equal(boxes, ref)
    assert float(boxes[:, [0, 2]].max()) <= 70 + 1e-4 and float(boxes[:, [1, 3]].max()) <= 50 + 1e-4
