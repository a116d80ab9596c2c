"""The stage runner: the only place that decides whether a stage is up to date.

Each stage declares the config sections it reads, the stages it depends on, and the files it
produces. After a stage succeeds the runner writes ``{work_dir}/manifests/<stage>.json`` with:
its key (a hash of its config sections, its upstream stages' keys and output digests), package
versions, wall time, and a sha256 of each declared output. A rerun skips a stage whose manifest
key matches and whose outputs are intact; ``force`` reruns a stage and everything downstream;
``until`` stops after a stage. Stage outputs are written atomically and the manifest last, so a
run killed mid-stage reruns that stage: with the same key it resumes (:func:`resuming`, training
stages continue from their last checkpoint); with another key the runner first removes the
checkpoints the stage declares, so it can never continue from another config's weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import importlib.metadata
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from distill.config import Config, config_hash, to_dict
from distill.errors import DistillError
from distill.files import sha256_file, sha256_json, write_json, write_text

StageFn = Callable[[Config], Any]

_RESUMING: contextvars.ContextVar[bool] = contextvars.ContextVar("distill_stage_resuming", default=False)


def section_value(cfg: Config, sec: str):
    """``cfg.<sec>`` for a section name or a dotted key (``det.backbone_pretrain``)."""
    val: Any = cfg
    for part in sec.split("."):
        val = getattr(val, part)
    return val


def resuming() -> bool:
    """True inside a stage that was started before with the same key and did not finish (a killed
    run): training stages then continue from their last checkpoint instead of starting over. A
    stage whose inputs changed since it was started starts from scratch."""
    return _RESUMING.get()


@dataclass(frozen=True)
class Stage:
    """One node of the graph.

    ``sections``: names of Config sections (or ``"work_dir"``, or a dotted key inside a section
    such as ``"det.backbone_pretrain"``) whose values change the output.
    ``outputs``: paths relative to work_dir that must exist after the stage (their sha256 goes into
    the manifest and into downstream keys). ``fn`` does the work given the resolved Config.
    ``view``: the Config the stage reads, when not the pipeline's as is (e.g. a key blanked); the
    stage runs on it AND is keyed on it, so a key it never reads cannot make it rerun.
    ``inputs``: dotted config keys naming files outside the run that the stage reads (checked
    before anything runs, so a missing dataset stops the run at once).
    ``checkpoints``: training folders (relative to work_dir, or a function of the stage's Config
    giving them) whose ``checkpoints/`` and ``model_final.pt`` the runner removes when the stage
    starts afresh (not resuming).
    """

    name: str
    fn: StageFn
    deps: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    description: str = ""
    view: Callable[[Config], Config] | None = None
    inputs: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] | Callable[[Config], Sequence[str | Path]] = ()

    def config(self, cfg: Config) -> Config:
        return self.view(cfg) if self.view else cfg


@dataclass
class StageResult:
    name: str
    status: str  # running | ran | skipped | failed
    seconds: float = 0.0
    note: str = ""


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("distill", "torch", "torchvision", "open_clip_torch"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def unknown_stage(name: str, valid: Sequence[str], where: str = "") -> DistillError:
    """The one-line error for a stage name not in ``valid``, with the closest valid name."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    prefix = f"{where}: " if where else ""
    return DistillError(f"{prefix}unknown stage {name!r}; valid stages: {', '.join(valid)}{hint}")


def _remove_checkpoints(work: Path, folders: Sequence[str | Path]) -> None:
    for rel in folders:
        shutil.rmtree(work / rel / "checkpoints", ignore_errors=True)
        (work / rel / "model_final.pt").unlink(missing_ok=True)


