"""detection/build.py: a trained ViLD student loaded back from its file (load_detector), its RPN
read as class-agnostic proposals (ViLDDetector.propose), and the box heads of det.box_head."""

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


# ------------------------------------------------------------------------------------ box heads
def _layer_types(head: torch.nn.Module) -> list[str]:
    return [type(m).__name__ for m in head.modules() if not list(m.children())]


def test_vild_box_head_is_4conv_2fc_each_with_batchnorm():
    """tensorflow/tpu projects/vild configs/vild_resnet.yaml frcnn_head (num_convs 4, num_filters,
    num_fcs 2, fc_dims, use_batch_norm) and modeling/vild_head.py (conv / fc -> BN -> ReLU)."""
    from distill.detection.build import RoIBatchNorm1d, build_box_head

    head = build_box_head(DetConfig(**{**TINY, "box_head": "4conv2fc", "box_head_conv_dim": 8}), 16)
    conv_block = ["Conv2d", "BatchNorm2d", "ReLU"]
    assert _layer_types(head) == conv_block * 4 + ["Flatten"] + ["Linear", "RoIBatchNorm1d", "ReLU"] * 2
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [(16, 8, (3, 3), (1, 1))] + [(8, 8, (3, 3), (1, 1))] * 3
    fcs = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(8 * 7 * 7, 32), (32, 32)]
    head.train()
    assert head(torch.randn(5, 16, 7, 7)).shape == (5, 32)
    # one RoI in training: the reference's batch norm gives its bias (batch variance 0), no error
    bn = RoIBatchNorm1d(4).train()
    torch.nn.init.constant_(bn.bias, 0.25)
    assert torch.equal(bn(torch.randn(1, 4)), torch.full((1, 4), 0.25))


def test_torchvision_4conv1fc_head_and_the_default_mlp2():
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    from distill.detection.build import build_box_head

    head = build_box_head(DetConfig(**{**TINY, "box_head": "4conv1fc", "box_head_conv_dim": 8}), 16)
    assert _layer_types(head) == ["Conv2d", "BatchNorm2d", "ReLU"] * 4 + ["Flatten", "Linear", "ReLU"]
    assert isinstance(build_box_head(DetConfig(**TINY), 16), TwoMLPHead) and DetConfig().box_head == "mlp2"


@pytest.mark.parametrize("box_head", ["4conv1fc", "4conv2fc"])
def test_detector_with_a_conv_head_trains_and_detects(teacher, box_head):
    torch.manual_seed(0)
    det = DetConfig(**{**TINY, "box_head": box_head, "box_head_conv_dim": 8, "image_head": "separate", "inference": "text"})
    text = F.normalize(torch.randn(3, D), dim=1)
    model = build_vild_detector(det, D, text, teacher=teacher)
    rh = model.roi_heads
    assert _layer_types(rh.box_head) == _layer_types(rh.image_head.box_head)  # ViLD 3.4: same architecture
    assert not torch.equal(rh.box_head[0][0].weight, rh.image_head.box_head[0][0].weight)  # its own weights
    g = torch.Generator().manual_seed(4)
    imgs = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    tg = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1]), "image_id": i,
           "proposals": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "proposal_embeddings": F.normalize(torch.randn(1, D, generator=g), dim=1)}
          for i in range(2)]
    model.train()
    losses = model(imgs, tg)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_vild_image"] > 0
    sum(losses.values()).backward()
    assert rh.box_head[0][0].weight.grad is not None
    model.eval()
    out = model(imgs)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4 and out[0]["scores"].shape == out[0]["labels"].shape


def test_a_checkpoint_of_another_box_head_is_refused(tmp_path, teacher):
    torch.manual_seed(0)
    text = F.normalize(torch.randn(3, D), dim=1)
    path = save_model(tmp_path / "mlp2.pt", build_vild_detector(DetConfig(**TINY), D, text, teacher=teacher))
    with pytest.raises(DistillError, match="does not fit ViLDDetector"):
        load_detector(path, DetConfig(**{**TINY, "box_head": "4conv2fc", "box_head_conv_dim": 8}), teacher)


def test_box_head_key_values_and_configs():
    from pathlib import Path

    from distill.config import load_config

    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(DistillError) as e:
        load_config(repo / "configs/shapes/vild.yaml", ["det.box_head=4conv"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("det.box_head: '4conv' is not one of mlp2, 4conv1fc, 4conv2fc")
    with pytest.raises(DistillError, match="det.box_head_conv_dim: expected a width >= 1"):
        load_config(repo / "configs/shapes/vild.yaml", ["det.box_head_conv_dim=0"])
    assert load_config(repo / "configs/shapes/vild.yaml").det.box_head == "mlp2"  # the shapes world keeps torchvision's
    for real in ("configs/coco/vild_r50_ovcoco.yaml", "configs/coco/pipeline_ovcoco.yaml", "configs/lvis/vild_r50.yaml"):
        cfg = load_config(repo / real)
        assert (cfg.det.box_head, cfg.det.box_head_dim, cfg.det.box_head_conv_dim) == ("4conv2fc", 1024, 256), real
        assert cfg.teacher.templates.splitlines()[0] == "There is {article} {} in the scene.", real  # distill/prompts/vild.txt
