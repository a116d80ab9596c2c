"""``distill train det``: train the ViLD student with the shared engine and evaluate it.

:func:`train_detector` is the stage function (one call from the CLI, the pipeline, the ablation):

1. vocabulary (:func:`distill.vocab.resolve_vocab`: ``data.vocab``, else the categories of
   ``data.train_full_json``) with its base/novel split; the teacher's text embeddings of every class (cached under ``embeddings/text``);
2. training classes: the BASE classes (ViLD-text sees only base text embeddings), or all of them
   for the oracle (``det.train_on_all``);
3. for ViLD-image: the proposals of ``distill propose`` and the teacher's cached embeddings of
   their top ``det.num_image_distill`` boxes, attached to each target;
4. the engine trains; evaluation runs on ``data.val_json`` over the WHOLE vocabulary (base + novel
   text embeddings, the generalized setting), writing ``det/<name>/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import Config, config_hash, save_config
from distill.errors import DistillError
from distill.files import write_json
from distill.vocab import resolve_vocab


def det_dir(cfg: Config) -> Path:
    return Path(cfg.work_dir) / "det" / cfg.det.name


def build_teacher_and_text(cfg: Config, vocab):
    """(teacher, text embeddings (C, D) of every class); a NaN embedding is a clear error."""
    from distill.teacher.clip import build_teacher
    from distill.teacher.text import text_embeddings

    teacher = build_teacher(cfg.teacher)
    emb = text_embeddings(teacher, vocab, cfg.teacher.templates, cache_dir=Path(cfg.work_dir) / "embeddings" / "text")
    check_text_embeddings(emb, vocab)
    return teacher, emb


def check_text_embeddings(emb: torch.Tensor, vocab) -> None:
    bad = (~torch.isfinite(emb)).any(dim=1)
    if bad.any():
        names = [vocab.names[i] for i in torch.where(bad)[0].tolist()]
        raise DistillError(f"{vocab.source or 'vocabulary'}: the teacher embeds {names} to NaN; fix these class names or the teacher weights")


class DetTrainSet(torch.utils.data.Dataset):
    """A CocoDetection whose labels are remapped to the TRAINING vocabulary's indices (classes
    outside it are dropped and counted), with proposals + teacher embeddings attached, then
    augmented by ``transforms`` (:mod:`distill.data.transforms`, on numpy; the proposals move
    with the image and keep their embeddings). ``base`` must have no transforms of its own."""

    def __init__(self, base, label_map: dict[int, int], proposals: dict | None = None, cache=None, num: int = 0, transforms=None, pyramid=None,
                 box_cache=None, self_labels: tuple[int, float, float] | None = None):
        if getattr(base, "transforms", None) is not None:
            raise DistillError("DetTrainSet: give the augmentation to DetTrainSet, not to its CocoDetection (the proposals must move with the image)")
        self.base = base
        self.transforms = transforms
        self.image_ids = base.image_ids
        self.lut = torch.full((max(label_map) + 2 if label_map else 1,), -1, dtype=torch.int64)
        for k, v in label_map.items():
            self.lut[k] = v
        self.proposals = proposals
        self.cache = cache
        self.num = num
        self.pyramid = pyramid  # OADP: {image_id -> (blocks (K, 4), teacher embeddings (K, D))} (teacher/pyramid.py)
        # the one-stage student: the teacher's embeddings of each image's GT boxes (box_cache) and
        # ZSD-YOLO's self-labels (k, min objectness, max IoU) drawn from the cached proposals
        self.box_cache = box_cache
        self.self_labels = self_labels
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.base)

    def _cached_proposals(self, iid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top ``num`` proposals of an image, their objectness and the teacher's embeddings."""
        boxes, scores = self.proposals.get(iid, (torch.zeros(0, 4), torch.zeros(0)))
        boxes, scores = boxes[: self.num], scores[: self.num]
        emb = self.cache.get(iid).float()
        if emb.shape[0] != boxes.shape[0]:
            raise DistillError(f"region cache: image {iid} has {emb.shape[0]} embeddings for {boxes.shape[0]} proposals (stale cache?)")
        return boxes.float(), scores.float(), emb

    def _add_self_labels(self, iid: int, t: dict) -> None:
        from distill.detection.one_stage import select_self_labels

        boxes, scores, emb = self._cached_proposals(iid)
        k, min_score, max_iou = self.self_labels
        scores = torch.where(emb.norm(dim=1) > 0, scores, torch.full_like(scores, -1.0))  # boxes the teacher skipped
        idx = select_self_labels(boxes, scores, torch.as_tensor(t["boxes"]).reshape(-1, 4), min_score, max_iou, k).numpy()
        t["boxes"] = np.concatenate([np.asarray(t["boxes"], np.float32).reshape(-1, 4), boxes[idx].numpy()])
        t["labels"] = np.concatenate([t["labels"], np.full(len(idx), -1, np.int64)])
        t["box_embeddings"] = np.concatenate([t["box_embeddings"].reshape(-1, emb.shape[1]), emb[idx].numpy()]).astype(np.float32)

    def __getitem__(self, i: int):
        from distill.data.coco import to_tensors

        img, t = self.base.raw(i)
        iid = int(t["image_id"])
        if self.box_cache is not None:
            gt_emb = self.box_cache.get(iid).float().numpy()
            if gt_emb.shape[0] != len(t["boxes"]):
                raise DistillError(f"box cache: image {iid} has {gt_emb.shape[0]} embeddings for {len(t['boxes'])} boxes (stale cache?)")
        lab = self.lut.numpy()[np.minimum(t["labels"], len(self.lut) - 1)]
        keep = lab >= 0
        self.dropped += int((~keep).sum())
        t["boxes"], t["labels"] = t["boxes"][keep], lab[keep]
        if "masks" in t:
            t["masks"] = t["masks"][keep]
        if self.box_cache is not None:
            t["box_embeddings"] = gt_emb[keep]
            if self.self_labels is not None and self.cache is not None:
                self._add_self_labels(iid, t)
        elif self.cache is not None:
            boxes, _, emb = self._cached_proposals(iid)
            ok = emb.norm(dim=1) > 0  # boxes the teacher skipped (zero rows)
            t["proposals"], t["proposal_embeddings"] = boxes[ok].numpy(), emb[ok].numpy()
        if self.pyramid is not None:
            blocks, emb = self.pyramid(int(t["image_id"]))
            t["blocks"], t["block_embeddings"] = blocks.numpy(), emb.float().numpy()
            t["global_embedding"] = emb[0].float().numpy()  # the centre square = the whole-image target
        if self.transforms is not None:
            iid = t["image_id"]
            img, t = self.transforms(img, t)
            t["image_id"] = iid
        return to_tensors(img, t)


