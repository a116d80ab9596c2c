"""MaskCLIP dense embeddings against a hand-written reference on a random tiny ViT."""

import open_clip
import torch
import torch.nn.functional as F

from distill.teacher import build_random_teacher
from distill.teacher.dense import maskclip_scores, patch_embeddings, pixel_embeddings


def _reference(teacher, images, size):
    """Independent path: an open_clip CLIP built at ``size`` with open_clip's own position-embedding
    resize (bicubic), run block by block; the last block runs its own forward with an attention
    mask that lets every token attend only to itself, which is exactly "value path without
    query-key attention" (attention = identity) with the block's residuals and MLP kept."""
    src = teacher.model
    v = src.visual
    big = open_clip.CLIP(
        embed_dim=teacher.embed_dim,
        vision_cfg=dict(image_size=size, patch_size=teacher.patch_size, width=v.conv1.out_channels,
                        layers=len(v.transformer.resblocks), head_width=v.conv1.out_channels // v.transformer.resblocks[0].attn.num_heads),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
    )
    sd = {k: t.clone() for k, t in src.state_dict().items()}
    open_clip.model.resize_pos_embed(sd, big, antialias=False)
    big.load_state_dict(sd)
    big.eval()
    vis = big.visual
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = teacher.normalize(x)
    tok = vis._embeds(x)
    for blk in vis.transformer.resblocks[:-1]:
        tok = blk(tok)
    L = tok.shape[1]
    mask = torch.full((L, L), float("-inf"))
    mask.fill_diagonal_(0.0)
    tok = vis.transformer.resblocks[-1](tok, attn_mask=mask)
    f = vis.ln_post(tok[:, 1:]) @ vis.proj
    f = F.normalize(f, dim=-1)
    g = size // teacher.patch_size
    return f.transpose(1, 2).reshape(images.shape[0], -1, g, g)


def test_value_path_matches_reference_at_pretrain_size():
    t = build_random_teacher(seed=1)
    imgs = torch.rand(2, 3, 40, 40)
    got = patch_embeddings(t, imgs, size=t.image_size)
    ref = _reference(t, imgs, t.image_size)
    assert got.shape == (2, t.embed_dim, 4, 4)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_value_path_matches_reference_with_interpolated_positions():
    t = build_random_teacher(seed=2)
    imgs = torch.rand(2, 3, 50, 70)
    got = patch_embeddings(t, imgs)  # dense_image_size = 2 x 32 -> 8 x 8 patches
    ref = _reference(t, imgs, t.dense_image_size)
    assert got.shape == (2, t.embed_dim, 8, 8)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    # and it really differs from the usual attention path (the class token's pooled embedding)
    pooled = t.encode_images(imgs)
    assert not torch.allclose(F.normalize(got.mean((2, 3)), dim=1), pooled, atol=1e-3)


def test_pixel_embeddings_unit_norm_and_upsampled():
    t = build_random_teacher(seed=0)
    imgs = torch.rand(1, 3, 24, 40)
    px = pixel_embeddings(t, imgs)
    assert px.shape == (1, t.embed_dim, 24, 40)
    assert torch.allclose(px.norm(dim=1), torch.ones(1, 24, 40), atol=1e-5)
    # pixel scores through the patch map: argmax at a patch centre equals the patch's argmax
    text = F.normalize(torch.randn(5, t.embed_dim), dim=-1)
    s = maskclip_scores(t, imgs, text, out_size=(8, 8))  # 8 x 8 = patch grid -> no resampling
    p = patch_embeddings(t, imgs)
    assert torch.allclose(s, torch.einsum("bdhw,cd->bchw", p, text), atol=1e-5)


def _keys_by_hand(t, imgs, size):
    """The last block's keys as MaskCLIP's ViT computes them with ``return_qkv``: ln_1, the key
    third of in_proj, then ``out_proj`` (mmseg/models/backbones/vit.py), class token dropped."""
    from distill.teacher.vit import embed_tokens, run_blocks

    vis = t.model.visual
    blocks = list(vis.transformer.resblocks)
    tok, _ = embed_tokens(vis, t.normalize(t.resize(imgs, size)))
    y = blocks[-1].ln_1(run_blocks(vis, tok, blocks[:-1]))
    C = y.shape[-1]
    W, b = blocks[-1].attn.in_proj_weight, blocks[-1].attn.in_proj_bias
    return blocks[-1].attn.out_proj(F.linear(y, W[C : 2 * C], b[C : 2 * C]))[:, 1:]


def test_maskclip_keys_are_taken_after_out_proj():
    t = build_random_teacher(seed=4)
    imgs = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        _, k = patch_embeddings(t, imgs, return_keys=True)
        ref = _keys_by_hand(t, imgs, t.dense_image_size)
    assert torch.allclose(k, ref, atol=1e-5)


def test_key_smoothing_and_prompt_denoising_reference():
    """refine_clip_output of the MaskCLIP reference (maskclip_plus_head.py), by hand: denoising sets
    a weak class's logits to -100 before the softmax; smoothing replaces only positions whose top
    probability is below ks_thresh by W @ probs, W from keys L2-normalised over positions."""
    t = build_random_teacher(seed=4)
    imgs = torch.rand(1, 3, 32, 32)
    text = F.normalize(torch.randn(6, t.embed_dim), dim=-1)
    p, k = patch_embeddings(t, imgs, return_keys=True)
    h, w = p.shape[-2:]
    temp = 5.0  # low temperature: random text does not saturate the softmax
    cos = torch.einsum("dhw,cd->chw", p[0], text).reshape(6, -1)  # (C, hw)
    conf = torch.softmax(temp * cos, dim=0).max(dim=1).values
    pd = float(conf.median()) + 1e-6  # removes about half the classes
    weak = conf < pd
    logits = cos.clone()
    logits[weak] = -100.0
    probs = torch.softmax(temp * logits, dim=0)  # the kept classes renormalise
    top = probs.max(dim=0).values
    ks = float(top.median()) + 1e-6  # about half the positions are unsure
    kn = k[0] / k[0].norm(dim=0, keepdim=True)  # (hw, C') normalised over positions (dim 1 of (B, hw, C'))
    ref = probs.clone()
    for i in range(h * w):  # brute force: unsure position i takes sum_j W_ij * probs_j
        if top[i] < ks:
            ref[:, i] = sum(float(kn[i] @ kn[j]) * probs[:, j] for j in range(h * w))
    got = maskclip_scores(t, imgs, text, out_size=(h, w), key_smoothing=ks, prompt_denoising=pd, temperature=temp)[0].reshape(6, -1)
    assert 0 < weak.sum() < 6 and 0 < (top < ks).sum() < h * w
    assert torch.allclose(got, ref, atol=1e-4)
    sure = top >= ks
    assert torch.allclose(got[:, sure], probs[:, sure], atol=1e-6)  # confident positions keep their own (fp32 rounding only)
    assert torch.allclose(got[:, sure].sum(0), torch.ones(int(sure.sum())), atol=1e-5)
    assert float(got[weak][:, sure].abs().max()) < 1e-30  # a denoised class has no probability left
    # denoising alone keeps logits (the reference only softmaxes for smoothing)
    only_pd = maskclip_scores(t, imgs, text, out_size=(h, w), prompt_denoising=pd, temperature=temp)[0].reshape(6, -1)
    assert torch.allclose(only_pd, logits, atol=1e-5)
