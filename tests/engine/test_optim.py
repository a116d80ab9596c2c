"""Optimizers and schedules (engine/optim.py)."""

from __future__ import annotations

import functools
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
    p = LRFactor(10, 0, "poly")  # IRN / CLIMS PolyOptimizer: (1 - t / T) ** 0.9
    assert [p(0), p(5), p(10)] == pytest.approx([1.0, 0.5**0.9, 0.0])
    with pytest.raises(DistillError, match="train.schedule"):
        LRFactor(10, 0, "linear")


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0) == pytest.approx(0.0)




def test_function_lr_sets_absolute_values_before_each_step_and_resumes():
    """FunctionLR: the lr of step k (0-based) is fn(k) exactly, in every group; its state_dict is
    weights_only-safe (no function inside) and restores the step."""
    import io

    fn = functools.partial(warmup_cosine, steps=10, warmup=3, lr=0.5)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(param_groups(m, 0.1), lr=123.0)
    sched = FunctionLR(opt, fn)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen == [[fn(k)] * 2 for k in range(6)]
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = torch.optim.SGD(param_groups(m, 0.1), lr=123.0)
    sched2 = FunctionLR(opt2, fn)
    sched2.load_state_dict(torch.load(buf, weights_only=True))
    sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == [fn(7)] * 2


def test_param_groups_no_decay_on_1d_and_clip_adamw():
    """The one no-decay rule (ndim <= 1) splits an open_clip model as open_clip's name rule does
    (gains, biases, ln, logit_scale); frozen parameters are left out; CLIP's AdamW betas / eps."""
    from distill.teacher import build_random_teacher

    model = build_random_teacher(seed=0).model
    for p in model.visual.proj, model.logit_scale:
        p.requires_grad_(True)
    model.visual.ln_post.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)] for p in no_decay["params"]}
    expect = {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or "ln" in n or "bias" in n or "logit_scale" in n)}
    assert by_name == expect and "logit_scale" in by_name and "visual.ln_post.weight" not in by_name
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and "visual.proj" in {names[id(p)] for p in decay["params"]}
    opt = clip_adamw(model, 1e-3, 0.2)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6 and opt.param_groups[0]["weight_decay"] == 0.2
    with pytest.raises(DistillError, match="train.optimizer"):
        from distill.config import TrainConfig
        from distill.engine.optim import build_optimizer

        build_optimizer(model, TrainConfig(optimizer="lamb"))
