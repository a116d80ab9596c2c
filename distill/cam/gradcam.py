"""Softmax Grad-CAM on the frozen teacher (CLIP-ES 3.2, eq. 2-4): hooks that always remove
themselves, the trunk run once per image, the last block per (image, class), and an adapter
to pytorch-grad-cam used as the reference in tests. See :mod:`distill.cam` for the chain."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from distill.errors import DistillError
from distill.teacher.vit import embed_tokens, patch_size, run_blocks


# ---------------------------------------------------------------------------------------------
# Hooks (context managers that always remove themselves)
# ---------------------------------------------------------------------------------------------


class AttentionRecorder:
    """Record the head-averaged attention weights of ``nn.MultiheadAttention`` modules.

    open_clip's blocks call ``self.attn(..., need_weights=False)``; a forward pre-hook switches
    that call to ``need_weights=True, average_attn_weights=True`` (the block keeps only ``[0]``, so
    its output is unchanged) and a forward hook stores the weights, ``(B, L, L)`` per call, in
    call order in ``self.weights``.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        for m in modules:
            if not isinstance(m, nn.MultiheadAttention):
                raise DistillError(
                    f"teacher: CLIP-ES needs nn.MultiheadAttention in the vision blocks, found {type(m).__name__}"
                )
        self.modules = list(modules)
        self.weights: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _pre(self, module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["need_weights"] = True
        kwargs["average_attn_weights"] = True
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        self.weights.append(output[1].detach())

    def __enter__(self) -> "AttentionRecorder":
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class OutputRecorder:
    """Keep the (non-detached) output of one module, e.g. ``resblocks[-1].ln_1``."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.output: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args, output):
        self.output = output

    def __enter__(self) -> "OutputRecorder":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# ---------------------------------------------------------------------------------------------
# The vision tower, split at the last block
# ---------------------------------------------------------------------------------------------


def _visual(teacher) -> nn.Module:
    visual = teacher.model.visual
    for name in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post"):
        if not hasattr(visual, name):
            raise DistillError(f"teacher: CLIP-ES needs an open_clip ViT image tower (missing visual.{name})")
    return visual


def patch_size_of(teacher) -> int:
    return patch_size(_visual(teacher))


def _blocks(visual) -> list[nn.Module]:
    return list(visual.transformer.resblocks)


@torch.no_grad()
def trunk_tokens(teacher, images: torch.Tensor, record_attention: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    """Run the image tower up to (not including) the last block.

    images: (B, 3, H, W) float in [0, 1], H and W multiples of the patch size.
    Returns ``tokens (B, 1 + h*w, W)`` (input of the last block), the attention weights of blocks
    ``1..L-1`` (each ``(B, 1 + h*w, 1 + h*w)``, heads averaged; an empty list without
    ``record_attention``, which lets the blocks use the fused attention kernel) and the grid ``(h, w)``.
    """
    visual = _visual(teacher)
    ps = patch_size_of(teacher)
    H, W = images.shape[-2:]
    if H % ps or W % ps:
        raise DistillError(f"images: size {H}x{W} is not a multiple of the patch size {ps} (resize first)")
    x = teacher.normalize(images.to(teacher.device))
    blocks = _blocks(visual)
    with _autocast(teacher), AttentionRecorder([b.attn for b in blocks[:-1]] if record_attention else []) as rec:
        x, (h, w) = embed_tokens(visual, x)
        x = run_blocks(visual, x, blocks[:-1])
    return x, rec.weights, (h, w)


def _autocast(teacher):
    fn = getattr(teacher, "autocast", None)
    return fn() if callable(fn) else contextlib.nullcontext()


def _pool_project(visual, x: torch.Tensor, pool: str) -> torch.Tensor:
    """Image embedding from the last block's output ``x (R, L, W)``."""
    if pool == "mean":
        # repo clip/model.py forward_last_layer: ln_post, mean over patch tokens, proj.
        pooled = visual.ln_post(x)[:, 1:].mean(1)
    elif pool == "model":
        pooled, _ = visual._pool(x)
    else:
        raise DistillError(f"cam.pool: {pool!r} is not one of mean, model")
    if getattr(visual, "proj", None) is not None:
        pooled = pooled @ visual.proj
    return pooled


def normalize_cam(cam: torch.Tensor) -> torch.Tensor:
    """Per map min-max to [0, 1] over the last two dims (pytorch_grad_cam ``scale_cam_image``).

    scale_cam_image divides by ``1e-7 + max``, an absolute epsilon: a softmax Grad-CAM whose class
    probability is close to 1 has gradients, hence a map, below 1e-7 (its shape intact), which that
    leaves at ~1e-4 of full scale, so CAA's 0.4 box (an 8-bit threshold, as the repo's
    scoremap2bbox) sees nothing and the class vanishes. Only an all-zero map stays zero here.
    """
    flat = cam.flatten(-2)
    flat = flat - flat.min(-1, keepdim=True).values
    flat = flat / flat.max(-1, keepdim=True).values.clamp_min(torch.finfo(flat.dtype).tiny)
    return flat.reshape(cam.shape)


def _class_token_only(visual, blk: nn.Module) -> bool:
    """True when the image embedding reads the class token alone (open_clip ``pool_type='tok'``, no
    attention pooling) and ``blk`` is an open_clip block, so :func:`_last_block_class_token` applies."""
    return (getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", None) == "tok"
            and getattr(visual.transformer, "batch_first", True)  # ln_1's recorded output is then batch-first
            and isinstance(getattr(blk, "attn", None), nn.MultiheadAttention)
            and all(hasattr(blk, n) for n in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))


def _last_block_class_token(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock.forward`` evaluated at the class token only: ``(R, 1, W)``
    from ``x (R, L, W)`` (batch-first). With class-token pooling the other tokens' queries and MLP
    rows never reach the image embedding, so this is exact for the CAM's scores and gradients
    (every token still enters through the keys and values of ``ln_1``), at ~1/L of the attention."""
    a = blk.ln_1(x)
    q = a[:, :1]
    if blk.attn.batch_first:
        att = blk.attn(q, a, a, need_weights=False)[0]
    else:
        att = blk.attn(q.transpose(0, 1), a.transpose(0, 1), a.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    y = x[:, :1] + blk.ls_1(att)
    return y + blk.ls_2(blk.mlp(blk.ln_2(y)))


def _target_scores(feats: torch.Tensor, labels: Sequence[Sequence[int]], text: torch.Tensor, bg: torch.Tensor | None,
                   softmax: bool, logit_scale: float) -> torch.Tensor:
    """(R,) target score of each (image, present class) row of ``feats (R, D)`` (unit rows, image
    by image as in ``labels``): the class's softmax probability among the image's present classes
    and the background words (CLIP-ES 3.2, eq. 3), or its logit without ``softmax``."""
    scores = []
    r = 0
    for ks in labels:
        if not len(ks):
            continue
        n = len(ks)
        fb = feats[r : r + n]  # (n, D): this image's rows
        t = text[list(ks)].float()
        if softmax:
            t_all = t if bg is None else torch.cat([t, bg.float()], 0)
            probs = (logit_scale * fb @ t_all.T).softmax(-1)  # (n, n + M)
            scores.append(probs[torch.arange(n), torch.arange(n)])
        else:
            scores.append(logit_scale * (fb * t).sum(-1))
        r += n
    return torch.cat(scores)


@dataclass
class LastBlockOut:
    cams: torch.Tensor  # (R, h, w) Grad-CAM, ReLU + min-max normalised
    scores: torch.Tensor  # (R,) the target score of each row
    attn_last: torch.Tensor  # (B, L, L) attention of the last block (one row per image)


def last_block_gradcam(
    teacher,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    labels: Sequence[Sequence[int]],
    text: torch.Tensor,
    bg_text: torch.Tensor | None = None,
    *,
    softmax: bool = True,
    logit_scale: float = 100.0,
    pool: str = "mean",
    need_attention: bool = True,
) -> LastBlockOut:
    """Grad-CAM at ``resblocks[-1].ln_1`` for every (image, present class) in one backward.

    tokens: (B, L, W) from :func:`trunk_tokens`; labels[b]: vocabulary indices present in image b;
    text: (C, D) L2-normalised class embeddings; bg_text: (M, D) background word embeddings.
    ``softmax=True``: the target of row (b, k) is ``softmax(logit_scale * cos(f_b, [T[labels[b]],
    bg]))[k]`` (CLIP-ES 3.2, eq. 3); ``softmax=False``: plain Grad-CAM of the logit
    ``logit_scale * cos(f_b, T[k])``.
    Rows are ordered image by image, class by class as in ``labels``. ``attn_last`` is empty
    (``(0, L, L)``) without ``need_attention`` (CAA is its only reader).
    """
    visual = _visual(teacher)
    blocks = _blocks(visual)
    last = blocks[-1]
    rows = [(b, k) for b, ks in enumerate(labels) for k in range(len(ks))]
    h, w = grid
    if not rows:
        return LastBlockOut(
            tokens.new_zeros((0, h, w)), tokens.new_zeros((0,)), tokens.new_zeros((0,) + (tokens.shape[1],) * 2)
        )
    b_idx = torch.tensor([b for b, _ in rows], device=tokens.device)
    # First row of each image, to read the last block's attention once per image.
    first_row = torch.tensor([next(i for i, (b, _) in enumerate(rows) if b == bb) for bb in range(len(labels))
                              if len(labels[bb])], device=tokens.device)
    x = tokens.detach()[b_idx].clone().requires_grad_(True)
    text = text.to(tokens.device)
    bg = bg_text.to(tokens.device) if bg_text is not None and len(bg_text) else None
    cls_only = pool == "model" and _class_token_only(visual, last)
    with torch.enable_grad(), _autocast(teacher), OutputRecorder(last.ln_1) as act_rec, \
            AttentionRecorder([last.attn] if need_attention and not cls_only else []) as att_rec:
        out = _last_block_class_token(last, x) if cls_only else run_blocks(visual, x, [last])
        feats = _pool_project(visual, out, pool).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        scores = _target_scores(feats, labels, text, bg, softmax, logit_scale)
        act = act_rec.output
        (grads,) = torch.autograd.grad(scores.sum(), act)
    if not getattr(visual.transformer, "batch_first", True):
        act, grads = act.transpose(0, 1), grads.transpose(0, 1)
    a = act.detach()[:, 1:].float()  # patch tokens only (reshape_transform drops the class token)
    g = grads[:, 1:].float()
    weights = g.mean(1)  # (R, W): Grad-CAM channel weights = spatial mean of gradients
    cam = torch.relu((a * weights[:, None, :]).sum(-1)).reshape(-1, h, w)
    if not need_attention:
        attn_last = tokens.new_zeros((0,) + (tokens.shape[1],) * 2)
    elif cls_only:  # the full attention of the last block, once per image with labels (for CAA)
        with torch.no_grad(), _autocast(teacher), AttentionRecorder([last.attn]) as att_rec:
            run_blocks(visual, tokens.detach()[b_idx[first_row]], [last])
        attn_last = att_rec.weights[0]
    else:
        attn_last = att_rec.weights[0][first_row]
    return LastBlockOut(normalize_cam(cam), scores.detach(), attn_last)


# ---------------------------------------------------------------------------------------------
# Class-aware attention affinity (CLIP-ES 3.3; repo generate_cams_voc12.py)
# ---------------------------------------------------------------------------------------------


class ClipLogits(nn.Module):
    """``images (B, 3, H, W) in [0, 1] -> logits (B, T)``: ``logit_scale * cos`` (or its softmax)
    against fixed text embeddings, through the teacher's own blocks; a model for pytorch_grad_cam."""

    def __init__(self, teacher, text: torch.Tensor, *, logit_scale: float = 100.0, pool: str = "mean",
                 softmax: bool = False):
        super().__init__()
        self.teacher = teacher
        self.visual = _visual(teacher)
        self.register_buffer("text", text.float(), persistent=False)
        self.logit_scale = logit_scale
        self.pool = pool
        self.softmax = softmax

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x, _ = embed_tokens(visual, self.teacher.normalize(images))
        x = run_blocks(visual, x, _blocks(visual))
        f = _pool_project(visual, x, self.pool).float()
        f = f / f.norm(dim=-1, keepdim=True)
        logits = self.logit_scale * f @ self.text.T
        return logits.softmax(-1) if self.softmax else logits


def vit_reshape_transform(grid: tuple[int, int], batch_first: bool = True):
    """pytorch_grad_cam reshape_transform for ViT tokens: drop the class token, ``(B, C, h, w)``."""
    h, w = grid

    def fn(t: torch.Tensor) -> torch.Tensor:
        if not batch_first:
            t = t.transpose(0, 1)
        return t[:, 1:].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)

    return fn


def pytorch_gradcam(teacher, image: torch.Tensor, text: torch.Tensor, targets: Sequence[int], *,
                    logit_scale: float = 100.0, pool: str = "mean", softmax: bool = False) -> np.ndarray:
    """pytorch_grad_cam.GradCAM at ``resblocks[-1].ln_1``, one call per target (the per-class loop).

    image: (3, H, W) in [0, 1]. Returns (K, H, W) float32 at the input resolution, as the library
    returns it (min-max normalised, bilinear cv2 resize, min-max again).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    visual = _visual(teacher)
    ps = patch_size_of(teacher)
    H, W = image.shape[-2:]
    model = ClipLogits(teacher, text.to(teacher.device), logit_scale=logit_scale, pool=pool, softmax=softmax)
    layer = _blocks(visual)[-1].ln_1
    reshape = vit_reshape_transform((H // ps, W // ps), getattr(visual.transformer, "batch_first", True))
    # The teacher is frozen: the input must require grad for the layer's output to have a graph.
    x = image[None].to(teacher.device).float().requires_grad_(True)
    outs = []
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        for t in targets:
            outs.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t))])[0])
    return np.stack(outs) if outs else np.zeros((0, H, W), np.float32)


# ---------------------------------------------------------------------------------------------
# Files: vocabulary, background words, image-level labels, images
