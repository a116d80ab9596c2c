"""``load_teacher``: every checkpoint format against its reference implementation, on randomly
initialised models (nothing is downloaded):

- OpenAI TorchScript archives (made with ``torch.jit``, fp16 weights and the three scalar buffers
  as OpenAI ships them) and state dicts saved from them, against ``open_clip.load_openai_model``;
- Hugging Face ``CLIPModel`` folders (quick_gelu and gelu) against transformers' ``CLIPModel``;
- open_clip state dicts and folders against open_clip;
- a TorchScript archive whose pickle names ``os.system`` is refused before anything runs.

Image and text embeddings agree within 1e-5 (fp32); ViT-B/32 at its real size is the ``slow`` test.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from distill import load_teacher
from distill.config import TeacherConfig
from distill.errors import DistillError
from distill.teacher import build_teacher
from checkpoints import hf_folder as _hf_folder
from checkpoints import VIT_B32, VIT_B32_TEXT, make_openai_archive, perturbed

TOL = 1e-5
TEXTS = ["a photo of a cat", "a dog on the grass", "x"]


def _embeddings_close(t, ref_image, ref_text, x, tokens) -> tuple[float, float]:
    with torch.no_grad():
        ri = F.normalize(ref_image(x).float(), dim=-1)
        rt = F.normalize(ref_text(tokens).float(), dim=-1)
    di = (t.encode_image(x) - ri).abs().max().item()
    dt = (t.encode_text(TEXTS) - rt).abs().max().item()
    return di, dt


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    return make_openai_archive(tmp_path_factory.mktemp("openai"))


def test_openai_archive_and_state_dict_match_open_clip_load_openai_model(openai_files):
    archive, sd = openai_files
    ref = open_clip.load_openai_model(str(archive), precision="fp32", device="cpu")
    x = torch.randn(3, 3, 32, 32)
    tokens = open_clip.tokenize(TEXTS)
    for path in (archive, sd):
        t = load_teacher(path)
        assert t.name == f"openai:{path.name}" and t.image_size == 32 and t.embed_dim == 32
        assert isinstance(t.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
        di, dt = _embeddings_close(t, ref.encode_image, ref.encode_text, x, tokens)
        assert di < TOL and dt < TOL, (path.name, di, dt)
    # the same weights, whichever file: the same fingerprint
    assert load_teacher(archive).fingerprint == load_teacher(sd).fingerprint


def test_openai_weights_under_a_gelu_name_name_the_quickgelu_model(openai_files, tmp_path):
    archive, sd = openai_files
    for path in (archive, sd):
        with pytest.raises(DistillError) as e:
            load_teacher(path, model="ViT-B-32")
        msg = str(e.value)
        assert "QuickGELU" in msg and "ViT-B-32-quickgelu" in msg and str(path) in msg and "\n" not in msg
    # the right activation but the wrong size: the differences are named
    with pytest.raises(DistillError, match=r"architecture differs from teacher.model 'ViT-B-32-quickgelu' \(embed_dim 512 vs 32"):
        load_teacher(archive, model="ViT-B-32-quickgelu")
    # through the config: teacher.model + teacher.pretrained go through the same loader
    with pytest.raises(DistillError, match="ViT-B-32-quickgelu"):
        build_teacher(TeacherConfig(model="ViT-B-32", pretrained=str(archive)))
    t = build_teacher(TeacherConfig(model="", pretrained=str(archive), dense_image_size=64))
    assert t.dense_image_size == 64 and t.name.startswith("openai:")


def _rewrite_archive(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = replace.get(item.filename, zin.read(item.filename))
            zout.writestr(item, data)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torchscript_archive_cannot_run_code(openai_files, tmp_path):
    archive, _ = openai_files
    with zipfile.ZipFile(archive) as z:
        prefix = next(n for n in z.namelist() if n.endswith("/data.pkl")).split("/")[0]
        code_files = [n for n in z.namelist() if "/code/" in n and n.endswith(".py")]
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    _rewrite_archive(archive, bad, {f"{prefix}/data.pkl": pickle.dumps({"visual": _Exploit(marker)}, protocol=2)})
    with pytest.raises(DistillError) as e:
        load_teacher(bad)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert "refusing" in str(e.value) and not marker.exists()
    # the archive's TorchScript source is never compiled: garbage there changes nothing we read
    assert code_files
    garbage = tmp_path / "garbage_code.pt"
    _rewrite_archive(archive, garbage, {n: b"import os\nos.system('touch pwned')\n)(" for n in code_files})
    assert load_teacher(garbage).fingerprint == load_teacher(archive).fingerprint
    assert not marker.exists()


def _hf_refs(model):
    def image(x):
        return model(input_ids=torch.zeros(1, 4, dtype=torch.long), pixel_values=x).image_embeds

    def text(tokens):
        return model(input_ids=tokens, pixel_values=torch.zeros(1, 3, *(model.config.vision_config.image_size,) * 2)).text_embeds

    return image, text


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hugging_face_folder_matches_transformers_clipmodel(tmp_path, act):
    model = _hf_folder(tmp_path / "hf", act)
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    t = load_teacher(tmp_path / "hf")
    assert t.name == "hf:hf" and t.mean == (0.5, 0.5, 0.5) and t.std == (0.25, 0.25, 0.25)
    gelu = t.model.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(gelu, open_clip.transformer.QuickGELU) == (act == "quick_gelu")
    x = torch.randn(2, 3, 32, 32)
    di, dt = _embeddings_close(t, *_hf_refs(model), x, t.tokenize(TEXTS))
    assert di < TOL and dt < TOL, (di, dt)
    other = "ViT-B-32" if act == "quick_gelu" else "ViT-B-32-quickgelu"
    with pytest.raises(DistillError, match="QuickGELU"):
        load_teacher(tmp_path / "hf", model=other)


def test_open_clip_state_dict_the_name_decides(tmp_path):
    torch.manual_seed(0)
    ref = perturbed(open_clip.create_model("distill-tiny-vit"), 1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    t = load_teacher(path, model="distill-tiny-vit")
    x = torch.randn(2, 3, 64, 64)
    di, dt = _embeddings_close(t, ref.encode_image, ref.encode_text, x, open_clip.get_tokenizer("distill-tiny-vit")(TEXTS))
    assert di < TOL and dt < TOL
    with pytest.raises(DistillError, match="does not say its architecture or activation; name it"):
        load_teacher(path)
    with pytest.raises(DistillError, match="Closest match: 'ViT-B-32'"):
        load_teacher(path, model="ViT-B-23")
    with pytest.raises(DistillError, match="does not fit the model config"):
        load_teacher(path, model="ViT-B-16")


def test_project_teacher_folder_and_preprocess(tmp_path):
    from distill.teacher.clip import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    ref = perturbed(open_clip.create_model("distill-tiny-vit"), 1)
    folder = tmp_path / "teacher"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "teacher.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("distill-tiny-vit")}))
    t = load_teacher(folder)
    assert t.name == "distill-tiny-vit"
    assert t.fingerprint == build_teacher(TeacherConfig(pretrained=str(folder / "teacher.safetensors"))).fingerprint
    # preprocess: the checkpoint's own eval transform (short side resized, centre crop, mean / std)
    rng = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(90, 150, 3, generator=rng) * 255).byte().numpy())
    x = t.preprocess(img)
    want = open_clip.image_transform(64, is_train=False, mean=t.mean, std=t.std)(img)
    assert x.shape == (3, 64, 64) and torch.equal(x, want)
    with torch.no_grad():
        ref_emb = F.normalize(ref.encode_image(x[None]), dim=-1)
    assert (t.encode_image(x[None]) - ref_emb).abs().max().item() < TOL
    assert torch.allclose(t.encode_text(["a red star"]).norm(dim=-1), torch.ones(1), atol=1e-6)


def test_bad_checkpoints_are_one_line_errors(tmp_path, openai_files):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    cases = {
        "unknown layout": (tmp_path / "x.pt", lambda p: torch.save({"epoch": torch.tensor(3)}, p)),
        "not a checkpoint": (tmp_path / "junk.bin", lambda p: p.write_bytes(b"junk")),
        "folder without config": (empty, lambda p: None),
    }
    for what, (path, make) in cases.items():
        make(path)
        with pytest.raises(DistillError) as e:
            load_teacher(path, model="ViT-B-32" if what == "unknown layout" else None)
        assert str(path) in str(e.value) and "\n" not in str(e.value), what
    hf = tmp_path / "hf_noconfig"
    _hf_folder(hf, "quick_gelu")
    (hf / "config.json").rename(hf / "renamed.json")
    (hf / "open_clip_config.json").unlink(missing_ok=True)
    with pytest.raises(DistillError, match="needs open_clip_config.json .* or config.json"):
        load_teacher(hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(DistillError, match="expected a CLIPModel config"):
        load_teacher(hf)
    with pytest.raises(DistillError, match="checkpoint not found"):
        load_teacher(tmp_path / "missing.pt")
    # an archive whose tensors do not make a CLIP
    archive, _ = openai_files
    with zipfile.ZipFile(archive) as z:
        prefix = next(n for n in z.namelist() if n.endswith("/data.pkl")).split("/")[0]
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=2).dump({"training": False})
    odd = tmp_path / "odd.pt"
    _rewrite_archive(archive, odd, {f"{prefix}/data.pkl": buf.getvalue()})
    with pytest.raises(DistillError, match="holds no tensors"):
        load_teacher(odd)


def test_cli_names_the_checkpoint_problem_in_one_line(tmp_path, openai_files):
    """`distill teacher embed-text` with OpenAI weights under a GELU name, from another folder."""
    exe = shutil.which("distill") or str(Path(sys.executable).parent / "distill")  # the venv's entry point
    archive, _ = openai_files
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "emb"
    r = subprocess.run(
        [exe, "teacher", "embed-text", str(repo / "configs/shapes/teacher.yaml"), "--vocab", "cat, dog", "--out", str(out),
         "teacher.model=ViT-B-32", f"teacher.pretrained={archive}", "teacher.templates=", "teacher.device=cpu", "teacher.dense_tower="],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ViT-B-32-quickgelu" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()
    r = subprocess.run(
        [exe, "teacher", "embed-text", str(repo / "configs/shapes/teacher.yaml"), "--vocab", "cat, dog", "--out", str(out),
         "teacher.model=", f"teacher.pretrained={archive}", "teacher.templates=", "teacher.device=cpu", "teacher.dense_tower="],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert r.returncode == 0, r.stderr
    assert "2 classes x 32 dims" in r.stdout and list(out.glob("*.safetensors"))


@pytest.mark.slow
def test_vit_b32_at_real_size_openai_and_hugging_face(tmp_path):
    """ViT-B/32 (88M parameters at 224 px): the OpenAI archive against load_openai_model, the
    Hugging Face folder (openai/clip-vit-base-patch32's config) against CLIPModel."""
    archive, _ = make_openai_archive(tmp_path / "openai", VIT_B32, VIT_B32_TEXT, embed_dim=512)
    ref = open_clip.load_openai_model(str(archive), precision="fp32", device="cpu")
    t = load_teacher(archive)
    assert t.name == "ViT-B-32-quickgelu" and t.embed_dim == 512 and t.patch_size == 32
    x = torch.randn(2, 3, 224, 224)
    di, dt = _embeddings_close(t, ref.encode_image, ref.encode_text, x, open_clip.tokenize(TEXTS))
    assert di < TOL and dt < TOL, (di, dt)
    del ref, t
    model = _hf_folder(
        tmp_path / "hf", "quick_gelu",
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32),
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77),
        projection_dim=512,
    )
    t = load_teacher(tmp_path / "hf")
    di, dt = _embeddings_close(t, *_hf_refs(model), x, t.tokenize(TEXTS))
    assert di < TOL and dt < TOL, (di, dt)
