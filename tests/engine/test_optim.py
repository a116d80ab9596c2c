"""Optimizers and schedules (engine/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from distill.engine.optim import FunctionLR, LRFactor, clip_adamw, param_groups, warmup_cosine
from distill.errors import DistillError


def test_lr_factor_warmup_cosine_step():
    f = LRFactor(100, 10, "cosine")
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx((0.001 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    s = LRFactor(90, 0, "step")
    assert [s(0), s(59), s(60), s(80)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    with pytest.raises(DistillError, match="train.schedule"):
        LRFactor(10, 0, "poly")


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0) == pytest.approx(0.0)


