"""LSeg: shapes, normalisation, scale init, any vocabulary, distillation gradient, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.segmentation.lseg import build_lseg
from distill.segmentation.train import teacher_pixel_fn


def _text(c, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(c, d, generator=g), dim=1)


@pytest.mark.parametrize("backbone", ["resnet18", "teacher"])
def test_shapes_normalisation_and_vocabulary(backbone, tiny_teacher):
    t = tiny_teacher
    m = build_lseg(t.embed_dim, backbone, visual=t.model.visual, mean=t.mean, std=t.std, features=16).eval()
    assert m.logit_scale.exp().item() == pytest.approx(1 / 0.07)  # LSeg section 3
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        emb = m.pixel_embeddings(x)
        assert emb.shape == (2, t.embed_dim, 64, 48)
        assert torch.allclose(emb.norm(dim=1), torch.ones(2, 64, 48), atol=1e-5)
        for c in (3, 7):  # any vocabulary at inference, no rebuild
            text = _text(c, t.embed_dim, c)
            logits = m(x, text=text)
            assert logits.shape == (2, 1 + c, 64, 48)
            # logits are the scale times the cosine with [background, classes]
            cls = F.normalize(torch.cat([m.bg_embed[None], text]), dim=1)
            low = m.pixel_embeddings(x, full_res=False)  # the decoder's resolution: stride 2
            assert low.shape[-2:] == (32, 24)  # stride 2 for both encoders
            ref = (1 / 0.07) * torch.einsum("bdhw,cd->bchw", low, cls)
            ref = F.interpolate(ref, size=(64, 48), mode="bilinear", align_corners=False)
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    # the vocabulary is never saved with the weights
    m.set_vocabulary(_text(4, t.embed_dim), [1, 2, 5, 9])
    assert "text" not in m.state_dict() and "class_ids" not in m.state_dict()
    if backbone == "teacher":  # the teacher's own tower stays frozen and untouched
        assert m.encoder.visual is not t.model.visual
        assert all(p.requires_grad for p in m.encoder.visual.parameters())
        assert all(not p.requires_grad for p in t.model.parameters())


def test_train_loss_ignores_novel_and_learns(tiny_teacher):
    torch.manual_seed(0)
    m = build_lseg(tiny_teacher.embed_dim, "resnet18", features=16)
    m.set_vocabulary(_text(2, tiny_teacher.embed_dim), [1, 3])  # base ids 1, 3; id 2 is novel
    x = torch.rand(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, 8:16, 8:16] = 1
    masks[:, 20:28, 20:28] = 3
    masks[:, :4] = 2  # novel pixels: ignored, not an error
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = m(x, {"masks": masks})["loss_ce"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.log(3) * 0.5 < losses[0] < 10.0  # scale 14.3 x random cosines
    assert losses[-1] < 0.7 * losses[0]
    all_ignore = m(x, {"masks": torch.full_like(masks, 255)})["loss_ce"]
    assert all_ignore.item() == 0.0


def test_distillation_gradient_reaches_only_the_student(tiny_teacher):
    t = tiny_teacher
    m = build_lseg(t.embed_dim, "resnet18", features=16, distill_weight=2.0, distill_loss="cosine")
    m.set_vocabulary(_text(2, t.embed_dim), [1, 2])
    m.set_distill_teacher(teacher_pixel_fn(t))
    assert not any(k.startswith("_teacher") for k in m.state_dict())
    m.train()
    x = torch.rand(2, 3, 32, 32)
    out = m(x, {"masks": torch.full((2, 32, 32), 255, dtype=torch.long)})  # no labels at all
    assert set(out) == {"loss_ce", "loss_distill"}
    assert out["loss_ce"].item() == 0.0
    # the distillation term equals 2 x mean(1 - cos) against the teacher's MaskCLIP pixels
    from distill.teacher.dense import pixel_embeddings

    with torch.no_grad():
        tp = pixel_embeddings(t, x, out_size=(16, 16))  # the decoder's resolution (stride 2)
        ref = 2.0 * (1 - (m.pixel_embeddings(x, full_res=False) * tp).sum(1)).mean()
    assert out["loss_distill"].item() == pytest.approx(ref.item(), rel=1e-4)
    out["loss_distill"].backward()
    assert all(p.grad is None for p in t.model.parameters())
    assert all(not p.requires_grad for p in t.model.parameters()) and not t.model.training
    grads = [p.grad for n, p in m.named_parameters() if n.startswith(("encoder", "decoder"))]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert m.bg_embed.grad is None or m.bg_embed.grad.abs().sum() == 0  # only CE touches classes


def test_bad_input(tiny_teacher):
    d = tiny_teacher.embed_dim
    m = build_lseg(d, "resnet18", features=16)
    with pytest.raises(DistillError, match="smaller than the patch size"):
        m(torch.rand(1, 3, 16, 64), text=_text(2, d))
    with pytest.raises(DistillError, match="empty query list"):
        m.set_vocabulary(torch.zeros(0, d))
    with pytest.raises(DistillError, match="expected \\(C, 16\\)"):
        m.set_vocabulary(torch.zeros(3, d + 1))
    m.train()
    m.set_vocabulary(_text(2, d))
    with pytest.raises(DistillError, match="does not match the images"):
        m(torch.rand(2, 3, 64, 64), {"masks": torch.zeros(2, 64, 60, dtype=torch.long)})
    with pytest.raises(DistillError, match="no teacher pixel"):
        build_lseg(d, "resnet18", features=16, distill_weight=1.0).train()(torch.rand(2, 3, 64, 64), {"masks": torch.zeros(2, 64, 64, dtype=torch.long)}, text=_text(2, d))
    with pytest.raises(DistillError, match="resnet18, teacher"):
        build_lseg(d, "vgg")


def test_dense_tower_backbone_is_a_copy_of_the_tower_passed(tiny_teacher):
    """build_lseg(backbone=dense_tower) runs on the tower the caller passes (the dense one),
    deep-copied; without one it names seg.backbone=dense_tower."""
    import copy

    t = tiny_teacher
    d = t.embed_dim
    with pytest.raises(DistillError, match=r"seg\.backbone=dense_tower needs"):
        build_lseg(d, "dense_tower", mean=t.mean, std=t.std, features=16)
    with pytest.raises(DistillError, match="resnet18, teacher, dense_tower"):
        build_lseg(d, "vgg")
    tower = copy.deepcopy(t.model.visual)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.1)
    m = build_lseg(d, "dense_tower", visual=tower, mean=t.mean, std=t.std, features=16)
    assert m.encoder.visual is not tower
    for (k, a), (_, b) in zip(m.encoder.visual.state_dict().items(), tower.state_dict().items()):
        assert torch.equal(a, b), k
    assert not torch.equal(m.encoder.visual.conv1.weight, t.model.visual.conv1.weight)


def test_pretrained_backbone_that_is_not_a_resnet18_is_one_line_error(tmp_path):
    """seg.pretrained_backbone names an image, a resnet34 or a pickled list: one line naming the key
    and the file (before: a traceback from torch.load, and a resnet34 loaded its first blocks into
    the resnet18 without a word); the `distill train backbone` file (resnet18 without fc) loads."""
    from torchvision.models import resnet18, resnet34

    from distill.segmentation.lseg import ResNetEncoder

    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    torch.save(resnet34().state_dict(), tmp_path / "r34.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    for name, says in (("a.png", "not a readable file (not a PyTorch checkpoint: a PNG image)"), ("r34.pth", "not a resnet18 state dict: 96 unexpected keys"),
                       ("list.pth", "not a resnet18 state dict: not a state dict")):
        with pytest.raises(DistillError) as e:
            ResNetEncoder(str(tmp_path / name))
        assert str(e.value).startswith(f"seg.pretrained_backbone: {tmp_path / name}: {says}") and "\n" not in str(e.value)
    net = resnet18()
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, tmp_path / "ok.pth")
    enc = ResNetEncoder(str(tmp_path / "ok.pth"))
    assert torch.equal(enc.layer4[1].conv2.weight, net.layer4[1].conv2.weight)


# ----------------------------------------------------------------------------------------------
# lang-seg's head: the fixed logit scale and the spatial regularisation blocks
# (isl-org/lang-seg modules/models/lseg_net.py)


def _hand_model(logit_scale: str) -> "torch.nn.Module":
    """A 2-d LSeg whose background embedding is set by hand: bg = (0.8, -0.6)."""
    torch.manual_seed(0)
    m = build_lseg(2, "resnet18", features=8, logit_scale=logit_scale)
    with torch.no_grad():
        m.bg_embed.copy_(torch.tensor([0.8, -0.6]))
    return m


def test_fixed_logit_scale_is_langseg_constant_and_never_trained():
    """lang-seg: ``nn.Parameter(torch.ones([]) * np.log(1 / 0.07)).exp()``, a plain tensor nothing
    trains. Hand example: pixels (1, 0) and (0.6, 0.8) against [bg (0.8, -0.6), (1, 0), (0, 1)] have
    cosines (0.8, 1, 0) and (0, 0.6, 0.8); the logits are 1/0.07 times those."""
    from distill.config import TrainConfig
    from distill.engine.optim import build_optimizer

    emb = torch.tensor([[1.0, 0.6], [0.0, 0.8]]).view(1, 2, 1, 2)  # (B, D, H, W): two unit pixels
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cos = torch.tensor([[0.8, 0.0], [1.0, 0.6], [0.0, 0.8]]).view(1, 3, 1, 2)
    fixed = _hand_model("fixed")
    assert build_lseg(2, "resnet18", features=8).logit_scale.requires_grad is False  # fixed is the default
    torch.testing.assert_close(fixed.classify(emb, text), (1 / 0.07) * cos, rtol=1e-6, atol=1e-6)
    # not a parameter, not in the optimizer, not in the state dict; no gradient reaches it
    assert "logit_scale" not in dict(fixed.named_parameters()) and "logit_scale" not in fixed.state_dict()
    opt = build_optimizer(fixed, TrainConfig(optimizer="adamw", lr=0.1))
    assert all(p is not fixed.logit_scale for g in opt.param_groups for p in g["params"])
    x = torch.rand(2, 3, 32, 32)
    masks = torch.randint(0, 3, (2, 32, 32))
    fixed.train()
    fixed(x, {"masks": masks}, text=text)["loss_ce"].backward()
    opt.step()
    assert fixed.logit_scale.grad is None and not fixed.logit_scale.requires_grad
    assert fixed.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    # the learnable scale (the shapes world's): the same logits at init, then trained
    learn = _hand_model("learnable")
    torch.testing.assert_close(learn.classify(emb, text), (1 / 0.07) * cos, rtol=1e-6, atol=1e-6)
    opt = build_optimizer(learn, TrainConfig(optimizer="adamw", lr=0.1))
    assert any(p is learn.logit_scale for g in opt.param_groups for p in g["params"]) and "logit_scale" in learn.state_dict()
    learn.train()
    learn(x, {"masks": masks}, text=text)["loss_ce"].backward()
    assert learn.logit_scale.grad is not None
    opt.step()
    assert learn.logit_scale.exp().item() != pytest.approx(1 / 0.07, rel=1e-3)
    with pytest.raises(DistillError, match=r"^seg\.logit_scale: 'cold' is not one of fixed, learnable$"):
        build_lseg(2, "resnet18", features=8, logit_scale="cold")


def _block_reference(x: torch.Tensor, block, depth: int) -> torch.Tensor:
    """lang-seg's loop written out channel by channel: ``depth - 1`` blocks with the activation,
    one without; bottleneck adds the max over the channels of the block's input."""
    w, b = block.conv.weight, block.conv.bias
    for i in range(depth):
        out = torch.cat([F.conv2d(x[:, k : k + 1], w, b, padding=1) for k in range(x.shape[1])], 1)
        if block.kind == "bottleneck":
            out = out + x.max(dim=1, keepdim=True).values
        x = F.leaky_relu(out) if i < depth - 1 else out
    return x


