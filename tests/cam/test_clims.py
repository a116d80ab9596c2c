"""CLIMS (cam/clims.py): the network as the reference builds it, the four losses by hand, the CAMs
of make_clims, and `distill cam --method clims` end to end on a tiny labelled folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.cam.clims import CamNet, ClimsLoss, clims_cams
from distill.teacher import build_random_teacher

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher():
    return build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, heads=2, seed=2)


def test_camnet_is_stride_16_with_a_frozen_stem_and_fixed_bn():
    torch.manual_seed(0)
    net = CamNet("resnet18", 3).train()
    assert net(torch.rand(2, 3, 64, 96)).shape == (2, 3, 4, 6)  # output stride 16 (layer4 unstrided)
    assert not any(p.requires_grad for p in net.features[0].parameters()) and not any(p.requires_grad for p in net.features[1].parameters())
    bn = net.features[4][0].bn1
    before = bn.running_mean.clone()
    net(torch.rand(2, 3, 64, 64) * 5)
    assert not bn.training and torch.equal(bn.running_mean, before)  # IRN's FixedBatchNorm
    groups = net.param_groups(0.1, 1e-4)
    assert groups[1]["lr"] == pytest.approx(1.0) and groups[1]["params"] == list(net.classifier.parameters())


def _by_hand(pairs, cam224, img224, text, bg, emb):
    otm = btm = cbs = 0.0
    for b, c in pairs:
        fg = emb(cam224[b, c][None, None] * img224[b][None])[0]
        bgi = emb((1 - cam224[b, c][None, None]) * img224[b][None])[0]
        otm += -math.log(float((fg @ text[c]).clamp(1e-4, 0.9999)))
        btm += -math.log(1 - float((bgi @ text[c]).clamp(1e-4, 0.9999)))
        cbs += sum(-math.log(1 - float(s)) for s in (bg @ fg))
    return otm, btm, cbs


def test_losses_equal_the_reference_formulas_by_hand(teacher):
    torch.manual_seed(0)
    net = CamNet("resnet18", 3)
    text = F.normalize(torch.randn(3, 16), dim=-1)
    bg = F.normalize(torch.randn(4, 16), dim=-1)
    w = {"otm": 10.0, "btm": 24.0, "cbs": 1.0, "reg": 0.2}
    loss = ClimsLoss(net, teacher, text, bg, w, cbs_thresh=-1.0)  # every background word above the threshold
    images = torch.rand(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    got = loss(images, labels)
    with torch.no_grad():
        cams = torch.sigmoid(net(images))
    S = teacher.image_size
    cam224 = F.interpolate(cams, (S, S), mode="bilinear", align_corners=True)
    img224 = F.interpolate(images, (S, S), mode="bilinear", align_corners=True)

    def emb(x):
        return F.normalize(teacher.model.encode_image(teacher.normalize(x)).float(), dim=-1)

    with torch.no_grad():
        otm, btm, cbs = _by_hand([(0, 0), (0, 2), (1, 1)], cam224, img224, text, bg, emb)
    assert got["loss_otm"].item() == pytest.approx(10 * otm / 3, rel=1e-4)
    assert got["loss_btm"].item() == pytest.approx(24 * btm / 3, rel=1e-4)
    assert got["loss_cbs"].item() == pytest.approx(cbs, rel=1e-4)
    assert got["loss_reg"].item() == pytest.approx(0.2 * float(cams.mean()), rel=1e-5)
    # a weight of 0 drops its term (the ablation adds them in order); a batch without labels is 0
    only = ClimsLoss(net, teacher, text, bg, {"otm": 10.0}, 0.26)(images, labels)
    assert set(only) == {"loss_otm"}
    none = loss(images, torch.zeros(2, 3))
    assert all(v.item() == 0 for v in none.values())
    sum(got.values()).backward()  # gradients reach the CAM network through the frozen teacher
    assert net.classifier.weight.grad is not None and net.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_cams_sum_scales_and_flips_at_stride_4():
    torch.manual_seed(0)
    net = CamNet("resnet18", 3).eval()
    img = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    cams = clims_cams(net, img, [0, 2], scales=(1.0,))
    assert cams.shape == (2, 10, 13) and torch.allclose(cams.amax(dim=(1, 2)), torch.ones(2), atol=1e-3)
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        raw = F.relu(net(torch.cat([x, x.flip(-1)])))[:, [0, 2]]
        want = F.interpolate((raw[0] + raw[1].flip(-1))[None], (10, 13), mode="bilinear", align_corners=False)[0]
    want = want / (want.amax(dim=(1, 2), keepdim=True) + 1e-5)
    assert torch.allclose(cams, want, atol=1e-5)
    assert clims_cams(net, img, []).shape == (0, 10, 13)


def test_cam_method_clims_end_to_end(tmp_path):
    """`distill cam CONFIG --method clims` from another folder: trains the baseline and CLIMS on the
    train split (tiny schedule), then writes masks for val; a bad method is one line, exit 2."""
    from reliability._fixtures import env, make_teacher_dir, make_tiny_world, teacher_overrides, world_overrides

    work = tmp_path / "w"
    make_tiny_world(work)
    over = world_overrides(work) + teacher_overrides(make_teacher_dir(tmp_path / "teacher")) + [
        "clims.pretrained=", "clims.image_size=64", "clims.batch_size=4", "clims.baseline_epochs=1", "clims.epochs=1",
        "clims.scales=[1.0]", "cam.crf=false", "cam.num_panels=1", "data.num_workers=0"]
    exe = str(Path(sys.executable).with_name("distill"))
    cfg = str(REPO / "configs/shapes/cam.yaml")
    r = subprocess.run([exe, "cam", cfg, *over, "--images", "val", "--method", "clims"], cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr
    out = work / "cam"
    assert (out / "clims.pth").is_file() and (out / "clims_baseline.pth").is_file()
    summary = json.loads((out / "summary_val.json").read_text())
    assert summary["method"] == "clims" and summary["processed"] > 0
    masks = list((out / "masks" / "val").glob("*.png"))
    assert len(masks) == summary["processed"] and list((out / "panels" / "val").glob("*.png"))
    z = np.load(next((out / "seeds" / "val").glob("*.npz")))
    assert z["gradcam"].ndim == 3 and "refined" not in z
    train_log = [json.loads(ln) for ln in (out / "clims_train" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_otm", "loss_btm", "loss_cbs", "loss_reg"} <= set(train_log[-1])
    bad = subprocess.run([exe, "cam", cfg, *over, "--images", "val", "--method", "clim"], cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "cam.method" in bad.stderr, bad.stderr


def test_clims_ablation_rows(tmp_path, teacher):
    """`distill ablate cam --clims`'s logic on the tiny labelled folder: one baseline, four CLIMS
    networks (losses added in the paper's order), each row scored; the rows' networks differ."""
    from cam.test_cam import _cfg, _tiny_world

    from distill.ablate.cam import CLIMS_ROWS, clims_ablation

    root = _tiny_world(tmp_path)
    # the tiny world has a val split only: train CLIMS on it too (images=val)
    cfg = _cfg(tmp_path, root, "clims.pretrained=", "clims.image_size=64", "clims.batch_size=2", "clims.baseline_epochs=1",
               "clims.epochs=1", "clims.scales=[1.0]", "cam.images=val", "cam.crf=false", "clims.baseline_lr=0.0001")  # a small lr: CAMs not saturated
    import distill.cam.clims as C

    orig = C.train_clims
    calls = []

    def train_on_val(cfg, **kw):
        calls.append(kw.get("weights"))
        return orig(cfg, split="val", **kw)

    C.train_clims = train_on_val
    try:
        m = clims_ablation(cfg, "val", teacher=teacher, progress=False)
    finally:
        C.train_clims = orig
    assert [r["step"] for r in m["rows"]] == list(CLIMS_ROWS)
    assert [sorted(k for k, v in w.items() if v > 0) for w in calls] == [["otm"], ["btm", "otm"], ["btm", "cbs", "otm"], ["btm", "cbs", "otm", "reg"]]
    for r in m["rows"][:5]:
        assert 0.0 <= r["miou"] <= 1.0
    out = tmp_path / "run" / "cam" / "clims_ablation"
    assert (out / "baseline.pth").is_file() and (out / "metrics.json").is_file()
    # REG always has a gradient (the random teacher's similarities sit below OTM's 1e-4 clamp, as the
    # reference clamps them): the row that adds it trained a different network
    a = torch.load(out / "clims_otm_btm_cbs.pth", weights_only=True)["model"]["classifier.weight"]
    b = torch.load(out / "clims.pth", weights_only=True)["model"]["classifier.weight"]
    assert not torch.equal(a, b)

    # the cached networks are reused only as trained: the same config trains nothing; another CBS
    # threshold retrains the two rows with CBS on; a new baseline retrains every row
    import dataclasses

    def rerun(c):
        calls.clear()
        C.train_clims = train_on_val
        try:
            clims_ablation(c, "val", teacher=teacher, progress=False)
        finally:
            C.train_clims = orig
        return [sorted(k for k, v in w.items() if v > 0) for w in calls]

    def as_train(c):  # the fixture trained on val; the ablation asks for networks of the train split
        for f in out.glob("*.pth"):
            state = torch.load(f, weights_only=True)
            state["settings"]["split"] = "train"
            torch.save(state, f)
        return c

    assert rerun(as_train(cfg)) == []
    thresh = dataclasses.replace(cfg, clims=dataclasses.replace(cfg.clims, cbs_thresh=0.5))
    assert rerun(as_train(thresh)) == [["btm", "cbs", "otm"], ["btm", "cbs", "otm", "reg"]]
    assert torch.load(out / "clims.pth", weights_only=True)["settings"]["cbs_thresh"] == 0.5
    # a new baseline (here: the old one gone) retrains every row, even one whose own settings match
    (out / "baseline.pth").unlink()
    assert len(rerun(as_train(thresh))) == 4
    assert rerun(as_train(thresh)) == []

    # a CLIMS row from a finished baseline never reads the ResNet the baseline started from (a
    # missing file here), and reads its training images in DataLoader workers (data.num_workers)
    gone = dataclasses.replace(thresh, clims=dataclasses.replace(thresh.clims, pretrained=str(tmp_path / "missing.pth")),
                               data=dataclasses.replace(thresh.data, num_workers=1))
    s = orig(gone, split="val", teacher=teacher, weights={"otm": 10.0}, out=str(tmp_path / "row.pth"), baseline=str(out / "baseline.pth"), progress=False)
    assert s["baseline"] == f"read {out / 'baseline.pth'}" and (tmp_path / "row.pth").is_file()


def test_voc_clims_config_is_the_references(tmp_path, teacher):
    """configs/voc/clims.yaml: ResNet-50, the reference's schedule and weights, its class texts
    ('player' for person) and its ten background words, each read as 'a photo of {}.'."""
    from distill.cam.clims import clims_text
    from distill.config import load_config
    from distill.vocab import resolve_vocab

    cfg = load_config(REPO / "configs/voc/clims.yaml", [f"work_dir={tmp_path}"])
    c = cfg.clims
    assert (cfg.cam.method, c.backbone, c.image_size, c.baseline_epochs, c.epochs, c.lr, c.baseline_lr) == ("clims", "resnet50", 512, 5, 15, 0.00025, 0.1)
    assert (c.otm_weight, c.btm_weight, c.cbs_weight, c.reg_weight, c.cbs_thresh) == (10, 24, 1, 0.2, 0.26)
    vocab = resolve_vocab(cfg.data)
    assert len(vocab) == 20 and vocab.prompts[vocab.names.index("person")] == ("player",)
    text, bg = clims_text(teacher, cfg, vocab)
    assert text.shape == (20, 16) and bg.shape == (10, 16)
    want = teacher.encode_text(["a photo of player."])[0]
    assert torch.allclose(text[vocab.names.index("person")], want, atol=1e-5)
