"""Class text embeddings: a prompt-template ensemble (CLIP, Radford et al. 2021, section 3.1.4)
averaged over every template and every synonym of a class, then L2-normalised.

>>> emb = text_embeddings(teacher, vocab, "shapes.txt", cache_dir="runs/x/embeddings/text")
>>> emb.shape   # (C, D), row i = class vocab.names[i]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.files import atomic_path, sha256_json

# Used when no template file is given. Written for this project (objects on textured backgrounds).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)


def load_templates(source: str | os.PathLike | Sequence[str] | None, key: str = "teacher.templates") -> tuple[str, ...]:
    """Templates from a setting (a file, one a line with ``{}``, or the templates themselves: see
    :func:`distill.config.read_templates_value`), a list of strings, or None / "" (:data:`DEFAULT_TEMPLATES`)."""
    from distill.config import read_templates_value
    from distill.teacher.prompt_learning import is_prompt_file

    if is_prompt_file(source):
        raise DistillError(f"{key}: {source} is a learned prompt file; this step needs hand-written templates (one a line with {{}})")
    if source is None or source == "":
        return DEFAULT_TEMPLATES
    if isinstance(source, (str, os.PathLike)):
        value = read_templates_value(str(source), key)
    else:
        value = "\n".join(str(t).strip() for t in source if str(t).strip()) + "\n"
        if not value.strip():
            raise DistillError(f"{key}: no prompt templates (expected one template a line with {{}})")
        value = read_templates_value(value, key)
    return tuple(value.splitlines())


def templates_key(source) -> list[str]:
    """What embeddings made with a templates setting depend on: the templates themselves, or a
    learned prompt file's bytes."""
    from distill.teacher.prompt_learning import is_prompt_file, prompt_file_key

    return [prompt_file_key(str(source).strip())] if is_prompt_file(source) else list(load_templates(source))


def article(name: str) -> str:
    """The ``{article}`` of a template for ``name``: "an" when it starts with a lower-case vowel,
    else "a" -- ViLD's rule as the reference writes it (``'an' if name[0] in 'aeiou' else 'a'``,
    tensorflow/tpu models/official/detection/projects/vild/ViLD_demo.ipynb, ``article``)."""
    return "an" if name[:1] in tuple("aeiou") else "a"


def fill_template(template: str, name: str) -> str:
    """``template`` with ``{}`` = ``name`` and ``{article}`` = :func:`article` of ``name``
    (the reference's ``template.format(name, article=article(name))``).

    >>> fill_template("There is {article} {} in the scene.", "apple")
    'There is an apple in the scene.'
    """
    return template.format(name, article=article(name))


def cache_key(teacher, vocab, templates: Sequence[str]) -> dict:
    """What the embeddings depend on: the teacher, the class prompts (names + synonyms, in
    order) and the templates."""
    return {
        "kind": "text",
        "teacher": teacher.fingerprint,
        "vocab": vocab.hash,
        "prompts": sha256_json([list(p) for p in vocab.prompts])[:16],
        "templates": sha256_json(list(templates))[:16],
    }


@torch.no_grad()
def encode_class_prompts(teacher, prompts: Sequence[Sequence[str]], templates: Sequence[str]) -> torch.Tensor:
    """Per class: embed every (template x synonym) sentence, L2-normalise each, average, then
    L2-normalise the mean (CLIP's zero-shot ensembling). Returns (C, D) float32."""
    sentences, owner = [], []
    for c, names in enumerate(prompts):
        for name in names:
            for t in templates:
                sentences.append(fill_template(t, name))
                owner.append(c)
    feats = teacher.encode_text(sentences)  # (S, D) unit rows
    owner_t = torch.tensor(owner, device=feats.device)
    C = len(prompts)
    sums = torch.zeros(C, feats.shape[1], device=feats.device).index_add_(0, owner_t, feats)
    counts = torch.bincount(owner_t, minlength=C).clamp_min(1).unsqueeze(1).float()
    return F.normalize(sums / counts, dim=-1)


