"""OADP's Object-Aware Knowledge Extraction (Wang et al., CVPR 2023, section 3.2;
github.com/LutingWang/OADP, ``oadp/oake/objects.py``): the teacher's embedding of a proposal read
from an adaptive square crop by an extra *object token* whose attention is masked to the patches
inside the proposal.

- **Adaptive square crop** (``COCODataset._expand``, ``ExpandMode.ADAPTIVE``): a square of side
  ``sqrt(8 * area)`` centred on the proposal, shifted back inside the image when it fits there
  (else it runs past the border, padded with zeros as ``PIL.Image.crop`` pads), resized to the
  tower's input.
- **Object token** (``Hooks``): a copy of the class token's input runs beside the tokens through
  every block; at each block it attends over ``[patch tokens, itself]`` (not the class token) of
  that block's input, the patches outside the proposal pushed down by an additive ``-100``
  (``attn_mask *= -100``), then the block's MLP; the tower's output is read from it
  (``ln_post`` + ``proj``) instead of from the class token. The class token and the patches run
  the unmodified tower, so with no patch masked the object token *is* the class token.
- The mask is the proposal inside the square at pixel level, nearest-resized to the patch grid
  (``COCODataset._mask``). A proposal that covers no patch (smaller than a patch) keeps the patch
  under its centre, so the token always reads the object (never only itself; never a NaN: its own
  position is never masked).
- ``upsample``: the reference halves the patch stride (``conv1.stride // 2``, padding
  ``(patch - 1) // 2``, position embeddings interpolated to twice the grid: ``Validator._build_model``,
  ``upsample=2``); 1 keeps the tower as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.teacher.vit import check_block, interpolate_pos_embed, iter_blocks, patch_size

SCALE_RATIO = 8.0  # objects.py ExpandMode.ADAPTIVE: length = sqrt(area * scale_ratio)
MASK_LOGIT = -100.0  # objects.py visual_forward_pre: attn_mask *= -100
UPSAMPLE = 2  # objects.py Validator._build_model(upsample=2): the patch stride halved


def adaptive_squares(boxes: torch.Tensor, height: int, width: int, ratio: float = SCALE_RATIO) -> torch.Tensor:
    """(N, 4) XYXY proposals -> (N, 4) XYXY squares of side ``sqrt(ratio * area)`` on each box's
    centre, translated to lie inside the image where the side fits (objects.py ``_expand``)."""
    b = boxes.float()
    wh = (b[:, 2:] - b[:, :2]).clamp_min(0)
    side = torch.sqrt(wh[:, 0] * wh[:, 1] * ratio)[:, None]
    centre = (b[:, :2] + b[:, 2:]) / 2
    lt, rb = centre - side / 2, centre + side / 2
    size = torch.tensor([float(width), float(height)])
    offset = torch.where(lt >= 0, torch.zeros_like(lt), -lt)
    offset = torch.where(rb <= size, offset, size - rb)
    offset = torch.where(side.expand(-1, 2) <= size, offset, torch.zeros_like(offset))
    return torch.cat([lt + offset, rb + offset], dim=1)


def object_masks(boxes: torch.Tensor, squares: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, grid, grid) bool, True where a patch is *outside* the proposal (objects.py ``_mask``:
    pixel columns / rows of the square within the box, inclusive, nearest-resized to the grid);
    a proposal covering no patch keeps the patch under its centre."""
    out = []
    for box, sq in zip(boxes.float(), squares.float()):
        side = max(1, int(round(float(sq[2] - sq[0]))))
        fg = box - sq[[0, 1, 0, 1]]
        r = torch.arange(side, dtype=torch.float32)
        inside = ((fg[1] <= r) & (r <= fg[3]))[:, None] & ((fg[0] <= r) & (r <= fg[2]))[None, :]
        bg = F.interpolate((~inside).float()[None, None], size=(grid, grid), mode="nearest")[0, 0] > 0.5
        if bg.all():
            cx = float((fg[0] + fg[2]) / 2) / side * grid
            cy = float((fg[1] + fg[3]) / 2) / side * grid
            bg[min(grid - 1, max(0, int(cy))), min(grid - 1, max(0, int(cx)))] = False
        out.append(bg)
    return torch.stack(out) if out else torch.zeros(0, grid, grid, dtype=torch.bool)


