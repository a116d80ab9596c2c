"""Pseudo-labels: label any image folder with any vocabulary, in resumable shards.

>>> summary = label(cfg)     # cfg.label.images / vocab / model / source / out ...

Sources (``cfg.label.source``: the frozen teacher, a ViLD or a segmentation student) are in
:mod:`distill.labels.sources`.

Working resolution (teacher source): an image whose longer side exceeds ``label.max_side`` is
decoded at that size (:func:`~distill.data.images.load_image_scaled`; a JPEG is never decoded at
full size); candidates (kept as boxes + box-limited masks, :class:`BoxMasks`, the top
``max_proposals`` chosen before any mask is cut out) and the teacher's crops come from it, and
:func:`to_full_size` maps boxes and masks to the full image, so COCO / YOLO / PNG outputs are in
full-image pixels and peak memory is bounded by the working size, not the photo's (full-size
arrays: the semantic PNG and one mask at a time while it is RLE-encoded or painted). Candidate
``min_area`` is in working pixels; the filter's ``min_area`` in full-image pixels. Images within
``max_side`` take exactly the full-size path.

Work is split into shards of ``shard_size`` consecutive images of the sorted list; under torchrun
rank ``r`` of ``W`` takes shards ``r, r + W, ...`` (rank-strided shards rather than strided
images, so a rerun with a different world size reuses every finished shard). Each shard is written
atomically to ``<out>/shards/shard-NNNNN.json`` with a key of everything that determines it; a
rerun skips shards whose key matches, so a killed run resumes and the merged result equals an
uninterrupted run's (batches never cross shard boundaries, so each shard sees the same batches).
Rank 0 then streams the shards into ``<out>/labels.json`` (COCO), ``<out>/yolo/`` and
``<out>/failures.txt``; semantic PNGs are written per image with the shard (a shard whose PNGs were
deleted is labeled again on rerun). ``<out>/skipped.txt`` names what the folder listing left out
(hidden entries, links to folders, GIFs and other non-images), counted in the summary.

The output folder is the labeler's (:func:`check_output`): it must not nest with the image folder,
a non-empty folder it did not write is refused, and ``<out>/manifest.json`` lists what the last
complete run wrote; files of an earlier run that this one does not write (another image folder's
PNG / YOLO files, another format) are removed when the run completes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from distill.data.images import SKIP_FOLDER_LINK, SKIP_HIDDEN, SKIP_UNSUPPORTED, load_image, load_image_scaled, relative_names, scan_images
from distill.errors import DistillError
from distill.files import atomic_path, safe_join, sha256_json, write_json, write_text
from distill.labels import formats
from distill.labels.sources import BoxMasks, build_source
from distill.vocab import Vocabulary, load_vocab

log = logging.getLogger(__name__)

FORMATS = ("coco", "yolo", "png")
LABELS_JSON = "labels.json"
SHARD_VERSION = 1
# The output folder is the labeler's (see :func:`check_output`): what a run writes there, by name.
MANIFEST = "manifest.json"
SKIPPED_TXT = "skipped.txt"
OUTPUT_FILES = (LABELS_JSON, "failures.txt", SKIPPED_TXT, "summary.json", "metrics.json", "config.yaml", MANIFEST)
OUTPUT_DIRS = ("shards", "semantic", "yolo")
MANIFEST_TOOL = "distill label"


# ------------------------------------------------------------------------------------ filtering


@dataclass(frozen=True)
class FilterOptions:
    """How raw predictions become labels (recorded in the output's ``info``).

    ``class_thresh`` maps vocabulary index -> score threshold (overrides ``score_thresh``);
    ``nms`` is the class-wise IoU threshold in [0, 1] (0 or 1 = off); ``min_area`` in pixels (mask area
    when masks exist, else box area); ``top_k`` per image after NMS (0 = all).
    """

    score_thresh: float = 0.3
    class_thresh: tuple[tuple[int, float], ...] = ()
    top_k: int = 100
    nms: float = 0.5
    min_area: float = 16.0

    def info(self, vocab: Vocabulary) -> dict:
        return {
            "score_thresh": self.score_thresh,
            "class_thresh": {vocab.names[i]: t for i, t in self.class_thresh},
            "top_k": self.top_k,
            "nms": self.nms,
            "min_area": self.min_area,
        }


def _split_class_thresh(text: str) -> list[str]:
    """``"cat, domestic=0.5, dog=0.2"`` -> ``["cat, domestic=0.5", "dog=0.2"]``: a comma ends an
    entry only after its ``=threshold``, so a class name may hold commas (one class a line in a
    .txt vocabulary); a trailing part without ``=`` is returned as it is (an error for the caller)."""
    out: list[str] = []
    cur: list[str] = []
    for seg in text.split(","):
        cur.append(seg)
        if "=" in seg:
            out.append(",".join(cur).strip())
            cur = []
    if cur and ",".join(cur).strip():
        out.append(",".join(cur).strip())
    return [p for p in out if p]


def _class_index(name: str, vocab: Vocabulary, where: str) -> int:
    """The vocabulary index of ``name`` (a class or a synonym); spaces around commas do not count
    (``cat,domestic`` is ``cat, domestic``: a config override's list loses them)."""
    import re

    from distill.vocab import name_key

    try:
        return vocab.index(name)
    except DistillError as e:
        def squeeze(x: str) -> str:
            return re.sub(r"\s*,\s*", ",", name_key(x))

        key = squeeze(name)
        for i, (n, syn) in enumerate(zip(vocab.names, vocab.synonyms)):
            if squeeze(n) == key or key in (squeeze(x) for x in syn):
                return i
        raise DistillError(f"{where}: {e}") from None


def parse_class_thresh(items: Sequence[str], vocab: Vocabulary, where: str = "label.class_thresh") -> tuple[tuple[int, float], ...]:
    """``["red star=0.5", "blue circle=0.2"]`` (or one comma-separated string) -> ((index, thr), ...).

    A comma separates two entries only after a threshold, so a class whose name holds commas
    (``"cat, domestic=0.5"``) gets its own. A prompt that maps onto a class (a synonym) names
    that class."""
    out: dict[int, float] = {}
    for part in _split_class_thresh(",".join(str(x) for x in items)):
        if "=" not in part:
            raise DistillError(f"{where}: {part!r}: expected 'class name=threshold'")
        name, val = (x.strip() for x in part.rsplit("=", 1))
        try:
            thr = float(val)
        except ValueError:
            raise DistillError(f"{where}: {part!r}: threshold {val!r} is not a number") from None
        if not 0.0 <= thr <= 1.0:
            raise DistillError(f"{where}: {part!r}: threshold must be in [0, 1]")
        out[_class_index(name, vocab, where)] = thr
    return tuple(sorted(out.items()))


def filter_predictions(pred: dict, opts: FilterOptions, num_classes: int) -> dict:
    """Thresholds (global / per class), minimum area, class-wise NMS, top-k; sorted by score.

    ``pred``: ``boxes`` (N, 4) XYXY, ``scores`` (N,), ``labels`` (N,) int64, optional ``masks``
    (N, H, W) bool (or :class:`BoxMasks`). One boolean keep-mask is applied to every field (SAM's ``MaskData.filter``).
    """
    boxes = pred["boxes"].float().reshape(-1, 4)
    scores = pred["scores"].float().reshape(-1)
    labels = pred["labels"].long().reshape(-1)
    n = scores.numel()
    thr = torch.full((num_classes,), float(opts.score_thresh))
    for i, t in opts.class_thresh:
        thr[i] = t
    keep = scores >= thr[labels] if n else torch.zeros(0, dtype=torch.bool)
    masks = pred.get("masks")
    if isinstance(masks, BoxMasks):
        area = masks.areas() if n else torch.zeros(0)
    elif masks is not None:
        area = masks.reshape(n, -1).sum(1).float() if n else torch.zeros(0)
    else:
        area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep &= area >= opts.min_area
    idx = torch.nonzero(keep).flatten()
    if idx.numel() and 0.0 < opts.nms < 1.0:
        k = torchvision.ops.batched_nms(boxes[idx], scores[idx], labels[idx], opts.nms)
        idx = idx[k]
    # Deterministic order: score descending, ties by original index.
    idx = idx.sort().values
    sel = idx[torch.sort(-scores[idx], stable=True).indices]
    if opts.top_k > 0:
        sel = sel[: opts.top_k]
    out = {"boxes": boxes[sel], "scores": scores[sel], "labels": labels[sel]}
    if masks is not None:
        out["masks"] = masks[sel]
    return out


# ------------------------------------------------------------------------------------ data


class _Images(Dataset):
    """Global index -> (index, (3, h, w) uint8 tensor or None, error message or None, extra,
    (H, W) of the full image or None).

    With ``max_side`` > 0 an image is decoded with its longer side at most ``max_side``
    (:func:`~distill.data.images.load_image_scaled`; h, w <= H, W), else at full size.
    ``prepare(array (h, w, 3) uint8)`` (a source's per-image CPU work, e.g. proposals) runs here,
    so it runs in the decoding workers."""

    def __init__(self, paths: Sequence[Path], prepare: Callable | None = None, max_side: int = 0):
        self.paths = list(paths)
        self.prepare = prepare
        self.max_side = int(max_side)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            if self.max_side > 0:
                arr, full = load_image_scaled(self.paths[i], self.max_side)
            else:
                arr = load_image(self.paths[i])
                full = arr.shape[:2]
        except DistillError as e:
            return i, None, str(e), None, None
        extra = self.prepare(arr) if self.prepare is not None else None
        return i, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), None, extra, (int(full[0]), int(full[1]))


def to_full_size(pred: dict, size: tuple[int, int], full: tuple[int, int]) -> dict:
    """A source's prediction on an image decoded at ``size`` (h, w) -> the full image's (H, W)
    pixels: boxes scaled, masks read at the full size (box-limited, :class:`BoxMasks`), a
    ``semantic`` map resized (nearest). Unchanged when the sizes are equal."""
    if tuple(size) == tuple(full):
        return pred
    (h, w), (H, W) = size, full
    out = dict(pred)
    out["boxes"] = pred["boxes"].float().reshape(-1, 4) * torch.tensor([W / w, H / h, W / w, H / h])
    masks = pred.get("masks")
    if masks is not None:
        out["masks"] = (masks if isinstance(masks, BoxMasks) else BoxMasks.from_dense(np.asarray(masks))).at((H, W))
    if "semantic" in pred:
        out["semantic"] = cv2.resize(np.asarray(pred["semantic"], np.uint8), (W, H), interpolation=cv2.INTER_NEAREST)
    return out



def _collate_list(batch):
    return batch


def _shard_ranges(n: int, shard_size: int) -> list[range]:
    return [range(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def _rank_world() -> tuple[int, int]:
    try:
        from distill.engine.distributed import get_rank, get_world_size, is_dist

        if is_dist():
            return get_rank(), get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ------------------------------------------------------------------------------------ labeling


@dataclass
class LabelJob:
    """Everything one labeling run needs (built from a Config by :func:`label`)."""

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


def _annotations(pred: dict, vocab: Vocabulary, with_masks: bool) -> list[dict]:
    anns = []
    boxes = pred["boxes"].tolist()
    scores = pred["scores"].tolist()
    labels = pred["labels"].tolist()
    masks = pred.get("masks")
    for j, (b, s, l) in enumerate(zip(boxes, scores, labels)):
        xywh = [round(v, 2) for v in formats.xyxy_to_xywh(b)]
        a = {"category_id": int(vocab.ids[l]), "bbox": xywh, "score": round(float(s), 5), "iscrowd": 0}
        if isinstance(masks, BoxMasks) and with_masks:  # full-size RLE, one mask at a time
            a["segmentation"] = masks.rle(j)
            a["area"] = masks.area(j)
        elif masks is not None and with_masks:
            m = masks[j].numpy()
            a["segmentation"] = formats.mask_to_rle(m)
            a["area"] = int(m.sum())
        else:
            a["area"] = round(xywh[2] * xywh[3], 2)
        anns.append(a)
    return anns


def run_labeling(
    job: LabelJob,
    source: Callable[[list[torch.Tensor]], list[dict]],
    *,
    rank: int = 0,
    world_size: int = 1,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Label this rank's pending shards (skipping finished ones); return counts for this rank.

    ``on_shard(k)`` is called after shard ``k`` is written (tests inject a kill there)."""
    n = len(job.paths)
    ranges = _shard_ranges(n, job.shard_size)
    from distill.engine.distributed import rank_shards

    mine = rank_shards(len(ranges), rank, world_size)
    pending = [k for k in mine if not job.shard_outputs_done(k, ranges[k])]  # missing PNGs are redone
    values = formats.semantic_values(job.vocab) if "png" in job.formats else []  # only PNGs have a class-count limit
    batches = [list(ranges[k])[i : i + job.batch_size] for k in pending for i in range(0, len(ranges[k]), job.batch_size)]
    stats = {"shards_total": len(mine), "shards_skipped": len(mine) - len(pending), "images": 0, "failures": 0, "annotations": 0}
    if not batches:
        return stats
    prepare = getattr(source, "prepare", None)
    max_side = int(getattr(source, "max_side", 0) or 0)  # the teacher source works at a bounded size
    loader = DataLoader(
        _Images(job.paths, prepare, max_side), batch_sampler=batches, num_workers=job.num_workers, collate_fn=_collate_list,
        persistent_workers=False, prefetch_factor=2 if job.num_workers > 0 else None,
    )
    shard_of = {i: k for k in pending for i in ranges[k]}
    records: dict[int, dict[int, dict]] = {}
    want_png = "png" in job.formats
    with torch.inference_mode():
        for batch in loader:
            ok = [(i, im, ex, full) for i, im, err, ex, full in batch if im is not None]
            if not ok:
                preds = []
            elif prepare is not None:
                preds = source([im for _, im, _, _ in ok], [ex for _, _, ex, _ in ok])
            else:
                preds = source([im for _, im, _, _ in ok])
            for (i, im, _, full), pred in zip(ok, preds):
                pred = to_full_size(pred, (int(im.shape[1]), int(im.shape[2])), full)  # outputs in full-image pixels
                pred = filter_predictions(pred, job.opts, len(job.vocab))
                h, w = full
                rec = {"index": i, "file_name": job.names[i], "width": w, "height": h,
                       "annotations": _annotations(pred, job.vocab, True)}
                if want_png:
                    if "semantic" in pred:
                        sem = pred["semantic"]
                    elif "masks" in pred:
                        sem = formats.paint_semantic(pred["masks"].numpy(), pred["labels"].numpy(), pred["scores"].numpy(), values, (h, w))
                    else:  # boxes only: paint boxes
                        bm = np.zeros((len(pred["scores"]), h, w), bool)
                        for j, (x0, y0, x1, y1) in enumerate(pred["boxes"].round().long().tolist()):
                            bm[j, max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
                        sem = formats.paint_semantic(bm, pred["labels"].numpy(), pred["scores"].numpy(), values, (h, w))
                    formats.write_semantic_png(job.png_path(i), np.asarray(sem), values)
                records.setdefault(shard_of[i], {})[i] = rec
                stats["images"] += 1
                stats["annotations"] += len(rec["annotations"])
            for i, im, err, *_ in batch:
                if im is None:
                    records.setdefault(shard_of[i], {})[i] = {"index": i, "file_name": job.names[i], "error": err}
                    stats["failures"] += 1
            # A shard is complete when every image has a record (batches never cross shards).
            for k in sorted({shard_of[b[0]] for b in batch}):
                if len(records.get(k, {})) == len(ranges[k]):
                    recs = records.pop(k)
                    write_json(job.shard_path(k), {"key": job.shard_key(k, ranges[k]), "shard": k,
                                                   "records": [recs[i] for i in ranges[k]]}, indent=None)
                    if on_shard is not None:
                        on_shard(k)
    return stats


def _iter_records(job: LabelJob) -> Iterator[dict]:
    for k, r in enumerate(_shard_ranges(len(job.paths), job.shard_size)):
        if not job.shard_done(k, r):
            raise DistillError(f"{job.shard_path(k)}: shard missing or stale; rerun the same command to finish (resume skips finished shards)")
        with open(job.shard_path(k), "rb") as f:
            yield from json.loads(f.read())["records"]


def merge_shards(job: LabelJob, info: dict) -> dict:
    """Stream every shard into ``labels.json`` (COCO), ``yolo/`` and ``failures.txt``.

    Image ids are 1 + the index in the sorted image list, annotation ids 1.. in (image, score)
    order, so the result depends only on the inputs, not on how the run was split or resumed."""
    out = job.out
    cat_to_index = {cid: i for i, cid in enumerate(job.vocab.ids)}
    n_img = n_ann = 0
    failures: list[str] = []
    ok: list[int] = []  # indices of the labeled images (their PNG / YOLO outputs exist)
    with atomic_path(out / LABELS_JSON) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"info": ' + json.dumps(info) + ',\n"licenses": [],\n"categories": ' + json.dumps(job.vocab.categories()) + ',\n"images": [')
            first = True
            for rec in _iter_records(job):
                if "error" in rec:
                    continue
                img = {"id": rec["index"] + 1, "file_name": rec["file_name"], "width": rec["width"], "height": rec["height"]}
                f.write(("\n" if first else ",\n") + json.dumps(img))
                first = False
            f.write('],\n"annotations": [')
            first = True
            for rec in _iter_records(job):
                if "error" in rec:
                    failures.append(f"{rec['file_name']}\t{rec['error']}")
                    continue
                n_img += 1
                ok.append(int(rec["index"]))
                for a in rec["annotations"]:
                    n_ann += 1
                    a = {"id": n_ann, "image_id": rec["index"] + 1, **a}
                    f.write(("\n" if first else ",\n") + json.dumps(a))
                    first = False
                if "yolo" in job.formats:
                    txt = formats.yolo_lines(rec["annotations"], rec["width"], rec["height"], cat_to_index)
                    formats.write_yolo_file(out / "yolo" / "labels", job.stems[rec["index"]], txt)
            f.write("]}\n")
    write_text(out / "failures.txt", "".join(line + "\n" for line in failures))
    if "yolo" in job.formats:
        formats.write_classes(out / "yolo", job.vocab)
    return {"images": n_img, "annotations": n_ann, "failures": len(failures), "ok": ok}


# ------------------------------------------------------------------------------------ output folder
#
# The labeler owns its output folder. ``<out>/manifest.json`` ({"tool": "distill label", "state":
# "running" | "complete", "key": job_key(), "files": [...]}) is written first (state running) and,
# when the run is complete, lists every file the run wrote (paths relative to --out, itself left
# out). A folder is the labeler's when it is new or empty (hidden entries such as .DS_Store aside),
# when it holds its manifest, or (an output of a distill without manifests) when it holds shards/
# and nothing but the labeler's names (OUTPUT_FILES, OUTPUT_DIRS). Anything else is refused before
# anything is written. At the end of a run, files under shards/, semantic/ and yolo/ and the
# top-level OUTPUT_FILES that this run did not write (another image folder's PNGs / YOLO files,
# shards past the end, a format no longer asked for, temporary files of a killed run) are removed;
# other entries (a user's notes beside the labels) are left alone.


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
    files |= {f"shards/shard-{k:05d}.json" for k in range(len(_shard_ranges(len(job.paths), job.shard_size)))}
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
    if not 0.0 <= lcfg.score_thresh <= 1.0:
        raise DistillError(f"label.score_thresh: expected a value in [0, 1], got {lcfg.score_thresh}")
    if not 0.0 <= lcfg.nms <= 1.0:
        raise DistillError(f"label.nms: expected an IoU threshold in [0, 1] (0 = off), got {lcfg.nms}")
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
    from distill.data.images import image_root

    opts = FilterOptions(lcfg.score_thresh, parse_class_thresh(lcfg.class_thresh, vocab), lcfg.top_k, lcfg.nms, lcfg.min_area)
    return LabelJob(paths, names, image_root(lcfg.images, paths), vocab, out, opts, fmts, lcfg.batch_size,
                    lcfg.num_workers, lcfg.shard_size, model_hash, lcfg.source, lcfg.model, skipped)


def label_vocab(cfg) -> Vocabulary:
    """``label.vocab``, else ``data.vocab``, else the categories of ``data.train_full_json``
    (with their base/novel split) when that file exists."""
    src = cfg.label.vocab or cfg.data.vocab
    if not src and cfg.data.train_full_json and Path(cfg.data.train_full_json).is_file():
        src = cfg.data.train_full_json
    if not src:
        raise DistillError("label.vocab: required (a vocabulary file or an inline list such as 'red star,crimson star=red star')")
    return load_vocab(src, cfg.data.split_file or None)


def label(cfg, *, source=None, on_shard: Callable[[int], None] | None = None) -> dict:
    """Label ``cfg.label.images`` with ``cfg.label.vocab``; write ``<out>/labels.json`` (+ yolo,
    semantic PNGs, failures.txt, skipped.txt, summary.json, manifest.json, and metrics.json when
    ``cfg.label.gt`` is set).

    ``source`` overrides :func:`build_source` (tests pass a random teacher's source)."""
    from distill.config import save_config
    from distill.engine.device import get_device

    t0 = time.time()
    vocab = label_vocab(cfg)
    job = make_job(cfg, vocab)  # the images, --out and options are checked before the model loads
    check_output(job)  # on every rank, before any rank writes (init_distributed below waits for all)
    gt = gt_name = None
    if cfg.label.gt:  # read, validated and matched to the images' names before anything is labelled
        from distill.labels.quality import check_gt_matches, load_label_gt

        gt, gt_name = load_label_gt(cfg.label.gt)
        check_gt_matches(gt, job.names, gt_name)
    if source is None:
        device = get_device(cfg.teacher.device)
        source, model_hash = build_source(cfg, vocab, device)
    else:
        model_hash = getattr(source, "fingerprint", "custom")
    job.model_hash = model_hash
    try:
        from distill.engine.distributed import barrier, init_distributed

        init_distributed()
    except ImportError:  # pragma: no cover
        barrier = lambda: None  # noqa: E731
    rank, world = _rank_world()
    if rank == 0:
        claim_output(job)
        if "png" in job.formats:
            formats.write_legend(job.out / "semantic", vocab)
    stats = run_labeling(job, source, rank=rank, world_size=world, on_shard=on_shard)
    barrier()
    if rank != 0:
        return stats
    info = {
        "description": "distill pseudo-labels",
        "source": job.source_name,
        "model": job.model or "teacher",
        "model_hash": model_hash,
        "vocab_hash": vocab.hash,
        "vocab_source": vocab.source,
        "images_root": str(job.root),
        **job.opts.info(vocab),
        "formats": list(job.formats),
    }
    merged = merge_shards(job, info)
    write_text(job.out / SKIPPED_TXT, "".join(f"{name}\t{why}\n" for name, _, why in job.skipped))
    save_config(cfg, job.out / "config.yaml")
    seconds = time.time() - t0
    kinds = [kind for _, kind, _ in job.skipped]
    summary = {
        "labels/images": merged["images"],
        "labels/annotations": merged["annotations"],
        "labels/failures": merged["failures"],
        # left out by the listing, named with the reason in skipped.txt
        "labels/skipped_hidden": kinds.count(SKIP_HIDDEN),
        "labels/skipped_folder_links": kinds.count(SKIP_FOLDER_LINK),
        "labels/skipped_unsupported": kinds.count(SKIP_UNSUPPORTED),
        "labels/shards_skipped": stats["shards_skipped"],
        "labels/seconds": round(seconds, 3),
        "labels/images_per_s": round(stats["images"] / seconds, 3) if seconds > 0 else 0.0,
    }
    write_json(job.out / "summary.json", summary)
    if gt is not None:
        from distill.labels.quality import label_quality

        # no match at all was refused before labelling: none now means those images failed to decode
        metrics = label_quality(job.out / LABELS_JSON, gt, gt_name=gt_name, require_match=False)
        write_json(job.out / "metrics.json", metrics)
        summary.update(metrics)
    finalize_output(job, written_files(job, merged["ok"], ["metrics.json"] if gt is not None else []))
    return summary
