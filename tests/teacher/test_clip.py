"""Teacher builder: names, checkpoints (safetensors, fp16 .pt), mismatches, fingerprint, precision."""

import dataclasses
import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from distill.config import TeacherConfig
from distill.errors import DistillError
from distill.teacher import build_random_teacher, build_teacher
from distill.teacher.clip import compute_fingerprint


def _tiny_state(seed=0):
    torch.manual_seed(seed)
    m = open_clip.create_model("distill-tiny-vit")
    return m, {k: v.contiguous() for k, v in m.state_dict().items()}


def test_unknown_model_lists_valid_names_and_closest():
    with pytest.raises(DistillError) as e:
        build_teacher(TeacherConfig(model="ViT-B-23", pretrained=""))
    msg = str(e.value)
    assert "teacher.model" in msg and "Closest match: 'ViT-B-32'" in msg and "distill-tiny-vit" in msg


def test_safetensors_checkpoint_loads_and_fp16_pt_too(tmp_path):
    model, sd = _tiny_state()
    path = tmp_path / "t.safetensors"
    save_file(sd, str(path))
    t = build_teacher(TeacherConfig(pretrained=str(path), dense_image_size=128))
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    assert (t.image_size, t.patch_size, t.embed_dim, t.dense_image_size) == (64, 8, 64, 128)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.eval().encode_image(t.normalize(x)), dim=-1)
    assert torch.allclose(t.encode_images(x), ref, atol=1e-5)
    # same weights -> same fingerprint, whatever the file
    pt = tmp_path / "t16.pt"
    torch.save({k: v.half() for k, v in sd.items()}, pt)
    t16 = build_teacher(TeacherConfig(pretrained=str(pt)))
    assert torch.allclose(t16.encode_images(x), ref, atol=2e-2)
    assert t16.fingerprint != t.fingerprint  # fp16-rounded weights are other weights
    t2 = build_teacher(TeacherConfig(pretrained=str(path)))
    assert t2.fingerprint == t.fingerprint
    # local-dir: layout (open_clip_config.json + weights): same weights, same fingerprint
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("distill-tiny-vit")}))
    (tmp_path / "t16.pt").unlink()
    t3 = build_teacher(TeacherConfig(model=f"local-dir:{tmp_path}", pretrained=""))
    assert t3.fingerprint == t.fingerprint and torch.allclose(t3.encode_images(x), ref, atol=1e-5)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    _, sd = _tiny_state()
    sd.pop("visual.ln_post.weight")
    sd["visual.proj"] = torch.zeros(128, 32)
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(DistillError) as e:
        build_teacher(TeacherConfig(pretrained=str(path)))
    msg = str(e.value)
    assert "does not fit" in msg and "visual.ln_post.weight" in msg and "extra.weight" in msg
    assert "visual.proj (128, 32) vs model (128, 64)" in msg


def test_missing_and_unreadable_weights(tmp_path):
    with pytest.raises(DistillError, match="distill teacher pretrain"):
        build_teacher(TeacherConfig(pretrained=str(tmp_path / "nope.safetensors")))
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DistillError, match="cannot read weights"):
        build_teacher(TeacherConfig(pretrained=str(bad)))
    with pytest.raises(DistillError, match="neither a file nor a known tag"):
        build_teacher(TeacherConfig(model="ViT-B-32", pretrained="nonsense-tag"))


def test_offline_tag_says_which_file_to_put_where(monkeypatch):
    def no_network(*a, **k):
        raise RuntimeError("offline")

    monkeypatch.setattr(open_clip, "create_model", no_network)
    with pytest.raises(DistillError) as e:
        build_teacher(TeacherConfig(model="ViT-B-32", pretrained="openai"))
    assert "teacher.pretrained=" in str(e.value) and "Download" in str(e.value)


def test_fingerprint_depends_on_weights_and_preprocessing():
    a = build_random_teacher(seed=0)
    b = build_random_teacher(seed=0)
    c = build_random_teacher(seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    m = a.model
    f0 = compute_fingerprint(m, "x", 32, a.mean, a.std)
    assert compute_fingerprint(m, "x", 32, a.mean, (0.5, 0.5, 0.5)) != f0
    assert compute_fingerprint(m, "x", 48, a.mean, a.std) != f0
    with torch.no_grad():
        m.visual.proj[0, 0] += 1e-3
    assert compute_fingerprint(m, "x", 32, a.mean, a.std) != f0


def test_random_teacher_deterministic_and_normalised():
    a, b = build_random_teacher(seed=5), build_random_teacher(seed=5)
    x = torch.rand(3, 3, 20, 30)
    ea, eb = a.encode_images(x), b.encode_images(x)
    assert torch.equal(ea, eb)
    assert torch.allclose(ea.norm(dim=-1), torch.ones(3), atol=1e-6)
    et = a.encode_text(["a red star", "a blue circle"])
    assert et.shape == (2, 32) and torch.allclose(et.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert a.tokenize(["a red star"]).shape == (1, 16)


def test_precision_amp_bf16_close_to_fp32_and_bad_precision():
    t = build_random_teacher(seed=0)
    x = torch.rand(2, 3, 32, 32)
    ref = t.encode_images(x)
    t_bf16 = dataclasses.replace(t, precision="amp_bf16")
    got = t_bf16.encode_images(x)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 5e-2 and not torch.equal(got, ref)
    with pytest.raises(DistillError, match="precision"):
        build_teacher(TeacherConfig(precision="fp8"))


def test_encode_text_cut_at_the_last_end_token_equals_open_clip():
    """Teacher.encode_text runs the causal text tower only up to the batch's last end-of-text
    token; open_clip's encode_text over the full context is the reference (mixed lengths, one
    prompt that fills the context, one empty)."""
    t = build_random_teacher(seed=3, context_length=16)
    texts = ["a red star", "a photo of a very very large blue circle on a striped ground with", "", "x"]
    tokens = t.tokenize(texts)
    assert int(tokens.argmax(-1).max()) == 15  # the long prompt fills the context
    with torch.no_grad():
        ref = torch.nn.functional.normalize(t.model.encode_text(tokens), dim=-1)
        short = torch.nn.functional.normalize(t.model.encode_text(t.tokenize(texts[:1] + texts[2:])), dim=-1)
    assert (t.encode_text(texts) - ref).abs().max().item() < 1e-6
    # a batch of short prompts only (the cut is at 4 tokens, not 16)
    assert int(t.tokenize(texts[:1] + texts[2:]).argmax(-1).max()) < 6
    assert (t.encode_text(texts[:1] + texts[2:]) - short).abs().max().item() < 1e-6
