"""The frozen CLIP teacher: load any CLIP checkpoint into an open_clip model, freeze it, and wrap
it with its preprocessing, precision and a fingerprint that keys every embedding cache.

>>> t = load_teacher("ViT-B-32.pt")                 # OpenAI archive / state dict: QuickGELU inferred
>>> t = load_teacher("clip-vit-base-patch32/")      # Hugging Face CLIPModel folder
>>> t = load_teacher("w.safetensors", model="ViT-B-32")   # open_clip state dict: the name decides
>>> t = load_teacher("runs/shapes/teacher")         # this project's teacher folder
>>> teacher = build_teacher(cfg.teacher)            # the same, from teacher.model / teacher.pretrained
>>> emb = teacher.encode_images(images)             # images (B, 3, H, W) in [0, 1] -> (B, D) unit rows
>>> emb = t.encode_image(t.preprocess(pil)[None])   # the checkpoint's own resize / crop / mean / std
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F

from distill.engine.device import autocast as _autocast
from distill.engine.device import autocast_dtype, get_device
from distill.errors import DistillError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Register our open_clip model configs (``distill-tiny-vit`` ...) once per process."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


@dataclass(eq=False)
class Teacher:
    """A frozen open_clip CLIP with its preprocessing.

    Attributes:
        model: the open_clip ``CLIP`` (eval mode, ``requires_grad=False``).
        image_size: (square) input size of the image tower.
        mean, std: per-channel normalisation applied to [0, 1] RGB inputs (tuples of 3 floats).
        embed_dim: D, size of the joint image-text embedding.
        patch_size: ViT patch size in pixels.
        dense_image_size: input size for dense paths (MaskCLIP pixels, dense RoIAlign, CAMs).
        fingerprint: hash of the weights + preprocessing; keys every cache built from this teacher
            (text embeddings, crop embeddings, pseudo-labels). A dense tower does not change it.
        dense_fingerprint: with a dense tower, a hash of ``fingerprint`` + the tower's weights; keys
            what the dense paths compute (dense RoIAlign region caches). See :attr:`dense_key`.
        precision: fp32 | amp_bf16 | amp_fp16 (autocast on the teacher's device type).
        dense_visual: None, or a frozen image tower (CLIPSelf, ``teacher.dense_pretrained``) that
            the dense paths (MaskCLIP patch / pixel embeddings, dense RoIAlign) run on instead of
            ``model.visual``; crops, the class token and text always use ``model``.
    """

    model: torch.nn.Module
    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    patch_size: int
    device: torch.device
    fingerprint: str
    precision: str = "fp32"
    dense_image_size: int = 0
    batch_size: int = 256
    tokenizer: object = field(default=None, repr=False)
    dense_visual: torch.nn.Module | None = field(default=None, repr=False)
    dense_fingerprint: str = ""
    _preprocess: object = field(default=None, repr=False)

    @property
    def preprocess(self):
        """``PIL.Image -> (3, image_size, image_size)`` float tensor: the checkpoint's own eval
        transform (open_clip ``image_transform``: bicubic resize of the short side, centre crop,
        mean / std), for :meth:`encode_image`."""
        if self._preprocess is None:
            self._preprocess = open_clip.image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std)
        return self._preprocess

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) (:attr:`preprocess`'s output, already normalised) ->
        (B, D) float32, L2-normalised. :meth:`encode_images` takes raw [0, 1] images instead."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise DistillError(f"encode_image: expected preprocessed images (B, 3, H, W), got shape {tuple(x.shape)}")
        with self.autocast():
            feats = self.model.encode_image(x.to(self.device, torch.float32))
        return F.normalize(feats.float(), dim=-1)

    @property
    def dense_key(self) -> str:
        """The fingerprint of the dense paths: ``dense_fingerprint`` with a dense tower, else ``fingerprint``."""
        return self.dense_fingerprint or self.fingerprint

    def __post_init__(self) -> None:
        if not self.dense_image_size:
            self.dense_image_size = self.image_size
        autocast_dtype(self.precision)  # validate

    # ---------------------------------------------------------------------------------- helpers
    def autocast(self):
        """Autocast context for the teacher's precision on its device (no-op for fp32)."""
        return _autocast(self.device, self.precision)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised with the teacher's mean / std."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def resize(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Bilinear resize of (B, 3, H, W) to a square ``size`` (default: ``image_size``)."""
        size = size or self.image_size
        if x.shape[-2:] == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """list of str -> (N, context_length) int64 tokens on the teacher's device."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    # ---------------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) float in [0, 1] -> (B, D) float32, L2-normalised.

        Resizes to ``image_size`` (bilinear) when needed, normalises with mean / std, batches by
        ``batch_size`` (default ``self.batch_size``).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise DistillError(f"encode_images: expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        bs = batch_size or self.batch_size
        out = []
        for i in range(0, x.shape[0], bs):
            xb = x[i : i + bs].to(self.device, torch.float32)
            xb = self.normalize(self.resize(xb))
            with self.autocast():
                feats = self.model.encode_image(xb)
            out.append(F.normalize(feats.float(), dim=-1))
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(out)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Strings (or tokens (N, L)) -> (N, D) float32, L2-normalised. The causal text tower runs
        up to the batch's longest prompt only (:func:`distill.teacher.text.encode_text_trimmed`:
        the same embeddings, ~8x faster for ViT-B/32 prompts of ~10 of 77 tokens)."""
        from distill.teacher.text import encode_text_trimmed

        from tqdm.auto import tqdm

        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        bs = batch_size or self.batch_size
        out = []
        # a bar on a terminal for long prompt sets (an LVIS vocabulary x 20 templates: 24k prompts)
        bar = tqdm(total=tokens.shape[0], desc="text prompts", unit="prompt", disable=True if tokens.shape[0] < 2000 else None, leave=False)
        for i in range(0, tokens.shape[0], bs):
            with self.autocast():
                feats = encode_text_trimmed(self.model, tokens[i : i + bs].to(self.device))
            out.append(F.normalize(feats.float(), dim=-1))
            bar.update(min(bs, tokens.shape[0] - i))
        bar.close()
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(out)


# ------------------------------------------------------------------------------------ building


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def compute_fingerprint(model: torch.nn.Module, arch, image_size: int, mean, std) -> str:
    """sha256 of the architecture (``arch``: the open_clip model config dict, or a name), every
    tensor of the state dict (key, dtype, shape, bytes) and the preprocessing (size, mean, std).
    The same weights loaded by name or from a local-dir give the same fingerprint."""
    h = hashlib.sha256()
    arch = json.dumps(arch, sort_keys=True) if isinstance(arch, dict) else str(arch)
    h.update(f"{arch}|{image_size}|{tuple(float(m) for m in mean)}|{tuple(float(s) for s in std)}".encode())
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def _square(v) -> int:
    if isinstance(v, (tuple, list)):
        if v[0] != v[1]:
            raise DistillError(f"teacher: non-square image size {tuple(v)} is not supported")
        return int(v[0])
    return int(v)


def _wrap(model, name: str, device: torch.device, precision: str, dense_image_size: int = 0, batch_size: int = 256, tokenizer=None, arch: dict | None = None, mean=None, std=None) -> Teacher:
    visual = model.visual
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise DistillError(f"teacher.model: {name!r} is not an open_clip ViT (dense paths need a ViT image tower)")
    pp = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(float(v) for v in (mean or pp.get("mean", open_clip.OPENAI_DATASET_MEAN)))
    std = tuple(float(v) for v in (std or pp.get("std", open_clip.OPENAI_DATASET_STD)))
    image_size = _square(visual.image_size)
    patch = _square(visual.patch_size)
    embed_dim = int(visual.output_dim)
    model = _freeze(model.to(device))
    fp = compute_fingerprint(model, arch if arch else name, image_size, mean, std)
    return Teacher(
        model=model,
        name=name,
        image_size=image_size,
        mean=mean,
        std=std,
        embed_dim=embed_dim,
        patch_size=patch,
        device=device,
        fingerprint=fp,
        precision=precision,
        dense_image_size=dense_image_size or image_size,
        batch_size=batch_size,
        tokenizer=tokenizer,
    )


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_model_quiet(name: str) -> torch.nn.Module:
    """``open_clip.create_model(name)`` without its "initialized randomly" warning (we load the
    weights ourselves right after, with checked keys)."""
    root = logging.getLogger()
    f = _NoRandomInitWarning()
    root.addFilter(f)
    try:
        return open_clip.create_model(name, device="cpu")
    finally:
        root.removeFilter(f)


def _unknown_model(name: str) -> DistillError:
    valid = open_clip.list_models()
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.4)
    hint = f" Closest match: {close[0]!r}." if close else ""
    return DistillError(f"teacher.model: unknown open_clip model {name!r}.{hint} Valid names: {', '.join(valid)}")


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
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistillError(f"{path}: cannot read weights ({msg}); expected a .safetensors or a torch state_dict") from None
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
    from distill.engine.checkpoint import state_dict_mismatch

    bad = state_dict_mismatch(own, sd)
    if bad:
        raise DistillError(f"{source}: checkpoint does not fit the model config: {bad}")
    sd = {k: (v.to(own[k].dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)


def _tag_error(name: str, tag: str) -> DistillError:
    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    hub = cfg.get("hf_hub", "")
    url = cfg.get("url", "")
    src = f"huggingface.co/{hub.rstrip('/')}" if hub else (url or "the open_clip release")
    fname = "open_clip_model.safetensors" if hub else (Path(url).name if url else "weights file")
    return DistillError(
        f"teacher.pretrained: weights for {name!r} tag {tag!r} cannot be downloaded here (offline). "
        f"Download {fname} from {src} on a machine with network, put it at e.g. "
        f"weights/{name}-{tag}.safetensors and set teacher.pretrained=weights/{name}-{tag}.safetensors"
    )


def attach_dense_tower(teacher: Teacher, path: str) -> Teacher:
    """Give ``teacher`` the CLIPSelf dense tower of ``path`` (see
    :func:`distill.teacher.dense.load_dense_tower`). ``fingerprint`` stays (crops, the class token
    and text do not change, so their caches stay valid); ``dense_fingerprint`` also covers the
    tower's weights, so no cache of the plain teacher's dense path is reused."""
    from distill.teacher.dense import load_dense_tower

    teacher.dense_visual = load_dense_tower(teacher, path)
    h = hashlib.sha256(f"{teacher.fingerprint}|dense|".encode())
    for key, t in sorted(teacher.dense_visual.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    teacher.dense_fingerprint = h.hexdigest()[:24]
    return teacher


def student_meta(cfg, teacher: "Teacher", **more) -> dict:
    """What a student's ``model_final.pt`` carries so it can be used from any folder, copied
    alone: its training config (word lists inline, see distill/config.py) and the teacher it was
    trained with (the file's absolute path and its fingerprint); ``more``: e.g. the trained classes."""
    from distill.config import dump_config

    def where(v: str) -> str:
        v = (v or "").strip()
        return str(Path(v).resolve()) if v and os.path.exists(v) else v

    tc = cfg.teacher
    return {"config": dump_config(cfg), "teacher": {"pretrained": where(tc.pretrained), "dense_pretrained": where(tc.dense_pretrained),
            "fingerprint": teacher.fingerprint, "dense_fingerprint": teacher.dense_fingerprint}, **more}


def build_teacher(tcfg, device: torch.device | str | None = None) -> Teacher:
    """Build the frozen teacher of ``tcfg``; with ``tcfg.dense_pretrained`` set, its dense paths
    run on that CLIPSelf tower (:func:`attach_dense_tower`)."""
    teacher = _build_teacher(tcfg, device)
    dense = (getattr(tcfg, "dense_pretrained", "") or "").strip()
    return attach_dense_tower(teacher, dense) if dense else teacher


def _build_teacher(tcfg, device: torch.device | str | None = None) -> Teacher:
    """Build the frozen teacher described by ``tcfg`` (a :class:`distill.config.TeacherConfig`).

    ``tcfg.pretrained``: a local checkpoint file or folder (read by :func:`load_teacher`, with
    ``tcfg.model`` as the architecture name where the file does not say it), ``local-dir:PATH``,
    an open_clip tag (needs the network), or empty (random weights, logged loudly: only for
    experiments). ``tcfg.model``: an open_clip model name (ours are registered on import), or
    ``local-dir:PATH``.
    """
    register_model_configs()
    dev = torch.device(device) if isinstance(device, str) else device
    dev = dev or get_device(getattr(tcfg, "device", ""))
    autocast_dtype(tcfg.precision)
    name = tcfg.model.strip()
    pretrained = (tcfg.pretrained or "").strip()
    kw = dict(device=dev, precision=tcfg.precision, dense_image_size=tcfg.dense_image_size, batch_size=tcfg.batch_size)
    if pretrained.startswith("local-dir:"):
        return load_teacher(pretrained[len("local-dir:") :], **kw)
    if name.startswith("local-dir:"):
        return load_teacher(name[len("local-dir:") :], **kw)
    if pretrained and os.path.exists(pretrained):
        return load_teacher(pretrained, model=name or None, **kw)

    if name not in open_clip.list_models():
        raise _unknown_model(name)
    tokenizer = open_clip.get_tokenizer(name)
    if pretrained and (pretrained.endswith((".safetensors", ".pt", ".pth", ".bin")) or "/" in pretrained):
        where = Path(pretrained)
        if name == "distill-tiny-vit" and where.name == "teacher.safetensors" and where.parent.name == "teacher":
            # {work_dir}/teacher/teacher.safetensors: where `distill teacher pretrain` writes the tiny teacher
            raise DistillError(
                f"teacher.pretrained: {pretrained} not found; pretrain the tiny teacher first "
                f"(`distill teacher pretrain CONFIG` writes it there) or point teacher.pretrained at a checkpoint"
            )
        raise DistillError(f"teacher.pretrained: {pretrained} not found (expected a checkpoint of {name!r} there: "
                           + ("a teacher.safetensors from `distill teacher pretrain`, " if name == "distill-tiny-vit" else "")
                           + "an OpenAI .pt, an open_clip .safetensors / .pt, or a Hugging Face CLIPModel folder)")

    if pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise DistillError(
                f"teacher.pretrained: {pretrained!r} is neither a file nor a known tag of {name!r} "
                f"(tags: {', '.join(tags) or 'none'}; or give a local .safetensors/.pt path)"
            )
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
        except Exception:
            raise _tag_error(name, pretrained) from None
    else:
        model = create_model_quiet(name)
        log.warning("teacher: %s has no pretrained weights (random init)", name)
    return _wrap(model, name, dev, tcfg.precision, tokenizer=tokenizer, arch=open_clip.get_model_config(name), dense_image_size=tcfg.dense_image_size, batch_size=tcfg.batch_size)


# ------------------------------------------------------------------------------ any checkpoint

# open_clip model-config keys that change nothing we build (CLIP(**cfg) takes the rest)
_IGNORED_CFG_KEYS = ("custom_text",)


def _model_from_cfg(cfg: dict, source: str) -> torch.nn.Module:
    cfg = {k: v for k, v in cfg.items() if k not in _IGNORED_CFG_KEYS}
    text = cfg.get("text_cfg", {})
    if "hf_model_name" in text or "timm_model_name" in cfg.get("vision_cfg", {}):
        raise DistillError(f"{source}: towers from Hugging Face / timm models are not supported (the dense paths need open_clip's own ViT and text transformer)")
    try:
        return open_clip.CLIP(**cfg)
    except TypeError as e:
        raise DistillError(f"{source}: model config not understood by open_clip.CLIP ({e})") from None


def _tokenizer(cfg: dict):
    return open_clip.tokenizer.SimpleTokenizer(context_length=int(cfg.get("text_cfg", {}).get("context_length", 77)))


def _registered_name(cfg: dict) -> str | None:
    """The open_clip model whose config is ``cfg`` (``ViT-B-32-quickgelu`` ...), if any."""
    want = json.dumps(_canonical(cfg), sort_keys=True)
    for n in open_clip.list_models():
        c = open_clip.get_model_config(n)
        if c and json.dumps(_canonical(c), sort_keys=True) == want:
            return n
    return None


_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"heads": 8, "mlp_ratio": 4.0}


def _canonical(cfg: dict) -> dict:
    """The architecture part of an open_clip model config, open_clip's dataclass defaults filled in."""
    v = _VISION_DEFAULTS | {k: cfg.get("vision_cfg", {}).get(k) for k in ("image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio") if k in cfg.get("vision_cfg", {})}
    t = _TEXT_DEFAULTS | {k: cfg.get("text_cfg", {}).get(k) for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio") if k in cfg.get("text_cfg", {})}
    return {"embed_dim": cfg.get("embed_dim"), "quick_gelu": bool(cfg.get("quick_gelu", False)), "vision_cfg": v, "text_cfg": t}


def _check_named(model: str, inferred: dict, source: str, what: str, kind: str = "checkpoint") -> None:
    """A named architecture must not contradict what the checkpoint (``kind``: or folder) says.
    The same shapes with the other activation (OpenAI's ViT-B-32 weights under ``ViT-B-32``)
    name the model with the right one; other shapes (a Hugging Face folder under the default
    ``distill-tiny-vit``) lead with the differences and ``teacher.model=`` (empty), which reads
    the architecture from the file."""
    named = open_clip.get_model_config(model)
    if named is None:
        raise _unknown_model(model)
    quick_named, quick_file = bool(named.get("quick_gelu", False)), bool(inferred.get("quick_gelu", False))
    same_shapes = _canonical({**named, "quick_gelu": False}) == _canonical({**inferred, "quick_gelu": False})
    if not same_shapes:
        found = _registered_name(inferred)
        act = ""
        if quick_named != quick_file:  # also the other activation (in the differences): name the model's twin if any
            twin = f"{model}-quickgelu" if quick_file else (model[: -len("-quickgelu")] if model.endswith("-quickgelu") else "")
            if twin in open_clip.list_models():
                act = f"; it {'needs QuickGELU' if quick_file else 'uses GELU, not QuickGELU'} ({twin} is {model} with {'QuickGELU' if quick_file else 'GELU'})"
        fix = f"give teacher.model= (empty) to read it from the {kind}" + (f", or teacher.model={found}" if found else "")
        raise DistillError(f"{source}: the {kind}'s architecture differs from teacher.model {model!r} ({_arch_diff(named, inferred)}){act}; {fix}")
    if quick_named != quick_file:
        if inferred.get("quick_gelu"):
            fix = f"{model}-quickgelu" if f"{model}-quickgelu" in open_clip.list_models() else (_registered_name(inferred) or "the matching -quickgelu model")
            raise DistillError(f"{source}: {what} needs QuickGELU but teacher.model {model!r} uses GELU; set teacher.model={fix} (or leave it empty to infer it)")
        fix = model[: -len("-quickgelu")] if model.endswith("-quickgelu") else (_registered_name(inferred) or "a GELU model")
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


def _weights_in(folder: Path, names: Sequence[str]) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if len(found) == 1:
        return folder / found[0]
    raise DistillError(f"{folder}: expected one weights file ({' or '.join(names)}), found {found or 'none'}")


def load_teacher(
    source: str | os.PathLike,
    model: str | None = None,
    *,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    dense_image_size: int = 0,
    batch_size: int = 256,
) -> Teacher:
    """The frozen :class:`Teacher` of any local CLIP checkpoint; the file says what it is:

    - an **OpenAI** TorchScript archive (``ViT-B-32.pt``; read without running it, see
      :mod:`distill.teacher.formats`) or a state dict saved from one (it carries
      ``input_resolution`` / ``context_length`` / ``vocab_size``): architecture read from the
      shapes and QuickGELU, as open_clip's ``load_openai_model``;
    - a **Hugging Face** ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or
      ``pytorch_model.bin``): architecture and activation (``hidden_act``) from the config, mean /
      std from ``preprocessor_config.json``;
    - an **open_clip** folder (``open_clip_config.json`` + weights; what ``distill teacher
      pretrain`` writes under ``{work_dir}/teacher``);
    - an **open_clip** state dict (``.safetensors`` / ``.pt``): ``model`` (an open_clip name) decides.

    ``model`` given with a file that says its architecture is checked against it: OpenAI weights
    under a GELU name stop with one line naming the ``-quickgelu`` model. Every problem is a
    one-line :class:`DistillError` naming the file."""
    register_model_configs()
    path = Path(source)
    model = (model or "").strip() or None
    dev = torch.device(device) if isinstance(device, str) else device
    dev = dev or get_device("")
    autocast_dtype(precision)
    kw = dict(dense_image_size=dense_image_size, batch_size=batch_size)
    if not path.exists():
        raise DistillError(f"{path}: checkpoint not found (expected an OpenAI .pt, an open_clip .safetensors / .pt, or a Hugging Face / open_clip folder)")

    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            try:
                meta = json.loads((path / "open_clip_config.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DistillError(f"{path / 'open_clip_config.json'}: not valid JSON ({e})") from None
            cfg = meta.get("model_cfg") if isinstance(meta, dict) else None
            if not isinstance(cfg, dict):
                raise DistillError(f"{path / 'open_clip_config.json'}: expected a 'model_cfg' object (open_clip's local-dir layout)")
            if model:
                _check_named(model, cfg, str(path), "open_clip_config.json", "folder")
            weights = _weights_in(path, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "teacher.safetensors"))
            net = _model_from_cfg(cfg, str(path))
            load_state_dict_checked(net, load_weights_file(weights), str(weights))
            pp = meta.get("preprocess_cfg") or {}
            name = _registered_name(cfg) or f"local-dir:{path}"
            return _wrap(net, name, dev, precision, tokenizer=_tokenizer(cfg), arch=cfg, mean=pp.get("mean"), std=pp.get("std"), **kw)
        if (path / "config.json").is_file():
            from distill.teacher import formats

            hf = formats.read_hf_config(path)
            cfg = formats.hf_model_cfg(hf, str(path / "config.json"))
            if model:
                _check_named(model, cfg, str(path), "the Hugging Face config's hidden_act", "folder")
            index = path / "model.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
                sd = {}
                for shard in shards:
                    sd.update(load_weights_file(path / shard))
            else:
                sd = load_weights_file(_weights_in(path, formats.HF_WEIGHT_FILES))
            net = _model_from_cfg(cfg, str(path))
            load_state_dict_checked(net, formats.hf_to_open_clip(sd, str(path)), str(path))
            mean, std = formats.hf_preprocess(path, cfg["vision_cfg"]["image_size"])
            return _wrap(net, f"hf:{path.name}", dev, precision, tokenizer=_tokenizer(cfg), arch=cfg, mean=mean, std=std, **kw)
        raise DistillError(f"{path}: a checkpoint folder needs open_clip_config.json (open_clip / this project's teacher) or config.json (Hugging Face CLIPModel)")

    from distill.teacher import formats

    archive = formats.is_torchscript_archive(path)
    sd = formats.read_torchscript_state_dict(path) if archive else load_weights_file(path)
    if archive or formats.is_openai_state_dict(sd):
        what = "an OpenAI TorchScript archive" if archive else "an OpenAI state dict"
        try:
            cfg = formats.openai_model_cfg(sd)
        except (KeyError, IndexError, DistillError):
            raise DistillError(f"{path}: {what} without the keys of a CLIP ViT (visual.conv1.weight, visual.proj, ln_final.weight ...)") from None
        if model:
            _check_named(model, cfg, str(path), what)
            cfg = open_clip.get_model_config(model)
        net = _model_from_cfg(cfg, str(path))
        own = net.state_dict()
        sd = {k: v for k, v in sd.items() if k in own or k not in dict(net.named_buffers())}  # attn_mask: not persisted
        sd = {k: v for k, v in sd.items() if k not in formats.OPENAI_EXTRA_KEYS}
        load_state_dict_checked(net, sd, str(path))
        name = model or _registered_name(cfg) or f"openai:{path.name}"
        return _wrap(net, name, dev, precision, tokenizer=_tokenizer(cfg), arch=cfg, **kw)

    if not model:
        raise DistillError(
            f"{path}: an open_clip state dict does not say its architecture or activation; name it "
            f"(teacher.model / load_teacher(..., model=...)), e.g. ViT-B-32 for LAION weights or ViT-B-32-quickgelu for OpenAI's"
        )
    if model not in open_clip.list_models():
        raise _unknown_model(model)
    net = create_model_quiet(model)
    load_state_dict_checked(net, sd, str(path))
    return _wrap(net, model, dev, precision, tokenizer=open_clip.get_tokenizer(model), arch=open_clip.get_model_config(model), **kw)


def build_random_teacher(
    embed_dim: int = 32,
    image_size: int = 32,
    patch: int = 8,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    text_width: int = 32,
    text_layers: int = 2,
    context_length: int = 16,
    seed: int = 0,
    dense_image_size: int = 0,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    perturb: float = 0.02,
) -> Teacher:
    """A tiny random open_clip ViT, deterministic from ``seed`` (for tests).

    Every parameter gets seeded noise of scale ``perturb`` on top of open_clip's init, so biases and
    norms are not trivially 0 / 1 and reference implementations are really exercised.
    """
    vision = dict(image_size=image_size, patch_size=patch, width=width, layers=layers, head_width=width // heads, mlp_ratio=4.0)
    text = dict(context_length=context_length, vocab_size=49408, width=text_width, heads=heads, layers=text_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)
        if perturb:
            g = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(perturb * torch.randn(p.shape, generator=g))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    dev = torch.device(device)
    arch = {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}
    return _wrap(model, f"random-vit-w{width}-l{layers}-s{seed}", dev, precision, dense_image_size=dense_image_size or 2 * image_size, batch_size=64, tokenizer=tokenizer, arch=arch)
