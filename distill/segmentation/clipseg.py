"""CLIPSeg-style student (Lüddecke & Ecker, "Image Segmentation Using Text and Image Prompts",
CVPR 2022).

A frozen CLIP ViT gives the activations of a few layers (paper section 3: layers 3, 7 and 9 of
ViT-B/16); each is reduced to ``reduce_dim`` (64) by a linear map, the first one is modulated by
FiLM on the query's CLIP embedding (a text prompt's or a visual prompt's image embedding), and a
small transformer decoder (one post-norm layer per extracted activation, the reduced activations
added in before each) ends in a transposed convolution that gives one mask per query. Loss: binary
cross entropy per query mask.

The decoder mirrors transformers' ``CLIPSegDecoder`` module for module (``film_mul``,
``film_add``, ``reduces``, ``layers``, ``transposed_convolution``) so the weights of
``CLIPSegForImageSegmentation`` load into it with :func:`convert_hf_clipseg`; the test
``tests/segmentation/test_clipseg.py`` checks the logits match to 1e-4.

The CLIP backbone is any module ``backbone(images) -> (activations, (gh, gw))`` whose activations
are a list of token tensors ``(B, 1 + gh*gw, width)`` (class token first) of the chosen layers,
shallow to deep. :class:`OpenCLIPBackbone` wraps the teacher's open_clip visual tower;
:class:`HFCLIPBackbone` wraps a transformers CLIP(Seg) vision model.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.teacher import formats
from distill.teacher.vit import block_outputs, patch_size

DEFAULT_LAYERS_12 = (3, 7, 9)  # CLIPSeg section 3 ("we extract activations from layers 3, 7 and 9")


def scale_layers(layers: Sequence[int], depth: int, reference_depth: int = 12) -> tuple[int, ...]:
    """Scale layer indices chosen for a ``reference_depth``-layer ViT to a ``depth``-layer one.

    >>> scale_layers((3, 7, 9), 12)
    (3, 7, 9)
    >>> scale_layers((3, 7, 9), 6)
    (1, 3, 4)
    """
    if depth <= 0:
        raise DistillError(f"clipseg: the backbone has {depth} layers (expected at least one)")
    if depth == reference_depth:
        out = tuple(int(i) for i in layers)
    else:
        out = tuple(min(depth - 1, max(0, int(round(i * depth / reference_depth)))) for i in layers)
    bad = [i for i in out if not 0 <= i < depth]
    if bad:
        raise DistillError(f"seg.clipseg_layers: layer {bad[0]} out of range for a {depth}-layer ViT (valid 0..{depth - 1})")
    return out


# ----------------------------------------------------------------------------------------------
# Backbones: images in [0, 1] -> list of (B, 1 + N, width) activations + grid size
# ----------------------------------------------------------------------------------------------


def _check_image(images: torch.Tensor, patch: int, what: str = "images") -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise DistillError(f"{what}: expected a (B, 3, H, W) float tensor, got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h < patch or w < patch:
        raise DistillError(f"{what}: image of {h}x{w} pixels is smaller than the patch size {patch}")


class OpenCLIPBackbone(nn.Module):
    """The activations of chosen blocks of an open_clip ``VisionTransformer`` (frozen by default).

    Args:
        visual: ``open_clip`` ``VisionTransformer`` (``teacher.model.visual``).
        layers: block indices (0-based) whose outputs are returned, shallow to deep.
        mean, std: per-channel normalisation applied to images in [0, 1].
        frozen: no gradient, eval mode kept (CLIPSeg section 3: the CLIP encoder stays frozen).

    ``forward(images (B, 3, H, W) in [0, 1]) -> ([(B, 1 + gh*gw, width)] * len(layers), (gh, gw))``;
    position embeddings are interpolated (bicubic) when the grid differs from the pretraining one
    (:func:`distill.teacher.vit.block_outputs`).
    """

    def __init__(self, visual: nn.Module, layers: Sequence[int], mean: Sequence[float], std: Sequence[float], frozen: bool = True):
        super().__init__()
        self.visual = visual
        depth = len(visual.transformer.resblocks)
        self.layers = tuple(int(i) for i in layers)
        bad = [i for i in self.layers if not 0 <= i < depth]
        if bad or not self.layers:
            raise DistillError(f"seg.clipseg_layers: {list(layers)} invalid for a {depth}-layer ViT (valid 0..{depth - 1})")
        self.patch = patch_size(visual)
        self.width = int(visual.conv1.out_channels)
        self.depth = depth
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.frozen = frozen
        if frozen:
            for p in self.visual.parameters():
                p.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True):  # a frozen tower stays in eval mode
        super().train(mode)
        if self.frozen:
            self.visual.eval()
        return self

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        _check_image(images, self.patch)
        v = self.visual
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = (images.float() - self.mean) / self.std
            return block_outputs(v, x.to(v.conv1.weight.dtype), self.layers)


class HFCLIPBackbone(nn.Module):
    """The same interface over a transformers ``CLIPVisionModel`` / ``CLIPSegVisionModel``.

    Used by the parity test and the benchmark. ``normalize=False`` takes already-normalised
    ``pixel_values``.
    """

    def __init__(self, vision_model: nn.Module, layers: Sequence[int], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        self.vision = vision_model
        self.layers = tuple(int(i) for i in layers)
        self.patch = int(vision_model.config.patch_size)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        _check_image(images, self.patch)
        x = (images.float() - self.mean) / self.std
        h = self.vision.embeddings(x, interpolate_pos_encoding=True)
        h = self.vision.pre_layrnorm(h)
        out = []
        for i, layer in enumerate(self.vision.encoder.layers[: max(self.layers) + 1]):
            h = layer(h, attention_mask=None)
            if isinstance(h, tuple):
                h = h[0]
            if i in self.layers:
                out.append(h)
        return out, (images.shape[-2] // self.patch, images.shape[-1] // self.patch)


# ----------------------------------------------------------------------------------------------
# Decoder (mirrors transformers.models.clipseg.modeling_clipseg.CLIPSegDecoder)
# ----------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise DistillError(f"clipseg: reduce_dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class CLIPSegDecoderLayer(nn.Module):
    """A post-norm transformer layer (the CLIPSeg decoder normalises after attention / MLP)."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.self_attn = _Attention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _MLP(dim, hidden)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm1(x + self.self_attn(x))
        return self.layer_norm2(x + self.mlp(x))


