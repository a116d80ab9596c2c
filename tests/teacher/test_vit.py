"""The shared ViT internals against open_clip's own code: position-embedding resize, the tokens
after chosen blocks, and the full tower when every block runs."""

import open_clip
import pytest
import torch

from distill.errors import DistillError
from distill.teacher import build_random_teacher
from distill.teacher.vit import block_outputs, embed_tokens, interpolate_pos_embed, patch_size, run_blocks, square


def test_interpolate_pos_embed_matches_open_clip_resize():
    t = build_random_teacher(seed=3, image_size=32, patch=8)  # 4 x 4 patches
    big = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=48, patch_size=8, width=32, layers=2, head_width=16),
                         text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2))
    sd = {k: v.clone() for k, v in t.model.state_dict().items()}
    open_clip.model.resize_pos_embed(sd, big, antialias=False)
    pos = t.model.visual.positional_embedding
    got = interpolate_pos_embed(pos, (4, 4), (6, 6))
    assert got.shape == (37, 32)
    assert torch.allclose(got, sd["visual.positional_embedding"], atol=1e-6)
    assert interpolate_pos_embed(pos, (4, 4), (4, 4)) is pos


def test_block_outputs_match_open_clip_intermediates_and_full_tower():
    t = build_random_teacher(seed=5, layers=3)
    visual = t.model.visual
    x = t.normalize(torch.rand(2, 3, 32, 32))
    acts, grid = block_outputs(visual, x, (0, 2))
    assert grid == (4, 4) and [a.shape for a in acts] == [(2, 17, 32)] * 2
    ref = visual.forward_intermediates(x, indices=[0, 2], intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
    for a, r, p in zip(acts, ref["image_intermediates"], ref["image_intermediates_prefix"]):
        assert torch.allclose(a, torch.cat([p, r], 1), atol=1e-6)
    # every block, then open_clip's pooling and projection: the tower's own forward
    tok, _ = embed_tokens(visual, x)
    out = run_blocks(visual, tok, list(visual.transformer.resblocks))
    pooled, _ = visual._pool(out)  # open_clip's own ln_post + class token
    assert torch.allclose(pooled @ visual.proj, visual(x), atol=1e-5)
    assert run_blocks(visual, tok, []) is tok


def test_patch_size_and_square():
    t = build_random_teacher(patch=8)
    assert patch_size(t.model.visual) == 8 == square((8, 8)) == square(8)
    with pytest.raises(DistillError, match="non-square"):
        square((8, 16), "patch size")
