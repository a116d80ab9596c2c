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
from distill.engine.device import get_device, resolve_precision
from distill.errors import DistillError
from distill.teacher import formats
from distill.teacher.dense import load_dense_tower
from distill.teacher.vit import patch_size, square

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
        dense_tower: None, or a frozen image tower (CLIPSelf, ``teacher.dense_tower``) that
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
    dense_tower: torch.nn.Module | None = field(default=None, repr=False)
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
        self.precision = resolve_precision(self.precision, self.device)  # checked; auto -> what runs here

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


def _hash_state_dict(h, model: torch.nn.Module) -> None:
    """Feed every tensor of ``model``'s state dict (key, dtype, shape, bytes) into the hash ``h``."""
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def compute_fingerprint(model: torch.nn.Module, arch, image_size: int, mean, std) -> str:
    """sha256 of the architecture (``arch``: the open_clip model config dict, or a name), every
    tensor of the state dict (key, dtype, shape, bytes) and the preprocessing (size, mean, std).
    The same weights loaded by name or from a local-dir give the same fingerprint."""
    h = hashlib.sha256()
    arch = json.dumps(arch, sort_keys=True) if isinstance(arch, dict) else str(arch)
    h.update(f"{arch}|{image_size}|{tuple(float(m) for m in mean)}|{tuple(float(s) for s in std)}".encode())
    _hash_state_dict(h, model)
    return h.hexdigest()[:24]


def _wrap(model, name: str, device: torch.device, precision: str, dense_image_size: int = 0, batch_size: int = 256, tokenizer=None, arch: dict | None = None, mean=None, std=None) -> Teacher:
    visual = model.visual
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise DistillError(f"teacher.model: {name!r} is not an open_clip ViT (dense paths need a ViT image tower)")
    pp = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(float(v) for v in (mean or pp.get("mean", open_clip.OPENAI_DATASET_MEAN)))
    std = tuple(float(v) for v in (std or pp.get("std", open_clip.OPENAI_DATASET_STD)))
    image_size = square(visual.image_size)
    model = _freeze(model.to(device))
    fp = compute_fingerprint(model, arch if arch else name, image_size, mean, std)
    return Teacher(model, name, image_size, mean, std, embed_dim=int(visual.output_dim), patch_size=patch_size(visual), device=device,
                   fingerprint=fp, precision=precision, dense_image_size=dense_image_size or image_size, batch_size=batch_size, tokenizer=tokenizer)


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
    teacher.dense_tower = load_dense_tower(teacher, path)
    h = hashlib.sha256(f"{teacher.fingerprint}|dense|".encode())
    _hash_state_dict(h, teacher.dense_tower)
    teacher.dense_fingerprint = h.hexdigest()[:24]
    return teacher


def student_meta(cfg, teacher: "Teacher", **more) -> dict:
    """What a student's ``model_final.pt`` carries so it can be used from any folder, copied
    alone: its training config (word lists inline, see distill/config/load.py) and the teacher it was
    trained with (the file's absolute path and its fingerprint); ``more``: e.g. the trained classes."""
    from distill.config import dump_config

    def where(v: str) -> str:
        v = (v or "").strip()
        return str(Path(v).resolve()) if v and os.path.exists(v) else v

    tc = cfg.teacher
    return {"config": dump_config(cfg), "teacher": {"pretrained": where(tc.pretrained), "dense_tower": where(tc.dense_tower),
            "fingerprint": teacher.fingerprint, "dense_fingerprint": teacher.dense_fingerprint}, **more}


def build_teacher(tcfg, device: torch.device | str | None = None) -> Teacher:
    """Build the frozen teacher of ``tcfg``; with ``tcfg.dense_tower`` set, its dense paths
    run on that CLIPSelf tower (:func:`attach_dense_tower`)."""
    teacher = _build_teacher(tcfg, device)
    dense = (getattr(tcfg, "dense_tower", "") or "").strip()
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
    precision = resolve_precision(tcfg.precision, dev)  # the teacher records what runs: auto resolved
    name = tcfg.model.strip()
    pretrained = (tcfg.pretrained or "").strip()
    kw = dict(device=dev, precision=precision, dense_image_size=tcfg.dense_image_size, batch_size=tcfg.batch_size)
    if pretrained.startswith("local-dir:"):
        return load_teacher(pretrained[len("local-dir:") :], **kw)
    if name.startswith("local-dir:"):
        return load_teacher(name[len("local-dir:") :], **kw)
    if pretrained and os.path.exists(pretrained):
        return load_teacher(pretrained, model=name or None, **kw)

    if name not in open_clip.list_models():
        raise formats.unknown_model(name)
    tokenizer = open_clip.get_tokenizer(name)
    if pretrained and (pretrained.endswith((".safetensors", ".pt", ".pth", ".bin")) or "/" in pretrained):
        raise _missing_pretrained(name, pretrained)
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
    return _wrap(model, name, dev, precision, tokenizer=tokenizer, arch=open_clip.get_model_config(name), dense_image_size=tcfg.dense_image_size, batch_size=tcfg.batch_size)


