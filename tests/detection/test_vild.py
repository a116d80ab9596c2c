"""ViLD head, losses, ensemble, vocabulary swap, bad input (tiny random models, no files)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.config import DetConfig
from distill.detection.build import build_plain_detector, build_vild_detector
from distill.detection.vild import (
    ViLDPredictor,
    box_loss_class_agnostic,
    ensemble_scores,
    loss_vild_image,
    loss_vild_text,
    vild_logits,
)
from distill.engine import checkpoint as ckpt_lib
from distill.errors import DistillError

D = 16
TINY = dict(
    backbone="resnet18_fpn",
    fpn_channels=16,
    returned_layers=(3, 4),
    anchor_sizes=(16, 32, 64),
    box_head_dim=32,
    min_size=64,
    max_size=64,
    rpn_pre_nms_train=200,
    rpn_post_nms_train=64,
    rpn_pre_nms_test=100,
    rpn_post_nms_test=50,
    roi_batch_size=32,
    ensemble_candidates=20,
)


def tiny_det(**kw) -> DetConfig:
    return DetConfig(**{**TINY, "inference": "text", **kw})


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def images_targets(n=2, with_props=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.rand(3, 64, 64, generator=g) for _ in range(n)]
    tg = []
    for i in range(n):
        t = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]]), "labels": torch.tensor([0, 2]), "image_id": 10 + i}
        if with_props:
            t["proposals"] = torch.tensor([[2.0, 2.0, 20.0, 20.0], [10.0, 10.0, 50.0, 60.0], [0.0, 0.0, 64.0, 64.0]])
            t["proposal_embeddings"] = unit(3, D, seed=i + 5)
        tg.append(t)
    return imgs, tg


# ----------------------------------------------------------------------------------- head
def test_predictor_shapes_and_normalisation():
    torch.manual_seed(0)
    p = ViLDPredictor(40, D)
    emb, deltas = p(torch.randn(7, 10, 2, 2))
    assert emb.shape == (7, D) and deltas.shape == (7, 4)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(7))


def test_logits_match_hand_computation_with_background_column():
    region, text = unit(3, D, seed=1), unit(4, D, seed=2)
    bg = torch.randn(D) * 3  # not normalised: the head normalises it
    logits = vild_logits(region, text, bg, 0.01)
    assert logits.shape == (3, 5)
    bg_n = bg / bg.norm()
    for r in range(3):
        assert logits[r, 0].item() == pytest.approx(float(region[r] @ bg_n) / 0.01, rel=1e-5)
        for c in range(4):
            assert logits[r, c + 1].item() == pytest.approx(float(region[r] @ text[c]) / 0.01, rel=1e-5)
    assert vild_logits(region, text, None, 0.01).shape == (3, 4)


def test_state_dict_has_no_vocabulary_and_vocabulary_swaps():
    torch.manual_seed(0)
    m = build_vild_detector(tiny_det(), D, unit(3, D))
    keys = set(m.state_dict())
    assert not any("text_embeddings" in k or "novel_mask" in k for k in keys)
    assert m.num_classes == 3
    m.eval()
    imgs, _ = images_targets()
    with torch.no_grad():
        out3 = m(imgs)
    assert all(int(d["labels"].max()) < 3 for d in out3 if len(d["labels"]))
    m.set_vocabulary(unit(7, D, seed=3))
    assert m.num_classes == 7 and set(m.state_dict()) == keys
    with torch.no_grad():
        out7 = m(imgs)
    labels7 = torch.cat([d["labels"] for d in out7])
    assert int(labels7.max()) < 7 and int(labels7.max()) >= 3  # new classes are predicted
    # a checkpoint saved with one vocabulary loads into a model built with another
    m2 = build_vild_detector(tiny_det(), D, unit(11, D, seed=4))
    m2.load_state_dict(m.state_dict(), strict=True)
    assert m2.num_classes == 11


def test_background_takes_the_mass_when_region_is_background():
    torch.manual_seed(0)
    m = build_vild_detector(tiny_det(), D, unit(5, D))
    heads = m.roi_heads
    bg = F.normalize(heads.box_predictor.background.detach(), dim=0)
    with torch.no_grad():
        s = heads.text_scores(torch.stack([bg, unit(D, seed=9)]))
    assert s.shape == (2, 5)
    assert float(s[0].sum()) < 1e-3  # a region equal to the background embedding: ~no class mass
    logits = vild_logits(torch.stack([bg, unit(D, seed=9)]), heads.text_embeddings, heads.box_predictor.background, 0.01)
    torch.testing.assert_close(s, F.softmax(logits, -1)[:, 1:])


# ----------------------------------------------------------------------------------- losses
def test_losses_match_references_and_are_finite_on_empty_input():
    logits = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 4, 0, 2, 3])
    ref = -torch.log_softmax(logits, -1)[torch.arange(6), labels].mean()
    assert loss_vild_text(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)
    s, t = unit(4, D, seed=1), unit(4, D, seed=2)
    ref_l1 = sum(float((s[i] - t[i]).abs().sum()) for i in range(4)) / 4
    assert loss_vild_image(s, t).item() == pytest.approx(ref_l1, rel=1e-6)
    empty_logits = torch.zeros(0, 5, requires_grad=True)
    for loss in (
        loss_vild_text(empty_logits, torch.zeros(0, dtype=torch.long)),
        loss_vild_image(torch.zeros(0, D, requires_grad=True), torch.zeros(0, D)),
        box_loss_class_agnostic(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
    ):
        assert torch.isfinite(loss) and loss.item() == 0.0
        loss.backward()


def test_training_losses_stable_names_and_empty_images():
    torch.manual_seed(0)
    m = build_vild_detector(tiny_det(), D, unit(3, D))
    m.train()
    imgs, tg = images_targets()
    losses = m(imgs, tg)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_box_reg", "loss_vild_text", "loss_vild_image"}
    assert all(torch.isfinite(v) for v in losses.values())
    # the ViLD-image term is exactly the L1 of the student's embeddings of the proposals
    sum(losses.values()).backward()
    # images without any box and without proposals
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 1}] * 2
    losses = m(imgs, empty)
    assert set(losses) >= {"loss_vild_text", "loss_vild_image", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_vild_image"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()


def test_vild_image_loss_uses_the_proposals():
    """Same images / boxes, different teacher targets -> only loss_vild_image changes, and it
    equals 0.5 x the mean L1 between an independent RoIAlign + head pass over the proposals and
    the teacher's embeddings."""
    torch.manual_seed(0)
    m = build_vild_detector(tiny_det(), D, unit(3, D))
    m.train()
    for mod in m.modules():  # BatchNorm with fixed statistics: the reference pass sees the same
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    imgs, tg = images_targets()
    torch.manual_seed(1)
    a = m(imgs, tg)
    tg2 = [dict(t, proposal_embeddings=-t["proposal_embeddings"]) for t in tg]
    torch.manual_seed(1)
    b = m(imgs, tg2)
    assert a["loss_vild_text"].item() == pytest.approx(b["loss_vild_text"].item(), rel=1e-5)
    assert abs(a["loss_vild_image"].item() - b["loss_vild_image"].item()) > 1e-3
    with torch.no_grad():
        il, _ = m.transform(imgs)
        rh = m.roi_heads
        feats = m.backbone(il.tensors)
        emb, _ = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, [t["proposals"] for t in tg], il.image_sizes)))
    teacher = torch.cat([t["proposal_embeddings"] for t in tg])
    ref = 0.5 * (emb - teacher).abs().sum(1).mean()
    assert a["loss_vild_image"].item() == pytest.approx(ref.item(), rel=1e-4)


