"""CLIP checkpoint formats, read into open_clip's layout without running anyone's code.

Three formats reach us (see :func:`distill.teacher.clip.load_teacher`):

- **OpenAI** (github.com/openai/CLIP): ``ViT-B-32.pt`` is a TorchScript archive (a zip with
  ``code/``, ``constants.pkl`` and a ``data.pkl`` that pickles the module tree); a state dict
  saved from it has the same keys plus three scalar buffers ``input_resolution``,
  ``context_length`` and ``vocab_size``. Its keys are open_clip's (open_clip was written to load
  them), and its MLPs use QuickGELU (open_clip's ``-quickgelu`` models; ``load_openai_model`` passes
  ``quick_gelu=True`` to ``build_model_from_openai_state_dict``, src/open_clip/model.py).
- **Hugging Face** ``CLIPModel`` folders: ``config.json`` (``hidden_act`` says quick_gelu or gelu)
  + ``model.safetensors`` / ``pytorch_model.bin``, with separate q / k / v projections; converted
  here to open_clip's keys.
- **open_clip** state dicts (``.safetensors`` / ``.pt``): the model name decides the architecture.

**No code runs when an archive is read.** :func:`read_torchscript_state_dict` never calls
``torch.jit.load``: it opens the zip, unpickles ``data.pkl`` with an unpickler whose
``find_class`` resolves only tensor rebuilders, storage types and ``OrderedDict``; every
``__torch__.*`` class becomes an inert record of its attributes, and any other global (``os.system``,
``builtins.eval``, ...) is refused with a :class:`DistillError` before anything is built. The
TorchScript source under ``code/`` is never compiled or executed.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import torch

from distill.errors import DistillError

# OpenAI's state dicts carry these scalar buffers (clip/model.py build_model deletes them too).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip whose entries include TorchScript's ``code/`` folder or ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


class _Record:
    """What a ``__torch__.*`` object of the archive becomes: its pickled attributes, nothing else."""

    qualname = ""

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, *args):
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _identity(x, *args):
    return x


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl`` into tensors and :class:`_Record` trees (see module doc)."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix, self.source = zf, prefix, source
        self.storages: dict[str, torch.Tensor] = {}
        self.records: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            key = f"{module}.{name}"
            if key not in self.records:
                self.records[key] = type(name, (_Record,), {"qualname": key})
            return self.records[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks, *a: data
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch.jit._pickle" and name in ("restore_type_tag", "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"):
            return _identity
        raise DistillError(f"{self.source}: TorchScript archive references {module}.{name}, which a CLIP checkpoint never needs; refusing to load it (it could run code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise DistillError(f"{self.source}: unexpected storage reference {pid!r:.80} in the TorchScript archive")
        _, dtype, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            try:
                raw = self.zf.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise DistillError(f"{self.source}: TorchScript archive lacks the tensor data {self.prefix}/data/{key}") from None
            t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
            if t.numel() < int(numel):
                raise DistillError(f"{self.source}: TorchScript archive tensor data {key} is truncated")
            self.storages[key] = t
        return self.storages[key]


def _flatten(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        return
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
        elif isinstance(v, _Record):
            _flatten(v, f"{prefix}{k}.", out)


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archived module tree, keyed like ``Module.state_dict()``
    (``visual.conv1.weight`` ...), read without executing anything (see the module doc). Besides
    parameters and buffers it holds non-persistent tensors (``attn_mask``); callers drop what
    their model does not persist."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DistillError(f"{path}: cannot read the TorchScript archive ({e})") from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise DistillError(f"{path}: expected one <name>/data.pkl in the TorchScript archive, found {len(pkls)}")
        prefix = pkls[0].split("/")[0]
        try:
            root = _ArchiveUnpickler(zf.read(pkls[0]), zf, prefix, str(path)).load()
        except DistillError:
            raise
        except Exception as e:
            raise DistillError(f"{path}: cannot unpickle the TorchScript archive's data.pkl ({type(e).__name__}: {e})") from None
    sd: dict[str, torch.Tensor] = {}
    _flatten(root, "", sd)
    if not sd:
        raise DistillError(f"{path}: the TorchScript archive holds no tensors")
    return {k: v.clone() for k, v in sd.items()}


def is_openai_state_dict(sd: dict) -> bool:
    """OpenAI's own state dicts (from its TorchScript archives) carry the three scalar buffers."""
    return all(k in sd for k in OPENAI_EXTRA_KEYS) and "visual.proj" in sd


