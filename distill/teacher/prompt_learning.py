"""Learned prompt context (CoOp, Zhou et al. IJCV 2022; DetPro, Du et al. CVPR 2022): ``n_ctx``
continuous vectors take the place of a hand-written template's words at the token-embedding level,
the class name and the full stop follow, and the frozen text tower reads the whole sequence.

The prompt of class ``name`` is the token sequence of ``"X X ... X name."`` (``n_ctx`` X's) with
the X's embeddings replaced by the context -- the reference's ``PromptLearner`` with
``class_token_position='end'`` (github.com/dyabel/detpro, prompt/coop_mini.py, ``forward`` /
``forward_for_classes``). DetPro learns one context per IoU group of positive proposals and
ensembles the class embeddings (its ``run.py test``: each group's rows L2-normalised, summed,
normalised again).

A prompt file (safetensors) holds ``context`` (G, n_ctx, width) and, in its metadata, the teacher
fingerprint, the context length, the IoU groups and the classes it was trained on. Any vocabulary
can be embedded with it, novel classes included; a file of another teacher is refused.

>>> emb = learned_text_embeddings(teacher, vocab, "runs/shapes/prompts/detpro.safetensors")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.files import atomic_path, sha256_file

KIND = "distill.learned_prompts"
CONTEXT_WORD = "X"  # the placeholder whose embeddings the context replaces (coop_mini.py: ' '.join(['X'] * n_ctx))


@dataclass
class LearnedPrompts:
    """``context`` (G, n_ctx, width): one context per group; the rest says where it comes from."""

    context: torch.Tensor
    fingerprint: str
    groups: list[list[float]] = field(default_factory=list)  # IoU range [lo, hi) of each group's positives
    counts: list[dict] = field(default_factory=list)  # per group: positives / negatives it was trained on
    classes: list[str] = field(default_factory=list)  # the (base) classes it was trained on
    path: str = ""

    @property
    def ctx_len(self) -> int:
        return int(self.context.shape[1])


def is_prompt_file(value: str | os.PathLike | None) -> bool:
    """True when a templates setting names a learned prompt file (``*.safetensors``) rather than
    hand-written templates."""
    return isinstance(value, (str, os.PathLike)) and str(value).strip().endswith(".safetensors") and "\n" not in str(value).strip()


def save_prompts(path: str | os.PathLike, prompts: LearnedPrompts) -> Path:
    from safetensors.torch import save_file

    meta = {
        "kind": KIND,
        "teacher": prompts.fingerprint,
        "ctx_len": str(prompts.ctx_len),
        "groups": json.dumps(prompts.groups),
        "counts": json.dumps(prompts.counts),
        "classes": json.dumps(prompts.classes),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({"context": prompts.context.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    return path


def load_prompts(path: str | os.PathLike, teacher=None, ctx_len: int | None = None, key: str = "teacher.templates") -> LearnedPrompts:
    """Read a prompt file; with ``teacher``, refuse one learned on another teacher (fingerprint) or
    for another text width; with ``ctx_len``, refuse another context length. One-line errors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{key}: {path}: prompt file not found (expected a file written by `distill train prompts`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            context = f.get_tensor("context") if "context" in f.keys() else None
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise DistillError(f"{key}: {path}: not a readable prompt file ({type(e).__name__})") from None
    if meta.get("kind") != KIND or context is None or context.ndim != 3:
        raise DistillError(f"{key}: {path}: not a prompt file of `distill train prompts` (expected a 'context' tensor (groups, n_ctx, width) and kind {KIND})")
    out = LearnedPrompts(context.float(), meta.get("teacher", ""), json.loads(meta.get("groups", "[]")),
                         json.loads(meta.get("counts", "[]")), json.loads(meta.get("classes", "[]")), str(path))
    if teacher is not None:
        if out.fingerprint != teacher.fingerprint:
            raise DistillError(f"{key}: {path}: learned on teacher {out.fingerprint[:12]}, but this teacher is {teacher.fingerprint[:12]} "
                               "(prompts are tied to the text tower that learned them: retrain with `distill train prompts`)")
        width = teacher.model.token_embedding.weight.shape[1]
        if context.shape[2] != width:
            raise DistillError(f"{key}: {path}: context width {context.shape[2]} != the teacher's token width {width}")
    if ctx_len is not None and out.ctx_len != ctx_len:
        raise DistillError(f"{key}: {path}: context length {out.ctx_len}, expected {ctx_len} (prompts.ctx_len)")
    return out


def prompt_tokens(teacher, names: Sequence[str], n_ctx: int) -> torch.Tensor:
    """Tokens of ``"X X ... X name."`` per name (N, L); a name the context length cuts off (no
    end-of-text token left) is a one-line error."""
    texts = [" ".join([CONTEXT_WORD] * n_ctx) + " " + name + "." for name in names]
    tokens = teacher.tokenize(texts)
    ref = teacher.tokenize([" ".join([CONTEXT_WORD] * n_ctx)])[0]
    x_id = int(ref[1])
    if not bool((tokens[:, 1 : 1 + n_ctx] == x_id).all()):
        raise DistillError(f"learned prompts: the tokenizer did not split {n_ctx} context words as expected")
    # open_clip's tokenizer cuts a long text and ends it with end-of-text: the full stop is then gone
    period = int(teacher.tokenize(["."])[0][1])
    eot = tokens.argmax(dim=-1)
    cut = [n for n, e, t in zip(names, eot.tolist(), tokens) if int(t[e - 1]) != period]
    if cut:
        raise DistillError(f"learned prompts: class name {cut[0]!r} does not fit the text tower's {tokens.shape[1]} tokens after {n_ctx} context tokens")
    return tokens


def encode_with_context(model, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The open_clip text tower on ``tokens`` (N, L) whose positions ``1 .. n_ctx`` take the
    embeddings ``context`` (n_ctx, width) (differentiable in ``context``). Returns (N, D), not
    normalised. Runs up to the longest prompt only: exact, as :func:`distill.teacher.text.encode_text_trimmed`
    explains (causal mask, end-of-text pooling)."""
    n_ctx = context.shape[0]
    L = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :L]
    cast = model.transformer.get_cast_dtype()
    emb = model.token_embedding(t).to(cast)
    ctx = context.to(cast).unsqueeze(0).expand(t.shape[0], -1, -1)
    x = torch.cat([emb[:, :1], ctx, emb[:, 1 + n_ctx :]], dim=1) + model.positional_embedding[:L].to(cast)
    attn = model.attn_mask[:L, :L] if getattr(model, "attn_mask", None) is not None else None
    x = model.transformer(x, attn_mask=attn)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), t.argmax(dim=-1)]
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


def check_text_tower(teacher) -> None:
    """Learned prompts need an open_clip causal text tower pooled at the end-of-text token."""
    m = teacher.model
    if getattr(m, "text_pool_type", "argmax") != "argmax" or getattr(m, "cls_emb", None) is not None or not hasattr(m, "token_embedding"):
        raise DistillError(f"learned prompts: teacher {teacher.name} has no open_clip causal text tower pooled at end-of-text (needed to insert a context)")


def class_embeddings(teacher, prompts: Sequence[Sequence[str]], context: torch.Tensor, batch_size: int = 256,
                     tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(C, D) unit rows for one context (n_ctx, width): per class the mean of its names' unit
    embeddings, normalised (the synonyms averaged as :func:`distill.teacher.text.encode_class_prompts`).
    Differentiable in ``context``. ``tokens``: :func:`prompt_tokens` of the names in order, when
    the caller made them already (prompt training calls this every step)."""
    names, owner = [], []
    for c, syns in enumerate(prompts):
        for n in syns:
            names.append(n)
            owner.append(c)
    if tokens is None:
        tokens = prompt_tokens(teacher, names, context.shape[0])
    tokens = tokens.to(teacher.device)
    parts = [F.normalize(encode_with_context(teacher.model, tokens[i : i + batch_size], context.to(teacher.device)).float(), dim=-1)
             for i in range(0, len(names), batch_size)]
    feats = torch.cat(parts)
    owner_t = torch.tensor(owner, device=feats.device)
    sums = torch.zeros(len(prompts), feats.shape[1], device=feats.device, dtype=feats.dtype).index_add(0, owner_t, feats)
    counts = torch.bincount(owner_t, minlength=len(prompts)).clamp_min(1).unsqueeze(1).to(feats.dtype)
    return F.normalize(sums / counts, dim=-1)


def ensemble(per_group: Sequence[torch.Tensor]) -> torch.Tensor:
    """DetPro's ensemble of the groups' class embeddings (prompt/run.py ``load_ens_embedding(...,
    norm=True)``): each unit-normalised, summed, normalised."""
    return F.normalize(sum(F.normalize(e, dim=-1) for e in per_group), dim=-1)


@torch.no_grad()
def learned_text_embeddings(teacher, vocab, source: str | os.PathLike | LearnedPrompts) -> torch.Tensor:
    """(C, D) float32 unit class embeddings of ``vocab`` from a prompt file (every group's context,
    ensembled)."""
    check_text_tower(teacher)
    lp = source if isinstance(source, LearnedPrompts) else load_prompts(source, teacher)
    with teacher.autocast():
        per_group = [class_embeddings(teacher, vocab.prompts, lp.context[g]) for g in range(lp.context.shape[0])]
    return ensemble(per_group).float()


def prompt_file_key(path: str | os.PathLike) -> str:
    """What text embeddings made with a prompt file depend on: its bytes."""
    return "learned:" + sha256_file(path)[:16]