# ----------------------------------------------------------------------------------- ensemble
def test_ensemble_formula_against_hand_computation():
    s_text = torch.tensor([[0.5, 0.2, 0.1], [0.05, 0.6, 0.3]])
    s_img = torch.tensor([[0.3, 0.4, 0.2], [0.1, 0.1, 0.8]])
    novel = torch.tensor([False, True, True])
    out = ensemble_scores(s_text, s_img, novel)
    l = 2 / 3
    expect = [
        [0.5**l * 0.3 ** (1 - l), 0.2 ** (1 - l) * 0.4**l, 0.1 ** (1 - l) * 0.2**l],
        [0.05**l * 0.1 ** (1 - l), 0.6 ** (1 - l) * 0.1**l, 0.3 ** (1 - l) * 0.8**l],
    ]
    for r in range(2):
        for c in range(3):
            assert out[r, c].item() == pytest.approx(expect[r][c], rel=1e-6)
    # alpha = 1 (base) / beta = 0 (novel) gives the text branch alone
    torch.testing.assert_close(ensemble_scores(s_text, s_img, novel, alpha=1.0, beta=0.0), s_text)
    assert math.isclose(out[0, 0].item(), math.exp(l * math.log(0.5) + (1 - l) * math.log(0.3)), rel_tol=1e-6)


