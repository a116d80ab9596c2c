"""CLIPSeg: parity with transformers' CLIPSegForImageSegmentation, layer scaling, bad input."""

import pytest
import torch

from distill.errors import DistillError
from distill.segmentation.clipseg import (
    CLIPSegDecoder,
    HFCLIPBackbone,
    build_clipseg,
    convert_hf_clipseg,
    sample_queries,
    scale_layers,
)

try:  # the reference: pyproject's dev extra (as pytest itself); missing it is a failure, not a skip
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation
except ImportError as e:
    raise ImportError("tests/segmentation/test_clipseg.py compares against transformers' CLIPSeg: pip install -e '.[dev]'") from e


def _hf(complex_head: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4),
        projection_dim=16,
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=24,
        extract_layers=[0, 2, 3],
        use_complex_transposed_convolution=complex_head,
    )
    model = CLIPSegForImageSegmentation(cfg).eval()
    # open_clip-like random biases and norms (HF inits them to 0 / 1): exercise every mapping
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("complex_head", [False, True])
def test_parity_with_transformers(complex_head):
    hf = _hf(complex_head)
    ours = convert_hf_clipseg(hf)
    x = torch.rand(3, 3, 32, 32)
    cond = torch.randn(3, 16)
    with torch.no_grad():
        ref = hf(pixel_values=x, conditional_embeddings=cond).logits
        out = ours.mask_logits(x, cond[:, None, :], resize=False)[:, 0]
    assert out.shape == ref.shape == ((3, 32, 32) if not complex_head else (3, 16, 16))
    assert ref.abs().mean() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_parity_hf_backbone_adapter_and_fan_out():
    """The HF-backbone adapter gives the same logits; one image x Q queries equals Q paired rows."""
    hf = _hf(False, seed=1)
    ours = convert_hf_clipseg(hf)
    wrapped = type(ours)(HFCLIPBackbone(hf.clip.vision_model, hf.config.extract_layers), ours.decoder).eval()
    x = torch.rand(2, 3, 32, 32)
    q = torch.randn(3, 16)
    with torch.no_grad():
        a = ours.mask_logits(x, q, resize=False)  # (2, 3, 32, 32): every image with every query
        b = wrapped.mask_logits(x, q, resize=False)
        ref = hf(pixel_values=x.repeat_interleave(3, 0), conditional_embeddings=q.repeat(2, 1)).logits.view(2, 3, 32, 32)
    torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, ref, atol=1e-4, rtol=1e-4)