def openai_model_cfg(sd: dict[str, torch.Tensor]) -> dict:
    """open_clip model config of an OpenAI-layout ViT state dict, read from its shapes as
    open_clip's ``build_model_from_openai_state_dict`` does (heads = width / 64 in both towers,
    QuickGELU)."""
    if "visual.proj" not in sd or "visual.conv1.weight" not in sd:
        raise DistillError("expected an OpenAI / open_clip CLIP ViT state dict (visual.conv1.weight, visual.proj ...)")
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vlayers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    twidth = sd["ln_final.weight"].shape[0]
    tlayers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    return {
        "embed_dim": int(sd["text_projection"].shape[1]),
        "quick_gelu": True,
        "vision_cfg": {"image_size": int(patch * grid), "layers": vlayers, "width": int(width), "patch_size": int(patch)},
        "text_cfg": {"context_length": int(sd["positional_embedding"].shape[0]), "vocab_size": int(sd["token_embedding.weight"].shape[0]), "width": int(twidth), "heads": int(twidth // 64), "layers": tlayers},
    }


# ------------------------------------------------------------------------------ Hugging Face

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_ACT = {"quick_gelu": True, "gelu": False}


def read_hf_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise DistillError(f"{folder}: no config.json (a Hugging Face CLIPModel folder holds config.json + model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("model_type") != "clip" or "vision_config" not in cfg or "text_config" not in cfg:
        raise DistillError(f"{cfg_path}: expected a CLIPModel config (model_type 'clip' with text_config and vision_config), got model_type {cfg.get('model_type')!r}")
    return cfg


def hf_model_cfg(cfg: dict, source: str) -> dict:
    """open_clip model config of a Hugging Face ``CLIPConfig`` dict (transformers'
    CLIPTextConfig / CLIPVisionConfig defaults where a key is absent)."""
    v = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5} | cfg["vision_config"]
    t = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5} | cfg["text_config"]
    acts = {v["hidden_act"], t["hidden_act"]}
    if len(acts) != 1 or not acts <= set(_HF_ACT):
        raise DistillError(f"{source}: hidden_act {v['hidden_act']!r} / {t['hidden_act']!r}: expected 'quick_gelu' or 'gelu' in both towers")
    for tower, c in (("vision_config", v), ("text_config", t)):
        if abs(float(c["layer_norm_eps"]) - 1e-5) > 1e-12:
            raise DistillError(f"{source}: {tower}.layer_norm_eps {c['layer_norm_eps']}: open_clip's towers use 1e-5")
    return {
        "embed_dim": int(cfg.get("projection_dim", 512)),
        "quick_gelu": _HF_ACT[v["hidden_act"]],
        "vision_cfg": {
            "image_size": int(v["image_size"]),
            "layers": int(v["num_hidden_layers"]),
            "width": int(v["hidden_size"]),
            "head_width": int(v["hidden_size"]) // int(v["num_attention_heads"]),
            "mlp_ratio": int(v["intermediate_size"]) / int(v["hidden_size"]),
            "patch_size": int(v["patch_size"]),
        },
        "text_cfg": {
            "context_length": int(t["max_position_embeddings"]),
            "vocab_size": int(t["vocab_size"]),
            "width": int(t["hidden_size"]),
            "heads": int(t["num_attention_heads"]),
            "layers": int(t["num_hidden_layers"]),
            "mlp_ratio": int(t["intermediate_size"]) / int(t["hidden_size"]),
        },
    }


def hf_to_open_clip(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Hugging Face ``CLIPModel`` keys -> open_clip ``CLIP`` keys (q / k / v concatenated into
    ``in_proj``, projections transposed). Keys it does not know are an error naming them."""
    sd = {k[len("clip."):] if k.startswith("clip.") else k: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(k: str) -> torch.Tensor:
        if k not in sd:
            raise DistillError(f"{source}: missing {k} (not a complete Hugging Face CLIPModel state dict)")
        used.add(k)
        return sd[k]

    def blocks(hf: str, oc: str) -> None:
        n = len({k.split(".")[3] for k in sd if k.startswith(f"{hf}.encoder.layers.")})
        for i in range(n):
            a, b = f"{hf}.encoder.layers.{i}", f"{oc}.resblocks.{i}"
            out[f"{b}.ln_1.weight"], out[f"{b}.ln_1.bias"] = take(f"{a}.layer_norm1.weight"), take(f"{a}.layer_norm1.bias")
            out[f"{b}.attn.in_proj_weight"] = torch.cat([take(f"{a}.self_attn.{p}_proj.weight") for p in "qkv"])
            out[f"{b}.attn.in_proj_bias"] = torch.cat([take(f"{a}.self_attn.{p}_proj.bias") for p in "qkv"])
            out[f"{b}.attn.out_proj.weight"], out[f"{b}.attn.out_proj.bias"] = take(f"{a}.self_attn.out_proj.weight"), take(f"{a}.self_attn.out_proj.bias")
            out[f"{b}.ln_2.weight"], out[f"{b}.ln_2.bias"] = take(f"{a}.layer_norm2.weight"), take(f"{a}.layer_norm2.bias")
            out[f"{b}.mlp.c_fc.weight"], out[f"{b}.mlp.c_fc.bias"] = take(f"{a}.mlp.fc1.weight"), take(f"{a}.mlp.fc1.bias")
            out[f"{b}.mlp.c_proj.weight"], out[f"{b}.mlp.c_proj.bias"] = take(f"{a}.mlp.fc2.weight"), take(f"{a}.mlp.fc2.bias")

    out["visual.class_embedding"] = take("vision_model.embeddings.class_embedding")
    out["visual.conv1.weight"] = take("vision_model.embeddings.patch_embedding.weight")
    out["visual.positional_embedding"] = take("vision_model.embeddings.position_embedding.weight")
    out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = take("vision_model.pre_layrnorm.weight"), take("vision_model.pre_layrnorm.bias")
    blocks("vision_model", "visual.transformer")
    out["visual.ln_post.weight"], out["visual.ln_post.bias"] = take("vision_model.post_layernorm.weight"), take("vision_model.post_layernorm.bias")
    out["visual.proj"] = take("visual_projection.weight").t().contiguous()
    out["token_embedding.weight"] = take("text_model.embeddings.token_embedding.weight")
    out["positional_embedding"] = take("text_model.embeddings.position_embedding.weight")
    blocks("text_model", "transformer")
    out["ln_final.weight"], out["ln_final.bias"] = take("text_model.final_layer_norm.weight"), take("text_model.final_layer_norm.bias")
    out["text_projection"] = take("text_projection.weight").t().contiguous()
    out["logit_scale"] = take("logit_scale")
    ignorable = ("position_ids",)
    extra = sorted(k for k in sd if k not in used and not k.endswith(ignorable))
    if extra:
        raise DistillError(f"{source}: unexpected keys for a CLIPModel: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return out


def hf_preprocess(folder: Path, image_size: int) -> tuple[tuple, tuple]:
    """(mean, std) of ``preprocessor_config.json`` when the folder has one, else OpenAI's."""
    import open_clip

    p = folder / "preprocessor_config.json"
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    if p.is_file():
        try:
            pc = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DistillError(f"{p}: not valid JSON ({e})") from None
        mean, std = pc.get("image_mean", mean), pc.get("image_std", std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