def test_ensemble_inference_uses_teacher_crops_and_formula():
    """Scores of the ensemble equal the formula applied to the text scores and to the teacher
    scores of the same boxes (stub teacher embedder, no NMS effect: one candidate box)."""
    torch.manual_seed(0)
    text = unit(4, D, seed=2)
    novel = torch.tensor([False, False, True, True])
    m = build_vild_detector(tiny_det(inference="ensemble", ensemble_candidates=1, detections_per_img=4, score_thresh=0.0), D, text, novel)
    m.eval()
    heads = m.roi_heads
    teacher_emb = unit(1, D, seed=7)
    seen = {}

    def stub(per_boxes):
        seen["boxes"] = per_boxes
        return [teacher_emb.expand(len(b), D) for b in per_boxes]

    imgs, _ = images_targets(n=1)
    with torch.no_grad():
        il, _ = m.transform(imgs)
        feats = m.backbone(il.tensors)
        props, _ = m.rpn(il, feats)
        heads.image_embedder = stub
        res, _ = heads(feats, props, il.image_sizes)
        heads.inference = "text"
        res_text, _ = heads(feats, props, il.image_sizes)
        emb, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(feats, props, il.image_sizes)))
    assert len(seen["boxes"][0]) == 1
    s_text = heads.text_scores(emb)
    best = s_text.max(1).values.argmax()  # the single candidate: highest max-class text score
    s_img = F.softmax(teacher_emb @ text.t() / 0.01, -1)[0]
    expect = ensemble_scores(s_text[best][None], s_img[None], novel)[0]
    got = torch.zeros(4)
    got[res[0]["labels"] - 1] = res[0]["scores"]
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(res_text[0]["scores"][:1], res[0]["scores"][:1])


def test_ensemble_with_a_random_tiny_teacher_end_to_end():
    from distill.teacher.clip import build_random_teacher

    teacher = build_random_teacher(embed_dim=D, image_size=32, patch=8, width=32, layers=1, text_layers=1, seed=0)
    torch.manual_seed(0)
    m = build_vild_detector(tiny_det(inference="ensemble", ensemble_candidates=5), D, unit(4, D), torch.tensor([0, 0, 1, 1]).bool(), teacher=teacher)
    m.eval()
    imgs, _ = images_targets(n=2)
    with torch.no_grad():
        out = m(imgs)
    assert len(out) == 2
    for d in out:
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) <= 5 * 4
        assert bool(((d["scores"] >= 0) & (d["scores"] <= 1)).all())
        assert bool((d["boxes"][:, 2:] <= 64).all())


# ----------------------------------------------------------------------------------- bad input
def test_bad_input_clear_errors_or_counted_skips():
    torch.manual_seed(0)
    m = build_vild_detector(tiny_det(), D, unit(3, D))
    m.train()
    imgs, tg = images_targets(with_props=False)
    tg[0] = dict(tg[0], labels=torch.tensor([0, 5]))
    with pytest.raises(DistillError, match="image 10: category index 5 outside the training vocabulary of 3"):
        m(imgs, tg)
    imgs, tg = images_targets(with_props=False)
    tg[1] = dict(tg[1], boxes=torch.tensor([[4.0, 6.0, 4.0, 40.0], [20.0, 20.0, 60.0, 50.0]]))
    losses = m(imgs, tg)
    assert m.skipped_boxes == 1 and all(torch.isfinite(v) for v in losses.values())
    bad = unit(3, D)
    bad[1, 0] = float("nan")
    with pytest.raises(DistillError, match=r"\['blue star'\]"):
        m.set_vocabulary(bad, names=["red star", "blue star", "green cross"])
    with pytest.raises(DistillError, match="expected \\(C, 16\\)"):
        m.set_vocabulary(unit(3, D + 1))
    fresh = build_vild_detector(tiny_det(), D)
    with pytest.raises(DistillError, match="no vocabulary set"):
        fresh.eval()(imgs)


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    plain = build_plain_detector(tiny_det(), 3)
    ckpt_lib.save_model(tmp_path / "plain.pt", plain)
    vild = build_vild_detector(tiny_det(), D, unit(3, D))
    with pytest.raises(DistillError, match="does not fit ViLDDetector"):
        ckpt_lib.load(tmp_path / "plain.pt", vild)
    other_dim = build_vild_detector(tiny_det(), D + 8, unit(3, D + 8))
    ckpt_lib.save_model(tmp_path / "v24.pt", other_dim)
    with pytest.raises(DistillError, match="shape mismatches"):
        ckpt_lib.load(tmp_path / "v24.pt", vild)