def _hf_with_real_text(complex_head: bool, seed: int = 2):
    """A tiny CLIPSeg whose text tower reads open_clip's tokens (vocabulary 49408, start / end of
    text 49406 / 49407, context 16), so that its CLIP can be our teacher."""
    torch.manual_seed(seed)
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
        projection_dim=16,
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=24,
        extract_layers=[0, 2, 3],
        use_complex_transposed_convolution=complex_head,
    )
    model = CLIPSegForImageSegmentation(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _teacher_of(hf, folder):
    """The HF CLIPSeg's CLIP saved as a Hugging Face CLIPModel folder and read back by
    ``load_teacher`` (the production loader: key mapping, OpenAI mean / std, open_clip tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    from distill.teacher.clip import load_teacher

    c = hf.config
    clip = CLIPModel(CLIPConfig(text_config=c.text_config.to_dict(), vision_config=c.vision_config.to_dict(), projection_dim=c.projection_dim))
    clip.load_state_dict(hf.clip.state_dict(), strict=True)
    clip.save_pretrained(folder)
    return load_teacher(folder, device="cpu")


@pytest.mark.parametrize("complex_head", [False, True])
def test_parity_at_real_settings_text_branch_normalisation_and_interpolated_positions(complex_head, tmp_path):
    """Our production path against transformers end to end: the teacher loaded from the CLIPSeg's
    own CLIP, the student built on the teacher's tower (``build_clipseg``) with the decoder's
    weights, images in [0, 1] normalised by the teacher's (OpenAI) mean / std, 48 x 48 and 24 x 24
    inputs for a 32 x 32 model (a 6 x 6 and a 3 x 3 grid: position embeddings interpolated
    bicubically from 4 x 4; transformers' decoder needs square grids), and prompts through the
    text branch: transformers' ``input_ids`` against our text tower on the same tokens, then the
    L2-normalised embeddings that training and inference feed the student (``Teacher.encode_text``)."""
    import torch.nn.functional as F

    from distill.teacher.text import encode_text_trimmed

    hf = _hf_with_real_text(complex_head)
    teacher = _teacher_of(hf, tmp_path / "clip")
    mean, std = torch.tensor(teacher.mean).view(1, 3, 1, 1), torch.tensor(teacher.std).view(1, 3, 1, 1)
    assert teacher.mean != (0.0, 0.0, 0.0) and teacher.std != (1.0, 1.0, 1.0)
    ours = build_clipseg(teacher.model.visual, teacher.mean, teacher.std, teacher.embed_dim, layers=hf.config.extract_layers,
                         scale_to_depth=False, reduce_dim=16, heads=2, hidden=24, complex_head=complex_head).eval()
    ours.decoder.load_state_dict(hf.decoder.state_dict(), strict=True)
    prompts = ["a red square", "a photo of a big green circle", "blue"]
    tokens = teacher.tokenize(prompts)
    assert tokens.shape == (3, 16) and (tokens == 49407).sum(1).eq(1).all()
    g = torch.Generator().manual_seed(3)
    for size in (48, 24):
        x = torch.rand(3, 3, size, size, generator=g)
        pixels = (x - mean) / std  # what transformers' CLIPSegProcessor hands the model
        with torch.no_grad():
            # text branch: HF embeds input_ids itself; ours runs the teacher's text tower on the tokens
            ref = hf(pixel_values=pixels, input_ids=tokens)
            raw = encode_text_trimmed(teacher.model, tokens)
            torch.testing.assert_close(raw, ref.conditional_embeddings, atol=1e-5, rtol=1e-5)
            out = ours.mask_logits(x, raw[:, None, :], resize=False)[:, 0]
            # the student's own queries: L2-normalised text embeddings
            q = teacher.encode_text(prompts)
            torch.testing.assert_close(q, F.normalize(ref.conditional_embeddings, dim=-1), atol=1e-6, rtol=1e-5)
            ref_n = hf(pixel_values=pixels, conditional_embeddings=q).logits
            out_n = ours.mask_logits(x, q[:, None, :], resize=False)[:, 0]
        side = size if not complex_head else size // 2
        assert out.shape == ref.logits.shape == out_n.shape == ref_n.shape == (3, side, side)
        assert ref.logits.abs().mean() > 0.1 and (ref.logits - ref_n).abs().mean() > 1e-3  # real signal; the norm matters
        torch.testing.assert_close(out, ref.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out_n, ref_n, atol=1e-4, rtol=1e-4)


def test_scale_layers():
    assert scale_layers((3, 7, 9), 12) == (3, 7, 9)
    assert scale_layers((3, 7, 9), 24) == (6, 14, 18)
    assert scale_layers((3, 7, 9), 4) == (1, 2, 3)
    with pytest.raises(DistillError, match="out of range"):
        scale_layers((3, 7, 12), 12)


def test_student_on_teacher_tower(tiny_teacher):
    t = tiny_teacher
    m = build_clipseg(t.model.visual, t.mean, t.std, t.embed_dim, reduce_dim=16, heads=2, hidden=32)
    assert m.backbone.layers == (1, 2, 3)  # (3, 7, 9) scaled to 4 blocks
    assert all(not p.requires_grad for p in m.backbone.parameters())
    q = torch.nn.functional.normalize(torch.randn(5, t.embed_dim), dim=1)
    x = torch.rand(2, 3, 40, 48)  # not a multiple of the patch in height: resized back
    m.eval()
    sem = m.semantic_logits(x, q)
    assert sem.shape == (2, 6, 40, 48)
    assert torch.allclose(sem[:, 0], torch.zeros(()))  # logit(0.5) = 0: the background channel
    # train: only the decoder learns, the loss is a finite BCE
    m.train()
    m.set_vocabulary(q, [1, 2, 3, 4, 5])
    masks = torch.randint(0, 6, (2, 40, 48))
    loss = m(x, {"masks": masks})["loss_bce"]
    loss.backward()
    assert torch.isfinite(loss) and 0.3 < loss.item() < 3.0
    assert all(p.grad is None for p in m.backbone.parameters())
    assert m.decoder.film_mul.weight.grad.abs().sum() > 0


def test_sample_queries_present_first():
    torch.manual_seed(0)
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[0, 0, 0] = 5
    masks[1, :2] = 2
    masks[1, 2:] = 3
    ids = torch.tensor([1, 2, 3, 4, 5])
    rows = sample_queries(masks, ids, 3)
    assert rows.shape == (2, 3)
    assert ids[rows[0, 0]] == 5
    assert set(ids[rows[1, :2]].tolist()) == {2, 3}
    assert len(set(rows[0].tolist())) == 3


def test_bad_input(tiny_teacher):
    t = tiny_teacher
    m = build_clipseg(t.model.visual, t.mean, t.std, t.embed_dim, reduce_dim=16, heads=2, hidden=32).eval()
    with pytest.raises(DistillError, match="empty query list"):
        m.semantic_logits(torch.rand(1, 3, 32, 32), torch.zeros(0, t.embed_dim))
    with pytest.raises(DistillError, match="smaller than the patch size"):
        m.semantic_logits(torch.rand(1, 3, 4, 32), torch.randn(2, t.embed_dim))
    with pytest.raises(DistillError, match="divisible"):
        CLIPSegDecoder(32, 16, reduce_dim=10, heads=4)
    m.train()
    m.set_vocabulary(torch.randn(2, t.embed_dim))
    with pytest.raises(DistillError, match="does not match the images"):
        m(torch.rand(1, 3, 32, 32), {"masks": torch.zeros(1, 16, 16, dtype=torch.long)})
