"""CLIP-ES: CAM seeds and refined pseudo masks from image-level labels with the frozen teacher.

Lin et al., "CLIP is Also an Efficient Segmenter: A Text-Driven Approach for Weakly Supervised
Semantic Segmentation", CVPR 2023 (paper sections cited as "CLIP-ES 3.x"; "repo" is the authors'
code, github.com/linyq2117/CLIP-ES, generate_cams_voc12.py / clip/model.py / eval_cam_with_crf.py).

Pipeline for one image with present classes ``k = 1..K`` (image-level labels):

1. Text side (CLIP-ES 3.2): class embeddings (prompt ensemble, ``distill.teacher.text``) and the
   embeddings of background words (``cam.background``, one a line).
2. Softmax Grad-CAM (CLIP-ES 3.2, eq. 2-4): ``logits = 100 * cos(image, [present classes, bg words])``,
   softmax across them; Grad-CAM of each present class's softmax score at the input norm of the
   last block (``resblocks[-1].ln_1``) over patch tokens, ReLU, min-max normalisation (relative:
   the repo's absolute 1e-7 epsilon erases a saturated softmax's map, see :func:`normalize_cam`).
   Efficient: blocks ``1..L-1`` run once per image (no grad), the last block runs on a batch that
   holds one row per (image, present class); the per-row scores are summed so ONE backward gives
   every class's gradient in its own row.
3. Class-aware attention affinity (CLIP-ES 3.3): attention of the last 8 blocks (patch-to-patch,
   heads averaged) -> alternating column/row normalisation (Sinkhorn, 3 rounds) -> symmetrise ->
   raised to ``cam.caa_power`` (2, squared, in the repo) -> restricted to the boxes around the CAM above 0.4 of its max -> ``refined = A @ cam``.
4. Masks (CLIP-ES 3.4 and eval_cam_with_crf.py): background = ``(1 - max_k cam_k) ** bg_power`` (or
   a fixed threshold), argmax, optional dense CRF, confidence-guided ignore: pixels whose
   confidence is below ``conf_thresh`` (0.95) become 255.

Images are resized before the teacher sees them (their size need not be a multiple of the patch
size): ``cam.resize=square`` resizes every image to ``cam.image_size`` (0 = the teacher's
``dense_image_size``) so that a batch can be stacked; ``cam.resize=patch_multiple`` follows the
repo (aspect ratio kept, each side rounded UP to a multiple of the patch size; ``cam.image_size``
0 keeps the original scale as the repo does, else the longer side is scaled to it). Position
embeddings are interpolated to the token grid by the teacher's dense path
(``distill.teacher.dense.embed_tokens``, bicubic; the repo's ``upsample_pos_emb`` is bilinear). The
CAMs are resized back to the original image size, so masks always have the image's size.

Outputs (``cam.out``): ``seeds/{split}/{stem}.npz`` (``category_ids``, patch-level ``gradcam`` and,
with ``cam.caa``, ``refined`` CAMs, ``size``), ``masks/{split}/{stem}.png`` (uint8, category id, 0 = background,
255 = ignore; the world's semantic PNG convention), ``panels/{split}/{stem}.png``,
``summary.json``; the ablation writes ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.errors import DistillError
from distill.teacher.dense import embed_tokens

# Dense CRF parameters of the repo (eval_cam_with_crf.py: DenseCRF(iter_max=10, pos_xy_std=1,
# pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4)).
CRF_PARAMS = dict(iter_max=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0)

# The 25 background words of the repo for VOC (clip_text.py: BACKGROUND_CATEGORY), for reference;
# distill/prompts/background_voc.txt holds the same list.
CLIP_ES_VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
)


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
    ps = _visual(teacher).conv1.kernel_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def _normalize_images(teacher, images: torch.Tensor) -> torch.Tensor:
    mean = torch.as_tensor(teacher.mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(teacher.std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return (images - mean) / std


def _blocks(visual) -> list[nn.Module]:
    return list(visual.transformer.resblocks)


def _run_block(visual, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: (B, L, W) batch-first; open_clip transformers may run sequence-first."""
    if getattr(visual.transformer, "batch_first", True):
        return blk(x)
    return blk(x.transpose(0, 1)).transpose(0, 1)


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
    x = _normalize_images(teacher, images.to(teacher.device))
    blocks = _blocks(visual)
    with _autocast(teacher), AttentionRecorder([b.attn for b in blocks[:-1]] if record_attention else []) as rec:
        x, (h, w) = embed_tokens(visual, x)
        for blk in blocks[:-1]:
            x = _run_block(visual, blk, x)
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
        out = _last_block_class_token(last, x) if cls_only else _run_block(visual, last, x)
        feats = _pool_project(visual, out, pool).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        scores = []
        r = 0
        for b, ks in enumerate(labels):
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
        scores = torch.cat(scores)
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
            _run_block(visual, last, tokens.detach()[b_idx[first_row]])
        attn_last = att_rec.weights[0]
    else:
        attn_last = att_rec.weights[0][first_row]
    return LastBlockOut(normalize_cam(cam), scores.detach(), attn_last)


