"""A labeling job (:class:`LabelJob`, built from a config by :func:`make_job`) and the output
folder it owns.

Work is split into shards of ``shard_size`` consecutive images of the sorted list; each shard is
written atomically to ``<out>/shards/shard-NNNNN.json`` with a key of everything that determines
it (:meth:`LabelJob.shard_key`), so a rerun skips the shards whose key matches.

The labeler owns its output folder. ``<out>/manifest.json`` ({"tool": "distill label", "state":
"running" | "complete", "key": job_key(), "files": [...]}) is written first (state running) and,
when the run is complete, lists every file the run wrote (paths relative to --out, itself left
out). A folder is the labeler's when it is new or empty (hidden entries such as .DS_Store aside),
when it holds its manifest, or (an output of a distill without manifests) when it holds shards/
and nothing but the labeler's names (OUTPUT_FILES, OUTPUT_DIRS). Anything else is refused before
anything is written (:func:`check_output`). At the end of a run, files under shards/, semantic/
and yolo/ and the top-level OUTPUT_FILES that this run did not write (another image folder's PNGs
/ YOLO files, shards past the end, a format no longer asked for, temporary files of a killed run)
are removed; other entries (a user's notes beside the labels) are left alone
(:func:`finalize_output`).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from distill.data.images import image_root, relative_names, scan_images
from distill.errors import DistillError
from distill.files import safe_join, sha256_json, write_json
from distill.labels import formats
from distill.labels.filtering import FilterOptions, parse_class_thresh, source_thresholds
from distill.vocab import Vocabulary

FORMATS = ("coco", "yolo", "png")
LABELS_JSON = "labels.json"
SHARD_VERSION = 1
# What a run writes in its output folder, by name.
MANIFEST = "manifest.json"
SKIPPED_TXT = "skipped.txt"
OUTPUT_FILES = (LABELS_JSON, "failures.txt", SKIPPED_TXT, "summary.json", "metrics.json", "config.yaml", MANIFEST)
OUTPUT_DIRS = ("shards", "semantic", "yolo")
MANIFEST_TOOL = "distill label"


def shard_ranges(n: int, shard_size: int) -> list[range]:
    """The image indices of each shard of ``n`` images."""
    return [range(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


@dataclass
class LabelJob:
    """Everything one labeling run needs (built from a Config by :func:`make_job`)."""

    paths: list[Path]
    names: list[str]
    root: Path
    vocab: Vocabulary
    out: Path
    opts: FilterOptions
    formats: tuple[str, ...] = ("coco",)
    batch_size: int = 8
    num_workers: int = 0
    shard_size: int = 64
    model_hash: str = ""
    source_name: str = "teacher"
    model: str = ""
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, kind, why) the listing left out

    @functools.cached_property
    def stems(self) -> list[str]:
        """Output names (PNG / YOLO) per image, collision-free (formats.output_stems)."""
        return formats.output_stems(self.names)

    def base_key(self) -> dict:
        return {
            "v": SHARD_VERSION,
            "model": self.model_hash,
            "vocab": self.vocab.hash,
            "ids": list(self.vocab.ids),
            "filter": self.opts.info(self.vocab),
            "png": "png" in self.formats,
        }

    def shard_key(self, k: int, r: range) -> str:
        return sha256_json({**self.base_key(), "shard": k, "names": [self.names[i] for i in r], "stems": [self.stems[i] for i in r]})[:20]

    def shard_path(self, k: int) -> Path:
        return self.out / "shards" / f"shard-{k:05d}.json"

    def _read_shard(self, k: int, r: range) -> dict | None:
        """Shard ``k`` when it is written with the current key, else None."""
        p = self.shard_path(k)
        if not p.is_file():
            return None
        try:
            with open(p, "rb") as f:
                head = json.loads(f.read())
        except (OSError, json.JSONDecodeError):
            return None
        return head if isinstance(head, dict) and head.get("key") == self.shard_key(k, r) else None

    def shard_done(self, k: int, r: range) -> bool:
        return self._read_shard(k, r) is not None

    def png_path(self, i: int) -> Path:
        return safe_join(self.out / "semantic", self.stems[i] + ".png")

    def shard_outputs_done(self, k: int, r: range) -> bool:
        """Shard ``k`` is written with the current key and, with PNG output, every image it labeled
        has its semantic PNG (a deleted one makes the shard run again; YOLO files and labels.json
        are rewritten from the shards by every merge)."""
        head = self._read_shard(k, r)
        if head is None:
            return False
        if "png" not in self.formats:
            return True
        return all("error" in rec or self.png_path(int(rec["index"])).is_file() for rec in head.get("records", []))

    def job_key(self) -> dict:
        """What the output folder holds the labels of (recorded in ``manifest.json``)."""
        return {
            "images": str(self.root),
            "names": sha256_json(self.names)[:16],
            "vocab": self.vocab.hash,
            "formats": list(self.formats),
            "source": self.source_name,
            "model": self.model_hash,
            "filter": sha256_json(self.opts.info(self.vocab))[:16],
        }


def _is_tmp_of(name: str) -> bool:
    """A temporary file of :func:`~distill.files.atomic_path` for one of the labeler's files."""
    return name.startswith(".") and ".tmp" in name and any(name.startswith(f".{n}.") for n in OUTPUT_FILES)


