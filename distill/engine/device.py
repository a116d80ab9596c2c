"""Devices and precision: ``cuda`` when available else ``cpu``; autocast by device type."""

from __future__ import annotations

import contextlib

import torch

from distill.errors import DistillError

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16", "auto")


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


def native_bf16(device: torch.device | str) -> bool:
    """True when ``device`` runs bfloat16 matmuls in hardware: a CUDA GPU with bf16 support, or a CPU
    whose oneDNN has bf16 kernels (AVX-512 and up; ``torch.ops.mkldnn._is_mkldnn_bf16_supported``).
    On a CPU without them (AVX2 only) bf16 is emulated: a 2048 x 2048 matmul ran under 1 GFLOP/s
    against 136 in fp32, and the teacher's crop embedding 4-5x slower (bench/precision.py)."""
    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``amp_bf16`` where ``device`` runs bf16 natively (:func:`native_bf16`), else
    ``fp32``; any other value of :data:`PRECISIONS` as it is (checked)."""
    if precision not in PRECISIONS:
        raise DistillError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "amp_bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """``fp32`` -> None, ``amp_bf16`` -> bfloat16, ``amp_fp16`` -> float16; ``auto`` as
    :func:`resolve_precision` decides on ``device``."""
    precision = resolve_precision(precision, device)
    return {"fp32": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}[precision]


def autocast(device: torch.device | str, precision: str = "fp32"):
    """An autocast context for ``precision`` on ``device`` (a no-op context for fp32)."""
    dev = torch.device(device) if isinstance(device, str) else device
    dtype = autocast_dtype(precision, dev)
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


def conv_memory_format(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``model`` with its 4-D weights in channels-last layout on CPU (oneDNN's convolutions run
    faster on it for the LSeg and crop-classifier steps: ``python bench/conv_layout.py`` measures
    both layouts side by side), unchanged elsewhere. Inputs need no change: a convolution with
    channels-last weights returns channels-last outputs. Not used for torchvision's Faster R-CNN,
    where the same benchmark shows no gain."""
    if torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model