# ---------------------------------------------------------------------------------------------
# Class-aware attention affinity (CLIP-ES 3.3; repo generate_cams_voc12.py)
# ---------------------------------------------------------------------------------------------


def scoremap_boxes(cam: np.ndarray, threshold: float = 0.4) -> list[tuple[int, int, int, int]]:
    """Boxes ``(x0, y0, x1, y1)`` around every contour of ``cam >= threshold * max`` (repo
    utils.scoremap2bbox with multi_contour_eval=True, including its ``min(x1, width - 1)`` clip and
    its ``[0, 0, 0, 0]`` box when nothing is above the threshold)."""
    height, width = cam.shape
    img = (np.clip(cam, 0, None) * 255).astype(np.uint8)
    _, thr = cv2.threshold(img, int(threshold * img.max()), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(thr, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return [(0, 0, 0, 0)]
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
    return boxes


def box_mask(cam: np.ndarray, threshold: float = 0.4) -> np.ndarray:
    """(h, w) float 0/1: the union of :func:`scoremap_boxes` (repo: ``aff_mask[y0:y1, x0:x1] = 1``)."""
    m = np.zeros(cam.shape, np.float32)
    for x0, y0, x1, y1 in scoremap_boxes(cam, threshold):
        m[y0:y1, x0:x1] = 1
    return m


def attention_affinity(attn: Sequence[torch.Tensor] | torch.Tensor, layers: int = 8, power: int = 2) -> torch.Tensor:
    """Affinity ``(N, N)`` from per-block attention ``(1 + N, 1 + N)`` (class token first).

    Patch-to-patch attention of the last ``layers`` blocks averaged; Sinkhorn-style normalisation
    (column then row, three rounds), symmetrised, raised to ``power`` (the repo squares it:
    ``trans_mat @ trans_mat`` once; ``power=1`` keeps the symmetrised affinity).
    """
    a = torch.stack([x[1:, 1:].float() for x in list(attn)[-layers:]]).mean(0)
    t = a / a.sum(0, keepdim=True)
    t = t / t.sum(1, keepdim=True)
    for _ in range(2):
        t = t / t.sum(0, keepdim=True)
        t = t / t.sum(1, keepdim=True)
    t = (t + t.T) / 2
    return torch.linalg.matrix_power(t, power)


def refine_cams(cams: torch.Tensor, affinity: torch.Tensor, box_thresh: float = 0.4) -> torch.Tensor:
    """CAA: ``refined_k = (A * box_mask_k[None, :]) @ cam_k`` for every class map ``cams (K, h, w)``.

    The box mask multiplies the affinity's columns (repo: ``trans_mat * aff_mask`` with
    ``aff_mask (1, n)``), i.e. only patches inside the boxes propagate. Returns ``(K, h, w)``, not
    normalised (normalise with :func:`normalize_cam`, as the repo's ``scale_cam_image`` does).
    """
    k, h, w = cams.shape
    if k == 0:
        return cams.clone()
    masks = torch.stack([torch.from_numpy(box_mask(c.float().cpu().numpy(), box_thresh)) for c in cams])
    src = (masks.to(cams) * cams).reshape(k, h * w)  # (A * m) @ c == A @ (m * c)
    return (src @ affinity.to(cams).T).reshape(k, h, w)


# ---------------------------------------------------------------------------------------------
# Seeds -> masks (CLIP-ES 3.4; repo eval_cam.py / eval_cam_with_crf.py)
# ---------------------------------------------------------------------------------------------


def upsample_cams(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) -> (K, H, W): min-max then bilinear resize (pytorch_grad_cam scale_cam_image)."""
    H, W = size
    out = np.zeros((len(cams), H, W), np.float32)
    for i, c in enumerate(cams):
        c = c.astype(np.float32) - c.min()
        c = c / max(float(c.max()), float(np.finfo(np.float32).tiny))  # relative, as normalize_cam
        out[i] = cv2.resize(c, (W, H))
    return out


def dense_crf(image: np.ndarray, probs: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Dense CRF (Krahenbuhl & Koltun) with the repo's parameters. image: (H, W, 3) uint8 RGB;
    probs: (C, H, W) scores. Returns Q (C, H, W). Needs the ``crf`` extra (pydensecrf2).

    Deviation: the repo subtracts the BGR mean and casts to uint8 (which wraps around); we pass the
    image itself, which is what the bilateral kernel's colour distance expects.
    """
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as dutils
    except ImportError:
        raise DistillError("cam.crf=true needs pydensecrf2, which is not installed: pip install 'distill[crf]'") from None
    p = dict(CRF_PARAMS, **(params or {}))
    c, h, w = probs.shape
    u = np.ascontiguousarray(dutils.unary_from_softmax(probs.astype(np.float32)))
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(u)
    d.addPairwiseGaussian(sxy=p["pos_xy_std"], compat=p["pos_w"])
    d.addPairwiseBilateral(sxy=p["bi_xy_std"], srgb=p["bi_rgb_std"], rgbim=np.ascontiguousarray(image), compat=p["bi_w"])
    return np.array(d.inference(int(p["iter_max"]))).reshape(c, h, w)


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def cams_to_mask(
    cams: np.ndarray,
    category_ids: Sequence[int],
    *,
    bg_thresh: float = 0.0,
    bg_power: float = 1.0,
    image: np.ndarray | None = None,
    crf: bool = False,
    conf_thresh: float = 0.0,
    conf_source: str = "prob",
) -> tuple[np.ndarray, np.ndarray]:
    """Class CAMs ``(K, H, W)`` in [0, 1] -> mask ``(H, W) uint8`` (category id, 0 bg, 255 ignore)
    and the per-pixel confidence ``(H, W)``.

    Background score: ``bg_thresh`` if > 0, else ``(1 - max_k cam_k) ** bg_power`` (repo
    eval_cam.py). With ``crf`` the scores go through :func:`dense_crf` and the confidence is its
    posterior (repo eval_cam_with_crf.py); without, ``conf_source="prob"`` is the winning score
    normalised over background + classes, ``"score"`` the winning score itself.
    Pixels with confidence below ``conf_thresh`` become 255 (CLIP-ES 3.4: 0.95).
    """
    K = len(cams)
    if K == 0:
        shape = cams.shape[1:]
        return np.zeros(shape, np.uint8), np.ones(shape, np.float32)
    if bg_thresh > 0:
        bg = np.full((1,) + cams.shape[1:], bg_thresh, np.float32)
    else:
        bg = np.power(1 - cams.max(0, keepdims=True), bg_power).astype(np.float32)
    scores = np.concatenate([bg, cams.astype(np.float32)], 0)
    if crf:
        if image is None:
            raise DistillError("cam.crf: the dense CRF needs the image")
        scores = dense_crf(image, scores)
        prob = scores
    elif conf_source == "prob":
        prob = scores / np.maximum(scores.sum(0, keepdims=True), 1e-7)
    elif conf_source == "score":
        prob = scores
    else:
        raise DistillError(f"cam.conf_source: {conf_source!r} is not one of prob, score")
    label = scores.argmax(0)
    keys = np.asarray([0] + [int(c) for c in category_ids], np.int64)
    mask = keys[label].astype(np.uint8)
    conf = prob.max(0).astype(np.float32)
    if conf_thresh > 0:
        mask[conf < conf_thresh] = 255
    return mask, conf


# ---------------------------------------------------------------------------------------------
# Batched CLIP-ES for a list of images
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageCams:
    """CAMs of one image at patch resolution. ``labels``: vocabulary indices present."""

    labels: list[int]
    gradcam: torch.Tensor  # (K, h, w) softmax (or plain) Grad-CAM, normalised
    refined: torch.Tensor | None  # (K, h, w) after CAA, normalised; None without CAA
    plain: torch.Tensor | None = None  # (K, h, w) plain Grad-CAM (ablation)


def clip_es_cams(
    teacher,
    images: torch.Tensor,
    labels: Sequence[Sequence[int]],
    text: torch.Tensor,
    bg_text: torch.Tensor | None,
    *,
    logit_scale: float = 100.0,
    pool: str = "mean",
    caa: bool = True,
    caa_layers: int = 8,
    caa_power: int = 2,
    box_thresh: float = 0.4,
    softmax: bool = True,
    with_plain: bool = False,
) -> list[ImageCams]:
    """CLIP-ES CAMs for a batch. images: (B, 3, H, W) float [0, 1], H, W multiples of the patch
    size; labels[b]: vocabulary indices present in image b (may be empty); text (C, D), bg_text
    (M, D) L2-normalised. ``with_plain`` also computes plain Grad-CAM (second last-block pass)."""
    tokens, attn, grid = trunk_tokens(teacher, images, record_attention=caa)
    out = last_block_gradcam(teacher, tokens, grid, labels, text, bg_text, softmax=softmax,
                             logit_scale=logit_scale, pool=pool, need_attention=caa)
    plain = None
    if with_plain:
        plain = last_block_gradcam(teacher, tokens, grid, labels, text, None, softmax=False,
                                   logit_scale=logit_scale, pool=pool, need_attention=False).cams
    results = []
    r = 0
    j = 0  # index into attn_last (images with labels only)
    for b, ks in enumerate(labels):
        n = len(ks)
        cams = out.cams[r : r + n]
        refined = None
        if caa and n:
            per_block = [a[b] for a in attn] + [out.attn_last[j]]
            aff = attention_affinity(per_block, caa_layers, caa_power)
            refined = normalize_cam(refine_cams(cams, aff, box_thresh))
        elif caa:
            refined = cams.clone()
        results.append(ImageCams(list(ks), cams.cpu(), None if refined is None else refined.cpu(),
                                 None if plain is None else plain[r : r + n].cpu()))
        r += n
        j += 1 if n else 0
    return results


# ---------------------------------------------------------------------------------------------
# Plain Grad-CAM through pytorch_grad_cam (the reference, and the bench's per-class loop)
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
        x = _normalize_images(self.teacher, images)
        x, _ = embed_tokens(visual, x)
        for blk in _blocks(visual):
            x = _run_block(visual, blk, x)
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
# ---------------------------------------------------------------------------------------------


def read_word_list(source: str, what: str = "cam.background") -> list[str]:
    """Background words: a file (one a line, ``#`` comments) or the words themselves; "" = none."""
    from distill.config import WORDS_EXPECTED
    from distill.io import read_lines

    return list(read_lines(source, what, WORDS_EXPECTED)) if source else []


def read_templates(source: str) -> list[str] | None:
    """``cam.templates``: a template file (one a line, with ``{}``) or the templates themselves."""
    from distill.teacher.text import load_templates

    return list(load_templates(source, "cam.templates")) if source else None


@dataclass
class LabelEntry:
    image_id: int
    file_name: str
    labels: list[int]  # vocabulary indices, sorted, unique


def read_image_labels(path: str | Path, vocab) -> list[LabelEntry]:
    """``[{"image_id", "file_name", "category_ids": [...]} ...]`` (the world's image_labels json);
    ``"categories": [names]`` is accepted instead of ids. Unknown ids / names are errors."""
    from distill.io import read_json

    data = read_json(path, "image-level labels")
    if isinstance(data, dict) and "images" in data:
        data = data["images"]
    if not isinstance(data, list):
        raise DistillError(f"{path}: expected a list of {{image_id, file_name, category_ids}} objects")
    id_to_index = {int(i): k for k, i in enumerate(vocab.ids)}
    name_to_index = {}
    for k, prompts in enumerate(vocab.prompts):
        for p in prompts:
            name_to_index.setdefault(p.strip().lower(), k)
    out = []
    for n, e in enumerate(data):
        if not isinstance(e, dict) or "file_name" not in e:
            raise DistillError(f"{path}: entry {n}: expected an object with file_name and category_ids")
        labels = []
        if "category_ids" in e:
            for c in e["category_ids"] or []:
                if isinstance(c, bool) or not isinstance(c, int) or c not in id_to_index:
                    raise DistillError(
                        f"{path}: entry {n} ({e['file_name']}): unknown category id {c!r}; "
                        f"valid ids: {', '.join(map(str, vocab.ids[:30]))}{' ...' if len(vocab) > 30 else ''}"
                    )
                labels.append(id_to_index[c])
        for name in e.get("categories", []) or []:
            key = str(name).strip().lower()
            if key not in name_to_index:
                raise DistillError(
                    f"{path}: entry {n} ({e['file_name']}): unknown class {name!r}; "
                    f"valid: {', '.join(vocab.names[:20])}{' ...' if len(vocab) > 20 else ''}"
                )
            labels.append(name_to_index[key])
        image_id = e.get("image_id", n)
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise DistillError(f"{path}: entry {n}: image_id must be an int, got {image_id!r}")
        out.append(LabelEntry(image_id, str(e["file_name"]), sorted(set(labels))))
    return out


def resize_for_teacher(image: np.ndarray, size: int, patch: int, mode: str = "square") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float [0, 1] with h, w multiples of ``patch`` (see module doc)."""
    H, W = image.shape[:2]
    if mode == "square":
        if size % patch:
            raise DistillError(f"cam.image_size: {size} is not a multiple of the patch size {patch}")
        th, tw = size, size
    elif mode == "patch_multiple":
        s = size / max(H, W) if size else 1.0  # size 0: the original scale (repo: scales=[1.0])
        th = int(math.ceil(H * s / patch) * patch)
        tw = int(math.ceil(W * s / patch) * patch)
    else:
        raise DistillError(f"cam.resize: {mode!r} is not one of square, patch_multiple")
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float()[None] / 255.0
    if (th, tw) != (H, W):
        # bicubic as the repo (PIL BICUBIC), antialiased when shrinking
        x = F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    return x[0]


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---------------------------------------------------------------------------------------------
# Stage: images + image-level labels -> seeds, masks, panels
# ---------------------------------------------------------------------------------------------


def _resolve_vocab(cfg):
    from distill.vocab import load_vocab

    source = cfg.cam.vocab or cfg.data.vocab or cfg.data.train_full_json
    return load_vocab(source, cfg.data.split_file or None)


def _text_features(teacher, cfg, vocab) -> tuple[torch.Tensor, torch.Tensor | None]:
    from distill.teacher.text import text_embeddings
    from distill.vocab import Vocabulary

    templates = read_templates(cfg.cam.templates) if cfg.cam.templates else (cfg.teacher.templates or None)
    text = text_embeddings(teacher, vocab, templates)
    words = read_word_list(cfg.cam.background)
    bg = None
    if words:
        bvocab = Vocabulary(names=tuple(dict.fromkeys(words)), source="cam.background")
        bg = text_embeddings(teacher, bvocab, templates)
    return text.float(), None if bg is None else bg.float()


def _resolve_inputs(cfg, images: str | None, labels: str | None) -> tuple[Path, Path, str]:
    """``images`` is a split name (train / val / unlabeled: ``data.image_root``) or a folder."""
    images = images or cfg.cam.images
    labels = labels or cfg.cam.labels
    if not images:
        raise DistillError("cam.images: expected a split name (train, val, ...) or an image folder")
    p = Path(images)
    if not p.is_dir() and "/" not in images and (Path(cfg.data.image_root) / images).is_dir():
        root, split = Path(cfg.data.image_root), images
        labels = labels or cfg.data.image_labels.replace("{split}", split)
    elif p.is_dir():
        root, split = p, p.name
    elif "/" not in images and labels and Path(cfg.data.image_root).is_dir():
        # a flat image folder (VOC: JPEGImages/): the split is the set of images the labels json lists
        root, split = Path(cfg.data.image_root), images
    else:
        raise DistillError(f"cam.images: {images!r} is neither an image folder nor a split under {cfg.data.image_root}")
    if not labels:
        raise DistillError("cam.labels: expected an image-level labels json (--labels)")
    return root, Path(labels), split


def _image_path(root: Path, file_name: str) -> Path:
    from distill.io import safe_join

    p = safe_join(root, file_name)
    if not p.is_file():
        alt = safe_join(root, Path(file_name).name)
        if alt.is_file():
            return alt
    return p


def _rel_stem(file_name: str, split: str) -> Path:
    """Output name relative to ``masks/``: ``{split}/{stem}`` (``train/000012``)."""
    fn = Path(file_name)
    parts = fn.parts
    if fn.is_absolute() or ".." in parts:  # an input name must not steer outputs out of cam.out
        raise DistillError(f"{file_name!r}: image-label file_name is absolute or contains '..' (expected a path relative to the image folder)")
    if len(parts) >= 2:
        return Path(*parts[:-1]) / fn.stem
    return Path(split) / fn.stem


def _gt_path(sem_root: Path, file_name: str, split: str) -> Path:
    """The semantic PNG of an image: ``{semantic_root}/{split}/{stem}.png`` (the world's layout),
    else the flat ``{semantic_root}/{stem}.png`` (VOC's SegmentationClass(Aug)/)."""
    nested = Path(sem_root) / _rel_stem(file_name, split).with_suffix(".png")
    if not nested.is_file():
        flat = Path(sem_root) / f"{Path(file_name).stem}.png"
        if flat.is_file():
            return flat
    return nested


def _write_png(path: Path, mask: np.ndarray) -> None:
    from distill.io import write_bytes

    ok, buf = cv2.imencode(".png", mask)
    if not ok:
        raise DistillError(f"{path}: could not encode PNG")
    write_bytes(path, buf.tobytes())


def _write_npz(path: Path, **arrays) -> None:
    import io as _io

    from distill.io import write_bytes

    buf = _io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(path, buf.getvalue())


def _check_cfg(c) -> None:
    if c.tower not in ("teacher", "dense"):
        raise DistillError(f"cam.tower: {c.tower!r} is not one of teacher, dense")
    if c.pool not in ("mean", "model"):
        raise DistillError(f"cam.pool: {c.pool!r} is not one of mean, model")
    if c.resize not in ("square", "patch_multiple"):
        raise DistillError(f"cam.resize: {c.resize!r} is not one of square, patch_multiple")
    if not 0 <= c.conf_thresh <= 1:
        raise DistillError(f"cam.conf_thresh: expected a value in [0, 1], got {c.conf_thresh}")
    if c.caa_layers < 1:
        raise DistillError(f"cam.caa_layers: expected >= 1, got {c.caa_layers}")
    if c.caa_power < 1:
        raise DistillError(f"cam.caa_power: expected an integer >= 1, got {c.caa_power}")
    if c.conf_source not in ("prob", "score"):
        raise DistillError(f"cam.conf_source: {c.conf_source!r} is not one of prob, score")
    if c.batch_size < 1:
        raise DistillError(f"cam.batch_size: expected >= 1, got {c.batch_size}")


def _image_size(cfg, teacher) -> int:
    return cfg.cam.image_size or getattr(teacher, "dense_image_size", 0) or cfg.teacher.dense_image_size


def _compute_batch(teacher, cfg, batch_imgs: list[np.ndarray], batch_labels: list[list[int]], text, bg,
                   with_plain: bool = False, caa: bool = True) -> list[ImageCams]:
    """Resize and run :func:`clip_es_cams`; images of different sizes (patch_multiple) run one by one."""
    c = cfg.cam
    ps = patch_size_of(teacher)
    size = _image_size(cfg, teacher) if c.resize == "square" else c.image_size
    xs = [resize_for_teacher(im, size, ps, c.resize) for im in batch_imgs]
    kw = dict(logit_scale=logit_scale_of(cfg, teacher), pool=c.pool, caa=caa, caa_layers=c.caa_layers,
              caa_power=c.caa_power, box_thresh=c.caa_box_thresh, with_plain=with_plain)
    if all(x.shape == xs[0].shape for x in xs):
        return clip_es_cams(teacher, torch.stack(xs), batch_labels, text, bg, **kw)
    out = []
    for x, lab in zip(xs, batch_labels):
        out += clip_es_cams(teacher, x[None], [lab], text, bg, **kw)
    return out


def _bg_rule(c) -> str:
    """The background score of :func:`cams_to_mask` in words (the panels' title)."""
    if c.bg_thresh > 0:
        return f"{c.bg_thresh:g}"
    return "1 - max CAM" if c.bg_power == 1 else f"(1 - max CAM) ** {c.bg_power:g}"


def logit_scale_of(cfg, teacher) -> float:
    """``cam.logit_scale``, or the teacher's learned ``exp(logit_scale)`` when it is <= 0 (CLIP-ES
    3.2 uses 100, which is OpenAI CLIP's learned scale)."""
    if cfg.cam.logit_scale > 0:
        return float(cfg.cam.logit_scale)
    return float(teacher.model.logit_scale.exp())


class _DenseModel:
    """``teacher.model`` with ``visual`` replaced by the dense tower (text and logit scale kept).
    Only ``visual`` is swapped: CLIP-ES reads the tower through it (``_visual``); the model's own
    ``encode_image`` would still run the original tower."""

    def __init__(self, model, visual):
        self._model, self.visual = model, visual

    def __getattr__(self, name):
        if name == "_model":  # not set yet (copy / pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self._model, name)


def cam_tower(teacher, cfg):
    """``teacher`` as CLIP-ES reads it: ``cam.tower=dense`` swaps in the CLIPSelf dense tower."""
    import dataclasses

    if cfg.cam.tower == "teacher":
        return teacher
    if cfg.cam.tower != "dense":
        raise DistillError(f"cam.tower: {cfg.cam.tower!r} is not one of teacher, dense")
    dv = getattr(teacher, "dense_visual", None)
    if dv is None:
        raise DistillError("cam.tower=dense: the teacher has no dense tower (set teacher.dense_pretrained to the file `distill teacher clipself` writes)")
    if isinstance(teacher.model, _DenseModel):
        return teacher
    return dataclasses.replace(teacher, model=_DenseModel(teacher.model, dv))


def _load_teacher(cfg):
    from distill.engine.distributed import init_distributed
    from distill.teacher.clip import build_teacher

    _, world, local_rank = init_distributed()  # a no-op unless launched by torchrun
    device = None
    if world > 1 and torch.cuda.is_available() and not cfg.teacher.device:
        device = f"cuda:{local_rank}"
    return build_teacher(cfg.teacher, device=device)


def run_cam(cfg, images: str | None = None, labels: str | None = None, *, teacher=None,
            max_images: int = 0) -> dict:
    """The ``cam`` stage: CLIP-ES seeds, refined masks and panels for every labelled image.

    images: a split name (``train``) or an image folder (default ``cam.images``); labels: an
    image-level labels json (default ``cam.labels``, or ``data.image_labels`` for a split).
    Images without labels are skipped and counted. Returns the summary written to
    ``{cam.out}/summary.json``.
    """
    from distill.config import save_config
    from distill.data.images import load_image
    from distill.io import write_json

    _check_cfg(cfg.cam)
    root, labels_path, split = _resolve_inputs(cfg, images, labels)
    vocab = _resolve_vocab(cfg)
    entries = read_image_labels(labels_path, vocab)
    if max_images:
        entries = entries[:max_images]
    todo = [e for e in entries if e.labels]
    skipped = len(entries) - len(todo)
    # Rank-sharded under torchrun (ARCHITECTURE: rank-sharded CAM): rank r takes images r, r + W, ...
    from distill.engine.distributed import get_rank, get_world_size

    if cfg.cam.crf and not crf_available():
        dense_crf(np.zeros((1, 1, 3), np.uint8), np.ones((1, 1, 1), np.float32))  # raises the DistillError
    teacher = cam_tower(teacher or _load_teacher(cfg), cfg)
    rank, world = get_rank(), get_world_size()
    todo = todo[rank::world]
    text, bg = _text_features(teacher, cfg, vocab)
    out = Path(cfg.cam.out)
    t0 = time.time()
    n_done = n_panels = 0
    ignored = total = 0
    for batch in _batches(todo, cfg.cam.batch_size):
        imgs = [load_image(_image_path(root, e.file_name)) for e in batch]
        # cam.caa=false: masks from the softmax Grad-CAM; CAA then runs only for the panels' images
        caa = cfg.cam.caa or n_panels < cfg.cam.num_panels
        res = _compute_batch(teacher, cfg, imgs, [e.labels for e in batch], text, bg, caa=caa)
        for e, im, r in zip(batch, imgs, res):
            H, W = im.shape[:2]
            cat_ids = [int(vocab.ids[k]) for k in r.labels]
            refined = upsample_cams(r.refined.numpy(), (H, W)) if r.refined is not None else None
            used = refined if cfg.cam.caa else upsample_cams(r.gradcam.numpy(), (H, W))
            mask, conf = cams_to_mask(used, cat_ids, bg_thresh=cfg.cam.bg_thresh, bg_power=cfg.cam.bg_power,
                                      image=im, crf=cfg.cam.crf, conf_thresh=cfg.cam.conf_thresh,
                                      conf_source=cfg.cam.conf_source)
            rel = _rel_stem(e.file_name, split)
            seeds = dict(category_ids=np.asarray(cat_ids, np.int64), gradcam=r.gradcam.numpy().astype(np.float16),
                         size=np.asarray([H, W], np.int64))
            if cfg.cam.caa:  # the refined seeds exist only when the masks use them
                seeds["refined"] = r.refined.numpy().astype(np.float16)
            _write_npz(out / "seeds" / rel.with_suffix(".npz"), **seeds)
            _write_png(out / "masks" / rel.with_suffix(".png"), mask)
            ignored += int((mask == 255).sum())
            total += mask.size
            if n_panels < cfg.cam.num_panels and refined is not None:
                from distill.labels.cam_panels import save_panel

                save_panel(out / "panels" / rel.with_suffix(".png"), im, upsample_cams(r.gradcam.numpy(), (H, W)),
                           refined, mask, [vocab.names[k] for k in r.labels], cat_ids,
                           title=f"{e.file_name} (id {e.image_id})",
                           seed_mask=cams_to_mask(used, cat_ids, bg_thresh=cfg.cam.bg_thresh,
                                                  bg_power=cfg.cam.bg_power)[0],
                           caa_used=cfg.cam.caa, crf=cfg.cam.crf, bg_rule=_bg_rule(cfg.cam))
                n_panels += 1
            n_done += 1
    wall = time.time() - t0
    summary = {
        "split": split,
        "images": len(entries),
        "processed": n_done,
        "skipped_no_labels": skipped,
        "ignored_fraction": ignored / max(total, 1),
        "panels": n_panels,
        "masks": str(out / "masks" / split),
        "wall_s": round(wall, 3),
        "images_per_s": round(n_done / wall, 3) if wall > 0 else None,
    }
    if world > 1:
        summary.update(rank=rank, world_size=world)
    write_json(out / (f"summary_{split}.json" if world == 1 else f"summary_{split}_rank{rank}.json"), summary)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    return summary


# ---------------------------------------------------------------------------------------------
# Ablation: Grad-CAM -> softmax Grad-CAM -> + CAA -> + CRF -> + confidence ignore
# ---------------------------------------------------------------------------------------------

ABLATION_STEPS = ("gradcam", "softmax_gradcam", "caa", "crf", "conf_ignore")
# The same chain without CAA (CRF and confidence ignore on the softmax Grad-CAM), for teachers
# whose attention is no affinity (``cam.caa=false``).
NO_CAA_STEPS = ("crf_no_caa", "conf_ignore_no_caa")


def _read_gt(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise DistillError(f"{path}: ground-truth semantic PNG not found")
    return np.array(Image.open(path))


def cam_ablation(cfg, split: str = "val", *, teacher=None, max_images: int = 0) -> dict:
    """mIoU of each CLIP-ES step on ``split`` using image-level labels only, against the semantic
    PNGs (``data.semantic_root/{split}``). CRF is "n/a" without pydensecrf2; confidence ignore is
    scored on the non-ignored pixels, with the ignored fraction. Writes ``{cam.out}/metrics.json``."""
    from distill.data.images import load_image
    from distill.eval.segmentation import SemSegEvaluator, semseg_classes
    from distill.io import write_json

    _check_cfg(cfg.cam)
    c = cfg.cam
    root, labels_path, _ = _resolve_inputs(cfg, split, None)
    vocab = _resolve_vocab(cfg)
    entries = read_image_labels(labels_path, vocab)
    if max_images:
        entries = entries[:max_images]
    teacher = cam_tower(teacher or _load_teacher(cfg), cfg)
    text, bg = _text_features(teacher, cfg, vocab)
    has_crf = crf_available()
    num_classes, seen, names = semseg_classes(vocab)
    steps = ABLATION_STEPS + NO_CAA_STEPS
    evals = {s: SemSegEvaluator(num_classes, seen, names=names) for s in steps if not s.startswith("crf") or has_crf}
    ignored = {"conf_ignore": 0, "conf_ignore_no_caa": 0}
    total = 0
    sem_root = Path(cfg.data.semantic_root)
    t0 = time.time()
    for batch in _batches(entries, c.batch_size):
        imgs = [load_image(_image_path(root, e.file_name)) for e in batch]
        res = _compute_batch(teacher, cfg, imgs, [e.labels for e in batch], text, bg, with_plain=True)
        for e, im, r in zip(batch, imgs, res):
            H, W = im.shape[:2]
            gt = _read_gt(_gt_path(sem_root, e.file_name, split))
            ids = [int(vocab.ids[k]) for k in r.labels]
            kw = dict(bg_thresh=c.bg_thresh, bg_power=c.bg_power, image=im)
            maps = {
                "gradcam": upsample_cams(r.plain.numpy(), (H, W)),
                "softmax_gradcam": upsample_cams(r.gradcam.numpy(), (H, W)),
                "caa": upsample_cams(r.refined.numpy(), (H, W)),
            }
            for step, m in maps.items():
                evals[step].process(cams_to_mask(m, ids, **kw)[0], gt)
            total += gt.size
            for src, crf_step, conf_step in (("caa", "crf", "conf_ignore"),
                                             ("softmax_gradcam", "crf_no_caa", "conf_ignore_no_caa")):
                mask, conf = cams_to_mask(maps[src], ids, crf=has_crf, conf_source=c.conf_source, **kw)
                if has_crf:
                    evals[crf_step].process(mask, gt)
                ign = conf < c.conf_thresh  # cams_to_mask(conf_thresh=...) without a second CRF
                ignored[conf_step] += int(ign.sum())
                gt_kept = gt.copy()
                gt_kept[ign] = 255
                pred = mask.copy()
                pred[ign] = 0
                evals[conf_step].process(pred, gt_kept)
    wall = time.time() - t0
    rows = []
    for step in steps:
        if step not in evals:
            rows.append({"step": step, "miou": None, "note": "n/a (pydensecrf2 not installed)"})
            continue
        m = evals[step].evaluate()
        row = {"step": step, "miou": float(m["miou/all"]), "miou_seen": float(m["miou/seen"]),
               "miou_unseen": float(m["miou/unseen"]), "pixel_acc": float(m["pixel_acc"])}
        if step in ignored:
            row["ignored_fraction"] = ignored[step] / max(total, 1)
            row["note"] = f"mIoU over non-ignored pixels; conf < {c.conf_thresh} -> 255"
        if step in NO_CAA_STEPS:
            row["note"] = "; ".join(x for x in ("on the softmax Grad-CAM (no CAA)", row.get("note")) if x)
        rows.append(row)
    by_step = {r["step"]: r for r in rows}
    final = "conf_ignore" if c.caa else "conf_ignore_no_caa"  # the chain run_cam's masks follow
    metrics = {
        "split": split,
        "images": len(entries),
        "images_with_labels": sum(1 for e in entries if e.labels),
        "rows": rows,
        "cam/miou_gradcam": by_step["gradcam"]["miou"],
        "cam/miou_final": by_step[final]["miou"],
        "cam/final_step": final,
        "cam/ignored_fraction": ignored[final] / max(total, 1),
        "settings": {"logit_scale": logit_scale_of(cfg, teacher), "pool": c.pool, "conf_source": c.conf_source, "bg_power": c.bg_power, "bg_thresh": c.bg_thresh,
                     "background_words": len(read_word_list(c.background)), "caa": c.caa, "caa_layers": c.caa_layers, "caa_power": c.caa_power,
                     "image_size": _image_size(cfg, teacher), "crf": has_crf},
        "wall_s": round(wall, 2),
        "table": ablation_table(rows),
    }
    write_json(Path(c.out) / "metrics.json", metrics)
    return metrics


def ablation_table(rows: list[dict]) -> str:
    """Markdown table of the ablation rows (mIoU in points)."""
    names = {"gradcam": "Grad-CAM", "softmax_gradcam": "softmax Grad-CAM", "caa": "+ CAA",
             "crf": "+ CRF", "conf_ignore": "+ confidence ignore",
             "crf_no_caa": "softmax Grad-CAM + CRF", "conf_ignore_no_caa": "softmax Grad-CAM + CRF + confidence ignore"}
    lines = ["| step | mIoU | note |", "|---|---|---|"]
    for r in rows:
        v = "n/a" if r["miou"] is None else f"{100 * r['miou']:.1f}"
        note = r.get("note", "")
        if "ignored_fraction" in r:
            note = f"{note}; {100 * r['ignored_fraction']:.1f}% pixels ignored"
        lines.append(f"| {names.get(r['step'], r['step'])} | {v} | {note} |")
    return "\n".join(lines)
