"""THE training loop: every trainer (ViLD, LSeg, CLIPSeg, the RPN, self-training, the teacher's
pretraining, CLIPSelf, the backbone pretraining) runs :func:`train`.

Contract: ``model(*batch)`` (or ``model(batch)`` for a dict) in train mode returns a dict of named,
already weighted losses; their sum is minimised. The loop owns the rest: optimizer and schedule
(:mod:`distill.engine.optim`, or the trainer's own), gradient accumulation, autocast (AMP on CUDA,
fp32 on CPU unless a trainer asks for its precision everywhere) with a GradScaler for fp16, DDP under
torchrun, checkpoints (atomic, ``weights_only=True``), exact resume, the non-finite-loss guard, and,
through hooks (:mod:`distill.engine.hooks`, as detectron2's ``SimpleTrainer`` + ``HookBase``), the
schedule, ``metrics.jsonl``, the progress bar, checkpoints and periodic evaluation.

Batches come from a DataLoader (:func:`make_loader`: the order depends on (seed, epoch) only, exact
mid-epoch resume) or, for trainers that draw random batches from in-memory data, from
:class:`DrawnBatches` (its generators' states are checkpointed).

>>> loader = make_loader(dataset, cfg.det.train, collate_fn=collate)
>>> metrics = train(model, loader, cfg.det.train, "runs/shapes/det/vild", eval_fn=evaluate)
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distill.config import TrainConfig
from distill.engine import checkpoint as ckpt_lib
from distill.engine import distributed as dist_lib
from distill.engine.device import attention_backend, autocast, get_device, resolve_precision
from distill.engine.hooks import Checkpointer, Evaluator, Hook, Metrics, Progress, Schedule
from distill.engine.optim import build_optimizer, build_scheduler
from distill.errors import DistillError
from distill.files import write_json, write_text

stage_lines = logging.getLogger("distill.stage")  # pipeline.runner.STAGE_LINES


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




class DrawnBatches:
    """Endless training batches drawn by ``draw()`` from random generators the trainer owns (the
    teacher's crops, CLIPSelf's grid cells, the backbone's box crops) instead of read from a
    dataset. ``generators`` (torch, python or numpy) are all the randomness ``draw`` uses: their
    states are saved in every checkpoint, so a resumed run draws what the uninterrupted one would."""

    def __init__(self, draw: Callable[[], Any], generators: dict[str, Any]):
        self.draw = draw
        self.generators = generators

    def __iter__(self) -> DrawnBatches:
        return self

    def __next__(self) -> Any:
        return self.draw()

    def state_dict(self) -> dict:
        return {k: ckpt_lib.generator_state(g) for k, g in self.generators.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, g in self.generators.items():
            ckpt_lib.set_generator_state(g, state[k])


def run_dir(output: str | Path) -> Path:
    """Where the loop writes for a trainer whose product is one file (``teacher.safetensors`` ->
    ``teacher_train/``): ``metrics.jsonl``, ``train_summary.json``, checkpoints while it runs."""
    output = Path(output)
    return output.with_name(output.name.split(".")[0] + "_train")


# ------------------------------------------------------------------------------------ train
@dataclass
class Loop:
    """What the loop and its hooks share: the objects being trained and where the run stands."""

    model: torch.nn.Module  # the bare model (``net`` is it or its DDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler for amp_fp16 on CUDA, else None
    tcfg: TrainConfig
    out_dir: Path
    device: torch.device
    precision: str
    rank: int
    world: int
    stream: DrawnBatches | None = None
    net: torch.nn.Module | None = None
    checkpointer: Checkpointer | None = None
    hint: str = ""  # appended to the non-finite-loss error ("try pretrain.precision=fp32 ...")
    step: int = 0  # optimizer steps done
    start_step: int = 0
    step_losses: dict[str, float] = field(default_factory=dict)  # the last step's losses + "loss"
    lr: float = 0.0
    averages: dict[str, float] = field(default_factory=dict)  # the newest metrics.jsonl record
    eval_res: dict = field(default_factory=dict)
    train_time: float = 0.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, record: dict) -> None:
        """Append one line to ``metrics.jsonl`` (rank 0), and to a pipeline stage's log file
        (the ``distill.stage`` logger, :func:`distill.pipeline.runner.stage_log`; never the console)."""
        if self.main:
            line = json.dumps(record)
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(line + "\n")
            stage_lines.info("%s %s", self.out_dir.name, line)


def train(
    model: torch.nn.Module,
    train_loader: DataLoader | DrawnBatches,
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
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    precision: str | None = None,
    final_checkpoint: bool = True,
    hooks: Sequence[Hook] = (),
    hint: str = "",
) -> dict:
    """Train ``model`` for ``tcfg.max_steps`` optimizer steps; return the final metrics dict.

    Args:
        model: returns a dict of named losses in train mode (``model(images, targets)``).
        train_loader: a DataLoader yielding batches (build it with :func:`make_loader` for exact,
            mid-epoch resume; a foreign sampler is fast-forwarded) or :class:`DrawnBatches`.
        tcfg: the TrainConfig (optimizer, schedule, accumulation, precision, periods, seed).
        out_dir: writes ``metrics.jsonl``, ``checkpoints/ckpt_XXXXXXX.pt`` (+ ``last_checkpoint``),
            ``model_final.pt`` and ``train_summary.json`` (rank 0 only).
        eval_fn: ``eval_fn(model) -> dict`` of metrics, run on rank 0 every ``tcfg.eval_period``
            steps and at the end; the engine puts the model back in train mode afterwards.
        resume: continue from the newest checkpoint in ``out_dir/checkpoints`` (model, optimizer,
            scheduler, scaler, step, RNG and drawn-batch states); an uninterrupted run and a killed
            + resumed one give the same losses and weights on CPU with ``num_workers=0``.
        extra: stored in every checkpoint (e.g. the config hash).
        meta: stored in ``model_final.pt`` (:func:`distill.engine.checkpoint.save_model`).
        optimizer, scheduler: the trainer's own (default: :func:`~distill.engine.optim.build_optimizer`
            and :func:`~distill.engine.optim.build_scheduler` from ``tcfg``); the scheduler steps
            after every optimizer step.
        precision: autocast on every device, CPU included (default: ``tcfg.precision`` on CUDA,
            fp32 on CPU).
        final_checkpoint: False when the caller saves its own output: no final checkpoint and no
            ``model_final.pt``; the periodic checkpoints are deleted once training finishes.
        hooks: run after the loop's own (:mod:`distill.engine.hooks`).
        hint: added to the non-finite-loss error.

    Raises:
        DistillError: a non-finite loss (naming the step, the loss and the batch's image ids;
            the last good checkpoint is kept: the newest one whose weights gave a finite loss; a
            newer one, whose weights gave this loss, becomes ``*.pt.nonfinite``), a bad
            optimizer / schedule name.
    """
    loop = _setup(model, train_loader, tcfg, Path(out_dir), device, precision, optimizer, scheduler)
    loop.hint = hint
    loop.checkpointer = Checkpointer(loop.out_dir, tcfg.checkpoint_period, extra, meta, final=final_checkpoint)
    resumed = loop.checkpointer.resume(loop) if resume else None
    loop.start_step = loop.step = resumed or 0
    if resumed is None:
        seed_everything(tcfg.seed + loop.rank)
    elif loop.world > 1:  # a single process has its RNG states back from the checkpoint
        seed_everything(tcfg.seed + 1000 * resumed + loop.rank)
    _open_metrics(loop)
    loop.net = model
    if loop.world > 1:
        local = [loop.device.index] if loop.device.type == "cuda" else None
        loop.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=local, find_unused_parameters=find_unused_parameters)
    batches = loop.stream if loop.stream is not None else _batches(train_loader, loop.start_step * max(1, tcfg.grad_accum))
    _run(loop, batches, [Schedule(), Metrics(), Progress(progress), loop.checkpointer, Evaluator(eval_fn, tcfg.eval_period), *hooks])
    final = {
        "step": loop.step,
        **loop.averages,
        "train_time_s": round(loop.train_time, 3),
        "sec_per_step": round(loop.train_time / max(1, loop.step - loop.start_step), 4),
        **loop.eval_res,
    }
    if loop.main:
        write_json(loop.out_dir / "train_summary.json", final)
    return final


def _setup(model, train_loader, tcfg: TrainConfig, out_dir: Path, device, precision, optimizer, scheduler) -> Loop:
    """Device, precision, optimizer, scheduler and GradScaler of a run (model moved, in train mode)."""
    rank, world, local_rank = dist_lib.init_distributed()
    if device is None:
        device = get_device(tcfg.device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local_rank)
    device = torch.device(device)
    if precision is None:
        precision = tcfg.precision if device.type == "cuda" else "fp32"  # fp32 on CPU
    precision = resolve_precision(precision, device)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model.to(device)
    model.train()
    optimizer = optimizer if optimizer is not None else build_optimizer(model, tcfg)
    scheduler = scheduler if scheduler is not None else build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler("cuda") if (precision == "amp_fp16" and device.type == "cuda") else None
    stream = train_loader if isinstance(train_loader, DrawnBatches) else None
    return Loop(model, optimizer, scheduler, scaler, tcfg, out_dir, device, precision, rank, world, stream=stream)


def _open_metrics(loop: Loop) -> None:
    """Create ``metrics.jsonl``; a resumed run keeps the lines up to its checkpoint's step."""
    if not loop.main:
        return
    path = loop.out_dir / "metrics.jsonl"
    loop.out_dir.mkdir(parents=True, exist_ok=True)
    kept = []
    if loop.start_step > 0 and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= loop.start_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
    write_text(path, "".join(k + "\n" for k in kept))


