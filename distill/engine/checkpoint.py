"""Training checkpoints: model, optimizer, scheduler, scaler, step and RNG states.

Everything is stored as tensors / plain containers so that ``torch.load(weights_only=True)``
reads it back (RNG states of python and numpy become int64 tensors). Files are written
atomically; ``last_checkpoint`` in the folder names the newest complete one.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.errors import DistillError
from distill.files import atomic_path, write_text

FORMAT = "distill-ckpt-1"
MODEL_FORMAT = "distill-model-1"  # model_final.pt: the weights + what is needed to use them (``meta``)
POINTER = "last_checkpoint"
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ RNG
def _py_state(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"python": torch.tensor(internal, dtype=torch.int64), "python_version": int(version),
            "python_gauss": float("nan") if gauss is None else float(gauss)}


def _py_tuple(state: dict[str, Any]) -> tuple:
    gauss = state["python_gauss"]
    return (state["python_version"], tuple(int(v) for v in state["python"].tolist()), None if gauss != gauss else gauss)


def rng_state() -> dict[str, Any]:
    """python, numpy, torch (and CUDA) RNG states as tensors."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        **_py_state(random.getstate()),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned; its tensors may have been read onto a GPU (a
    checkpoint loaded with ``map_location="cuda"``): the RNGs take CPU tensors."""
    random.setstate(_py_tuple(state))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].cpu().numpy().astype(np.uint32), state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def generator_state(g: torch.Generator | random.Random | np.random.Generator) -> dict[str, Any]:
    """The state of one random generator (torch, python or numpy) in weights_only-safe form."""
    if isinstance(g, torch.Generator):
        return {"torch": g.get_state()}
    if isinstance(g, random.Random):
        return _py_state(g.getstate())
    if isinstance(g, np.random.Generator):
        return {"numpy": json.dumps(g.bit_generator.state)}  # 128-bit integers: kept exact as text
    raise TypeError(f"not a random generator: {type(g).__name__}")


def set_generator_state(g: torch.Generator | random.Random | np.random.Generator, state: dict[str, Any]) -> None:
    """Restore what :func:`generator_state` returned into ``g`` (of the same kind)."""
    if isinstance(g, torch.Generator):
        g.set_state(state["torch"].cpu())
    elif isinstance(g, random.Random):
        g.setstate(_py_tuple(state))
    elif isinstance(g, np.random.Generator):
        g.bit_generator.state = json.loads(state["numpy"])
    else:
        raise TypeError(f"not a random generator: {type(g).__name__}")


# ------------------------------------------------------------------------------------ save/load
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel wrappers."""
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def save(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    scaler: Any = None,
    extra: dict | None = None,
    data: dict | None = None,
) -> Path:
    """Write a checkpoint atomically and return its path. ``data``: the state of a stream of drawn
    batches (:class:`distill.engine.train.DrawnBatches`)."""
    path = Path(path)
    m = unwrap(model)
    ckpt = {
        "format": FORMAT,
        "arch": type(m).__name__,
        "step": int(step),
        "model": m.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng_state(),
        "extra": extra or {},
        "data": data or {},
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def load_file(path: str | Path, key: str, expected: str, map_location: str | torch.device = "cpu"):
    """``torch.load(weights_only=True)`` of a file the user named in config ``key``; a missing or
    unreadable file is one line naming the key, the path and what was ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{key}: {path}: file not found (expected {expected})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DistillError(f"{key}: {path}: not a readable file ({load_failure(path, e)}); expected {expected}") from None


def read(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file (``weights_only=True``); a plain state_dict is accepted too."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DistillError(f"{path}: not a readable checkpoint ({load_failure(path, e)})") from None
    if not isinstance(obj, dict):
        raise DistillError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    if obj.get("format") == MODEL_FORMAT:
        obj = {"format": MODEL_FORMAT, "model": obj["model"], "step": 0, "meta": obj.get("meta") or {}}
    elif obj.get("format") != FORMAT:  # a bare state_dict
        obj = {"format": None, "model": obj, "step": 0}
    return obj


_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF document"}


def load_failure(path: str | Path, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words; torch's "Weights only load
    failed" text (which suggests the unsafe ``weights_only=False``) becomes "not a PyTorch
    checkpoint: <what the file is>" or the global it refused."""
    if "Weights only load failed" not in str(error):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither a torch zip archive nor a legacy pickle
        return "not a PyTorch checkpoint: " + next((v for k, v in _MAGIC.items() if head.startswith(k)), f"starts with bytes {head[:4]!r}")
    refused = next((ln.strip() for ln in str(error).splitlines() if "Unsupported" in ln), "it pickles Python objects")
    return f"a PyTorch file holding more than tensors: {refused}; save its state_dict() instead"


def state_dict_mismatch(own: dict, state: dict) -> str:
    """"" when ``state`` has exactly ``own``'s keys and shapes; else one line naming the missing,
    unexpected and mis-shaped keys (a few of each)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shape)):
        if keys:
            parts.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''})")
    return "; ".join(parts)


def load_model_state(model: torch.nn.Module, state: dict, where: str = "checkpoint") -> None:
    """``load_state_dict`` (strict) turning a mismatch into a one-line DistillError."""
    m = unwrap(model)
    bad = state_dict_mismatch(m.state_dict(), state)
    if bad:
        raise DistillError(f"{where}: does not fit {type(m).__name__} (another architecture or config?): {bad}")
    m.load_state_dict(state, strict=True)


def load(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = False,
    map_location: str | torch.device = "cpu",
    data: Any = None,
) -> dict:
    """Restore a checkpoint into the given objects (``data``: a stream of drawn batches); returns
    the checkpoint dict (``step``, ``extra``)."""
    ckpt = read(path, map_location)
    load_model_state(model, ckpt["model"], str(path))
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if data is not None and ckpt.get("data"):
        data.load_state_dict(ckpt["data"])
    if restore_rng and ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return ckpt


def save_model(path: str | Path, model: torch.nn.Module, meta: dict | None = None) -> Path:
    """The model's state_dict (e.g. ``model_final.pt``), atomically; with ``meta`` (plain
    strings / numbers: the training config, the teacher's identity) the file is
    ``{"format": MODEL_FORMAT, "model": state_dict, "meta": meta}``, so a copied checkpoint
    carries what it needs to be used (:func:`read` returns it as ``ckpt["meta"]``)."""
    buf = io.BytesIO()
    state = unwrap(model).state_dict()
    torch.save({"format": MODEL_FORMAT, "model": state, "meta": meta} if meta else state, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def set_last(folder: str | Path, path: str | Path) -> None:
    write_text(Path(folder) / POINTER, Path(path).name + "\n")


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint named by ``last_checkpoint`` in ``folder`` (None if none).
    When the pointer is missing or garbled but ``ckpt_*.pt`` files are there, the newest readable
    one, with a warning naming the pointer."""
    p = Path(folder) / POINTER
    if p.is_file():
        name = p.read_text(encoding="utf-8", errors="replace").strip()
        cand = Path(folder) / name
        if name and "/" not in name and cand.is_file():
            return cand
    for cand in sorted(Path(folder).glob("ckpt_*.pt"), reverse=True):
        try:
            read(cand)
        except DistillError:
            continue
        log.warning(f"{p}: missing or does not name a checkpoint; resuming from the newest readable {cand.name}")
        return cand
    return None