@pytest.mark.parametrize("kind", ["bottleneck", "depthwise"])
@pytest.mark.parametrize("depth", [1, 3])
def test_head_blocks_match_langseg_and_keep_shapes(kind, depth):
    torch.manual_seed(0)
    m = build_lseg(8, "resnet18", features=8, head_block=kind, head_block_depth=depth).eval()
    assert m.head_block.kind == kind and isinstance(m.head_block.activation, torch.nn.LeakyReLU)  # lang-seg's default lrelu
    assert {n for n, _ in m.head_block.named_parameters()} == {"conv.weight", "conv.bias"}  # one 3x3 conv, 1 -> 1 channel
    assert m.head_block.conv.weight.shape == (1, 1, 3, 3)
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        for c in (2, 5):  # any vocabulary: the block is shared by every class channel
            text = _text(c, 8, c)
            logits = m(x, text=text)
            assert logits.shape == (2, 1 + c, 32, 48)
            emb = m.pixel_embeddings(x, full_res=False)
            cls = F.normalize(torch.cat([m.bg_embed[None], text]), dim=1)
            raw = m.logit_scale.exp() * torch.einsum("bdhw,cd->bchw", emb, cls)
            ref = F.interpolate(_block_reference(raw, m.head_block, depth), size=(32, 48), mode="bilinear", align_corners=False)
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    # the block trains with the rest
    m.train()
    m(x, {"masks": torch.randint(0, 3, (2, 32, 48))}, text=_text(2, 8))["loss_ce"].backward()
    assert m.head_block.conv.weight.grad is not None and m.head_block.conv.weight.grad.abs().sum() > 0


