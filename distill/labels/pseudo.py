"""Pseudo-labels: label any image folder with any vocabulary, in resumable shards.

>>> summary = label(cfg)     # cfg.label.images / vocab / model / source / out ...

Sources (``cfg.label.source``: the frozen teacher, a ViLD or a segmentation student) are in
:mod:`distill.labels.sources`; the job, its shards and its output folder in
:mod:`distill.labels.job`; thresholds, NMS and top-k in :mod:`distill.labels.filtering`.

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

The output folder is the labeler's (:func:`~distill.labels.job.check_output`): it must not nest
with the image folder, a non-empty folder it did not write is refused, and
``<out>/manifest.json`` lists what the last complete run wrote; files of an earlier run that this
one does not write (another image folder's PNG / YOLO files, another format) are removed when the
run completes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distill.data.images import SKIP_FOLDER_LINK, SKIP_HIDDEN, SKIP_UNSUPPORTED, load_image, load_image_scaled
from distill.errors import DistillError
from distill.files import atomic_path, write_json, write_text
from distill.labels import formats
from distill.labels.candidates import BoxMasks
from distill.labels.filtering import filter_predictions
from distill.labels.job import (LABELS_JSON, SKIPPED_TXT, LabelJob, check_output, claim_output, finalize_output, make_job,
                                shard_ranges, written_files)
from distill.labels.sources import build_source
from distill.vocab import Vocabulary, resolve_vocab

log = logging.getLogger(__name__)


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


def _rank_world() -> tuple[int, int]:
    try:
        from distill.engine.distributed import get_rank, get_world_size, is_dist

        if is_dist():
            return get_rank(), get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ------------------------------------------------------------------------------------ labeling


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
    ranges = shard_ranges(n, job.shard_size)
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
    for k, r in enumerate(shard_ranges(len(job.paths), job.shard_size)):
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


def label(cfg, *, source=None, on_shard: Callable[[int], None] | None = None) -> dict:
    """Label ``cfg.label.images`` with ``cfg.label.vocab``; write ``<out>/labels.json`` (+ yolo,
    semantic PNGs, failures.txt, skipped.txt, summary.json, manifest.json, and metrics.json when
    ``cfg.label.gt`` is set).

    ``source`` overrides :func:`build_source` (tests pass a random teacher's source)."""
    from distill.config import save_config
    from distill.engine.device import get_device

    t0 = time.time()
    vocab = resolve_vocab(cfg.data, cfg.label.vocab, key="label.vocab")
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