def test_region_embeddings_read_boxes_in_input_pixels():
    """The student's embedding of a box does not depend on the input size: an image and its exact
    2x (nearest) upsample, resized to the same model size, give the same embeddings for the same
    object boxes (coordinates scaled with the image)."""
    torch.manual_seed(0)
    model = build_vild_detector(tiny_det(), D, unit(3, D)).eval()
    img = torch.rand(3, 64, 64)
    big = img.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]])
    small_emb = model.region_embeddings([img], [boxes])[0]
    big_emb = model.region_embeddings([big], [boxes * 2])[0]
    assert small_emb.shape == (2, D)
    torch.testing.assert_close(small_emb.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(big_emb, small_emb, atol=1e-5, rtol=0)
    shifted = model.region_embeddings([big], [boxes])[0]  # unscaled boxes cover other pixels
    assert (shifted - small_emb).abs().max() > 1e-3


def test_region_top1_scores_each_box_against_its_class():
    """region_top1 counts a box as right when its embedding is nearest its own class's text
    embedding, and splits the accuracy by base / novel class."""
    from distill.detection.train import region_top1

    text = unit(4, D, seed=3)
    novel = torch.tensor([False, False, True, True])

    class Oracle(torch.nn.Module):  # right for class 0, 1 and 2; class 3 boxes read as class 0
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def region_embeddings(self, images, boxes, branch="text"):
            return [text[torch.where(self.current == 3, 0, self.current)] for _ in boxes[:1]]

    model = Oracle()
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    model.current = labels
    ds = [(torch.zeros(3, 8, 8), {"boxes": torch.zeros(6, 4), "labels": labels, "image_id": 1})]
    m = region_top1(model, ds, text, novel, batch_size=1)
    assert m["region/top1"] == pytest.approx(4 / 6)
    assert m["region/top1_base"] == pytest.approx(1.0)
    assert m["region/top1_novel"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------- ViLD-ensemble (3.4)
def test_separate_image_head_each_loss_trains_only_its_own_branch():
    """image_head=separate: ViLD-image's gradient reaches the image head and not the text
    branch's box head / projection; ViLD-text's reaches the text branch and not the image head.
    The image loss equals 0.5 x L1 of the image head's own pass over the proposals."""
    torch.manual_seed(0)
    m = build_vild_detector(tiny_det(image_head="separate"), D, unit(3, D))
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    rh = m.roi_heads
    assert rh.image_head is not None
    # fresh weights, same architecture as the text branch's box head
    assert rh.image_head.box_head.fc6.weight.shape == rh.box_head.fc6.weight.shape
    assert not torch.equal(rh.image_head.box_head.fc6.weight, rh.box_head.fc6.weight)
    imgs, tg = images_targets()
    losses = m(imgs, tg)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_box_reg", "loss_vild_text", "loss_vild_image"}

    def grads(loss):
        m.zero_grad()
        loss.backward(retain_graph=True)
        g = lambda mod: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)  # noqa: E731
        return g(rh.image_head), g(rh.box_head) + g(rh.box_predictor.projection)

    img_g, text_g = grads(losses["loss_vild_image"])
    assert img_g > 0 and text_g == 0
    img_g, text_g = grads(losses["loss_vild_text"])
    assert img_g == 0 and text_g > 0
    with torch.no_grad():
        il, _ = m.transform(imgs)
        emb = rh.image_head(rh.box_roi_pool(m.backbone(il.tensors), [t["proposals"] for t in tg], il.image_sizes))
    ref = 0.5 * (emb - torch.cat([t["proposal_embeddings"] for t in tg])).abs().sum(1).mean()
    assert losses["loss_vild_image"].item() == pytest.approx(ref.item(), rel=1e-4)
    # images without proposals: the image term is 0 and still backpropagates
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 1}] * 2
    losses = m(imgs, empty)
    assert losses["loss_vild_image"].item() == 0.0
    sum(losses.values()).backward()


