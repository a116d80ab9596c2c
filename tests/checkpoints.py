"""Checkpoints in the formats users hold, made at test time from randomly initialised models (no
download): OpenAI's TorchScript archive (and the state dict saved from it), a Hugging Face
``CLIPModel`` folder. Used by tests/teacher/test_load_teacher.py and the real-config runs."""

from __future__ import annotations

from pathlib import Path

import torch

SMALL_VIT = dict(image_size=32, patch_size=8, width=128, layers=2)  # heads = width / 64, as OpenAI
SMALL_TEXT = dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)
VIT_B32 = dict(image_size=224, patch_size=32, width=768, layers=12)
VIT_B32_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_openai_archive(folder: Path, vision=SMALL_VIT, text=SMALL_TEXT, embed_dim=32, seed=0, name="ViT-openai.pt") -> tuple[Path, Path]:
    """An OpenAI-style TorchScript archive of a random QuickGELU CLIP and the state dict saved
    from it, shaped as OpenAI ships them: fp16 linear / conv / attention weights
    (``convert_weights_to_fp16``), ``input_resolution`` / ``context_length`` / ``vocab_size``
    buffers, the attention mask a plain attribute (not in the state dict)."""
    from open_clip.model import CLIP, convert_weights_to_fp16

    torch.manual_seed(seed)
    m = perturbed(CLIP(embed_dim, vision_cfg=dict(vision), text_cfg=dict(text), quick_gelu=True), seed + 1)
    for key, value in (("input_resolution", vision["image_size"]), ("context_length", text["context_length"]), ("vocab_size", text["vocab_size"])):
        m.__dict__.pop(key, None)
        m.register_buffer(key, torch.tensor(value))
    convert_weights_to_fp16(m)
    object.__setattr__(m, "attn_mask", m._buffers.pop("attn_mask"))
    size = vision["image_size"]
    traced = torch.jit.trace_module(m, {"encode_image": (torch.ones(1, 3, size, size, dtype=torch.float16),)}, check_trace=False)
    folder.mkdir(parents=True, exist_ok=True)
    archive, sd = folder / name, folder / "openai_state_dict.pt"
    traced.save(str(archive))
    torch.save(traced.state_dict(), sd)
    return archive, sd


def hf_folder(folder: Path, act: str, seed: int = 0, vision=None, text=None, projection_dim=32):
    from transformers import CLIPConfig, CLIPModel

    vision = vision or dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=8)
    text = text or dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77)
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(text, hidden_act=act), vision_config=dict(vision, hidden_act=act), projection_dim=projection_dim)
    model = perturbed(CLIPModel(cfg), seed + 1)
    model.save_pretrained(folder)
    return model
