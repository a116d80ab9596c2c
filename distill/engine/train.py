"""The training loop shared by every student (ViLD, LSeg, CLIPSeg).

Contract: ``model(images, targets)`` in train mode returns a dict of named, already weighted
losses; their sum is minimised. The engine owns the rest: optimizer, warm-up + schedule, gradient
accumulation, AMP on CUDA (fp32 on CPU), DDP under torchrun, checkpoints (atomic,
``weights_only=True``), exact resume, ``metrics.jsonl``, a progress bar with losses and ETA,
periodic evaluation, and a NaN guard.

>>> loader = make_loader(dataset, cfg.det.train, collate_fn=collate)
>>> metrics = train(model, loader, cfg.det.train, "runs/shapes/det/vild", eval_fn=evaluate)
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distill.config import TrainConfig
from distill.engine import checkpoint as ckpt_lib
from distill.engine import distributed as dist_lib
from distill.engine.device import attention_backend, autocast, get_device
from distill.errors import DistillError
from distill.files import write_json, write_text

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


# --------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def micro_batch_size(tcfg: TrainConfig, world: int | None = None) -> int:
    """Images per process per forward: ``batch_size`` is the total per optimizer step, split over
    ranks and accumulation steps."""
    world = dist_lib.get_world_size() if world is None else world
    denom = world * max(1, tcfg.grad_accum)
    if tcfg.batch_size < denom or tcfg.batch_size % denom:
        raise DistillError(
            f"train.batch_size: {tcfg.batch_size} must be a multiple of world_size x grad_accum = {world} x {tcfg.grad_accum}"
        )
    return tcfg.batch_size // denom


def make_loader(
    dataset: Dataset,
    tcfg: TrainConfig,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    shuffle: bool = True,
) -> DataLoader:
    """A training DataLoader whose order depends only on (seed, epoch) and that the engine can
    resume mid-epoch (a :class:`ResumableSampler`, rank-sharded under DDP, drop_last)."""
    if len(dataset) == 0:
        raise DistillError("train: the training dataset is empty")
    bs = micro_batch_size(tcfg)
    sampler = dist_lib.ResumableSampler(len(dataset), shuffle=shuffle, seed=tcfg.seed)
    if len(sampler) < bs:
        raise DistillError(f"train.batch_size: {bs} images per process but the dataset has only {len(sampler)} per process")
    g = torch.Generator()
    g.manual_seed(tcfg.seed)
    return DataLoader(
        dataset,
        batch_size=bs,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=True,
        generator=g,
        persistent_workers=False,
    )


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on biases, norms and other 1-d parameters."""
    if tcfg.optimizer not in OPTIMIZERS:
        raise DistillError(f"train.optimizer: {tcfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    if not decay and not no_decay:
        raise DistillError("train: the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum)
    return torch.optim.AdamW(groups, lr=tcfg.lr)


class LRFactor:
    """Linear warm-up from 0.001 (as detectron2's WarmupMultiStepLR / WarmupCosineLR) times a
    cosine decay to 0, a step decay (x0.1 at 2/3 and 8/9 of training) or a constant."""

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
        if step < self.warmup:
            a = step / self.warmup
            f *= 0.001 * (1 - a) + a
        return f


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(tcfg.max_steps, tcfg.warmup, tcfg.schedule))


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside lists / tuples / dicts to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_device(v, device) for v in obj)
    return obj


def batch_image_ids(batch: Any) -> list:
    """Every ``image_id`` found in a batch's target dicts (for error messages)."""
    ids: list = []

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            if "image_id" in o:
                v = o["image_id"]
                ids.extend(v.flatten().tolist() if torch.is_tensor(v) else (v if isinstance(v, list) else [v]))
                return
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(batch)
    return ids


