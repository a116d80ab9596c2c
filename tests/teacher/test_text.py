"""Text embeddings: prompt ensemble x synonyms, normalised, order-stable, cached by key."""

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.teacher import build_random_teacher
from distill.teacher.text import fill_template, load_templates, text_embeddings
from distill.vocab import load_vocab


@pytest.fixture(scope="module")
def teacher():
    return build_random_teacher(seed=0)


def test_ensemble_over_templates_and_synonyms(teacher):
    vocab = load_vocab("red star: scarlet star, blue circle")
    templates = ["a photo of a {}.", "a {} on a table."]
    emb = text_embeddings(teacher, vocab, templates)
    assert emb.shape == (2, teacher.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-6)
    # reference: mean of the 4 (template x synonym) unit embeddings of class 0, renormalised
    sent = [t.format(n) for n in ("red star", "scarlet star") for t in templates]
    ref0 = F.normalize(teacher.encode_text(sent).mean(0), dim=0)
    ref1 = F.normalize(teacher.encode_text([t.format("blue circle") for t in templates]).mean(0), dim=0)
    assert torch.allclose(emb[0], ref0, atol=1e-6) and torch.allclose(emb[1], ref1, atol=1e-6)


def test_order_follows_vocab(teacher):
    a = text_embeddings(teacher, load_vocab("red star, blue circle, green square"), ["a {}."])
    b = text_embeddings(teacher, load_vocab("green square, red star, blue circle"), ["a {}."])
    assert torch.allclose(a[[2, 0, 1]], b, atol=1e-6)


def test_cache_reuses_and_is_keyed(tmp_path, teacher):
    vocab = load_vocab("red star, blue circle")
    e1 = text_embeddings(teacher, vocab, ["a {}."], cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith(vocab.hash)
    e2 = text_embeddings(teacher, vocab, ["a {}."], cache_dir=tmp_path)
    assert torch.equal(e1, e2)
    # other templates or another teacher: a new entry, never the stale one
    e3 = text_embeddings(teacher, vocab, ["a photo of a {}."], cache_dir=tmp_path)
    other = build_random_teacher(seed=1)
    e4 = text_embeddings(other, vocab, ["a {}."], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert not torch.allclose(e1, e3) and not torch.allclose(e1, e4)


def test_template_file_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# comment\na photo of a {}.\n\nthe {}\n")
    assert load_templates(f) == ("a photo of a {}.", "the {}")
    f.write_text("no placeholder\n")
    with pytest.raises(DistillError, match="exactly one"):
        load_templates(f)
    with pytest.raises(DistillError, match="not found"):
        load_templates(tmp_path / "missing.txt")
    f.write_text("# only comments\n")
    with pytest.raises(DistillError, match="no prompt templates"):
        load_templates(f)


def test_repo_prompt_files_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "distill" / "prompts"
    for name in ("shapes.txt", "default.txt", "vild.txt"):
        assert len(load_templates(root / name)) >= 5


# ViLD's prompt set as the reference lists it (tensorflow/tpu models/official/detection/projects/
# vild/ViLD_demo.ipynb, `multiple_templates`): 63 strings; a few of them, by position
VILD_COUNT = 63
VILD_SOME = {0: "There is {article} {} in the scene.", 6: "itap of my {}.", 8: "a photo of {article} {}.",
             24: "a photo of the small {}.", 52: "the plastic {}.", 59: "an embroidered {}.", 62: "a painting of a {}."}


def _this_is(text: str) -> str:
    """The notebook's FLAGS.this_is step of build_text_embedding, verbatim in effect."""
    return "This is " + text if text.startswith("a") or text.startswith("the") else text


def test_vild_prompt_file_is_the_reference_set():
    got = load_templates("vild.txt")  # a bare name: the file shipped in distill/prompts/
    assert len(got) == VILD_COUNT == len(set(got))
    for i, ref in VILD_SOME.items():
        assert got[i] == _this_is(ref), i
    # 58 sentences start with "a" / "the" and carry the prefix; the 5 "There is" / "itap of" do not
    plain = [t for t in got if not t.startswith("This is ")]
    assert plain == ["There is {article} {} in the scene.", "There is the {} in the scene.", "itap of {article} {}.",
                     "itap of my {}.", "itap of the {}."]


def test_vild_templates_fill_the_class_name_as_the_reference_does(teacher):
    # the reference: template.format(name, article='an' if name[0] in 'aeiou' else 'a')
    assert fill_template("This is a photo of {article} {}.", "apple") == "This is a photo of an apple."
    assert fill_template("There is {article} {} in the scene.", "umbrella") == "There is an umbrella in the scene."
    assert fill_template("There is {article} {} in the scene.", "hair drier") == "There is a hair drier in the scene."
    assert fill_template("itap of {article} {}.", "Orange") == "itap of a Orange."  # lower-case vowels only, as there
    assert fill_template("This is the toy {}.", "elephant") == "This is the toy elephant."
    # the text embeddings encode exactly those sentences
    vocab = load_vocab("apple, banana")
    tpl = ["There is {article} {} in the scene.", "This is a photo of {article} {}."]
    emb = text_embeddings(teacher, vocab, tpl)
    ref = F.normalize(teacher.encode_text(["There is an apple in the scene.", "This is a photo of an apple."]).mean(0), dim=0)
    assert torch.allclose(emb[0], ref, atol=1e-6)


def test_template_fields_other_than_article_are_refused():
    with pytest.raises(DistillError, match=r"teacher.templates: .*unknown field \{name\}"):
        load_templates(["a photo of {name} {}."])
    with pytest.raises(DistillError, match="teacher.templates: .*unbalanced braces"):
        load_templates(["a photo of {} {"])


def test_trimmed_text_encoding_equals_full_context_with_gradients():
    import open_clip

    from distill.teacher.clip import create_model_quiet, register_model_configs
    from distill.teacher.text import encode_text_trimmed

    register_model_configs()
    torch.manual_seed(0)
    model = create_model_quiet("distill-tiny-vit").train()
    tok = open_clip.get_tokenizer("distill-tiny-vit")(["a red star.", "a photo of a big blue circle next to a small green cross", "x"])
    assert (tok != 0).sum(1).max() < tok.shape[1]  # there is padding to trim
    full = model.encode_text(tok)
    g_full = torch.autograd.grad(full.square().sum(), model.transformer.resblocks[0].attn.in_proj_weight)[0]
    trim = encode_text_trimmed(model, tok)
    g_trim = torch.autograd.grad(trim.square().sum(), model.transformer.resblocks[0].attn.in_proj_weight)[0]
    torch.testing.assert_close(trim, full, rtol=1e-5, atol=1e-6)
    # the same gradient up to float summation order (padding rows add exact zeros in another order)
    assert float((g_trim - g_full).norm() / g_full.norm()) < 1e-5


def test_split_by_length_cuts_where_fewest_tokens_are_padded():
    from distill.teacher.text import split_by_length

    # 6 prompts of 9-10 tokens, 2 captions of 30: 8 x 30 = 240 tokens as one group, 6 x 10 + 2 x 30 = 120 as two
    lengths = torch.tensor([9, 30, 10, 9, 28, 10, 9, 10])
    short, long = split_by_length(lengths)
    assert sorted(short.tolist()) == [0, 2, 3, 5, 6, 7] and sorted(long.tolist()) == [1, 4]
    # lengths close together: one group (a cut would save under 20% of the tokens)
    (one,) = split_by_length(torch.tensor([9, 10, 10, 11]))
    assert sorted(one.tolist()) == [0, 1, 2, 3]
    assert [g.tolist() for g in split_by_length(torch.tensor([7]))] == [[0]]