class Pipeline:
    """Runs a list of stages in dependency order with manifests."""

    def __init__(self, stages: Sequence[Stage]):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError("duplicate stage names")
        self.stages = {s.name: s for s in stages}
        for s in stages:
            for d in s.deps:
                if d not in self.stages:
                    raise ValueError(f"stage {s.name!r} depends on unknown stage {d!r}")
        self.order = self._toposort(names)

    def _toposort(self, names: list[str]) -> list[str]:
        done: list[str] = []
        visiting: set[str] = set()

        def visit(n: str) -> None:
            if n in done:
                return
            if n in visiting:
                raise ValueError(f"cycle through stage {n!r}")
            visiting.add(n)
            for d in self.stages[n].deps:
                visit(d)
            visiting.discard(n)
            done.append(n)

        for n in names:
            visit(n)
        return done

    def check_name(self, name: str, where: str = "") -> str:
        """``name`` if it is a stage of this graph, else a one-line :class:`DistillError`."""
        if name not in self.stages:
            raise unknown_stage(name, self.order, where)
        return name

    def downstream(self, name: str) -> set[str]:
        out = {name}
        changed = True
        while changed:
            changed = False
            for s in self.stages.values():
                if s.name not in out and any(d in out for d in s.deps):
                    out.add(s.name)
                    changed = True
        return out

    # -- manifests ---------------------------------------------------------------------------
    @staticmethod
    def manifest_path(cfg: Config, name: str) -> Path:
        return Path(cfg.work_dir) / "manifests" / f"{name}.json"

    def read_manifest(self, cfg: Config, name: str) -> dict | None:
        p = self.manifest_path(cfg, name)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            return None  # a corrupt manifest means "not done"

    def stage_key(self, cfg: Config, name: str) -> str:
        s = self.stages[name]
        parts: dict[str, Any] = {"stage": name}
        cfg = s.config(cfg)
        for sec in s.sections:
            val = section_value(cfg, sec)
            parts[sec] = to_dict(val) if dataclasses.is_dataclass(val) else val
        for d in s.deps:
            m = self.read_manifest(cfg, d)
            parts[f"dep:{d}"] = (m or {}).get("key", "missing"), (m or {}).get("outputs", {})
        return sha256_json(parts)[:16]

    def _outputs_intact(self, cfg: Config, manifest: dict) -> bool:
        for rel, digest in manifest.get("outputs", {}).items():
            p = Path(cfg.work_dir) / rel
            if not p.is_file() or sha256_file(p) != digest:
                return False
        return True

    def is_fresh(self, cfg: Config, name: str) -> bool:
        m = self.read_manifest(cfg, name)
        return bool(m) and m.get("key") == self.stage_key(cfg, name) and self._outputs_intact(cfg, m)

    def _write_manifest(self, cfg: Config, name: str, key: str, seconds: float) -> None:
        s = self.stages[name]
        seen = s.config(cfg)  # what the stage read (its view)
        outputs = {}
        for rel in s.outputs:
            p = Path(cfg.work_dir) / rel
            if not p.is_file():
                raise DistillError(f"stage {name!r} finished without writing {p}")
            outputs[rel] = sha256_file(p)
        hashes = {}
        for sec in s.sections:
            v = section_value(seen, sec)
            hashes[sec] = config_hash(v) if dataclasses.is_dataclass(v) else str(v)
        write_json(
            self.manifest_path(cfg, name),
            {
                "stage": name,
                "key": key,
                "config_hash": hashes,
                "deps": {d: (self.read_manifest(cfg, d) or {}).get("key") for d in s.deps},
                "outputs": outputs,
                "versions": _versions(),
                "wall_time_s": round(seconds, 3),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )

    # -- running -----------------------------------------------------------------------------
    def _selected(self, force: Sequence[str], until: str | None) -> tuple[set[str], list[str]]:
        """The forced stages (each ``--force`` stage and everything downstream) and the stages in
        order up to ``until``; unknown names are one-line errors."""
        forced: set[str] = set()
        for f in force:
            forced |= self.downstream(self.check_name(f, "--force"))
        order = list(self.order)
        if until:
            order = order[: order.index(self.check_name(until, "--until")) + 1]
        return forced, order

    def plan(self, cfg: Config, *, force: Sequence[str] = (), until: str | None = None) -> list[str]:
        """The stages a run would execute: forced, stale, or downstream of one that is."""
        forced, order = self._selected(force, until)
        stale: set[str] = set()
        for n in order:
            if n in forced or any(d in stale for d in self.stages[n].deps) or not self.is_fresh(cfg, n):
                stale.add(n)
        return [n for n in order if n in stale]

    def run(
        self,
        cfg: Config,
        *,
        force: Sequence[str] = (),
        until: str | None = None,
        on_event: Callable[[StageResult], None] | None = None,
    ) -> list[StageResult]:
        forced, order = self._selected(force, until)
        emit = on_event or (lambda r: None)
        results: list[StageResult] = []
        for name in order:
            if name not in forced and self.is_fresh(cfg, name):
                wall = (self.read_manifest(cfg, name) or {}).get("wall_time_s", 0.0)
                results.append(StageResult(name, "skipped", wall, "up to date"))
                emit(results[-1])
                continue
            missing = [d for d in self.stages[name].deps if not self.is_fresh(cfg, d)]
            if missing:
                raise DistillError(f"stage {name!r} needs {', '.join(missing)} first (run without --until, or run those stages)")
            results.append(self._run_stage(cfg, name, emit))
            emit(results[-1])
        return results

    def _run_stage(self, cfg: Config, name: str, emit: Callable[[StageResult], None]) -> StageResult:
        """Run one stage: resume when its ``.started`` marker holds this key (a killed run with the
        same inputs), else remove its declared checkpoints first; the manifest is written last."""
        s = self.stages[name]
        emit(StageResult(name, "running"))
        key = self.stage_key(cfg, name)
        started = self.manifest_path(cfg, name).with_suffix(".started")
        resume = started.is_file() and started.read_text().strip() == key
        if not resume:
            folders = s.checkpoints(s.config(cfg)) if callable(s.checkpoints) else s.checkpoints
            _remove_checkpoints(Path(cfg.work_dir), folders)
        write_text(started, key + "\n")
        t0 = time.perf_counter()
        token = _RESUMING.set(resume)
        with stage_log(Path(cfg.work_dir) / "logs" / f"{name}.log", append=resume) as log:
            log.info("stage %s: %s (key %s)", name, "resumed" if resume else "started", key)
            try:
                note = s.fn(s.config(cfg))
            except BaseException as e:
                log.info("stage %s: failed after %.1f s: %s: %s", name, time.perf_counter() - t0, type(e).__name__, e)
                emit(StageResult(name, "failed", time.perf_counter() - t0))
                raise
            finally:
                _RESUMING.reset(token)
            dt = time.perf_counter() - t0
            log.info("stage %s: done in %.1f s %s", name, dt, note or "")
        self._write_manifest(cfg, name, key, dt)
        started.unlink(missing_ok=True)
        return StageResult(name, "ran", dt, str(note) if note else "")


STAGE_LINES = "distill.stage"  # the stage's start / end and the training loops' metric lines: its log file only


@contextlib.contextmanager
def stage_log(path: Path, append: bool = False):
    """While the stage runs, ``path`` gets the ``distill`` logger's records (the warnings the
    console shows) and the lines of the :data:`STAGE_LINES` logger (the stage's start and end, the
    training loops' JSON metric lines, :meth:`distill.engine.train.Loop.log`), which go nowhere
    else. The ``distill`` logger's level and propagation are left as they are. Yields the
    :data:`STAGE_LINES` logger."""
    import logging

    log, lines = logging.getLogger("distill"), logging.getLogger(STAGE_LINES)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    state = (lines.level, lines.propagate)
    lines.setLevel(logging.INFO)
    lines.propagate = False
    log.addHandler(handler)
    lines.addHandler(handler)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        lines.removeHandler(handler)
        lines.setLevel(state[0])
        lines.propagate = state[1]
        handler.close()


def stage_timings(cfg: Config) -> dict[str, float]:
    """Wall time of each finished stage, read from the manifests (for the report), in the order
    the stages finished."""
    rows = []
    d = Path(cfg.work_dir) / "manifests"
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            try:
                m = json.loads(p.read_text())
                rows.append((str(m.get("finished", "")), m["stage"], float(m.get("wall_time_s", 0.0))))
            except (json.JSONDecodeError, KeyError, OSError):
                continue
    return {stage: t for _, stage, t in sorted(rows)}
