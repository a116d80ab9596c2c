"""CLIP checkpoint formats, read into open_clip's layout without running anyone's code.

Three formats reach us (see :func:`distill.teacher.clip.load_teacher`, which reads them with the
helpers here: weights files, strict state-dict loading, the architecture a file says it is):

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

import difflib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import open_clip
import torch

from distill.engine.checkpoint import load_failure, state_dict_mismatch
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


# ------------------------------------------------------------------------------ open_clip folders

OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "teacher.safetensors")


def read_open_clip_config(folder: Path) -> tuple[dict, dict]:
    """``(model_cfg, preprocess_cfg)`` of open_clip's local-dir layout (``open_clip_config.json``)."""
    path = folder / "open_clip_config.json"
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{path}: not valid JSON ({e})") from None
    cfg = meta.get("model_cfg") if isinstance(meta, dict) else None
    if not isinstance(cfg, dict):
        raise DistillError(f"{path}: expected a 'model_cfg' object (open_clip's local-dir layout)")
    return cfg, meta.get("preprocess_cfg") or {}


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
        "vision_cfg": hf_vision_cfg(v),
        "text_cfg": {
            "context_length": int(t["max_position_embeddings"]),
            "vocab_size": int(t["vocab_size"]),
            "width": int(t["hidden_size"]),
            "heads": int(t["num_attention_heads"]),
            "layers": int(t["num_hidden_layers"]),
            "mlp_ratio": int(t["intermediate_size"]) / int(t["hidden_size"]),
        },
    }


def hf_vision_cfg(v: dict) -> dict:
    """open_clip ``vision_cfg`` of a Hugging Face ``CLIPVisionConfig`` dict (every key present)."""
    return {
        "image_size": int(v["image_size"]),
        "layers": int(v["num_hidden_layers"]),
        "width": int(v["hidden_size"]),
        "head_width": int(v["hidden_size"]) // int(v["num_attention_heads"]),
        "mlp_ratio": int(v["intermediate_size"]) / int(v["hidden_size"]),
        "patch_size": int(v["patch_size"]),
    }


class HFKeys:
    """A Hugging Face state dict read key by key (``keys(name)``); ``used`` holds what was read."""

    def __init__(self, sd: dict[str, torch.Tensor], source: str):
        self.sd, self.source, self.used = sd, source, set()

    def __call__(self, k: str) -> torch.Tensor:
        if k not in self.sd:
            raise DistillError(f"{self.source}: missing {k} (not a complete Hugging Face CLIPModel state dict)")
        self.used.add(k)
        return self.sd[k]


def _hf_blocks(take: HFKeys, hf: str, oc: str) -> dict[str, torch.Tensor]:
    """Encoder layers ``{hf}encoder.layers.i`` -> open_clip blocks ``{oc}resblocks.i`` (q / k / v
    concatenated into ``in_proj``)."""
    out: dict[str, torch.Tensor] = {}
    pre = f"{hf}encoder.layers."
    for i in range(len({k[len(pre) :].split(".")[0] for k in take.sd if k.startswith(pre)})):
        a, b = f"{pre}{i}", f"{oc}resblocks.{i}"
        out[f"{b}.ln_1.weight"], out[f"{b}.ln_1.bias"] = take(f"{a}.layer_norm1.weight"), take(f"{a}.layer_norm1.bias")
        out[f"{b}.attn.in_proj_weight"] = torch.cat([take(f"{a}.self_attn.{p}_proj.weight") for p in "qkv"])
        out[f"{b}.attn.in_proj_bias"] = torch.cat([take(f"{a}.self_attn.{p}_proj.bias") for p in "qkv"])
        out[f"{b}.attn.out_proj.weight"], out[f"{b}.attn.out_proj.bias"] = take(f"{a}.self_attn.out_proj.weight"), take(f"{a}.self_attn.out_proj.bias")
        out[f"{b}.ln_2.weight"], out[f"{b}.ln_2.bias"] = take(f"{a}.layer_norm2.weight"), take(f"{a}.layer_norm2.bias")
        out[f"{b}.mlp.c_fc.weight"], out[f"{b}.mlp.c_fc.bias"] = take(f"{a}.mlp.fc1.weight"), take(f"{a}.mlp.fc1.bias")
        out[f"{b}.mlp.c_proj.weight"], out[f"{b}.mlp.c_proj.bias"] = take(f"{a}.mlp.fc2.weight"), take(f"{a}.mlp.fc2.bias")
    return out


