"""The frozen CLIP teacher: build an open_clip model from a :class:`TeacherConfig`, freeze it, and
wrap it with its preprocessing, precision and a fingerprint that keys every embedding cache.

>>> teacher = build_teacher(cfg.teacher)            # open_clip name + tag / local file / local-dir:
>>> emb = teacher.encode_images(images)             # images (B, 3, H, W) in [0, 1] -> (B, D) unit rows
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
        """Strings (or tokens (N, L)) -> (N, D) float32, L2-normalised."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        bs = batch_size or self.batch_size
        out = []
        for i in range(0, tokens.shape[0], bs):
            with self.autocast():
                feats = self.model.encode_text(tokens[i : i + bs].to(self.device))
            out.append(F.normalize(feats.float(), dim=-1))
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


def _wrap(model, name: str, device: torch.device, precision: str, dense_image_size: int = 0, batch_size: int = 256, tokenizer=None, arch: dict | None = None) -> Teacher:
    visual = model.visual
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise DistillError(f"teacher.model: {name!r} is not an open_clip ViT (dense paths need a ViT image tower)")
    pp = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(float(v) for v in pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in pp.get("std", open_clip.OPENAI_DATASET_STD))
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


def build_teacher(tcfg, device: torch.device | str | None = None) -> Teacher:
    """Build the frozen teacher of ``tcfg``; with ``tcfg.dense_pretrained`` set, its dense paths
    run on that CLIPSelf tower (:func:`attach_dense_tower`)."""
    teacher = _build_teacher(tcfg, device)
    dense = (getattr(tcfg, "dense_pretrained", "") or "").strip()
    return attach_dense_tower(teacher, dense) if dense else teacher


def _build_teacher(tcfg, device: torch.device | str | None = None) -> Teacher:
    """Build the frozen teacher described by ``tcfg`` (a :class:`distill.config.TeacherConfig`).

    ``tcfg.model``: an open_clip model name (ours are registered on import), or ``local-dir:PATH``
    (a folder with ``open_clip_config.json`` + weights). ``tcfg.pretrained``: an open_clip tag
    (needs the network), a local ``.safetensors`` / ``.pt`` / ``.bin`` file, or empty (random
    weights, logged loudly: only for experiments).
    """
    register_model_configs()
    dev = torch.device(device) if isinstance(device, str) else device
    dev = dev or get_device(getattr(tcfg, "device", ""))
    autocast_dtype(tcfg.precision)
    name = tcfg.model.strip()
    pretrained = (tcfg.pretrained or "").strip()
    if pretrained.startswith("local-dir:"):
        name, pretrained = pretrained, ""
    kw = dict(dense_image_size=tcfg.dense_image_size, batch_size=tcfg.batch_size)

    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise DistillError(f"teacher.model: {folder}/open_clip_config.json not found (local-dir: expects the config json and weights in that folder)")
        try:
            model = open_clip.create_model(name, device="cpu")
        except Exception as e:
            raise DistillError(f"teacher.model: cannot load {name!r} ({str(e).splitlines()[0]})") from None
        tokenizer = open_clip.get_tokenizer(name)
        arch = json.loads((folder / "open_clip_config.json").read_text()).get("model_cfg")
        return _wrap(model, name, dev, tcfg.precision, tokenizer=tokenizer, arch=arch, **kw)

    if name not in open_clip.list_models():
        raise _unknown_model(name)
    tokenizer = open_clip.get_tokenizer(name)

    if pretrained and not os.path.exists(pretrained) and (pretrained.endswith((".safetensors", ".pt", ".pth", ".bin")) or "/" in pretrained):
        if name == "distill-tiny-vit":
            raise DistillError(
                f"teacher.pretrained: {pretrained} not found; pretrain the tiny teacher first "
                f"(`distill teacher pretrain CONFIG` writes it there) or point teacher.pretrained at a checkpoint"
            )
        raise DistillError(f"teacher.pretrained: {pretrained} not found (expected a .safetensors / .pt file of {name!r} weights there)")

    if pretrained and not os.path.isfile(pretrained):
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
        if not pretrained:
            log.warning("teacher: %s has no pretrained weights (random init)", name)
        else:
            load_state_dict_checked(model, load_weights_file(pretrained), pretrained)
    return _wrap(model, name, dev, tcfg.precision, tokenizer=tokenizer, arch=open_clip.get_model_config(name), **kw)


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
