"""Precision choices (distill/engine/device.py): ``auto`` picks bf16 only where the device runs it."""

import dataclasses

import pytest
import torch

from distill.engine import device as D
from distill.errors import DistillError


def test_auto_precision_follows_the_hardware(monkeypatch):
    """auto = amp_bf16 on a CPU with oneDNN bf16 kernels (AVX-512 and up), fp32 on one without
    (AVX2: bf16 emulated, many times slower); explicit choices stay as given; bad ones are refused."""
    for native, want in ((True, "amp_bf16"), (False, "fp32")):
        monkeypatch.setattr(D, "native_bf16", lambda dev, n=native: n)
        assert D.resolve_precision("auto", "cpu") == want
        assert D.autocast_dtype("auto") == (torch.bfloat16 if native else None)
        for p in ("fp32", "amp_bf16", "amp_fp16"):
            assert D.resolve_precision(p, "cpu") == p
    with pytest.raises(DistillError, match="precision: 'bf16' is not one of fp32, amp_bf16, amp_fp16, auto"):
        D.resolve_precision("bf16", "cpu")


def test_native_bf16_reads_this_cpu():
    assert D.native_bf16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert D.native_bf16("meta") is False


def test_teacher_records_the_resolved_precision(monkeypatch):
    """A teacher given precision auto says what it runs (the region cache key reads it), so two
    machines with different hardware never share a cache made at another precision."""
    from distill.teacher.clip import build_random_teacher

    for native, want in ((True, "amp_bf16"), (False, "fp32")):
        monkeypatch.setattr(D, "native_bf16", lambda dev, n=native: n)
        t = build_random_teacher(seed=0)
        assert dataclasses.replace(t, precision="auto").precision == want