def grid_size(visual, image_size: int, upsample: int = 1) -> int:
    """Patches per side of the (upsampled) tower at ``image_size``."""
    p = patch_size(visual)
    if upsample == 1:
        return image_size // p
    stride, pad = p // upsample, (p - 1) // 2
    return (image_size + 2 * pad - p) // stride + 1


def _patch_tokens(visual, x: torch.Tensor, upsample: int) -> tuple[torch.Tensor, int]:
    """Tokens after ``ln_pre`` (B, 1 + g*g, C) of the tower, the patch stride divided by ``upsample``."""
    p = patch_size(visual)
    if upsample == 1:
        x = visual.conv1(x)
    else:
        if p % upsample:
            raise DistillError(f"regions.oake_upsample: {upsample} does not divide the patch size {p}")
        x = F.conv2d(x, visual.conv1.weight, visual.conv1.bias, stride=p // upsample, padding=(p - 1) // 2)
    B, C, h, w = x.shape
    x = x.reshape(B, C, h * w).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = interpolate_pos_embed(visual.positional_embedding, tuple(visual.grid_size), (h, w))
    return visual.ln_pre(x + pos.to(x.dtype)), h


def object_token_embeddings(visual, x: torch.Tensor, bg: torch.Tensor, upsample: int = 1) -> torch.Tensor:
    """Normalised crops (B, 3, S, S) and their background masks (B, g, g) (True = outside the
    object) -> (B, D) object-token embeddings, not normalised."""
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise DistillError("regions.mode=oake: needs a ViT tower pooled at its class token (open_clip pool_type 'tok')")
    tok, g = _patch_tokens(visual, x, upsample)
    if bg.shape[-2:] != (g, g):
        raise DistillError(f"oake: masks of {tuple(bg.shape[-2:])} patches for a {g}x{g} grid")
    B = tok.shape[0]
    blocks = list(visual.transformer.resblocks)
    for blk in blocks:
        check_block(blk)
    # additive mask over [patches, object token] (the token itself never masked)
    add = torch.cat([bg.reshape(B, -1).to(tok.dtype) * MASK_LOGIT, tok.new_zeros(B, 1)], dim=1)
    y = tok[:, :1]
    x_in = tok
    for blk, x_out in zip(blocks, iter_blocks(visual, tok, blocks)):
        heads = blk.attn.num_heads
        kv = blk.ln_1(torch.cat([x_in[:, 1:], y], dim=1))
        q = kv[:, -1:]
        mask = add[:, None, :].repeat_interleave(heads, dim=0)  # (B * heads, 1, L)
        if blk.attn.batch_first:
            a = blk.attn(q, kv, kv, need_weights=False, attn_mask=mask)[0]
        else:
            a = blk.attn(q.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1), need_weights=False, attn_mask=mask)[0].transpose(0, 1)
        y = y + blk.ls_1(a)
        y = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
        x_in = x_out
    if getattr(visual, "final_ln_after_pool", False):
        pooled = visual.ln_post(y[:, 0])
    else:
        pooled = visual.ln_post(y)[:, 0]
    return pooled @ visual.proj if visual.proj is not None else pooled


def crop_squares(images: torch.Tensor, owners: torch.Tensor, squares: torch.Tensor, size: int) -> torch.Tensor:
    """Square crops (K, 3, size, size) of ``images`` (B, 3, H, W) by ``squares`` (K, 4) XYXY of
    image ``owners`` (K,), zero outside the image (PIL's crop) -- RoIAlign on a zero-padded copy."""
    from torchvision.ops import roi_align

    H, W = images.shape[-2:]
    side = squares[:, 2] - squares[:, 0]
    pad = int(math.ceil(max(0.0, float((-squares[:, :2]).max()), float((squares[:, 2] - W).max()), float((squares[:, 3] - H).max()))))
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    rois = torch.cat([owners[:, None].float(), squares + pad], dim=1).to(images.device)
    sr = max(1, int(math.ceil(float(side.max()) / size)))  # samples per output pixel ~ area-averaging when shrinking
    return roi_align(padded, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=sr, aligned=True)
