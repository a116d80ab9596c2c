"""ViT internals of an open_clip image tower (``VisionTransformer``), shared by the dense paths
(MaskCLIP in distill/teacher/dense.py, CLIPSelf), the CAMs (CLIP-ES Grad-CAM in
distill/cam/gradcam.py) and the CLIPSeg / LSeg backbones (distill/segmentation/).

Tokens are batch-first ``(B, 1 + h*w, C)``, class token first, patches row-major; a tower whose
transformer runs sequence-first (``transformer.batch_first=False``) is transposed around its
blocks only. Position embeddings are resized bicubically to the input's patch grid (as MaskCLIP's
``interpolate_mode='bicubic'`` and open_clip's ``resize_pos_embed``).

>>> tok, (h, w) = embed_tokens(visual, x)        # x (B, 3, H, W) normalised -> after ln_pre
>>> tok = run_blocks(visual, tok, blocks[:-1])   # the trunk
>>> v, k = value_path(blocks[-1], tok)           # MaskCLIP's last block (no query-key attention)
>>> acts, grid = block_outputs(visual, x, (3, 7, 9))   # CLIPSeg's activations
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError


def square(v, what: str = "image size") -> int:
    """An int, or the side of a square ``(a, a)`` size; a non-square one is a :class:`DistillError`."""
    if isinstance(v, (tuple, list)):
        if v[0] != v[1]:
            raise DistillError(f"teacher: non-square {what} {tuple(v)} is not supported")
        return int(v[0])
    return int(v)


def patch_size(visual: nn.Module) -> int:
    """The patch size in pixels of an open_clip ViT tower (its patch embedding's kernel)."""
    return square(visual.conv1.kernel_size, "patch size")


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh*gw, C) learned position embedding -> (1 + h*w, C) for a ``new_grid`` of patches
    (class token kept, patch part resized bicubically, align_corners=False)."""
    if tuple(grid) == tuple(new_grid):
        return pos
    cls, patches = pos[:1], pos[1:]
    C = pos.shape[-1]
    patches = patches.reshape(1, grid[0], grid[1], C).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(-1, C)], dim=0)


def embed_tokens(visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Normalised images (B, 3, H, W) -> tokens after ``ln_pre`` (B, 1 + h*w, C) with
    position embeddings interpolated to the patch grid; returns also (h, w)."""
    x = visual.conv1(x)  # (B, C, h, w)
    B, C, h, w = x.shape
    x = x.reshape(B, C, h * w).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = interpolate_pos_embed(visual.positional_embedding, tuple(visual.grid_size), (h, w))
    x = x + pos.to(x.dtype)
    x = visual.ln_pre(x)
    return x, (h, w)


def iter_blocks(visual: nn.Module, x: torch.Tensor, blocks: Sequence[nn.Module]) -> Iterator[torch.Tensor]:
    """Run ``blocks`` on batch-first tokens ``x`` (B, L, C); yields each block's output, batch-first."""
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in blocks:
        x = blk(x)
        yield x if batch_first else x.transpose(0, 1)


def run_blocks(visual: nn.Module, x: torch.Tensor, blocks: Sequence[nn.Module]) -> torch.Tensor:
    """Batch-first tokens (B, L, C) through ``blocks`` -> (B, L, C) (``x`` itself for no blocks)."""
    for x in iter_blocks(visual, x, blocks):
        pass
    return x


def block_outputs(visual: nn.Module, x: torch.Tensor, layers: Sequence[int]) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Normalised images (B, 3, H, W) -> the outputs (B, 1 + h*w, C) of the blocks ``layers``
    (0-based), in block order, and the patch grid (h, w). Blocks after the deepest one do not run."""
    tok, grid = embed_tokens(visual, x)
    last = max(layers)
    out = [t for i, t in enumerate(iter_blocks(visual, tok, visual.transformer.resblocks[: last + 1])) if i in layers]
    return out, (int(grid[0]), int(grid[1]))


def check_block(block: nn.Module) -> None:
    """The value path reads an open_clip block with a fused ``in_proj_weight`` and no ``ln_attn``."""
    attn = getattr(block, "attn", None)
    if attn is None or getattr(attn, "in_proj_weight", None) is None or not hasattr(block, "ln_1") or not hasattr(block, "mlp"):
        raise DistillError("teacher: MaskCLIP needs an open_clip ViT whose blocks use a fused in_proj_weight (nn.MultiheadAttention)")
    if hasattr(block, "ln_attn") and not isinstance(block.ln_attn, torch.nn.Identity):
        raise DistillError("teacher: MaskCLIP value path does not support blocks with ln_attn (scale_attn)")


def value_path(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MaskCLIP's last block (section 3.2; see distill/teacher/dense.py): (B, L, C) tokens ->
    (value-path output (B, L, C), keys (B, L, C)). The query-key attention is dropped; the
    value projection, ``out_proj``, the block's residual and its MLP are kept."""
    check_block(block)
    attn = block.attn
    C = x.shape[-1]
    W, b = attn.in_proj_weight, attn.in_proj_bias
    y = block.ln_1(x)
    k = F.linear(y, W[C : 2 * C], None if b is None else b[C : 2 * C])
    v = F.linear(y, W[2 * C :], None if b is None else b[2 * C :])
    v = attn.out_proj(v)
    v = x + block.ls_1(v)
    v = v + block.ls_2(block.mlp(block.ln_2(v)))
    return v, k