class CLIPSegDecoder(nn.Module):
    """FiLM-conditioned transformer decoder over reduced CLIP activations.

    Args:
        width: the ViT's hidden size; cond_dim: the query embedding size (CLIP projection dim);
        num_layers: number of extracted activations (= decoder layers); reduce_dim: 64 (paper);
        patch: the ViT patch size (the transposed conv upsamples by it); complex_head: the
        "refined" head (conv, two transposed convs of stride patch/4).
    """

    def __init__(
        self,
        width: int,
        cond_dim: int,
        num_layers: int = 3,
        reduce_dim: int = 64,
        heads: int = 4,
        hidden: int = 2048,
        patch: int = 16,
        complex_head: bool = False,
        conditional_layer: int = 0,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.conditional_layer = conditional_layer
        self.patch = patch
        self.film_mul = nn.Linear(cond_dim, reduce_dim)
        self.film_add = nn.Linear(cond_dim, reduce_dim)
        if complex_head:
            k = patch // 4
            if k < 1:
                raise DistillError(f"clipseg: the complex head needs a patch size >= 4 (got {patch})")
            self.transposed_convolution = nn.Sequential(
                nn.Conv2d(reduce_dim, reduce_dim, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.ConvTranspose2d(reduce_dim, reduce_dim // 2, kernel_size=k, stride=k),
                nn.ReLU(),
                nn.ConvTranspose2d(reduce_dim // 2, 1, kernel_size=k, stride=k),
            )
        else:
            self.transposed_convolution = nn.ConvTranspose2d(reduce_dim, 1, patch, stride=patch)
        self.reduces = nn.ModuleList([nn.Linear(width, reduce_dim) for _ in range(num_layers)])
        self.layers = nn.ModuleList([CLIPSegDecoderLayer(reduce_dim, heads, hidden, eps) for _ in range(num_layers)])

    def forward(self, activations: Sequence[torch.Tensor], cond: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """activations: shallow-to-deep list of (B, 1 + gh*gw, width); cond: (B, Q, cond_dim)
        query embeddings per image. Returns logits (B, Q, gh'*..., ) of shape (B, Q, H', W')."""
        b, q = cond.shape[:2]
        flat = cond.reshape(b * q, -1)
        out = None
        for i, (act, layer, reduce) in enumerate(zip(list(activations)[::-1], self.layers, self.reduces)):
            r = reduce(act).repeat_interleave(q, dim=0)  # reduce per image, then one copy per query
            out = r if out is None else out + r
            if i == self.conditional_layer:
                out = self.film_mul(flat)[:, None, :] * out + self.film_add(flat)[:, None, :]
            out = layer(out)
        out = out[:, 1:, :].transpose(1, 2).reshape(b * q, -1, grid[0], grid[1])
        logits = self.transposed_convolution(out)
        return logits.reshape(b, q, logits.shape[-2], logits.shape[-1])


class CLIPSeg(nn.Module):
    """Backbone (frozen CLIP ViT) + :class:`CLIPSegDecoder`; one mask per query.

    ``forward(images, targets=None, queries=None)``:
      - train mode: ``targets`` = {"masks": (B, H, W) int64 semantic ids (255 ignore)}; queries are
        the training vocabulary (:meth:`set_vocabulary`); returns ``{"loss_bce": ...}``;
      - eval mode: returns ``(B, 1 + C, H, W)`` semantic logits (channel 0 = background, a
        constant logit of ``bg_thresh``; channel 1 + i = query i), see :meth:`semantic_logits`.

    Queries are inputs: ``queries`` (C, D) text embeddings shared by all images, or (B, C, D).
    """

    def __init__(self, backbone: nn.Module, decoder: CLIPSegDecoder, bg_thresh: float = 0.5, queries_per_image: int = 0):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.bg_thresh = float(bg_thresh)
        self.queries_per_image = int(queries_per_image)  # 0 = every vocabulary class per image
        self.register_buffer("text", torch.zeros(0), persistent=False)
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def patch(self) -> int:
        return int(self.backbone.patch)

    def set_vocabulary(self, text: torch.Tensor, class_ids: Sequence[int] | torch.Tensor | None = None) -> None:
        """``text`` (C, D) query embeddings; ``class_ids`` (C,) the semantic-mask value of each row
        (default 1..C). Not saved in checkpoints: any vocabulary can be set at inference."""
        _check_queries(text)
        ids = torch.arange(1, text.shape[0] + 1) if class_ids is None else torch.as_tensor(class_ids, dtype=torch.long)
        self.text = text.detach().to(self.text.device, torch.float32)
        self.class_ids = ids.to(self.text.device)

    def mask_logits(self, images: torch.Tensor, queries: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], queries (Q, D) or (B, Q, D) -> (B, Q, H, W) mask logits
        (``resize=False``: at the head's own resolution, as transformers returns them)."""
        _check_queries(queries)
        acts, grid = self.backbone(images)
        cond = queries.to(acts[0].dtype)
        if cond.ndim == 2:
            cond = cond.unsqueeze(0).expand(images.shape[0], -1, -1)
        logits = self.decoder([a.float() for a in acts], cond.float(), grid)
        if resize and logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def semantic_logits(self, images: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(B, 1 + Q, H, W): channel 0 is the constant logit of ``bg_thresh``, so an argmax picks
        background where no query's probability exceeds the threshold."""
        m = self.mask_logits(images, queries)
        t = min(max(self.bg_thresh, 1e-6), 1 - 1e-6)
        bg = torch.full_like(m[:, :1], math.log(t / (1 - t)))
        return torch.cat([bg, m], dim=1)

    def forward(self, images: torch.Tensor, targets=None, queries: torch.Tensor | None = None):
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images))
        q = self.text if queries is None else queries
        if q.numel() == 0:
            raise DistillError("clipseg: no queries (set_vocabulary was not called and no queries were given)")
        if self.training:
            from distill.segmentation.losses import clipseg_bce_loss

            masks = _target_masks(targets, images)
            ids = self.class_ids if queries is None else torch.arange(1, q.shape[-2] + 1, device=images.device)
            if q.ndim == 2 and 0 < self.queries_per_image < q.shape[0]:
                sel = sample_queries(masks, ids, self.queries_per_image)  # (B, K) rows of q
                q, ids = q[sel], ids[sel]
            return {"loss_bce": clipseg_bce_loss(self.mask_logits(images, q), masks, ids)}
        return self.semantic_logits(images, q)


def sample_queries(masks: torch.Tensor, class_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Per image, ``k`` query rows: the classes present in its mask first (random order), then
    random absent ones as negatives. masks (B, H, W), class_ids (Q,) -> (B, k) int64 row indices."""
    rows = []
    ids = class_ids.to(masks.device)
    for m in masks:
        present = torch.isin(ids, torch.unique(m))
        score = torch.rand(ids.shape[0], device=masks.device) + present.float() * 2.0
        rows.append(torch.argsort(score, descending=True)[:k])
    return torch.stack(rows)


def _check_queries(q: torch.Tensor) -> None:
    if not isinstance(q, torch.Tensor) or q.ndim not in (2, 3):
        raise DistillError("queries: expected a (C, D) or (B, C, D) tensor of query embeddings")
    if q.shape[-2] == 0:
        raise DistillError("queries: empty query list (expected at least one class or prompt)")


def _target_masks(targets, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64 masks from a dict {"masks": ...} or a list of per-image dicts."""
    if targets is None:
        raise DistillError("training needs targets with semantic 'masks'")
    if isinstance(targets, dict):
        masks = targets["masks"]
    else:
        masks = torch.stack([t["masks"] for t in targets])
    masks = masks.to(images.device).long()
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise DistillError(
            f"masks: shape {tuple(masks.shape)} does not match the images {tuple(images.shape)} (expected (B, H, W))"
        )
    return masks


def build_clipseg(
    visual: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    cond_dim: int,
    layers: Sequence[int] = DEFAULT_LAYERS_12,
    reduce_dim: int = 64,
    heads: int = 4,
    hidden: int = 2048,
    complex_head: bool = False,
    scale_to_depth: bool = True,
    bg_thresh: float = 0.5,
    queries_per_image: int = 0,
) -> CLIPSeg:
    """CLIPSeg over an open_clip visual tower (the teacher's), frozen. ``layers`` are for a 12-layer
    ViT and are scaled to the tower's depth when ``scale_to_depth``."""
    depth = len(visual.transformer.resblocks)
    layers = scale_layers(layers, depth) if scale_to_depth else tuple(layers)
    backbone = OpenCLIPBackbone(visual, layers, mean, std, frozen=True)
    decoder = CLIPSegDecoder(backbone.width, cond_dim, len(layers), reduce_dim, heads, hidden, backbone.patch, complex_head)
    return CLIPSeg(backbone, decoder, bg_thresh, queries_per_image)


# ----------------------------------------------------------------------------------------------
# Converter from transformers' CLIPSegForImageSegmentation
# ----------------------------------------------------------------------------------------------


def convert_hf_vision_to_open_clip(hf_vision: nn.Module, visual_projection: nn.Module | None = None) -> nn.Module:
    """A transformers CLIP(Seg) vision model -> an equivalent open_clip ``VisionTransformer``.

    Built as open_clip builds a CLIP's image tower from its config, with the keys the teacher's
    Hugging Face reader maps (:func:`distill.teacher.formats.hf_vision_to_open_clip`: embeddings,
    pre_layrnorm, encoder layers with q, k, v -> ``in_proj``, post_layernorm) and the visual
    projection (``proj = W.T``). The activation (quick_gelu or gelu) is carried over.
    """
    from open_clip.model import _build_vision_tower

    c = hf_vision.config
    quick = {"quick_gelu": True, "gelu": False}.get(c.hidden_act)
    if quick is None:
        raise DistillError(f"clipseg converter: hidden_act {c.hidden_act!r} not supported (quick_gelu, gelu)")
    out_dim = visual_projection.weight.shape[0] if visual_projection is not None else c.hidden_size
    vt = _build_vision_tower(out_dim, formats.hf_vision_cfg(c.to_dict()), quick_gelu=quick)
    new = formats.hf_vision_to_open_clip(formats.HFKeys(hf_vision.state_dict(), "clipseg converter"))
    new["proj"] = visual_projection.weight.detach().t().clone() if visual_projection is not None else torch.eye(c.hidden_size)
    vt.load_state_dict(new, strict=True)
    return vt.eval()


def convert_hf_clipseg(hf_model: nn.Module, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> CLIPSeg:
    """transformers ``CLIPSegForImageSegmentation`` -> our :class:`CLIPSeg` with the same weights:
    the vision tower becomes an open_clip ``VisionTransformer`` behind :class:`OpenCLIPBackbone`,
    the decoder state dict loads 1:1 (same module names). ``mean``/``std``: the normalisation our
    backbone applies to images in [0, 1] (HF takes normalised pixel values)."""
    cfg = hf_model.config
    vision = convert_hf_vision_to_open_clip(hf_model.clip.vision_model, hf_model.clip.visual_projection)
    backbone = OpenCLIPBackbone(vision, cfg.extract_layers, mean, std, frozen=True)
    decoder = CLIPSegDecoder(
        width=cfg.vision_config.hidden_size,
        cond_dim=cfg.projection_dim,
        num_layers=len(cfg.extract_layers),
        reduce_dim=cfg.reduce_dim,
        heads=cfg.decoder_num_attention_heads,
        hidden=cfg.decoder_intermediate_size,
        patch=cfg.vision_config.patch_size,
        complex_head=bool(cfg.use_complex_transposed_convolution),
        conditional_layer=cfg.conditional_layer,
        eps=cfg.vision_config.layer_norm_eps,
    )
    missing, unexpected = decoder.load_state_dict(hf_model.decoder.state_dict(), strict=False)
    if missing or unexpected:
        raise DistillError(f"clipseg converter: decoder keys differ (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return CLIPSeg(backbone, decoder).eval()