def _image_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1] (what the teacher's region embedders read)."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


def _concat(datasets):
    if len(datasets) == 1:
        return datasets[0]
    cat = torch.utils.data.ConcatDataset(datasets)
    cat.image_ids = [i for d in datasets for i in d.image_ids]
    return cat


@torch.no_grad()
def predict(model, dataset, batch_size: int = 8, device=None, vocab_ids=None) -> list[dict]:
    """COCO results (``image_id``, ``category_id`` = ``vocab_ids[label]``, ``bbox`` XYWH, ``score``;
    ``segmentation`` as compressed RLE, the mask head's probabilities at 0.5, when the model
    predicts masks)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from distill.data.coco import collate

    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    res: list[dict] = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for images, targets in loader:
        out = model([im.to(device) for im in images])
        for t, o in zip(targets, out):
            b = o["boxes"].cpu()
            b[:, 2:] -= b[:, :2]
            rles = [None] * len(b)
            if "masks" in o and len(b):  # (N, 1, H, W) probabilities pasted at the image's size
                m = (o["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
            for box, s, lab, rle in zip(b.tolist(), o["scores"].cpu().tolist(), o["labels"].cpu().tolist(), rles):
                r = {"image_id": int(t["image_id"]), "category_id": int(vocab_ids[lab]) if vocab_ids else int(lab), "bbox": [round(x, 2) for x in box], "score": round(float(s), 5)}
                if rle is not None:
                    r["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
                res.append(r)
    model.train(was)
    return res


REGION_EVAL_IMAGES = 500  # region_top1 reads the first 500 val images (a second backbone pass)


@torch.no_grad()
def region_top1(model, dataset, text_emb: torch.Tensor, novel: torch.Tensor, batch_size: int = 8, max_images: int = REGION_EVAL_IMAGES) -> dict:
    """Zero-shot classification of ground-truth boxes by the student: the argmax over the whole
    vocabulary of cos(student region embedding, text embedding), scored against the box's class.

    The student-side twin of the teacher's GT-crop top-1 (``zeroshot/top1_ens``): it shows how
    much of the teacher's region knowledge the embedding that ViLD trains carries, apart from
    localisation and score calibration. Returns ``region/top1`` and ``region/top1_base`` /
    ``region/top1_novel`` (NaN where the first ``max_images`` images hold no such box).
    """
    from distill.data.coco import collate

    device = next(model.parameters()).device
    text = torch.nn.functional.normalize(text_emb.float(), dim=1).to(device)
    novel = torch.as_tensor(novel, dtype=torch.bool)
    n = min(len(dataset), max_images)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    heads = getattr(model, "roi_heads", None)
    # ViLD-ensemble names novel regions with its image head: read that branch where it exists
    branch = "image" if getattr(heads, "image_head", None) is not None else "text"
    hits, labels = [], []
    for images, targets in loader:
        boxes = [t["boxes"].float() for t in targets]
        if not sum(len(b) for b in boxes):
            continue
        emb = torch.cat(model.region_embeddings([im.to(device) for im in images], [b.to(device) for b in boxes], branch=branch))
        lab = torch.cat([t["labels"] for t in targets])
        hits.append((emb @ text.t()).argmax(1).cpu() == lab)
        labels.append(lab)
    hit = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
    lab = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    is_novel = novel[lab]

    def acc(mask: torch.Tensor) -> float:
        return float(hit[mask].float().mean()) if mask.any() else float("nan")

    return {"region/top1": acc(torch.ones_like(hit)), "region/top1_base": acc(~is_novel), "region/top1_novel": acc(is_novel)}


def make_eval_fn(cfg: Config, vocab, text_all: torch.Tensor, out_dir: Path, inference: str | None = None):
    """``eval_fn(model) -> metrics`` over the whole vocabulary on ``data.val_json``."""
    from distill.data.coco import CocoDetection
    from distill.eval.detection import evaluate_detection
    from distill.files import write_json as wj

    val = CocoDetection(cfg.data.val_json, cfg.data.image_root, vocab, skip_unknown=True)
    novel = torch.tensor(vocab.is_novel)

    def eval_fn(model) -> dict:
        heads = getattr(model, "roi_heads", None) or getattr(model, "head", None)  # ViLD's | the one-stage student's
        saved = None
        if heads is not None and hasattr(heads, "text_embeddings"):
            saved = (heads.text_embeddings.clone(), heads.novel_mask.clone(), heads.inference)
            model.set_vocabulary(text_all, novel, list(vocab.names))
            if inference:
                heads.inference = inference
        try:
            results = predict(model, val, cfg.det.train.batch_size, vocab_ids=list(vocab.ids))
        finally:
            if saved is not None:
                heads.text_embeddings, heads.novel_mask, heads.inference = saved
        wj(out_dir / "results_val.json", results)
        iou_types = ("bbox", "segm") if cfg.det.masks else ("bbox",)
        metrics = evaluate_detection(cfg.data.val_json, results, None, iou_types=iou_types, vocab=vocab, max_dets=cfg.det.detections_per_img)
        if hasattr(model, "region_embeddings"):  # the ViLD student (not the plain baseline)
            metrics.update(region_top1(model, val, text_all, novel, cfg.det.train.batch_size))
        wj(out_dir / "metrics.json", metrics)
        return metrics

    return eval_fn


class _PyramidLookup:
    """``image_id -> (block boxes (K, 4), teacher embeddings (K, D))`` from the pyramid cache;
    the boxes follow from the image size (teacher/pyramid.py), so only the embeddings are stored."""

    def __init__(self, cache, sizes: dict[int, tuple[int, int]], block: int):
        self.cache, self.sizes, self.block = cache, sizes, block

    def __call__(self, iid: int):
        from distill.teacher.pyramid import block_boxes

        w, h = self.sizes[iid]
        boxes = block_boxes(w, h, self.block)
        emb = self.cache.get(iid)
        if emb.shape[0] != boxes.shape[0]:
            raise DistillError(f"pyramid cache: image {iid} has {emb.shape[0]} block embeddings for {boxes.shape[0]} blocks (stale cache?)")
        return boxes, emb


def pyramid_targets(cfg: Config, teacher, dataset) -> _PyramidLookup:
    """The teacher's block embeddings of every image of ``dataset`` (teacher/pyramid.py), computed
    once into a cache keyed like the region cache (``embeddings/pyramid/<key>``)."""
    from distill.files import sha256_json
    from distill.teacher.cache import EmbeddingCache
    from distill.teacher.pyramid import pyramid_cache_key, pyramid_embeddings

    key = pyramid_cache_key(teacher)
    cache = EmbeddingCache(Path(cfg.work_dir) / "embeddings" / "pyramid" / sha256_json(key)[:16], key, dtype=cfg.teacher.cache_dtype,
                           shard_size=max(1, cfg.regions.shard_size))
    ids = [int(x) for x in dataset.image_ids]
    sizes = {}
    for i, iid in enumerate(ids):
        img, _ = dataset.raw(i)
        sizes[iid] = (int(img.shape[1]), int(img.shape[0]))
        if iid not in cache:
            cache.write([iid], [pyramid_embeddings(teacher, _image_tensor(img))[1].cpu()])
    cache.close()
    return _PyramidLookup(cache, sizes, teacher.image_size)


def gt_box_embeddings(cfg: Config, teacher, dataset, json_path: str):
    """The teacher's embeddings (``regions.mode`` crops) of every ground-truth box of ``dataset``
    (in its annotation order), computed once into a cache keyed like the region cache on the
    annotation file's digest (``embeddings/boxes/<key>``); returned as that cache."""
    from distill.detection.proposals import region_cache_key
    from distill.files import sha256_file, sha256_json
    from distill.teacher.cache import EmbeddingCache
    from distill.teacher.regions import embed_regions_sharded

    key = region_cache_key(teacher, "gt:" + sha256_file(json_path), 0, cfg.regions.mode, cfg.regions.scales)
    root = Path(cfg.work_dir) / "embeddings" / "boxes" / sha256_json(key)[:16]
    cache = EmbeddingCache(root, key, dtype=cfg.teacher.cache_dtype, shard_size=max(1, cfg.regions.shard_size))
    position = {int(iid): i for i, iid in enumerate(dataset.image_ids)}
    if cache.missing(position) or not cache.complete:

        def load(iid: int):
            img, t = dataset.raw(position[iid])
            return _image_tensor(img), torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)

        embed_regions_sharded(teacher, list(position), load, cache, mode=cfg.regions.mode, scales=cfg.regions.scales)
    return cache


