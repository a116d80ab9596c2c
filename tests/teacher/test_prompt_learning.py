"""Learned prompt context (DetPro / CoOp): the context inserted at the token-embedding level is
exactly a hand-written template when it holds that template's token embeddings; prompt files are
tied to their teacher and context length; any templates setting accepts one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.teacher.clip import build_random_teacher
from distill.teacher.prompt_learning import (
    LearnedPrompts,
    class_embeddings,
    ensemble,
    learned_text_embeddings,
    load_prompts,
    prompt_tokens,
    save_prompts,
)
from distill.teacher.text import load_templates, text_embeddings
from distill.vocab import Vocabulary


@pytest.fixture(scope="module")
def teacher():
    return build_random_teacher(context_length=24, seed=3)


def _template_context(teacher, words: str) -> torch.Tensor:
    tok = teacher.tokenize([words])[0]
    n = int(tok.argmax()) - 1  # the words' tokens between start- and end-of-text
    return teacher.model.token_embedding(tok[1 : 1 + n]).detach()


def test_context_of_a_templates_tokens_equals_encode_text(teacher, tmp_path):
    """The issue's exactness test: context = token embeddings of "a photo of a" -> the class
    embeddings are encode_text("a photo of a {name}.") (synonyms averaged as the template path)."""
    ctx = _template_context(teacher, "a photo of a")
    assert ctx.shape[0] == 4
    prompts = [("red star",), ("blue circle", "azure disc"), ("green triangle",)]
    with torch.no_grad():
        got = class_embeddings(teacher, prompts, ctx)
    want = torch.stack([
        F.normalize(torch.stack([teacher.encode_text([f"a photo of a {n}."])[0] for n in names]).mean(0), dim=-1)
        for names in prompts
    ])
    assert (got - want).abs().max() < 1e-5
    # and the same through text_embeddings with a one-group prompt file (the path every stage takes)
    vocab = Vocabulary(("red star", "blue circle", "green triangle"), synonyms=(("red star",), ("blue circle", "azure disc"), ("green triangle",)))
    assert vocab.prompts == tuple(prompts)
    path = save_prompts(tmp_path / "p.safetensors", LearnedPrompts(ctx[None], teacher.fingerprint, [[0.5, 1.1]]))
    assert (text_embeddings(teacher, vocab, str(path)) - want).abs().max() < 1e-5


def test_groups_are_ensembled_as_detpro(teacher, tmp_path):
    """Two groups: normalise(sum of each group's unit class embeddings) (run.py load_ens_embedding)."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 3, teacher.model.token_embedding.weight.shape[1], generator=g) * 0.02
    path = save_prompts(tmp_path / "p.safetensors", LearnedPrompts(ctx, teacher.fingerprint, [[0.5, 0.7], [0.7, 1.1]]))
    vocab = Vocabulary(("red star", "blue circle"))
    with torch.no_grad():
        e0 = class_embeddings(teacher, vocab.prompts, ctx[0])
        e1 = class_embeddings(teacher, vocab.prompts, ctx[1])
    want = (e0 + e1) / (e0 + e1).norm(dim=-1, keepdim=True)
    assert torch.allclose(learned_text_embeddings(teacher, vocab, path), want, atol=1e-6)
    assert torch.allclose(ensemble([e0, e1]), want, atol=1e-6)
    assert not torch.allclose(e0, e1, atol=1e-3)  # the groups really differ


def test_context_gets_gradients_and_the_tower_does_not(teacher):
    ctx = torch.nn.Parameter(_template_context(teacher, "a photo of a").clone())
    emb = class_embeddings(teacher, [("red star",)], ctx)
    emb.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_prompt_file_of_another_teacher_or_context_length_is_one_line(teacher, tmp_path):
    other = build_random_teacher(context_length=24, seed=4)
    path = save_prompts(tmp_path / "p.safetensors", LearnedPrompts(torch.zeros(1, 8, 32), other.fingerprint, [[0.5, 1.1]]))
    with pytest.raises(DistillError, match="learned on teacher .* but this teacher is") as e:
        text_embeddings(teacher, Vocabulary(("red star",)), str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(DistillError, match="context length 8, expected 4"):
        load_prompts(path, other, ctx_len=4)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DistillError, match="not a readable prompt file"):
        load_prompts(tmp_path / "bad.safetensors")
    with pytest.raises(DistillError, match="prompt file not found"):
        load_prompts(tmp_path / "missing.safetensors")


def test_hand_written_template_steps_refuse_a_prompt_file(tmp_path):
    with pytest.raises(DistillError, match="is a learned prompt file; this step needs hand-written templates"):
        load_templates(str(tmp_path / "p.safetensors"), "cam.templates")


def test_a_class_name_the_context_cuts_off_is_one_line(teacher):
    with pytest.raises(DistillError, match="does not fit the text tower's 24 tokens after 8 context tokens"):
        prompt_tokens(teacher, ["a " * 20 + "star"], 8)
    assert prompt_tokens(teacher, ["red star"], 8).shape == (1, 24)


def test_config_keeps_a_prompt_file_as_its_path(tmp_path):
    from distill.config import load_config

    t = build_random_teacher(seed=0)
    path = save_prompts(tmp_path / "p.safetensors", LearnedPrompts(torch.zeros(1, 2, 32), t.fingerprint))
    cfg = load_config(None, [f"teacher.templates={path}"])
    assert cfg.teacher.templates == str(path.resolve())
    with pytest.raises(DistillError, match="teacher.templates: .*missing.safetensors: prompt file not found"):
        load_config(None, [f"teacher.templates={tmp_path / 'missing.safetensors'}"])
