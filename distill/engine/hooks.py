"""Hooks of the training loop (engine/train.py), as detectron2's ``HookBase``: the loop calls
``before_train`` once, ``after_step`` after every optimizer step, ``after_train`` once when every
step ran, and ``close`` always (also when training stops on an error).

The loop runs :class:`Schedule`, :class:`Metrics`, :class:`Progress`, :class:`Checkpointer`,
:class:`Evaluator` in that order, then the hooks a trainer passes. A hook reads and writes the
:class:`~distill.engine.train.Loop` it is given: ``loop.step`` (steps done), ``loop.step_losses``
(the last step's losses), ``loop.model`` / ``loop.optimizer`` / ``loop.scheduler``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from distill.engine import checkpoint as ckpt_lib
from distill.engine import distributed as dist_lib
from distill.errors import DistillError

if TYPE_CHECKING:
    from distill.engine.train import Loop


class Hook:
    """Does nothing; subclasses override the events they need."""

    def before_train(self, loop: Loop) -> None:
        pass

    def after_step(self, loop: Loop) -> None:
        pass

    def after_train(self, loop: Loop) -> None:
        pass

    def close(self, loop: Loop) -> None:
        pass


class BeforeTrain(Hook):
    """Calls ``fn()`` on rank 0 once a resumed checkpoint is loaded, before the first step (e.g.
    writes the run's config.yaml, so a refused --resume leaves the old one)."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def before_train(self, loop: Loop) -> None:
        if loop.main:
            self.fn()


class Schedule(Hook):
    """Records the step's learning rate (``loop.lr``, of the first group), then steps the scheduler."""

    def after_step(self, loop: Loop) -> None:
        loop.lr = loop.optimizer.param_groups[0]["lr"]
        loop.scheduler.step()


class Metrics(Hook):
    """Every ``log_period`` steps and at the last one: the mean of each loss over the steps since the
    last record (averaged over ranks), the lr, time and ETA, as a line of ``metrics.jsonl``;
    ``loop.averages`` holds the newest record's means."""

    def before_train(self, loop: Loop) -> None:
        self.window: dict[str, float] = {}
        self.n = 0
        self.t0 = time.perf_counter()

    def after_step(self, loop: Loop) -> None:
        for k, v in loop.step_losses.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.n += 1
        if loop.step % max(1, loop.tcfg.log_period) and loop.step != loop.tcfg.max_steps:
            return
        avg = dist_lib.all_reduce_mean({k: v / self.n for k, v in self.window.items()}, loop.device)
        loop.averages = avg
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / max(1, loop.step - loop.start_step)
        eta = round(rate * (loop.tcfg.max_steps - loop.step), 1)
        loop.log({"step": loop.step, "lr": loop.lr, **avg, "time_s": round(elapsed, 3), "eta_s": eta})
        self.window, self.n = {}, 0


class Progress(Hook):
    """A tqdm bar with the step's losses (rank 0, when ``enabled``)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def before_train(self, loop: Loop) -> None:
        if self.enabled and loop.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=loop.tcfg.max_steps, initial=loop.start_step, desc=loop.out_dir.name, dynamic_ncols=True, mininterval=1.0)

    def after_step(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in loop.step_losses.items()}, refresh=False)

    def close(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Evaluator(Hook):
    """``eval_fn(model) -> dict`` on rank 0 every ``eval_period`` steps and after the last one; its
    metrics go to ``metrics.jsonl`` with the step and to ``loop.eval_res``; the model is put back
    in train mode."""

    def __init__(self, eval_fn: Callable[[torch.nn.Module], dict] | None, period: int):
        self.eval_fn = eval_fn
        self.period = period

    def run(self, loop: Loop) -> None:
        res: dict = {}
        if loop.main:
            res = dict(self.eval_fn(ckpt_lib.unwrap(loop.net)) or {})
            loop.log({"step": loop.step, "eval": res})
        dist_lib.barrier()
        loop.net.train()
        loop.eval_res = res

    def after_step(self, loop: Loop) -> None:
        if self.eval_fn is not None and self.period and loop.step % self.period == 0 and loop.step < loop.tcfg.max_steps:
            self.run(loop)

    def after_train(self, loop: Loop) -> None:
        if self.eval_fn is not None:
            self.run(loop)


class Checkpointer(Hook):
    """Checkpoints (``out_dir/checkpoints/ckpt_XXXXXXX.pt``, the two newest kept) every ``period``
    steps and after the last one, with ``model_final.pt``; with ``final=False`` the caller saves its
    own output and the checkpoints, there only to resume a killed run, are deleted at the end.

    Tracks which checkpoint is known good for the non-finite guard: a checkpoint is unverified until
    a step on its weights gave a finite loss (:meth:`set_aside`)."""

    def __init__(self, out_dir: Path, period: int, extra: dict | None, meta: dict | None, final: bool = True):
        self.dir = Path(out_dir) / "checkpoints"
        self.period, self.extra, self.meta, self.final = period, extra, meta, final
        self.last_good: Path | None = None
        self.unverified: Path | None = None

    def resume(self, loop: Loop) -> int | None:
        """Load the newest checkpoint into the loop's objects; its step (None when there is none)."""
        path = ckpt_lib.last_checkpoint(self.dir)
        if path is None:
            if loop.main:
                print(f"--resume: no checkpoint in {self.dir}; starting from scratch")
            return None
        state = ckpt_lib.load(path, loop.model, loop.optimizer, loop.scheduler, loop.scaler, restore_rng=(loop.world == 1),
                              map_location=loop.device, data=loop.stream)
        if int(state["step"]) > loop.tcfg.max_steps:
            raise DistillError(f"{path}: the checkpoint is at step {int(state['step'])}, beyond max_steps {loop.tcfg.max_steps}; "
                               "give a max_steps >= the checkpoint's step to continue it (or train without --resume)")
        if loop.main:
            print(f"resuming from {path} at step {int(state['step'])}")
        # not known good until a step's loss on its weights is finite
        self.unverified, self.last_good = path, _previous_checkpoint(self.dir, path)
        return int(state["step"])

    def save(self, loop: Loop) -> Path:
        path = self.dir / f"ckpt_{loop.step:07d}.pt"
        if loop.main:
            data = loop.stream.state_dict() if loop.stream is not None else None
            ckpt_lib.save(path, loop.net, loop.optimizer, loop.scheduler, loop.step, scaler=loop.scaler, extra=self.extra, data=data)
            ckpt_lib.set_last(self.dir, path)
            for p in sorted(self.dir.glob("ckpt_*.pt"))[:-2]:  # keep the two newest
                p.unlink(missing_ok=True)
        dist_lib.barrier()
        return path

    def after_step(self, loop: Loop) -> None:
        if self.unverified is not None:  # the step just done on its weights gave a finite loss
            self.last_good, self.unverified = self.unverified, None
        if self.period and loop.step % self.period == 0 and loop.step < loop.tcfg.max_steps:
            self.unverified = self.save(loop)

    def after_train(self, loop: Loop) -> None:
        if not self.final:
            if loop.main:
                shutil.rmtree(self.dir, ignore_errors=True)
            dist_lib.barrier()
            return
        self.last_good = self.save(loop)
        if loop.main:
            ckpt_lib.save_model(loop.out_dir / "model_final.pt", loop.net, self.meta)

    def set_aside(self, main: bool) -> str:
        """On a non-finite loss: "<last good checkpoint>" plus, when the newest checkpoint holds the
        weights that gave it, a note that it became ``*.pt.nonfinite`` (``last_checkpoint`` goes back
        to the good one, or away, so ``--resume`` does not restart from it)."""
        where = str(self.last_good) if self.last_good is not None else "none saved yet"
        if self.unverified is None:
            return where
        bad = self.unverified
        aside = bad.with_name(bad.name + ".nonfinite")
        if main:
            if self.last_good is not None:
                ckpt_lib.set_last(self.dir, self.last_good)
            else:
                (self.dir / ckpt_lib.POINTER).unlink(missing_ok=True)
            if bad.is_file():
                bad.replace(aside)
        return f"{where} ({bad.name}, whose weights gave this loss, moved to {aside.name})"


def _previous_checkpoint(ckpt_dir: Path, path: Path) -> Path | None:
    """The newest checkpoint older than ``path`` (the steps after it ran with finite losses)."""
    older = [p for p in sorted(ckpt_dir.glob("ckpt_*.pt")) if p.name < path.name]
    return older[-1] if older else None
