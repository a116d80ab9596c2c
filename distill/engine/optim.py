"""Optimizers and learning-rate schedules for the training loop (engine/train.py).

Two schedules: :class:`LRFactor` (the students' ``train.schedule``: warm-up from 0.001 times cosine,
step or constant, as detectron2's) and :func:`warmup_cosine` (the teacher's pretraining and
CLIPSelf: linear warm-up to ``lr``, then cosine to 0, as open_clip's ``cosine_lr``), which
:class:`FunctionLR` applies as absolute values. The backbone pretraining passes torch's
``OneCycleLR``; any ``torch.optim.lr_scheduler`` object works.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from distill.config import TrainConfig
from distill.errors import DistillError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "poly", "constant")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups: ``weight_decay`` on matrices and kernels, none on
    biases, norms, gains, the logit scale and every other parameter with ``ndim <= 1`` (detectron2's
    and open_clip's rule; for open_clip towers the same split as open_clip's name-based one).
    Empty groups are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over :func:`param_groups`."""
    if tcfg.optimizer not in OPTIMIZERS:
        raise DistillError(f"train.optimizer: {tcfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, tcfg.weight_decay)
    if not groups:
        raise DistillError("train: the model has no trainable parameters")
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum)
    return torch.optim.AdamW(groups, lr=tcfg.lr)


def clip_adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with CLIP's betas (0.9, 0.98) and eps 1e-6 over :func:`param_groups` (the teacher's
    pretraining and CLIPSelf)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)


class LRFactor:
    """Linear warm-up from 0.001 (as detectron2's WarmupMultiStepLR / WarmupCosineLR) times a
    cosine decay to 0, a step decay (x0.1 at 2/3 and 8/9 of training), a poly decay (power 0.9) or a constant."""

    def __init__(self, max_steps: int, warmup: int, schedule: str):
        if schedule not in SCHEDULES:
            raise DistillError(f"train.schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
        self.max_steps = max(1, int(max_steps))
        self.warmup = int(warmup)
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        f = 1.0
        if self.schedule == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * min(step, self.max_steps) / self.max_steps))
        elif self.schedule == "step":
            f = 0.1 ** sum(step >= m for m in (int(self.max_steps * 2 / 3), int(self.max_steps * 8 / 9)))
        elif self.schedule == "poly":  # IRN / CLIMS misc/torchutils.py PolyOptimizer: (1 - t / T) ** 0.9
            f = (1.0 - min(step, self.max_steps) / self.max_steps) ** 0.9
        if step < self.warmup:
            a = step / self.warmup
            f *= 0.001 * (1 - a) + a
        return f


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.schedule`` as a factor on ``train.lr`` (:class:`LRFactor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(tcfg.max_steps, tcfg.warmup, tcfg.schedule))


def warmup_cosine(step: int, steps: int, warmup: int, lr: float) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    cosine decay to 0 at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, t)))


class FunctionLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets every group's learning rate to ``fn(step)`` before each step (absolute values, not a
    factor on the initial lr); ``state_dict`` holds the step, not ``fn``."""

    def __init__(self, optimizer: torch.optim.Optimizer, fn: Callable[[int], float]):
        self.fn = fn
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.fn(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "fn")}
