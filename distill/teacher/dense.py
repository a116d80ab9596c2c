"""Dense teacher embeddings: MaskCLIP (Zhou, Loy, Dai, "Extract Free Dense Labels from CLIP",
ECCV 2022).

MaskCLIP section 3.2 drops the query-key attention of the last attention layer and keeps its value
path, so every patch token becomes an embedding in the joint space, directly comparable with the
text embeddings. For a ViT we follow the released MaskCLIP code (as read in the copy at
github.com/volgachen/MaskCLIP, ``mmseg/models/backbones/vit.py``, ``TransformerEncoderLayer.forward`` with ``return_qkv=True``,
config ``configs/_base_/models/maskclip_vit16.py``: ``return_qkv=True, final_norm=True``), which
keeps the rest of the last block around the value path::

    y = ln_1(x)
    v = out_proj(y @ W_v^T + b_v)          # W_v, b_v: last third of in_proj_weight / in_proj_bias
    v = x + v                              # the block's residual
    v = v + mlp(ln_2(v))                   # the block's MLP with its residual
    f = ln_post(v) @ proj                  # final norm + visual projection (MaskClipHead `proj`)

Position embeddings are interpolated bicubically when the dense input differs from the pretrain
size (MaskCLIP ``interpolate_mode='bicubic'``). The token embedding and the value path live in
distill/teacher/vit.py, shared with the CAMs and the CLIPSeg backbone. Key smoothing and prompt denoising (MaskCLIP
section 3.2, "Key Smoothing and Prompt Denoising") act on class scores: see :func:`maskclip_refine`.

The dense path runs on the teacher's *dense tower* (:func:`tower_for_dense_paths`): its image tower, or, when
``teacher.dense_tower`` names one, a CLIPSelf-distilled copy of it
(distill/teacher/clipself.py) while crops, the class token and text keep the original teacher.
:func:`dense_feature_map` is the same computation with gradients, for training that tower.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.teacher.formats import load_state_dict_checked, load_weights_file
from distill.teacher.vit import embed_tokens, run_blocks, value_path


def tower_for_dense_paths(teacher) -> torch.nn.Module:
    """The image tower the dense paths run on: ``teacher.dense_tower`` (CLIPSelf weights, see
    :func:`load_dense_tower`) when set, else ``teacher.model.visual``."""
    dv = getattr(teacher, "dense_tower", None)
    return dv if dv is not None else teacher.model.visual


def dense_feature_map(visual, x: torch.Tensor, return_keys: bool = False):
    """The MaskCLIP value-path map of an open_clip ViT tower, differentiable (no ``no_grad``).

    Args:
        visual: an open_clip ``VisionTransformer``.
        x: (B, 3, S, S) images already resized and normalised (mean / std).
    Returns:
        (B, D, h, w) float32 with h = w = S // patch, L2-normalised along D; with
        ``return_keys`` also the last block's keys after its ``out_proj`` (B, h*w, C), as
        MaskCLIP's key smoothing uses them.
    """
    blocks = list(visual.transformer.resblocks)
    tok, (h, w) = embed_tokens(visual, x)
    tok = run_blocks(visual, tok, blocks[:-1])
    v, k = value_path(blocks[-1], tok)
    if return_keys:  # the reference takes q, k, v all through out_proj (MaskCLIP mmseg/models/backbones/vit.py)
        k = blocks[-1].attn.out_proj(k)
    f = visual.ln_post(v[:, 1:])
    if visual.proj is not None:
        f = f @ visual.proj
    f = F.normalize(f.float(), dim=-1)
    f = f.transpose(1, 2).reshape(f.shape[0], -1, h, w)
    return (f, k[:, 1:]) if return_keys else f


def load_dense_tower(teacher, path: str) -> torch.nn.Module:
    """A frozen copy of ``teacher.model.visual`` with the image-tower weights of ``path`` (the
    ``visual.*`` keys of an open_clip state dict, as ``distill teacher clipself`` writes).

    A file written by ``distill teacher clipself`` records the fingerprint of the teacher it was
    distilled from; loading it onto another teacher is a :class:`DistillError` (stale weights)."""
    if not os.path.isfile(path):
        raise DistillError(f"teacher.dense_tower: {path} not found (run `distill teacher clipself CONFIG` to write it, or set teacher.dense_tower='')")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        src = meta.get("teacher_fingerprint")
        if src and src != teacher.fingerprint:
            raise DistillError(
                f"teacher.dense_tower: {path} was distilled from teacher {src}, but teacher.pretrained gives "
                f"teacher {teacher.fingerprint}; rerun `distill teacher clipself CONFIG` for this teacher"
            )
    sd = load_weights_file(path)
    vis = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
    if not vis:
        raise DistillError(f"teacher.dense_tower: {path} has no visual.* weights (expected an open_clip state dict)")
    tower = copy.deepcopy(teacher.model.visual)
    load_state_dict_checked(tower, vis, f"teacher.dense_tower {path}")
    tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower.to(teacher.device)


@torch.no_grad()
def patch_embeddings(teacher, images: torch.Tensor, size: int | None = None, return_keys: bool = False):
    """MaskCLIP patch embeddings.

    Args:
        images: (B, 3, H, W) float in [0, 1] (resized to ``size`` x ``size``).
        size: dense input size (default ``teacher.dense_image_size``).
    Returns:
        (B, D, h, w) float32, L2-normalised along D, with h = w = size // patch_size;
        with ``return_keys`` also the last block's keys (B, h*w, C).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise DistillError(f"patch_embeddings: expected images (B, 3, H, W), got shape {tuple(images.shape)}")
    size = size or teacher.dense_image_size
    visual = tower_for_dense_paths(teacher)
    feats, keys = [], []
    bs = max(1, teacher.batch_size // 4)
    for i in range(0, images.shape[0], bs):
        x = teacher.normalize(teacher.resize(images[i : i + bs].to(teacher.device, torch.float32), size))
        with teacher.autocast():
            f, k = dense_feature_map(visual, x, return_keys=True)
        feats.append(f)
        keys.append(k.float())
    out = torch.cat(feats)
    return (out, torch.cat(keys)) if return_keys else out


@torch.no_grad()
def pixel_embeddings(teacher, images: torch.Tensor, size: int | None = None, out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """MaskCLIP embeddings upsampled (bilinear) to pixels.

    Args:
        images: (B, 3, H, W) in [0, 1].
        size: dense input size (default ``teacher.dense_image_size``).
        out_size: output (H', W') (default the input's (H, W)).
    Returns:
        (B, D, H', W') float32, L2-normalised along D.
    """
    out_size = tuple(out_size) if out_size else tuple(images.shape[-2:])
    p = patch_embeddings(teacher, images, size=size)
    up = F.interpolate(p, size=out_size, mode="bilinear", align_corners=False)
    return F.normalize(up, dim=1)


def refinements(tcfg) -> dict:
    """The MaskCLIP refinement settings of a teacher config section, as :func:`maskclip_refine`'s
    keyword arguments (one place for the teacher evaluation, the seg ablation and MaskCLIP+)."""
    return {"key_smoothing": tcfg.key_smoothing, "prompt_denoising": tcfg.prompt_denoising}


def maskclip_refine(logits: torch.Tensor, keys: torch.Tensor | None = None, key_smoothing: float = 0.0,
                    prompt_denoising: float = 0.0, temperature: float = 100.0) -> torch.Tensor:
    """MaskCLIP's key smoothing and prompt denoising (section 3.2), as the reference does them
    (the copy at github.com/volgachen/MaskCLIP, ``mmseg/models/decode_heads/maskclip_plus_head.py``,
    ``refine_clip_output``; ``maskclip_head.py`` ``refine_output`` is the same with ``vote_thresh`` /
    ``cls_thresh``; the ``kspd`` configs use ``ks_thresh=1.0, pd_thresh=0.5``).

    Args:
        logits: (B, C, h, w) cosine similarities on the patch grid (not modified).
        keys: (B, h*w, C') the last block's keys after ``out_proj`` (:func:`patch_embeddings` with
            ``return_keys``); needed when ``key_smoothing > 0``.
        prompt_denoising: ``pd_thresh``; a class whose top probability ``softmax(temperature * cos)``
            over all positions is below it gets logit -100 at every position (pushed down before
            any softmax, so the other classes renormalise). 0 = off.
        key_smoothing: ``ks_thresh``; the scores become probabilities ``softmax(temperature * .)``
            and a position whose top probability is below it takes ``W @ probs``, with
            ``W = k_n @ k_n^T``: confident positions keep their own. 0 = off.
    Returns:
        (B, C, h, w): the logits when only denoising is on (the reference keeps logits there),
        else probabilities (smoothed where not confident).
    """
    out = logits
    if prompt_denoising > 0:
        conf = torch.softmax(out * temperature, dim=1).flatten(2).amax(-1)  # (B, C)
        out = out.masked_fill((conf < prompt_denoising)[:, :, None, None], -100.0)
    if key_smoothing > 0:
        if keys is None:
            raise DistillError("maskclip_refine: key_smoothing needs the last block's keys")
        B, C, h, w = out.shape
        probs = torch.softmax(out * temperature, dim=1).flatten(2).transpose(1, 2)  # (B, hw, C)
        # F.normalize(k, p=2) on (B, hw, C') normalises along dim 1, over positions, not channels:
        # kept as the reference computes it (the weights are not a convex combination; only the
        # arg-max of the smoothed scores is used downstream).
        kn = F.normalize(keys.float(), p=2, dim=1)
        smoothed = kn @ kn.transpose(1, 2) @ probs
        unsure = probs.amax(-1, keepdim=True) < key_smoothing
        out = torch.where(unsure, smoothed, probs).transpose(1, 2).reshape(B, C, h, w)
    return out


@torch.no_grad()
def maskclip_scores(
    teacher,
    images: torch.Tensor,
    text: torch.Tensor,
    size: int | None = None,
    out_size: tuple[int, int] | None = None,
    key_smoothing: float = 0.0,
    prompt_denoising: float = 0.0,
    temperature: float = 100.0,
) -> torch.Tensor:
    """Zero-shot per-pixel class scores (B, C, H', W'): cosine similarities of the patch embeddings
    and the text embeddings, refined by :func:`maskclip_refine` when ``key_smoothing`` or
    ``prompt_denoising`` is set (``temperature``: the reference's fixed 100, CLIP's logit scale).
    Upsampling (bilinear) happens last, on scores, as the reference's ``assign_label`` does."""
    out_size = tuple(out_size) if out_size else tuple(images.shape[-2:])
    text = F.normalize(text.to(teacher.device).float(), dim=-1)
    need_keys = key_smoothing > 0
    res = patch_embeddings(teacher, images, size=size, return_keys=need_keys)
    feats, keys = res if need_keys else (res, None)
    scores = torch.einsum("bdhw,cd->bchw", feats, text)
    scores = maskclip_refine(scores, keys, key_smoothing, prompt_denoising, temperature)
    return F.interpolate(scores, size=out_size, mode="bilinear", align_corners=False)
