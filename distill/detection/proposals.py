"""Class-agnostic proposals and the teacher's embeddings of them (ViLD section 3.3).

ViLD-image distills from regions precomputed offline: a class-agnostic detector trained on BASE
boxes only (here a torchvision Faster R-CNN with one "object" class, the same backbone and
settings as the student) proposes the top-k boxes of every training image; the teacher embeds
them (1x + 1.5x crops, ViLD 3.2) once, into a cache keyed by the teacher's fingerprint and the
proposals' hash, so a stale cache is never read.

Files under ``{work_dir}/proposals/<name>/``: ``model_final.pt`` + ``metrics.jsonl`` (training),
``proposals_train.safetensors`` (``boxes`` (sum N, 4) XYXY pixels, ``scores``, ``image_ids``,
``counts``; metadata ``hash``), ``metrics.json`` (recall of val boxes, base / novel).
Region embeddings: ``{work_dir}/embeddings/regions/<key>/``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torchvision.ops import box_iou

from distill.config import Config, save_config
from distill.errors import DistillError
from distill.files import atomic_path, sha256_json, write_json
from distill.vocab import resolve_vocab


# ------------------------------------------------------------------------------------ files
def proposals_dir(cfg: Config) -> Path:
    return Path(cfg.work_dir) / "proposals" / cfg.proposals.name


def save_proposals(path: str | Path, image_ids: list[int], boxes: list[torch.Tensor], scores: list[torch.Tensor], meta: dict | None = None) -> str:
    """Write proposals atomically; returns their hash (of ids, boxes and scores)."""
    from safetensors.torch import save_file

    counts = torch.tensor([len(b) for b in boxes], dtype=torch.int64)
    tensors = {
        "image_ids": torch.tensor(image_ids, dtype=torch.int64),
        "counts": counts,
        "boxes": torch.cat([b.float().cpu() for b in boxes]) if boxes else torch.zeros(0, 4),
        "scores": torch.cat([s.float().cpu() for s in scores]) if scores else torch.zeros(0),
    }
    import hashlib

    h = hashlib.sha256()
    for k in ("image_ids", "counts", "boxes", "scores"):
        h.update(tensors[k].contiguous().numpy().tobytes())
    digest = h.hexdigest()[:16]
    md = {"hash": digest, **{k: str(v) for k, v in (meta or {}).items()}}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=md)
    return digest


def load_proposals(path: str | Path) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], str]:
    """``{image_id: (boxes (N, 4), scores (N,))}`` and the proposals' hash."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: proposals not found (run `distill propose CONFIG` first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise DistillError(f"{path}: not a readable proposals file ({type(e).__name__})") from None
    missing = {"image_ids", "counts", "boxes", "scores"} - set(t)
    if missing or "hash" not in meta:
        raise DistillError(f"{path}: not a proposals file (missing {sorted(missing) or 'hash'})")
    out = {}
    for iid, b, s in zip(t["image_ids"].tolist(), t["boxes"].split(t["counts"].tolist()), t["scores"].split(t["counts"].tolist())):
        out[int(iid)] = (b, s)
    return out, meta["hash"]


# ------------------------------------------------------------------------------------ network
def _agnostic_det(cfg: Config):
    from distill.detection.build import build_plain_detector

    det = dataclasses.replace(cfg.det, masks=False, score_thresh=0.0, nms=cfg.proposals.nms, detections_per_img=cfg.proposals.top_k)
    return build_plain_detector(det, 1, class_agnostic=True)