def test_head_block_hand_example():
    """A centre-only kernel (2, bias 0.5): depthwise = 2x + 0.5; bottleneck = 2x + 0.5 + max_k x;
    the last application has no activation, the ones before it lrelu."""
    from distill.segmentation.lseg import LogitBlock

    x = torch.tensor([[[[-1.0]], [[3.0]]]])  # (1, 2, 1, 1)
    for kind, once in (("depthwise", [-1.5, 6.5]), ("bottleneck", [1.5, 9.5])):
        blk = LogitBlock(kind)
        with torch.no_grad():
            blk.conv.weight.zero_()
            blk.conv.weight[0, 0, 1, 1] = 2.0
            blk.conv.bias.fill_(0.5)
            assert blk(x, act=False).flatten().tolist() == once
            assert blk(x).flatten().tolist() == pytest.approx([0.01 * min(v, 0) + max(v, 0) for v in once])
    with pytest.raises(DistillError, match=r"^seg\.head_block_activation: 'gelu' is not one of lrelu, tanh, relu$"):
        LogitBlock("depthwise", "gelu")


def test_head_block_none_is_todays_head():
    """head_block=none adds no module, no parameter and no state: the logits are exactly the scaled
    cosine upsampled, as before the option existed."""
    torch.manual_seed(0)
    m = build_lseg(8, "resnet18", features=8, logit_scale="learnable", head_block="none").eval()
    assert m.head_block is None and not any("head_block" in k for k in m.state_dict())
    torch.manual_seed(0)
    plain = build_lseg(8, "resnet18", features=8, logit_scale="learnable").eval()
    assert m.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), plain.state_dict().values()))
    x, text = torch.rand(2, 3, 32, 32), _text(3, 8)
    with torch.no_grad():
        emb = m.pixel_embeddings(x, full_res=False)
        cls = F.normalize(torch.cat([m.bg_embed[None], text]), dim=1)
        old = m.logit_scale.exp().clamp(max=100.0) * torch.einsum("bdhw,cd->bchw", emb, cls)
        old = F.interpolate(old, size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.equal(m(x, text=text), old)
    with pytest.raises(DistillError, match=r"^seg\.head_block: 'crf' is not one of none, bottleneck, depthwise$"):
        build_lseg(8, "resnet18", features=8, head_block="crf")
    with pytest.raises(DistillError, match=r"^seg\.head_block_depth: expected >= 1"):
        build_lseg(8, "resnet18", features=8, head_block="depthwise", head_block_depth=0)
