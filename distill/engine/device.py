"""Devices and precision: ``cuda`` when available else ``cpu``; autocast by device type."""

from __future__ import annotations

import contextlib

import torch

from distill.errors import DistillError

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")


def get_device(name: str = "") -> torch.device:
    """``""`` -> cuda when available else cpu; otherwise ``torch.device(name)`` (validated)."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DistillError(f"device: {name!r} is not a torch device (expected cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistillError(f"device: {name!r} requested but CUDA is not available (use cpu or leave it empty)")
    return dev


def autocast_dtype(precision: str) -> torch.dtype | None:
    """``fp32`` -> None, ``amp_bf16`` -> bfloat16, ``amp_fp16`` -> float16."""
    if precision not in PRECISIONS:
        raise DistillError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return {"fp32": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}[precision]


def autocast(device: torch.device | str, precision: str = "fp32"):
    """An autocast context for ``precision`` on ``device`` (a no-op context for fp32)."""
    dev = torch.device(device) if isinstance(device, str) else device
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype, enabled=True)


def full_precision(device: torch.device | str):
    """Autocast switched off on ``device`` inside an autocast region (a loss computed in fp32)."""
    dev = torch.device(device) if isinstance(device, str) else device
    return torch.autocast(device_type=dev.type, enabled=False)


def attention_backend(device: torch.device | str):
    """The scaled-dot-product attention kernels to train with on ``device``.

    On CPU, PyTorch's default flash-attention kernel has a slow backward for the short sequences
    of our ViTs (65 image tokens, 32 text tokens): profiled on the teacher's pretraining step it
    was 39% of the step, its backward 6.6x its forward. The plain math kernel trains the same
    model 1.35x faster (bf16, 2 cores: 0.42 vs 0.57 s/step; ``bench/teacher_step.py``). CUDA
    keeps PyTorch's choice.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type != "cpu":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op threads (``n <= 0``: leave torch's setting), restored after."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