def _run(loop: Loop, batches: Iterator[Any], hooks: list[Hook]) -> None:
    for h in hooks:
        h.before_train(loop)
    t0 = time.perf_counter()
    try:
        while loop.step < loop.tcfg.max_steps:
            loop.step_losses = _step(loop, batches)
            loop.step += 1
            for h in hooks:
                h.after_step(loop)
    finally:
        for h in hooks:
            h.close(loop)
    loop.train_time = time.perf_counter() - t0
    for h in hooks:
        h.after_train(loop)


def _step(loop: Loop, batches: Iterator[Any]) -> dict[str, float]:
    """One optimizer step: ``grad_accum`` micro-batches forward (autocast) + backward (GradScaler,
    DDP syncing on the last one), the non-finite guard, gradient clipping, the optimizer step.
    Returns the step's losses (means over the micro-batches) and their sum as ``loss``."""
    net, opt, scaler, device = loop.net, loop.optimizer, loop.scaler, loop.device
    accum = max(1, loop.tcfg.grad_accum)
    opt.zero_grad(set_to_none=True)
    step_losses: dict[str, float] = {}
    for a in range(accum):
        batch = to_device(next(batches), device)
        sync = a == accum - 1 or loop.world == 1
        ctx = net.no_sync() if (not sync and hasattr(net, "no_sync")) else contextlib.nullcontext()
        with ctx, attention_backend(device):
            with autocast(device, loop.precision):
                losses = _call(net, batch)
            total = sum(losses.values())
            _guard(loop, losses, total, batch)
            loss = total / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in losses.items():
            step_losses[k] = step_losses.get(k, 0.0) + float(v.detach()) / accum
        step_losses["loss"] = step_losses.get("loss", 0.0) + float(total.detach()) / accum
    if loop.tcfg.clip_grad > 0:
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), loop.tcfg.clip_grad)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return step_losses


def _guard(loop: Loop, losses: dict[str, torch.Tensor], total: torch.Tensor, batch: Any) -> None:
    """Stop on a non-finite loss on any rank, naming the step, the losses, the batch's image ids
    and the last good checkpoint (:meth:`Checkpointer.set_aside`)."""
    if not dist_lib.any_true(not bool(torch.isfinite(total.detach())), loop.device):
        return
    vals = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    ids = batch_image_ids(batch)
    where = loop.checkpointer.set_aside(loop.main) if loop.checkpointer is not None else "none saved yet"
    raise DistillError(
        f"step {loop.step + 1}: non-finite loss ({vals}){f' on image ids {ids}' if ids else ''}; "
        f"training stopped, last good checkpoint: {where}{f'; {loop.hint}' if loop.hint else ''}"
    )