def build_training_set(cfg: Config, vocab, teacher, train_idx: list[int]):
    """Datasets of ``data.train_json`` (+ ``data.extra``), labels in the training vocabulary,
    augmented by ``det.augment``."""
    from distill.data.coco import CocoDetection
    from distill.detection.build import train_transform
    from distill.detection.proposals import embed_proposals, load_proposals, proposals_dir

    det = cfg.det
    jsons = [cfg.data.train_full_json if det.train_on_all else cfg.data.train_json, *cfg.data.extra]
    label_map = {full: k for k, full in enumerate(train_idx)}
    sets = []
    for j in jsons:
        base = CocoDetection(j, cfg.data.image_root, vocab, masks=det.masks, skip_unknown=True)
        proposals = cache = box_cache = None
        one_stage = det.arch == "fcos"
        if det.use_image and (not one_stage or det.self_labels > 0):
            proposals, phash = load_proposals(proposals_dir(cfg) / "proposals_train.safetensors")
            cache = embed_proposals(cfg, teacher, proposals, phash, base)
        if one_stage and det.use_image:
            box_cache = gt_box_embeddings(cfg, teacher, base, j)
        pyramid = pyramid_targets(cfg, teacher, base) if (det.global_weight > 0 or det.block_weight > 0 or det.block_relation_weight > 0) else None
        self_labels = (det.self_labels, det.self_label_score, det.self_label_iou) if one_stage and det.self_labels > 0 else None
        sets.append(DetTrainSet(base, label_map, proposals, cache, det.num_image_distill, transforms=train_transform(det), pyramid=pyramid,
                                box_cache=box_cache, self_labels=self_labels))
    return _concat(sets)