def train_proposal_network(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train the class-agnostic detector on base boxes (``data.train_json``), augmented like the
    detector (``det.augment``; it has the detector's sizes); returns its weights."""
    from distill.data.coco import CocoDetection, collate
    from distill.detection.build import train_transform
    from distill.engine.train import make_loader, train

    out = proposals_dir(cfg)
    ds = CocoDetection(cfg.data.train_json, cfg.data.image_root, None, transforms=train_transform(cfg.det))
    model = _agnostic_det(cfg)
    loader = make_loader(ds, cfg.proposals.train, collate_fn=collate, num_workers=cfg.data.num_workers)
    save_config(cfg, out / "config.yaml")
    train(model, loader, cfg.proposals.train, out, resume=resume, progress=progress)
    return out / "model_final.pt"


@torch.no_grad()
def predict_proposals(model, dataset, batch_size: int = 16, min_size: float = 4.0, device=None) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """Run the class-agnostic detector; boxes smaller than ``min_size`` px on a side are dropped."""
    from distill.data.coco import collate

    device = device or next(model.parameters()).device
    model.eval()
    ids, boxes, scores = [], [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for images, targets in loader:
        out = model([im.to(device) for im in images])
        for t, o in zip(targets, out):
            b, s = o["boxes"].cpu(), o["scores"].cpu()
            wh = b[:, 2:] - b[:, :2]
            keep = (wh >= min_size).all(1)
            ids.append(int(t["image_id"]))
            boxes.append(b[keep])
            scores.append(s[keep])
    return ids, boxes, scores


def proposal_recall(boxes: list[torch.Tensor], gt: list[torch.Tensor], gt_novel: list[torch.Tensor], k: int, iou: float = 0.5) -> dict:
    """Fraction of GT boxes (base / novel / all) covered at IoU >= ``iou`` by the top-k proposals."""
    hit = {"base": [0, 0], "novel": [0, 0]}
    for b, g, nov in zip(boxes, gt, gt_novel):
        if len(g) == 0:
            continue
        covered = (box_iou(g, b[:k]).max(1).values >= iou) if len(b) else torch.zeros(len(g), dtype=torch.bool)
        for split, sel in (("base", ~nov), ("novel", nov)):
            hit[split][0] += int(covered[sel].sum())
            hit[split][1] += int(sel.sum())
    out = {f"recall@{k}/{s}": (h / n if n else float("nan")) for s, (h, n) in hit.items()}
    tot = sum(h for h, _ in hit.values()), sum(n for _, n in hit.values())
    out[f"recall@{k}/all"] = tot[0] / tot[1] if tot[1] else float("nan")
    return out


def run_proposals(cfg: Config, resume: bool = False, progress: bool = True) -> dict:
    """Stage ``propose``: train the class-agnostic network on base boxes, write the top-k proposals
    of every training image, and measure their recall on val (base / novel)."""
    from distill.data.coco import CocoDetection
    from distill.engine.checkpoint import load
    from distill.engine.device import get_device

    t0 = time.perf_counter()
    out = proposals_dir(cfg)
    weights = out / "model_final.pt"
    # the weights are reused only when they were trained with this config (never stale ones)
    from distill.config import to_dict
    from distill.files import write_text

    det_arch = {k: v for k, v in to_dict(cfg.det).items() if k != "train"}
    key = sha256_json({"proposals": to_dict(cfg.proposals), "train_json": cfg.data.train_json, "det": det_arch})[:16]
    stamp = out / "weights_key.txt"
    fresh = weights.is_file() and stamp.is_file() and stamp.read_text().strip() == key
    if not fresh or resume:
        stamp.unlink(missing_ok=True)
        train_proposal_network(cfg, resume=resume, progress=progress)
        write_text(stamp, key + "\n")
    model = _agnostic_det(cfg)
    load(weights, model)
    dev = get_device(cfg.proposals.train.device)
    model.to(dev)
    train_ds = CocoDetection(cfg.data.train_json, cfg.data.image_root, None)
    ids, boxes, scores = predict_proposals(model, train_ds, cfg.proposals.batch_size, cfg.proposals.min_size, dev)
    digest = save_proposals(out / "proposals_train.safetensors", ids, boxes, scores, {"top_k": cfg.proposals.top_k, "train_json": cfg.data.train_json})
    # recall on val, split by base / novel (the point of class-agnostic proposals)
    vocab = resolve_vocab(cfg.data)
    val = CocoDetection(cfg.data.val_json, cfg.data.image_root, vocab, skip_unknown=True)
    _, vb, _ = predict_proposals(model, val, cfg.proposals.batch_size, cfg.proposals.min_size, dev)
    is_novel = torch.tensor(vocab.is_novel)
    gts = [val[i][1] for i in range(len(val))] if len(val) <= 5000 else []
    metrics = {"proposals_hash": digest, "num_images": len(ids), "mean_per_image": float(sum(len(b) for b in boxes) / max(1, len(ids)))}
    if gts:
        for k in sorted({cfg.det.num_image_distill, cfg.proposals.top_k}):
            metrics.update(proposal_recall(vb, [g["boxes"] for g in gts], [is_novel[g["labels"]] for g in gts], k))
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "metrics.json", metrics)
    return metrics


# ------------------------------------------------------------------------------------ embeddings
def region_cache_key(teacher, proposals_hash: str, num: int, mode: str, scales) -> dict:
    # crops run on the teacher's own tower; the dense mode on its dense tower (CLIPSelf) when it has one
    fp = getattr(teacher, "dense_key", teacher.fingerprint) if mode == "dense" else teacher.fingerprint
    return {"teacher": fp, "precision": teacher.precision, "proposals": proposals_hash, "num": int(num), "mode": mode, "scales": [float(s) for s in scales]}


def embed_proposals(cfg: Config, teacher, proposals: dict[int, tuple[torch.Tensor, torch.Tensor]], proposals_hash: str, dataset, num: int | None = None, stats: dict | None = None):
    """The teacher's embeddings of the top ``num`` proposals of every image of ``dataset``,
    computed once into an :class:`~distill.teacher.cache.EmbeddingCache` (keyed by teacher
    fingerprint + proposals hash + crop mode) and returned as that cache (``.get(image_id)``).

    Under torchrun every rank must call it: rank ``r`` of ``W`` embeds the cache shards ``r, r + W,
    ...`` and rank 0 writes the index (:func:`~distill.teacher.regions.embed_regions_sharded`); the
    cache is byte-identical to a one-process run's. ``stats`` receives this rank's counts."""
    from distill.engine.device import resolve_precision
    from distill.engine.distributed import init_distributed
    from distill.teacher.cache import EmbeddingCache
    from distill.teacher.regions import embed_regions_sharded

    init_distributed()  # a no-op unless launched by torchrun
    num = cfg.det.num_image_distill if num is None else num
    precision = resolve_precision(cfg.regions.precision, teacher.device) if cfg.regions.precision else teacher.precision
    if precision != teacher.precision:
        import dataclasses

        teacher = dataclasses.replace(teacher, precision=precision)
    key = region_cache_key(teacher, proposals_hash, num, cfg.regions.mode, cfg.regions.scales)
    root = Path(cfg.work_dir) / "embeddings" / "regions" / sha256_json(key)[:16]
    cache = EmbeddingCache(root, key, dtype=cfg.teacher.cache_dtype, shard_size=max(1, cfg.regions.shard_size))
    position = {iid: i for i, iid in enumerate(int(x) for x in dataset.image_ids)}
    if cache.missing(position) or not cache.complete:  # the same on every rank (nobody writes before the barrier)
        empty = torch.zeros(0, 4)

        def load(iid: int):
            return dataset[position[iid]][0], proposals.get(iid, (empty, None))[0][:num]

        counts = embed_regions_sharded(teacher, list(position), load, cache, mode=cfg.regions.mode, scales=cfg.regions.scales)
        if stats is not None:
            stats.update(counts)
    return cache


def embed_training_regions(cfg: Config, teacher=None) -> tuple:
    """Stage ``regions`` / ``distill teacher embed-regions``: the teacher's embeddings of the
    proposals (``distill propose``) of every ``data.train_json`` image; rank-sharded under torchrun.
    Returns ``(cache, counts)``: this run's counts summed over ranks (``images`` embedded,
    ``shards`` planned, ``shards_skipped`` found finished on disk, ``skipped_boxes``,
    ``clipped_boxes``) and ``train_images``."""
    from distill.data.coco import CocoDetection
    from distill.engine.distributed import all_reduce_sum, init_distributed

    _, world, local_rank = init_distributed()  # before the teacher: each rank on its own GPU
    proposals, phash = load_proposals(proposals_dir(cfg) / "proposals_train.safetensors")
    ds = CocoDetection(cfg.data.train_json, cfg.data.image_root, resolve_vocab(cfg.data, need_base=True), skip_unknown=True)
    if teacher is None:
        from distill.engine.device import get_device
        from distill.teacher.clip import build_teacher

        device = get_device(cfg.teacher.device)
        if world > 1 and device.type == "cuda" and not cfg.teacher.device:
            device = torch.device("cuda", local_rank)
        teacher = build_teacher(cfg.teacher, device=device)
    counts = {"images": 0, "skipped_boxes": 0, "clipped_boxes": 0, "shards": 0, "shards_skipped": 0}
    cache = embed_proposals(cfg, teacher, proposals, phash, ds, stats=counts)
    counts = {k: int(v) for k, v in all_reduce_sum(counts, device=teacher.device).items()}
    counts["train_images"] = len(ds)
    return cache, counts