def text_embeddings(
    teacher,
    vocab,
    templates: str | os.PathLike | Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """(C, D) float32 L2-normalised class embeddings in vocabulary order.

    ``templates``: a template file, a list, or None (:data:`DEFAULT_TEMPLATES`); or a learned
    prompt file (``*.safetensors`` of ``distill train prompts``: DetPro's context, see
    :mod:`distill.teacher.prompt_learning`), read for any vocabulary, novel classes included.
    ``cache_dir``: when given, the result is stored as ``<vocab-hash>-<key>.safetensors`` keyed
    by (teacher fingerprint, prompts, templates) and reused when the key matches.
    """
    from safetensors.torch import load_file, save_file

    if len(vocab) == 0:
        raise DistillError("vocabulary: empty (expected at least one class)")
    from distill.teacher.prompt_learning import is_prompt_file, learned_text_embeddings, load_prompts, prompt_file_key

    learned = None
    if is_prompt_file(templates):
        learned = load_prompts(str(templates).strip(), teacher)  # another teacher's file: one line, before any cache is read
        key = cache_key(teacher, vocab, [prompt_file_key(learned.path)])
    else:
        templates = load_templates(templates)
        key = cache_key(teacher, vocab, templates)
    path = None
    if cache_dir:
        path = Path(cache_dir) / f"{vocab.hash}-{sha256_json(key)[:12]}.safetensors"
        if path.is_file():
            try:
                emb = load_file(str(path))["embeddings"]
            except Exception:  # unreadable entry: recompute and overwrite it
                emb = None
            if emb is not None and emb.shape == (len(vocab), teacher.embed_dim):
                return emb.float().to(teacher.device)
    emb = learned_text_embeddings(teacher, vocab, learned) if learned is not None else encode_class_prompts(teacher, vocab.prompts, templates)
    if path is not None:
        meta = {k: str(v) for k, v in key.items()}
        meta["names"] = "|".join(vocab.names)
        with atomic_path(path) as tmp:
            save_file({"embeddings": emb.detach().cpu().contiguous()}, str(tmp), metadata=meta)
    return emb


def split_by_length(lengths: torch.Tensor, min_saving: float = 0.2) -> list[torch.Tensor]:
    """Row indices in at most two groups, short and long prompts, cut where the token count
    ``n_short * L_short + n_long * L_long`` is least (each group padded to its own longest);
    one group unless the cut saves ``min_saving`` of the tokens of padding all to the longest.

    Pretraining batches are ~95% class prompts of ~10 tokens and ~5% captions of ~30: one
    batch padded to 30 spends two thirds of the text tower on padding."""
    order = torch.argsort(lengths, stable=True)
    ls = lengths[order].tolist()
    n = len(ls)
    whole = n * ls[-1] if n else 0
    best, cut = whole, n
    for k in range(1, n):
        if ls[k] != ls[k - 1]:
            cost = k * ls[k - 1] + (n - k) * ls[-1]
            if cost < best:
                best, cut = cost, k
    if cut == n or best > (1 - min_saving) * whole:
        return [order]
    return [order[:cut], order[cut:]]


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (open_clip ``CLIP``, causal text tower, ``argmax`` pooling)
    computed on each prompt's tokens up to its group's longest instead of the full context: the
    short prompts and the long ones (captions) run as two groups (:func:`split_by_length`).

    Exact, not an approximation: with a causal mask no position attends to a later one, layer
    norms are per token and the pooled feature is read at the end-of-text token, so trailing
    padding never reaches the output. Our prompts are ~10 of 32 tokens, so the text tower does
    about a third of the work in pretraining. Falls back to ``encode_text`` for other models.
    """
    if getattr(model, "text_pool_type", None) != "argmax" or getattr(model, "attn_mask", None) is None or getattr(model, "cls_emb", None) is not None:
        return model.encode_text(tokens)
    lengths = tokens.argmax(dim=-1) + 1  # the end-of-text token has the largest id
    groups = split_by_length(lengths.cpu())
    if len(groups) == 1:
        return _encode_prefix(model, tokens, int(lengths.max()))
    parts = [_encode_prefix(model, tokens[g.to(tokens.device)], int(lengths[g.to(lengths.device)].max())) for g in groups]
    order = torch.cat(groups).to(tokens.device)
    return torch.cat(parts)[torch.argsort(order)]


def _encode_prefix(model, tokens: torch.Tensor, L: int) -> torch.Tensor:
    """The text tower on ``tokens[:, :L]`` (every end-of-text token inside the first ``L``)."""
    t = tokens[:, :L]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast) + model.positional_embedding[:L].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), t.argmax(dim=-1)]
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x