def train_detector(cfg: Config, *, resume: bool = False, eval_only: bool = False, progress: bool = True, teacher=None) -> dict:
    """Train (unless ``eval_only``) and evaluate the ViLD student of ``cfg.det``; returns metrics
    (``bbox/AP50_novel`` ...) also written to ``det/<name>/metrics.json``."""
    from distill.detection.build import build_detector, check_arch
    from distill.engine.checkpoint import load, load_model_state, read
    from distill.engine.hooks import BeforeTrain
    from distill.engine.train import make_loader, train
    from distill.data.coco import collate

    t0 = time.perf_counter()
    det = cfg.det
    out = det_dir(cfg)
    vocab = resolve_vocab(cfg.data, need_base=True)
    if teacher is None:
        from distill.engine.device import get_device
        from distill.engine.distributed import init_distributed

        # under torchrun, join the process group (and pick this rank's GPU) before the teacher is
        # placed, so each rank's teacher sits on its own device rather than all on cuda:0
        init_distributed(get_device(cfg.teacher.device).type)
        teacher, text_all = build_teacher_and_text(cfg, vocab)
    else:
        from distill.teacher.text import text_embeddings

        text_all = text_embeddings(teacher, vocab, cfg.teacher.templates)
        check_text_embeddings(text_all, vocab)
    # data.extra (pseudo-labels, labels/selftrain.py) may carry novel classes: train on every class then.
    train_idx = list(range(len(vocab))) if det.train_on_all or cfg.data.extra else vocab.base_indices
    # evaluation loads a trained checkpoint: the pretrained backbone file is not needed then
    model = build_detector(det, teacher.embed_dim, text_all[train_idx].cpu(), teacher=teacher, region_mode=cfg.regions.mode, load_weights=not eval_only)
    eval_fn = make_eval_fn(cfg, vocab, text_all.cpu(), out)
    if eval_only:
        weights = Path(det.checkpoint) if det.checkpoint else out / "model_final.pt"
        state = read(weights)["model"]
        check_arch(state, det, str(weights))
        load_model_state(model, state, str(weights))
        save_config(cfg, out / "config.yaml")
        model.to(next(iter(teacher.model.parameters())).device)
        metrics = eval_fn(model)
    else:
        if det.init:  # a resumed checkpoint, when there is one, replaces these weights in train()
            load(det.init, model)
        ds = build_training_set(cfg, vocab, teacher, train_idx)
        loader = make_loader(ds, det.train, collate_fn=collate, num_workers=cfg.data.num_workers)
        from distill.teacher.clip import student_meta

        meta = student_meta(cfg, teacher, trained_classes=[vocab.names[i] for i in train_idx])
        metrics = train(model, loader, det.train, out, eval_fn=eval_fn, resume=resume, progress=progress, extra={"config_hash": config_hash(det)}, meta=meta,
                        hooks=[BeforeTrain(lambda: save_config(cfg, out / "config.yaml"))])  # once a --resume checkpoint fits
        metrics["skipped_boxes"] = model.skipped_boxes
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "metrics.json", metrics)
    return metrics


def with_det(cfg: Config, **changes: Any) -> Config:
    """``cfg`` with ``det`` fields replaced (``train`` may be a dict of TrainConfig changes)."""
    tr = changes.pop("train", None)
    det = dataclasses.replace(cfg.det, **changes)
    if tr:
        det = dataclasses.replace(det, train=dataclasses.replace(det.train, **tr))
    return dataclasses.replace(cfg, det=det)