@pytest.mark.parametrize("image_head", ["shared", "separate"])
def test_ensemble_heads_inference_needs_no_teacher_and_follows_the_formula(image_head):
    """inference=ensemble_heads (ViLD-ensemble): per box, the section 3.4 geometric mean of the
    text branch's scores and the image branch's (softmax over the classes of its embedding), no
    teacher; image_head = the image branch alone."""
    torch.manual_seed(0)
    text = unit(4, D, seed=2)
    novel = torch.tensor([False, True, False, True])
    kw = dict(image_head=image_head, detections_per_img=1000, score_thresh=0.0, nms=1.0)
    m = build_vild_detector(tiny_det(inference="ensemble_heads", **kw), D, text, novel)
    m.eval()
    rh = m.roi_heads
    imgs, _ = images_targets(n=1)
    with torch.no_grad():
        il, _ = m.transform(imgs)
        feats = m.backbone(il.tensors)
        props, _ = m.rpn(il, feats)
        props = [props[0][:3]]
        res = {}
        for mode in ("ensemble_heads", "image_head", "text"):
            rh.inference = mode
            res[mode], _ = rh(feats, props, il.image_sizes)
        pooled = rh.box_roi_pool(feats, props, il.image_sizes)
        emb, _ = rh.box_predictor(rh.box_head(pooled))
        emb_i = emb if image_head == "shared" else rh.image_head(pooled)
    s_text = rh.text_scores(emb)
    s_img = F.softmax(emb_i @ text.t() / 0.01, -1)
    expect = {"ensemble_heads": ensemble_scores(s_text, s_img, novel), "image_head": s_img, "text": s_text}
    for mode, r in res.items():  # the top score of each class over the 3 boxes (nms=1.0 keeps all)
        got = torch.zeros(4)
        for lab, sc in zip(r[0]["labels"].tolist(), r[0]["scores"].tolist()):
            got[lab - 1] = max(got[lab - 1], sc)
        torch.testing.assert_close(got, expect[mode].max(0).values, rtol=1e-5, atol=1e-7)
    with pytest.raises(DistillError, match="det.image_head"):
        build_vild_detector(tiny_det(image_head="two"), D, text, novel)


def test_region_embeddings_read_the_image_branch_on_request():
    torch.manual_seed(0)
    m = build_vild_detector(tiny_det(image_head="separate"), D, unit(3, D))
    imgs, _ = images_targets(n=1)
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0]])]
    a = m.region_embeddings(imgs, boxes)[0]
    b = m.region_embeddings(imgs, boxes, branch="image")[0]
    assert a.shape == b.shape == (1, D) and not torch.allclose(a, b)
    torch.testing.assert_close(b.norm(dim=1), torch.ones(1))


def test_a_trained_model_loads_without_its_pretrained_backbone_file(tmp_path):
    """Evaluation and labeling load a checkpoint: they build the layers without reading
    det.pretrained_backbone, so a detector keeps working once that file is gone; training still
    needs it (a one-line error naming the key)."""
    det = tiny_det(pretrained_backbone=str(tmp_path / "gone.pth"), freeze_backbone=False)
    with pytest.raises(DistillError, match="det.pretrained_backbone: .*gone.pth: file not found"):
        build_vild_detector(det, D, unit(3, D))
    torch.manual_seed(0)
    m = build_vild_detector(det, D, unit(3, D), load_weights=False)
    ref = build_vild_detector(tiny_det(), D, unit(3, D))
    assert m.state_dict().keys() == ref.state_dict().keys()