def _call(model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    if not isinstance(out, dict) or not out:
        raise TypeError(f"{type(model).__name__} must return a non-empty dict of losses in train mode, got {type(out).__name__}")
    return out


def _batches(loader: DataLoader, start_micro: int) -> Iterator[Any]:
    """Endless batches, epoch after epoch, starting at micro-batch ``start_micro``; the order
    depends only on the sampler's (seed, epoch), and creating an iterator does not touch the
    global RNG (so a resumed run draws the same random numbers as an uninterrupted one)."""
    n = len(loader)
    if n == 0:
        raise DistillError("train: the data loader yields no batches (dataset smaller than one batch?)")
    epoch, skip = divmod(start_micro, n)
    sampler = loader.sampler
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        discard = 0
        if skip and hasattr(sampler, "set_start") and loader.batch_size:
            sampler.set_start(skip * loader.batch_size)
        else:
            discard = skip
        rng = torch.get_rng_state()
        it = iter(loader)
        torch.set_rng_state(rng)
        for i, batch in enumerate(it):
            if i < discard:
                continue
            yield batch
        epoch, skip = epoch + 1, 0


# ------------------------------------------------------------------------------------ train
def train(
    model: torch.nn.Module,
    train_loader: DataLoader,
    tcfg: TrainConfig,
    out_dir: str | Path,
    *,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    resume: bool = False,
    device: torch.device | str | None = None,
    find_unused_parameters: bool = True,
    progress: bool = True,
    extra: dict | None = None,
    meta: dict | None = None,
) -> dict:
    """Train ``model`` for ``tcfg.max_steps`` optimizer steps; return the final metrics dict.

    Args:
        model: ``model(images, targets)`` returns a dict of named losses in train mode.
        train_loader: yields ``(images, targets)`` batches; build it with :func:`make_loader` for
            exact, mid-epoch resume (any loader works; a foreign sampler is fast-forwarded).
        tcfg: the TrainConfig (optimizer, schedule, accumulation, precision, periods, seed).
        out_dir: writes ``metrics.jsonl``, ``checkpoints/ckpt_XXXXXXX.pt`` (+ ``last_checkpoint``)
            and ``model_final.pt`` (rank 0 only).
        eval_fn: ``eval_fn(model) -> dict`` of metrics, run on rank 0 every ``tcfg.eval_period``
            steps and at the end; the engine puts the model back in train mode afterwards.
        resume: continue from the newest checkpoint in ``out_dir/checkpoints`` (model, optimizer,
            scheduler, scaler, step and RNG states); an uninterrupted run and a killed + resumed
            one give the same losses and weights on CPU with ``num_workers=0``.
        extra: stored in every checkpoint (e.g. the config hash).
        meta: stored in ``model_final.pt`` (:func:`distill.engine.checkpoint.save_model`).

    Raises:
        DistillError: a non-finite loss (naming the step, the loss and the batch's image ids;
            the last good checkpoint is kept: the newest one whose weights gave a finite loss; a
            newer one, whose weights gave this loss, becomes ``*.pt.nonfinite``), a bad
            optimizer / schedule name.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    rank, world, local_rank = dist_lib.init_distributed()
    if device is None:
        device = get_device(tcfg.device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local_rank)
    device = torch.device(device)
    main = rank == 0
    precision = tcfg.precision if device.type == "cuda" else "fp32"  # fp32 on CPU
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    accum = max(1, tcfg.grad_accum)

    model.to(device)
    model.train()
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler("cuda") if (precision == "amp_fp16" and device.type == "cuda") else None

    start_step = 0
    last_good = ckpt_lib.last_checkpoint(ckpt_dir)
    if resume and last_good is not None:
        state = ckpt_lib.load(last_good, model, optimizer, scheduler, scaler, restore_rng=(world == 1), map_location=device)
        start_step = int(state["step"])
        if world > 1:
            seed_everything(tcfg.seed + 1000 * start_step + rank)
        if main:
            print(f"resuming from {last_good} at step {start_step}")
        # not known good until a step's loss on its weights is finite (see `unverified` below)
        unverified, last_good = last_good, _previous_checkpoint(ckpt_dir, last_good)
    else:
        if resume and main:
            print(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
        last_good = unverified = None
        seed_everything(tcfg.seed + rank)

    metrics_path = out_dir / "metrics.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step > 0 and metrics_path.is_file():  # drop lines from after the checkpoint
            for line in metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        write_text(metrics_path, "".join(k + "\n" for k in kept))

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=find_unused_parameters
        )

    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.max_steps, initial=start_step, desc=out_dir.name, dynamic_ncols=True, mininterval=1.0)

    def log(record: dict) -> None:
        if main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval(step: int) -> dict:
        res: dict = {}
        if eval_fn is not None and main:
            res = dict(eval_fn(ckpt_lib.unwrap(net)) or {})
            log({"step": step, "eval": res})
        dist_lib.barrier()
        net.train()
        return res

    batches = _batches(train_loader, start_step * accum)
    window: dict[str, float] = {}
    window_n = 0
    last: dict[str, float] = {}
    eval_res: dict = {}
    t0 = time.perf_counter()
    step = start_step
    try:
        while step < tcfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            step_losses: dict[str, float] = {}
            for a in range(accum):
                batch = to_device(next(batches), device)
                sync = a == accum - 1 or world == 1
                ctx = net.no_sync() if (not sync and hasattr(net, "no_sync")) else _null()
                with ctx, attention_backend(device):
                    with autocast(device, precision):
                        losses = _call(net, batch)
                    total = sum(losses.values())
                    bad = not bool(torch.isfinite(total.detach()))
                    if dist_lib.any_true(bad, device):
                        vals = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
                        aside = ""
                        if unverified is not None:  # this loss came from its weights: not a good checkpoint
                            aside = f" ({unverified.name}, whose weights gave this loss, moved to {_set_aside(ckpt_dir, unverified, last_good, main).name})"
                        where = last_good if last_good is not None else "none saved yet"
                        raise DistillError(
                            f"step {step + 1}: non-finite loss ({vals}) on image ids {batch_image_ids(batch)}; "
                            f"training stopped, last good checkpoint: {where}{aside}"
                        )
                    loss = total / accum
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                for k, v in losses.items():
                    step_losses[k] = step_losses.get(k, 0.0) + float(v.detach()) / accum
                step_losses["loss"] = step_losses.get("loss", 0.0) + float(total.detach()) / accum
            if unverified is not None:  # its weights gave a finite loss
                last_good, unverified = unverified, None
            if tcfg.clip_grad > 0:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1

            for k, v in step_losses.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            log_now = step % max(1, tcfg.log_period) == 0 or step == tcfg.max_steps
            if log_now:
                avg = dist_lib.all_reduce_mean({k: v / window_n for k, v in window.items()}, device)
                last = avg
                elapsed = time.perf_counter() - t0
                rate = elapsed / max(1, step - start_step)
                log({"step": step, "lr": lr, **avg, "time_s": round(elapsed, 3), "eta_s": round(rate * (tcfg.max_steps - step), 1)})
                window, window_n = {}, 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in step_losses.items()}, refresh=False)
            if tcfg.checkpoint_period and step % tcfg.checkpoint_period == 0 and step < tcfg.max_steps:
                unverified = _checkpoint(ckpt_dir, net, optimizer, scheduler, scaler, step, extra, main)
            if eval_fn is not None and tcfg.eval_period and step % tcfg.eval_period == 0 and step < tcfg.max_steps:
                eval_res = run_eval(step)
    finally:
        if bar is not None:
            bar.close()

    train_time = time.perf_counter() - t0
    last_good = _checkpoint(ckpt_dir, net, optimizer, scheduler, scaler, step, extra, main)
    if main:
        ckpt_lib.save_model(out_dir / "model_final.pt", net, meta)
    if eval_fn is not None:
        eval_res = run_eval(step)
    final = {
        "step": step,
        **last,
        "train_time_s": round(train_time, 3),
        "sec_per_step": round(train_time / max(1, step - start_step), 4),
        **eval_res,
    }
    if main:
        write_json(out_dir / "train_summary.json", final)
    return final


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _previous_checkpoint(ckpt_dir: Path, path: Path) -> Path | None:
    """The newest checkpoint older than ``path`` (the steps after it ran with finite losses)."""
    older = [p for p in sorted(ckpt_dir.glob("ckpt_*.pt")) if p.name < path.name]
    return older[-1] if older else None


def _set_aside(ckpt_dir: Path, bad: Path, good: Path | None, main: bool) -> Path:
    """A checkpoint whose weights gave a non-finite loss: ``last_checkpoint`` goes back to ``good``
    (or away) so ``--resume`` does not restart from it, and the file becomes ``*.nonfinite``."""
    aside = bad.with_name(bad.name + ".nonfinite")
    if main:
        if good is not None:
            ckpt_lib.set_last(ckpt_dir, good)
        else:
            (ckpt_dir / ckpt_lib.POINTER).unlink(missing_ok=True)
        if bad.is_file():
            bad.replace(aside)
    return aside


def _checkpoint(ckpt_dir: Path, net, optimizer, scheduler, scaler, step: int, extra: dict | None, main: bool) -> Path:
    path = ckpt_dir / f"ckpt_{step:07d}.pt"
    if main:
        ckpt_lib.save(path, net, optimizer, scheduler, step, scaler=scaler, extra=extra)
        ckpt_lib.set_last(ckpt_dir, path)
        old = sorted(ckpt_dir.glob("ckpt_*.pt"))[:-2]  # keep the two newest
        for p in old:
            p.unlink(missing_ok=True)
    dist_lib.barrier()
    return path