def hf_vision_to_open_clip(take: HFKeys, hf: str = "", oc: str = "") -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP(Seg) vision model's keys (under ``hf``, e.g. ``vision_model.``) ->
    open_clip ``VisionTransformer`` keys (under ``oc``, e.g. ``visual.``), projection aside."""
    out = {
        f"{oc}class_embedding": take(f"{hf}embeddings.class_embedding"),
        f"{oc}conv1.weight": take(f"{hf}embeddings.patch_embedding.weight"),
        f"{oc}positional_embedding": take(f"{hf}embeddings.position_embedding.weight"),
        f"{oc}ln_pre.weight": take(f"{hf}pre_layrnorm.weight"),
        f"{oc}ln_pre.bias": take(f"{hf}pre_layrnorm.bias"),
    }
    out.update(_hf_blocks(take, hf, f"{oc}transformer."))
    out[f"{oc}ln_post.weight"], out[f"{oc}ln_post.bias"] = take(f"{hf}post_layernorm.weight"), take(f"{hf}post_layernorm.bias")
    return out


def hf_to_open_clip(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Hugging Face ``CLIPModel`` keys -> open_clip ``CLIP`` keys (q / k / v concatenated into
    ``in_proj``, projections transposed). Keys it does not know are an error naming them."""
    sd = {k[len("clip."):] if k.startswith("clip.") else k: v for k, v in sd.items()}
    take = HFKeys(sd, source)
    out = hf_vision_to_open_clip(take, "vision_model.", "visual.")
    out["visual.proj"] = take("visual_projection.weight").t().contiguous()
    out["token_embedding.weight"] = take("text_model.embeddings.token_embedding.weight")
    out["positional_embedding"] = take("text_model.embeddings.position_embedding.weight")
    out.update(_hf_blocks(take, "text_model.", "transformer."))
    out["ln_final.weight"], out["ln_final.bias"] = take("text_model.final_layer_norm.weight"), take("text_model.final_layer_norm.bias")
    out["text_projection"] = take("text_projection.weight").t().contiguous()
    out["logit_scale"] = take("logit_scale")
    ignorable = ("position_ids",)
    extra = sorted(k for k in sd if k not in take.used and not k.endswith(ignorable))
    if extra:
        raise DistillError(f"{source}: unexpected keys for a CLIPModel: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return out


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face ``CLIPModel`` folder (one file, or the shards of
    ``model.safetensors.index.json``) in open_clip's keys (:func:`hf_to_open_clip`)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())):
            sd.update(load_weights_file(folder / shard))
    else:
        sd = load_weights_file(weights_in(folder, HF_WEIGHT_FILES))
    return hf_to_open_clip(sd, str(folder))


def hf_preprocess(folder: Path, image_size: int) -> tuple[tuple, tuple]:
    """(mean, std) of ``preprocessor_config.json`` when the folder has one, else OpenAI's."""
    p = folder / "preprocessor_config.json"
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    if p.is_file():
        try:
            pc = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DistillError(f"{p}: not valid JSON ({e})") from None
        mean, std = pc.get("image_mean", mean), pc.get("image_std", std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ------------------------------------------------------------------------------ weights files


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pt/.pth/.bin`` (``torch.load(weights_only=True)``)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle refused by weights_only, ...
        raise DistillError(f"{path}: cannot read weights ({load_failure(path, e)}); expected a .safetensors or a torch state_dict") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DistillError(f"{path}: expected a state_dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_state_dict_checked(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into ``model`` strictly; any missing / unexpected key or shape mismatch is a
    :class:`DistillError` naming them. Floating tensors are cast to the model's dtype (fp16 loads)."""
    own = model.state_dict()
    if "logit_scale" in sd and "logit_scale" in own and sd["logit_scale"].ndim != own["logit_scale"].ndim:
        sd = dict(sd, logit_scale=sd["logit_scale"].reshape(own["logit_scale"].shape))
    bad = state_dict_mismatch(own, sd)
    if bad:
        raise DistillError(f"{source}: checkpoint does not fit the model config: {bad}")
    sd = {k: (v.to(own[k].dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)


def weights_in(folder: Path, names: Sequence[str]) -> Path:
    """The weights file of a checkpoint folder: the first of ``names`` present, else its only one."""
    for n in names:
        if (folder / n).is_file():
            return folder / n
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if len(found) == 1:
        return folder / found[0]
    raise DistillError(f"{folder}: expected one weights file ({' or '.join(names)}), found {found or 'none'}")


# ------------------------------------------------------------------------------ architectures

# open_clip model-config keys that change nothing we build (CLIP(**cfg) takes the rest)
_IGNORED_CFG_KEYS = ("custom_text",)
_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"heads": 8, "mlp_ratio": 4.0}


def unknown_model(name: str) -> DistillError:
    """The error for an open_clip model name that does not exist: the closest and every valid name."""
    valid = open_clip.list_models()
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.4)
    hint = f" Closest match: {close[0]!r}." if close else ""
    return DistillError(f"teacher.model: unknown open_clip model {name!r}.{hint} Valid names: {', '.join(valid)}")


def model_from_cfg(cfg: dict, source: str) -> torch.nn.Module:
    """An open_clip ``CLIP`` (random weights) of a model config dict read from ``source``."""
    cfg = {k: v for k, v in cfg.items() if k not in _IGNORED_CFG_KEYS}
    text = cfg.get("text_cfg", {})
    if "hf_model_name" in text or "timm_model_name" in cfg.get("vision_cfg", {}):
        raise DistillError(f"{source}: towers from Hugging Face / timm models are not supported (the dense paths need open_clip's own ViT and text transformer)")
    try:
        return open_clip.CLIP(**cfg)
    except TypeError as e:
        raise DistillError(f"{source}: model config not understood by open_clip.CLIP ({e})") from None


def registered_name(cfg: dict) -> str | None:
    """The open_clip model whose config is ``cfg`` (``ViT-B-32-quickgelu`` ...), if any."""
    want = json.dumps(_canonical(cfg), sort_keys=True)
    for n in open_clip.list_models():
        c = open_clip.get_model_config(n)
        if c and json.dumps(_canonical(c), sort_keys=True) == want:
            return n
    return None


def _canonical(cfg: dict) -> dict:
    """The architecture part of an open_clip model config, open_clip's dataclass defaults filled in."""
    v = _VISION_DEFAULTS | {k: cfg.get("vision_cfg", {}).get(k) for k in ("image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio") if k in cfg.get("vision_cfg", {})}
    t = _TEXT_DEFAULTS | {k: cfg.get("text_cfg", {}).get(k) for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio") if k in cfg.get("text_cfg", {})}
    return {"embed_dim": cfg.get("embed_dim"), "quick_gelu": bool(cfg.get("quick_gelu", False)), "vision_cfg": v, "text_cfg": t}


def check_named(model: str, inferred: dict, source: str, what: str, kind: str = "checkpoint") -> None:
    """A named architecture must not contradict what the checkpoint (``kind``: or folder) says.
    The same shapes with the other activation (OpenAI's ViT-B-32 weights under ``ViT-B-32``)
    name the model with the right one; other shapes (a Hugging Face folder under the default
    ``distill-tiny-vit``) lead with the differences and ``teacher.model=`` (empty), which reads
    the architecture from the file."""
    named = open_clip.get_model_config(model)
    if named is None:
        raise unknown_model(model)
    quick_named, quick_file = bool(named.get("quick_gelu", False)), bool(inferred.get("quick_gelu", False))
    same_shapes = _canonical({**named, "quick_gelu": False}) == _canonical({**inferred, "quick_gelu": False})
    if not same_shapes:
        found = registered_name(inferred)
        act = ""
        if quick_named != quick_file:  # also the other activation (in the differences): name the model's twin if any
            twin = f"{model}-quickgelu" if quick_file else (model[: -len("-quickgelu")] if model.endswith("-quickgelu") else "")
            if twin in open_clip.list_models():
                act = f"; it {'needs QuickGELU' if quick_file else 'uses GELU, not QuickGELU'} ({twin} is {model} with {'QuickGELU' if quick_file else 'GELU'})"
        fix = f"give teacher.model= (empty) to read it from the {kind}" + (f", or teacher.model={found}" if found else "")
        raise DistillError(f"{source}: the {kind}'s architecture differs from teacher.model {model!r} ({_arch_diff(named, inferred)}){act}; {fix}")
    if quick_named != quick_file:
        if inferred.get("quick_gelu"):
            fix = f"{model}-quickgelu" if f"{model}-quickgelu" in open_clip.list_models() else (registered_name(inferred) or "the matching -quickgelu model")
            raise DistillError(f"{source}: {what} needs QuickGELU but teacher.model {model!r} uses GELU; set teacher.model={fix} (or leave it empty to infer it)")
        fix = model[: -len("-quickgelu")] if model.endswith("-quickgelu") else (registered_name(inferred) or "a GELU model")
        raise DistillError(f"{source}: {what} uses GELU but teacher.model {model!r} uses QuickGELU; set teacher.model={fix} (or leave it empty to infer it)")


def _arch_diff(named: dict, inferred: dict) -> str:
    a, b = _canonical(named), _canonical(inferred)
    diffs = []
    for key in ("embed_dim", "quick_gelu"):
        if a[key] != b[key]:
            diffs.append(f"{key} {a[key]} vs {b[key]}")
    for tower in ("vision_cfg", "text_cfg"):
        for k in sorted(set(a[tower]) | set(b[tower])):
            if a[tower].get(k) != b[tower].get(k):
                diffs.append(f"{tower}.{k} {a[tower].get(k)} vs {b[tower].get(k)}")
    return ", ".join(diffs[:4])