def read_manifest(out: Path) -> dict | None:
    """``<out>/manifest.json`` when it is this labeler's, else None."""
    try:
        m = json.loads((Path(out) / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("tool") == MANIFEST_TOOL else None


def check_output(job: LabelJob) -> None:
    """Refuse, before anything is written, an ``--out`` that is not the labeler's (see above)."""
    out = job.out
    if not out.is_dir():
        return  # new (a file in the way is reported when the folder is created)
    try:
        names = sorted(e.name for e in out.iterdir())
    except OSError as e:
        raise DistillError(f"label.out: cannot read {out} ({e.strerror})") from None
    visible = [n for n in names if not n.startswith(".")]
    if not visible:
        return
    if read_manifest(out) is not None:
        return
    if MANIFEST in visible:
        raise DistillError(f"label.out: {out / MANIFEST} is not a manifest of distill label; give an empty or new --out")
    foreign = [n for n in visible if n not in OUTPUT_FILES and n not in OUTPUT_DIRS]

    def shown(ns: list[str]) -> str:
        return ", ".join(repr(n) for n in ns[:3]) + (f" and {len(ns) - 3} more" if len(ns) > 3 else "")

    if foreign:
        raise DistillError(f"label.out: {out} is not empty and holds files distill label did not write ({shown(foreign)}); "
                           "give an empty or new --out (the labeler owns its output folder)")
    if not (out / "shards").is_dir():
        raise DistillError(f"label.out: {out} is not empty ({shown(visible)}) and holds no {MANIFEST} of a labeling run; "
                           "give an empty or new --out (the labeler owns its output folder)")


def claim_output(job: LabelJob) -> None:
    """Create ``--out`` and mark it as this run's (manifest, state running). When the previous run
    there labeled something else, its final files go now, so a killed run leaves no stale labels.json."""
    out = job.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistillError(f"label.out: cannot create {out} ({e.strerror}: {e.filename})") from None
    old, key = read_manifest(out), job.job_key()
    if old is not None and old.get("key") != key:
        for n in OUTPUT_FILES:
            if n not in (MANIFEST, "config.yaml"):
                _remove(out / n)
    write_json(out / MANIFEST, {"tool": MANIFEST_TOOL, "version": 1, "state": "running", "key": key, "files": []})


def _remove(p: Path) -> None:
    try:
        if p.is_symlink() or p.is_file():
            p.unlink()
    except OSError as e:
        raise DistillError(f"label.out: cannot remove {p} ({e.strerror})") from None


def written_files(job: LabelJob, ok: Sequence[int], extra: Sequence[str] = ()) -> set[str]:
    """Paths (relative to --out) of every file a complete run writes; ``ok``: the labeled images."""
    files = {LABELS_JSON, "failures.txt", SKIPPED_TXT, "summary.json", "config.yaml", *extra}
    files |= {f"shards/shard-{k:05d}.json" for k in range(len(shard_ranges(len(job.paths), job.shard_size)))}
    if "png" in job.formats:
        files |= {"semantic/legend.json", "semantic/legend.png", *(f"semantic/{job.stems[i]}.png" for i in ok)}
    if "yolo" in job.formats:
        files |= {"yolo/classes.txt", *(f"yolo/labels/{job.stems[i]}.txt" for i in ok)}
    return files


def finalize_output(job: LabelJob, written: set[str]) -> None:
    """Remove the labeler's files that this run did not write; then the manifest (state complete)
    lists what it wrote."""
    root = job.out.resolve()
    for d in OUTPUT_DIRS:
        base = root / d
        if base.is_symlink() or not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base, topdown=False):
            for f in filenames:
                p = Path(dirpath, f)
                if p.relative_to(root).as_posix() not in written:
                    _remove(p)
            for dn in dirnames:
                q = Path(dirpath, dn)
                if q.is_symlink():
                    _remove(q)
                else:
                    try:
                        q.rmdir()  # only when empty
                    except OSError:
                        pass
        if not any(w.startswith(d + "/") for w in written):
            try:
                base.rmdir()
            except OSError:
                pass
    for name in sorted(os.listdir(root)):
        if (name in OUTPUT_FILES and name != MANIFEST and name not in written) or _is_tmp_of(name):
            _remove(root / name)
    write_json(job.out / MANIFEST, {"tool": MANIFEST_TOOL, "version": 1, "state": "complete", "key": job.job_key(),
                                    "files": sorted(written)})



def make_job(cfg, vocab: Vocabulary, model_hash: str = "") -> LabelJob:
    """The job of ``cfg.label`` over ``vocab``, every setting checked before anything is written
    or a model is loaded."""
    lcfg = cfg.label
    if not lcfg.images:
        raise DistillError("label.images: required (an image folder or a list file)")
    if not lcfg.out:
        raise DistillError("label.out: required (an output folder)")
    fmts = tuple(f.strip().lower() for f in lcfg.format if f.strip())
    bad = [f for f in fmts if f not in FORMATS]
    if not fmts:
        raise DistillError(f"label.format: empty (expected one or more of {', '.join(FORMATS)})")
    if bad:
        raise DistillError(f"label.format: {bad[0]!r} is not one of {', '.join(FORMATS)}")
    if "png" in fmts:
        formats.semantic_values(vocab)  # refuses, before anything is written, a vocabulary too large for a PNG
    for key in ("batch_size", "shard_size"):
        if getattr(lcfg, key) < 1:
            raise DistillError(f"label.{key}: expected a positive integer, got {getattr(lcfg, key)}")
    if lcfg.num_workers < 0:
        raise DistillError(f"label.num_workers: expected >= 0, got {lcfg.num_workers}")
    score_thresh, nms = source_thresholds(lcfg.source, lcfg.score_thresh, lcfg.nms)
    if not 0.0 <= score_thresh <= 1.0:
        raise DistillError(f"label.score_thresh: expected a value in [0, 1], got {score_thresh}")
    if not 0.0 <= nms <= 1.0:
        raise DistillError(f"label.nms: expected an IoU threshold in [0, 1] (0 = off), got {nms}")
    for key in ("top_k", "min_area", "max_side"):
        if getattr(lcfg, key) < 0:
            raise DistillError(f"label.{key}: expected >= 0{' (0 = full size)' if key == 'max_side' else ''}, got {getattr(lcfg, key)}")
    # --out and the image folder must not nest: an --out inside the images would be labeled by the
    # next run (its PNGs are images); images inside --out lie in a folder the labeler owns.
    src, out = Path(lcfg.images), Path(lcfg.out)
    out_r = out.resolve()
    if src.is_dir():
        img_r = src.resolve()
        if out_r == img_r or img_r in out_r.parents:
            raise DistillError(f"label.out: {out} is {'the image folder' if out_r == img_r else 'inside the image folder'} "
                               f"label.images {src}: the next run would label its own outputs; give an --out outside the image folder")
        if out_r in img_r.parents:
            raise DistillError(f"label.images: {src} is inside label.out {out}: the labeler owns its output folder and "
                               "would read its own outputs; give an --out outside the image folder")
    paths, skipped = scan_images(lcfg.images)
    inside = next((p for p in paths if out_r in p.parents), None)
    if inside is not None:
        raise DistillError(f"label.images: {src} names {inside}, inside label.out {out}: the labeler owns its output folder "
                           "and would read its own outputs; give an --out that holds none of the images")
    names = relative_names(lcfg.images, paths)
    opts = FilterOptions(score_thresh, parse_class_thresh(lcfg.class_thresh, vocab), lcfg.top_k, nms, lcfg.min_area)
    return LabelJob(paths, names, image_root(lcfg.images, paths), vocab, out, opts, fmts, lcfg.batch_size,
                    lcfg.num_workers, lcfg.shard_size, model_hash, lcfg.source, lcfg.model, skipped)
