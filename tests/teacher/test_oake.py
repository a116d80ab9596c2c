"""OADP's object-aware knowledge extraction (teacher/oake.py): with no patch masked the object
token is the class-token path; the adaptive square and the patch mask as the reference computes
them; a proposal smaller than a patch still reads its patch; region_embeddings' oake mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.teacher.clip import build_random_teacher
from distill.teacher.oake import (
    _patch_tokens,
    adaptive_squares,
    grid_size,
    object_masks,
    object_token_embeddings,
)
from distill.teacher.vit import run_blocks


@pytest.fixture(scope="module")
def teacher():
    return build_random_teacher(image_size=32, patch=8, width=32, layers=2, seed=5)


def _class_token_path(visual, tok):
    x = run_blocks(visual, tok, list(visual.transformer.resblocks))
    return visual.ln_post(x)[:, 0] @ visual.proj


@pytest.mark.parametrize("upsample", [1, 2])
def test_object_token_with_every_patch_unmasked_is_the_class_token(teacher, upsample):
    """The issue's check: mask covering every patch -> the object token equals the class token."""
    visual = teacher.model.visual
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g)
    n = grid_size(visual, 32, upsample)
    with torch.no_grad():
        got = object_token_embeddings(visual, x, torch.zeros(3, n, n, dtype=torch.bool), upsample)
        want = visual(x) if upsample == 1 else _class_token_path(visual, _patch_tokens(visual, x, upsample)[0])
    assert (got - want).abs().max() < 1e-5
    # and masking changes it (the token reads only the object's patches)
    bg = torch.ones(3, n, n, dtype=torch.bool)
    bg[:, :2, :2] = False
    with torch.no_grad():
        masked = object_token_embeddings(visual, x, bg, upsample)
    assert (masked - want).abs().max() > 1e-3 and torch.isfinite(masked).all()


def test_upsampled_grid_is_the_references_halved_stride(teacher):
    visual = teacher.model.visual  # patch 8 at 32 px: 4x4; stride 4, padding 3: (32 + 6 - 8) / 4 + 1 = 8
    assert grid_size(visual, 32, 1) == 4 and grid_size(visual, 32, 2) == 8
    tok, h = _patch_tokens(visual, torch.zeros(1, 3, 32, 32), 2)
    assert h == 8 and tok.shape == (1, 1 + 64, 32)


def test_adaptive_square_as_the_reference():
    """side = sqrt(8 * area) on the centre, shifted inside the image when it fits (objects.py _expand)."""
    boxes = torch.tensor([[40.0, 40, 50, 60], [0, 0, 10, 10], [90, 0, 100, 5], [0, 0, 100, 100]])
    sq = adaptive_squares(boxes, 100, 100)
    side = [math.sqrt(8 * 200), math.sqrt(800), math.sqrt(400), math.sqrt(8e4)]
    assert torch.allclose(sq[:, 2] - sq[:, 0], torch.tensor(side), atol=1e-4)
    assert torch.allclose(sq[:, 3] - sq[:, 1], torch.tensor(side), atol=1e-4)
    assert torch.allclose(sq[0, :2], torch.tensor([45 - side[0] / 2, 50 - side[0] / 2]), atol=1e-4)  # inside: centred
    assert torch.allclose(sq[1, :2], torch.zeros(2)) and torch.allclose(sq[2, 2:3], torch.tensor([100.0]))  # shifted in
    assert torch.allclose(sq[2, 1:2], torch.zeros(1))
    assert torch.allclose(sq[3], torch.tensor([50 - side[3] / 2, 50 - side[3] / 2, 50 + side[3] / 2, 50 + side[3] / 2]), atol=1e-3)  # larger than the image: centred


def test_object_mask_marks_the_patches_outside_and_keeps_a_tiny_box_patch():
    sq = torch.tensor([[0.0, 0, 16, 16], [0, 0, 16, 16]])
    boxes = torch.tensor([[0.0, 0, 7.9, 15.9], [9.0, 9, 9.5, 9.5]])  # the left half; a box inside one patch, no patch centre
    bg = object_masks(boxes, sq, 4)
    assert bg[0, :, :2].logical_not().all() and bg[0, :, 2:].all()
    # nearest resize samples pixels 2, 6, 10, 14: none inside [9, 9.5] -> the patch under the centre is kept
    assert int((~bg[1]).sum()) == 1 and not bg[1, 2, 2]


def test_region_embeddings_oake_mode(teacher):
    from distill.teacher.regions import region_embeddings

    img = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[4.0, 4, 20, 30], [30, 10, 31, 11], [0, 0, 64, 48], [10, 10, 10, 20]])  # a 1 px box; a zero-width box
    out, info = region_embeddings(teacher, [img], [boxes], mode="oake", return_info=True)
    e = out[0]
    assert e.shape == (4, teacher.embed_dim) and torch.isfinite(e).all()
    assert torch.allclose(e[:3].norm(dim=-1), torch.ones(3), atol=1e-5) and info["valid"][0].tolist() == [True, True, True, False]
    assert e[3].abs().sum() == 0  # a skipped box is a zero row, as in the other modes
    assert F.cosine_similarity(e[0], e[2], dim=0) < 0.9999  # different objects, different embeddings