def _missing_pretrained(name: str, pretrained: str) -> DistillError:
    """``teacher.pretrained`` looks like a path (a weights suffix or a ``/``) but is not there."""
    where = Path(pretrained)
    if name == "distill-tiny-vit" and where.name == "teacher.safetensors" and where.parent.name == "teacher":
        # {work_dir}/teacher/teacher.safetensors: where `distill teacher pretrain` writes the tiny teacher
        return DistillError(
            f"teacher.pretrained: {pretrained} not found; pretrain the tiny teacher first "
            f"(`distill teacher pretrain CONFIG` writes it there) or point teacher.pretrained at a checkpoint"
        )
    return DistillError(f"teacher.pretrained: {pretrained} not found (expected a checkpoint of {name!r} there: "
                        + ("a teacher.safetensors from `distill teacher pretrain`, " if name == "distill-tiny-vit" else "")
                        + "an OpenAI .pt, an open_clip .safetensors / .pt, or a Hugging Face CLIPModel folder)")


# ------------------------------------------------------------------------------ any checkpoint


def _tokenizer(cfg: dict):
    return open_clip.tokenizer.SimpleTokenizer(context_length=int(cfg.get("text_cfg", {}).get("context_length", 77)))


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
    precision = resolve_precision(precision, dev)
    if not path.exists():
        raise DistillError(f"{path}: checkpoint not found (expected an OpenAI .pt, an open_clip .safetensors / .pt, or a Hugging Face / open_clip folder)")
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        loaded = _load_open_clip_dir(path, model)
    elif path.is_dir() and (path / "config.json").is_file():
        loaded = _load_hf_dir(path, model)
    elif path.is_dir():
        raise DistillError(f"{path}: a checkpoint folder needs open_clip_config.json (open_clip / this project's teacher) or config.json (Hugging Face CLIPModel)")
    else:
        loaded = _load_file(path, model)
    net, name, tokenizer, arch, mean, std = loaded
    return _wrap(net, name, dev, precision, tokenizer=tokenizer, arch=arch, mean=mean, std=std, dense_image_size=dense_image_size, batch_size=batch_size)


# each reader -> (open_clip CLIP with the weights, name, tokenizer, architecture for the fingerprint, mean, std)


def _load_open_clip_dir(path: Path, model: str | None) -> tuple:
    """open_clip's local-dir layout: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) + weights."""
    cfg, pp = formats.read_open_clip_config(path)
    if model:
        formats.check_named(model, cfg, str(path), "open_clip_config.json", "folder")
    weights = formats.weights_in(path, formats.OPEN_CLIP_WEIGHT_FILES)
    net = formats.model_from_cfg(cfg, str(path))
    formats.load_state_dict_checked(net, formats.load_weights_file(weights), str(weights))
    return net, formats.registered_name(cfg) or f"local-dir:{path}", _tokenizer(cfg), cfg, pp.get("mean"), pp.get("std")


def _load_hf_dir(path: Path, model: str | None) -> tuple:
    """A Hugging Face ``CLIPModel`` folder: ``config.json`` + weights (one file or shards)."""
    cfg = formats.hf_model_cfg(formats.read_hf_config(path), str(path / "config.json"))
    if model:
        formats.check_named(model, cfg, str(path), "the Hugging Face config's hidden_act", "folder")
    sd = formats.read_hf_weights(path)
    net = formats.model_from_cfg(cfg, str(path))
    formats.load_state_dict_checked(net, sd, str(path))
    mean, std = formats.hf_preprocess(path, cfg["vision_cfg"]["image_size"])
    return net, f"hf:{path.name}", _tokenizer(cfg), cfg, mean, std


def _load_file(path: Path, model: str | None) -> tuple:
    """An OpenAI TorchScript archive or state dict (the shapes say the architecture), or an
    open_clip state dict (``model`` says it)."""
    archive = formats.is_torchscript_archive(path)
    sd = formats.read_torchscript_state_dict(path) if archive else formats.load_weights_file(path)
    if archive or formats.is_openai_state_dict(sd):
        what = "an OpenAI TorchScript archive" if archive else "an OpenAI state dict"
        try:
            cfg = formats.openai_model_cfg(sd)
        except (KeyError, IndexError, DistillError):
            raise DistillError(f"{path}: {what} without the keys of a CLIP ViT (visual.conv1.weight, visual.proj, ln_final.weight ...)") from None
        if model:
            formats.check_named(model, cfg, str(path), what)
            cfg = open_clip.get_model_config(model)
        net = formats.model_from_cfg(cfg, str(path))
        own = net.state_dict()
        sd = {k: v for k, v in sd.items() if k in own or k not in dict(net.named_buffers())}  # attn_mask: not persisted
        sd = {k: v for k, v in sd.items() if k not in formats.OPENAI_EXTRA_KEYS}
        formats.load_state_dict_checked(net, sd, str(path))
        return net, model or formats.registered_name(cfg) or f"openai:{path.name}", _tokenizer(cfg), cfg, None, None
    if not model:
        raise DistillError(
            f"{path}: an open_clip state dict does not say its architecture or activation; name it "
            f"(teacher.model / load_teacher(..., model=...)), e.g. ViT-B-32 for LAION weights or ViT-B-32-quickgelu for OpenAI's"
        )
    if model not in open_clip.list_models():
        raise formats.unknown_model(model)
    net = create_model_quiet(model)
    formats.load_state_dict_checked(net, sd, str(path))
    return net, model, open_clip.get_tokenizer(model), open_clip.get_model_config(model), None, None


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
