"""Pretrain the tiny open_clip teacher (``distill-tiny-vit``) on the shapes world, contrastively, on
image-text pairs of ALL categories -- the way web-scale CLIP has seen every word.

Recipe (why each part: docs/experiments.md): batches of ~95% single-object crops of
``instances_train.json`` objects (text = a prompt template with the class name) and ~5% whole
images (text = one of their captions); crop side = box side x U(0.9, 1.6) around a slightly shifted
centre, horizontal flip; a multi-positive contrastive loss: every sample is keyed by its class (a
whole image by its sorted object list), the target of each row is the row of the key-equality
matrix normalised to sum 1, symmetric soft cross-entropy, logit scale fixed at 50; AdamW,
linear warm-up then cosine decay over a FIXED number of steps; ``pretrain.precision``. The
training loop is distill/engine/train.py (resume, DDP, the non-finite guard); its ``metrics.jsonl``
and, while it runs, its checkpoints are in ``teacher/teacher_train/``.

The checkpoint is a plain open_clip state dict in safetensors, so
``open_clip.create_model("distill-tiny-vit", pretrained=path)`` loads it. A ``manifest.json``
beside it records the inputs (world hash, pretrain config, model, templates); a later run with the
same inputs reuses the checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from distill.config import TrainConfig, config_hash, save_config, to_dict
from distill.engine.device import full_precision, get_device, torch_threads
from distill.engine.distributed import get_rank, is_main
from distill.engine.optim import FunctionLR, clip_adamw, warmup_cosine
from distill.engine.train import DrawnBatches, micro_batch_size, run_dir, train
from distill.errors import DistillError
from distill.files import atomic_path, output_is_current, read_json, safe_join, sha256_json, write_json
from distill.teacher.clip import MODEL_CONFIG_DIR, create_model_quiet, register_model_configs
from distill.teacher.regions import clip_boxes, crop_and_resize
from distill.teacher.text import encode_text_trimmed, fill_template, load_templates

log = logging.getLogger(__name__)

MODEL_NAME = "distill-tiny-vit"


@dataclass
class PairData:
    """The shapes world's training pairs, in memory.

    images: (N, 3, H, W) uint8; boxes: (M, 4) float XYXY; box_image: (M,) image row; box_class:
    (M,) vocab index; captions: per image row, its captions; image_key: (N,) key of the sorted
    object list; names: class names in vocab order.
    """

    images: torch.Tensor
    boxes: torch.Tensor
    box_image: torch.Tensor
    box_class: torch.Tensor
    captions: list[list[str]]
    image_key: torch.Tensor
    names: list[str]
    # stuff crops (pretrain.stuff_fraction): boxes XYXY, their image row, index into stuff_names
    stuff_boxes: torch.Tensor | None = None
    stuff_image: torch.Tensor | None = None
    stuff_class: torch.Tensor | None = None
    stuff_names: tuple[str, ...] = ()


def _free_boxes(rng: np.random.Generator, objects: list[list[float]], H: int, W: int, n: int, tries: int = 30) -> list[list[float]]:
    """Up to ``n`` random square-ish boxes (side 12-40% of the image) that overlap no object box."""
    out = []
    for _ in range(tries):
        if len(out) == n:
            break
        w, h = rng.uniform(0.12, 0.4) * W, rng.uniform(0.12, 0.4) * H
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        if all(x >= o[2] or x + w <= o[0] or y >= o[3] or y + h <= o[1] for o in objects):
            out.append([x, y, x + w, y + h])
    return out


def _overlap_frac(b: list[float], objects: list[list[float]]) -> float:
    """The largest fraction of box ``b`` covered by one of ``objects`` (all XYXY)."""
    area = max((b[2] - b[0]) * (b[3] - b[1]), 1e-6)
    best = 0.0
    for o in objects:
        iw, ih = min(b[2], o[2]) - max(b[0], o[0]), min(b[3], o[3]) - max(b[1], o[1])
        if iw > 0 and ih > 0:
            best = max(best, iw * ih / area)
    return best


def stuff_regions(entries: list[dict], row: dict[int, int], objects: dict[int, list[list[float]]], H: int, W: int, seed: int = 0) -> tuple[list[list[float]], list[int], list[str]]:
    """Boxes of what the captions do not name, from captions.json's ``background`` / ``clutter``.

    Per image: up to 2 boxes of bare background (overlapping no object box), named
    "<texture> background", and each clutter item at most 30% covered by an object box, named as
    drawn ("gray line"). Returns (boxes XYXY, image rows, names)."""
    rng = np.random.default_rng(seed)
    boxes, rows, names = [], [], []
    for e in entries:
        r = row.get(int(e["image_id"]))
        if r is None or "background" not in e:
            continue
        objs = objects.get(r, [])
        for b in _free_boxes(rng, objs, H, W, 2):
            boxes.append(b)
            rows.append(r)
            names.append(f"{e['background']} background")
        for c in e.get("clutter", []):
            x, y, w, h = (float(v) for v in c["bbox"])
            b = [x, y, x + w, y + h]
            if w >= 3 and h >= 3 and _overlap_frac(b, objs) <= 0.3:
                boxes.append(b)
                rows.append(r)
                names.append(str(c["name"]))
    return boxes, rows, names


def load_pairs(cfg, json_path: str | None = None) -> PairData:
    """Read ``data.train_full_json`` (all classes), its images and ``data.captions``."""
    from distill.data.images import load_image

    path = Path(json_path or cfg.data.train_full_json)
    data = read_json(path, "COCO instances")
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        images = data["images"]
        anns = data["annotations"]
    except (KeyError, TypeError):
        raise DistillError(f"{path}: expected a COCO instances json with images, annotations, categories") from None
    names = [c["name"] for c in cats]
    cid_to_idx = {c["id"]: i for i, c in enumerate(cats)}
    caps_by_id: dict[int, list[str]] = {}
    cap_path = Path(cfg.data.captions)
    cap_entries = read_json(cap_path, "captions") if cap_path.is_file() else []
    try:
        for e in cap_entries:
            caps_by_id[int(e["image_id"])] = [str(c) for c in e.get("captions", [])]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DistillError(f"{cap_path}: expected a list of {{image_id, captions: [str, ...]}} entries") from None
    root = Path(cfg.data.image_root)
    row = {}
    arrs = []
    for im in images:
        a = load_image(safe_join(root, im["file_name"]))
        if arrs and a.shape != arrs[0].shape:
            raise DistillError(f"{im['file_name']}: size {a.shape[:2]} differs from {arrs[0].shape[:2]} (shapes world images share one size)")
        row[int(im["id"])] = len(arrs)
        arrs.append(a)
    if not arrs:
        raise DistillError(f"{path}: no images")
    imgs = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    H, W = imgs.shape[-2:]
    boxes, bimg, bcls = [], [], []
    objs: dict[int, list[int]] = {r: [] for r in row.values()}
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = [float(v) for v in a["bbox"]]
        r = row[int(a["image_id"])]
        c = cid_to_idx[int(a["category_id"])]
        objs[r].append(c)
        boxes.append([x, y, x + w, y + h])
        bimg.append(r)
        bcls.append(c)
    boxes_t, valid = clip_boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), H, W)
    keys: dict[tuple, int] = {}
    image_key = torch.tensor([len(names) + keys.setdefault(tuple(sorted(objs[r])), len(keys)) for r in range(len(arrs))])
    captions = [[] for _ in range(len(arrs))]
    for iid, r in row.items():
        captions[r] = caps_by_id.get(iid, [])
    stuff = _stuff_fields(cfg, cap_path, cap_entries, row, boxes, bimg, H, W) if cfg.pretrain.stuff_fraction > 0 else {}
    return PairData(
        images=imgs,
        boxes=boxes_t[valid],
        box_image=torch.tensor(bimg, dtype=torch.long)[valid],
        box_class=torch.tensor(bcls, dtype=torch.long)[valid],
        captions=captions,
        image_key=image_key,
        names=names,
        **stuff,
    )


def _stuff_fields(cfg, cap_path: Path, cap_entries: list, row: dict[int, int], boxes: list, bimg: list[int], H: int, W: int) -> dict:
    """The ``stuff_*`` fields of :class:`PairData` (:func:`stuff_regions` of every image)."""
    obj_boxes: dict[int, list[list[float]]] = {r: [] for r in row.values()}
    for b, r in zip(boxes, bimg):
        obj_boxes[r].append(b)
    try:
        sb, sr, sn = stuff_regions(cap_entries, row, obj_boxes, H, W, cfg.pretrain.seed)
    except (KeyError, TypeError, ValueError):
        raise DistillError(f"{cap_path}: expected \"background\": str and \"clutter\": [{{name, bbox}}] in each entry (pretrain.stuff_fraction > 0)") from None
    if not sb:
        raise DistillError(
            f"{cap_path}: no \"background\" / \"clutter\" fields for pretrain.stuff_fraction > 0 "
            "(a world made by an older distill: rebuild it with `distill world make`, or set pretrain.stuff_fraction=0)"
        )
    stuff_names = tuple(sorted(set(sn)))
    sbox, sok = clip_boxes(torch.tensor(sb, dtype=torch.float32), H, W)
    return {
        "stuff_boxes": sbox[sok],
        "stuff_image": torch.tensor(sr, dtype=torch.long)[sok],
        "stuff_class": torch.tensor([stuff_names.index(n) for n in sn], dtype=torch.long)[sok],
        "stuff_names": stuff_names,
    }


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric soft cross-entropy against the row-normalised key-equality matrix.

    img, txt: (B, D) L2-normalised; keys: (B,) int, equal keys are positives of each other.
    """
    logits = scale * img @ txt.t()
    pos = (keys[:, None] == keys[None, :]).float()
    target = pos / pos.sum(dim=1, keepdim=True)
    li = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    lt = -(target * F.log_softmax(logits.t(), dim=1)).sum(1).mean()  # pos is symmetric
    return (li + lt) / 2


def dense_region_loss(model, images: torch.Tensor, boxes: list[torch.Tensor], labels: torch.Tensor, class_text: torch.Tensor, scale: float, mean, std) -> torch.Tensor:
    """Optional dense-path loss (``pretrain.dense_weight``; our addition, not in the lab recipe):
    GT boxes pooled by RoIAlign from the MaskCLIP patch map (teacher/dense.py, with gradients) of
    whole images are classified against the class text embeddings (cross-entropy, fixed scale).

    images: (B, 3, S, S) in [0, 1]; boxes: per image (N_i, 4) XYXY in input pixels; labels: (sum N_i,)
    class indices; class_text: (C, D) L2-normalised.
    """
    from torchvision.ops import roi_align

    from distill.teacher.dense import dense_feature_map

    f = dense_feature_map(model.visual, (images - mean) / std)  # (B, D, h, w), unit vectors
    w = f.shape[-1]
    S = images.shape[-1]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), device=f.device), b.to(f.device) * (w / S)], 1) for i, b in enumerate(boxes)])
    pooled = F.normalize(roi_align(f, rois, (1, 1), 1.0, 0, True).flatten(1), dim=-1)
    return F.cross_entropy(scale * pooled @ class_text.t(), labels.to(f.device))


class BatchSampler:
    """Draws training batches (images (B, 3, S, S) in [0, 1], token ids (B, L), keys (B,))."""

    def __init__(self, data: PairData, pcfg, templates: tuple[str, ...], tokenizer, image_size: int, seed: int):
        self.d = data
        self.p = pcfg
        self.size = image_size
        self.g = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self.templates = templates
        # pre-tokenised texts: class prompts (C x T) and every caption
        C = len(data.names)
        self.class_tokens = tokenizer([fill_template(t, n) for n in data.names for t in templates]).view(C, len(templates), -1)
        flat = [c for caps in data.captions for c in caps]
        self.cap_tokens = tokenizer(flat) if flat else None
        self.cap_index, k = [], 0
        for caps in data.captions:
            self.cap_index.append(list(range(k, k + len(caps))))
            k += len(caps)
        self.with_caps = [r for r, c in enumerate(self.cap_index) if c]
        self.stuff_tokens = None
        if pcfg.stuff_fraction > 0 and data.stuff_boxes is not None and len(data.stuff_boxes):
            S = len(data.stuff_names)
            self.stuff_tokens = tokenizer([fill_template(t, n) for n in data.stuff_names for t in templates]).view(S, len(templates), -1)

    def dense_batch(self, n: int, size: int):
        """n whole images resized to ``size`` with their GT boxes (scaled) and labels."""
        d = self.d
        H, W = d.images.shape[-2:]
        rows = torch.randint(len(d.images), (n,), generator=self.g)
        x = d.images[rows].float() / 255.0
        if (H, W) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        sc = torch.tensor([size / W, size / H, size / W, size / H])
        boxes, labels = [], []
        for r in rows.tolist():
            sel = d.box_image == r
            boxes.append(d.boxes[sel] * sc)
            labels.append(d.box_class[sel])
        return x, boxes, torch.cat(labels)

    def _crops(self, boxes: torch.Tensor, rows: torch.Tensor, scale_min: float, scale_max: float) -> torch.Tensor:
        """Crops of ``boxes`` (n, 4) XYXY of image ``rows``: side x U(scale_min, scale_max) around a
        centre shifted by up to ``crop_shift`` of the side, resized to the input size."""
        d, p, g = self.d, self.p, self.g
        n = len(boxes)
        H, W = d.images.shape[-2:]
        b = boxes
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        s = scale_min + (scale_max - scale_min) * torch.rand(n, generator=g)
        cx = cx + p.crop_shift * bw * (2 * torch.rand(n, generator=g) - 1)
        cy = cy + p.crop_shift * bh * (2 * torch.rand(n, generator=g) - 1)
        hw, hh = bw * s / 2, bh * s / 2
        crop_boxes, ok = clip_boxes(torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], 1), H, W)
        crop_boxes = torch.where(ok[:, None], crop_boxes, b)
        uniq, inv = torch.unique(rows, return_inverse=True)
        src = d.images[uniq].float() / 255.0
        rois = torch.cat([inv.float()[:, None], crop_boxes], 1)
        return crop_and_resize(src, rois, self.size)

    def __call__(self, B: int):
        d, p, g = self.d, self.p, self.g
        n_whole = int(round(B * p.whole_image_fraction)) if self.with_caps else 0
        n_stuff = int(round(B * p.stuff_fraction)) if self.stuff_tokens is not None else 0
        n_crop = B - n_whole - n_stuff
        # crops
        idx = torch.randint(len(d.boxes), (n_crop,), generator=g)
        crops = self._crops(d.boxes[idx], d.box_image[idx], p.crop_scale_min, p.crop_scale_max)
        cls = d.box_class[idx]
        t = torch.randint(len(self.templates), (n_crop,), generator=g)
        tokens = [self.class_tokens[cls, t]]
        keys = [cls]
        ims = [crops]
        if n_whole:
            rows = torch.tensor([self.rng.choice(self.with_caps) for _ in range(n_whole)])
            whole = F.interpolate(d.images[rows].float() / 255.0, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
            ims.append(whole)
            tokens.append(self.cap_tokens[[self.rng.choice(self.cap_index[int(r)]) for r in rows]])
            keys.append(d.image_key[rows])
        if n_stuff:
            # stuff crops stay inside their box (scale <= 1): a background box borders objects
            sidx = torch.randint(len(d.stuff_boxes), (n_stuff,), generator=g)
            ims.append(self._crops(d.stuff_boxes[sidx], d.stuff_image[sidx], 0.8, 1.0))
            scls = d.stuff_class[sidx]
            st = torch.randint(len(self.templates), (n_stuff,), generator=g)
            tokens.append(self.stuff_tokens[scls, st])
            keys.append(-1 - scls)  # below every class / image key
        x = torch.cat(ims)
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.clamp(0, 1), torch.cat(tokens), torch.cat(keys)


class PretrainLoss(torch.nn.Module):
    """The teacher's losses on a drawn batch (the training loop's model contract).

    batch: ``images`` (B, 3, S, S) in [0, 1], ``tokens`` (B, L), ``keys`` (B,); with
    ``dense_weight`` also ``dense_images`` / ``dense_boxes`` / ``dense_labels`` (see
    :meth:`BatchSampler.dense_batch`) and ``class_tokens`` (C, L), one prompt per class.
    Returns ``loss_contrastive`` (:func:`multi_positive_loss`, in fp32 under any autocast) and
    ``loss_dense`` (``dense_weight`` x :func:`dense_region_loss`).
    """

    def __init__(self, model, logit_scale: float, dense_weight: float = 0.0):
        super().__init__()
        self.clip = model
        self.scale = logit_scale
        self.dense_weight = dense_weight
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        img = self.clip.encode_image((batch["images"] - self.mean) / self.std)
        txt = encode_text_trimmed(self.clip, batch["tokens"])
        with full_precision(img.device):
            out = {"loss_contrastive": multi_positive_loss(F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1), batch["keys"], self.scale)}
        if self.dense_weight > 0:
            ctext = F.normalize(encode_text_trimmed(self.clip, batch["class_tokens"]).float(), dim=-1)
            dl = dense_region_loss(self.clip, batch["dense_images"], batch["dense_boxes"], batch["dense_labels"], ctext, self.scale, self.mean, self.std)
            out["loss_dense"] = self.dense_weight * dl
        return out


def drawn_batches(sampler: BatchSampler, pcfg, batch_size: int, dense_size: int) -> DrawnBatches:
    """The training batches of :class:`PretrainLoss`: ``batch_size`` crops / whole images, then (with
    ``pretrain.dense_weight``) ``pretrain.dense_images`` whole images at ``dense_size`` and one
    random prompt template per class, all drawn from the sampler's generators."""
    C, T = sampler.class_tokens.shape[:2]

    def draw() -> dict:
        x, tok, keys = sampler(batch_size)
        batch = {"images": x, "tokens": tok, "keys": keys}
        if pcfg.dense_weight > 0:
            dx, dboxes, dlab = sampler.dense_batch(pcfg.dense_images, dense_size)
            t_idx = torch.randint(T, (C,), generator=sampler.g)
            batch.update(dense_images=dx, dense_boxes=dboxes, dense_labels=dlab, class_tokens=sampler.class_tokens[torch.arange(C), t_idx])
        return batch

    return DrawnBatches(draw, {"torch": sampler.g, "python": sampler.rng})


def _inputs(cfg, templates: tuple[str, ...]) -> dict:
    man = Path(cfg.work_dir) / "data" / "manifest.json"
    world = read_json(man, "world manifest") if man.is_file() else {}
    cfg_json = (MODEL_CONFIG_DIR / f"{MODEL_NAME}.json").read_text()
    return {
        "world_hash": (world.get("world_hash") or sha256_json(world)) if world else config_hash(cfg.world),
        "train_json": str(cfg.data.train_full_json),
        "pretrain": config_hash(cfg.pretrain),
        "model": MODEL_NAME,
        "model_config": sha256_json(cfg_json)[:16],
        "templates": sha256_json(list(templates))[:16],
        "open_clip": open_clip.__version__,
    }


def pretrain(cfg, out_dir: str | Path | None = None, force: bool = False, resume: bool = False, progress: bool = True) -> Path:
    """Train the tiny teacher; returns the checkpoint path (``{work_dir}/teacher/teacher.safetensors``).

    Reuses an existing checkpoint whose manifest inputs match (unless ``force``); ``resume``
    continues a killed run from its last checkpoint (``teacher/teacher_train/checkpoints``).
    """

    register_model_configs()
    pc = cfg.pretrain
    out = Path(out_dir) if out_dir else Path(cfg.work_dir) / "teacher"
    ckpt = out / "teacher.safetensors"
    templates = load_templates(cfg.teacher.templates)
    inputs = _inputs(cfg, templates)
    man_path = out / "manifest.json"
    if not force and output_is_current(ckpt, man_path, inputs):
        log.info("teacher pretrain: inputs unchanged, reusing %s", ckpt)
        return ckpt
    if pc.steps < 1 or pc.batch_size < 2:
        raise DistillError(f"pretrain.steps / pretrain.batch_size: expected >= 1 / >= 2, got {pc.steps} / {pc.batch_size}")
    t0 = time.time()
    with torch_threads(pc.threads):
        model, summary = _train(cfg, ckpt, templates, inputs, resume, progress)
    if is_main():
        _save(cfg, model, out, ckpt, man_path, inputs, {**summary, "wall_s": round(time.time() - t0, 1)})
    return ckpt


def _train(cfg, ckpt: Path, templates: tuple[str, ...], inputs: dict, resume: bool, progress: bool):
    """The open_clip model trained by the training loop, and the loop's summary."""
    pc = cfg.pretrain
    dev = get_device(cfg.teacher.device)
    torch.manual_seed(pc.seed)
    data = load_pairs(cfg)
    log.info("teacher pretrain: %d objects, %d images, %d classes", len(data.boxes), len(data.images), len(data.names))
    model = create_model_quiet(MODEL_NAME)  # random init is the point here: no warning
    if pc.init:
        from distill.teacher.formats import load_state_dict_checked, load_weights_file

        load_state_dict_checked(model, load_weights_file(pc.init), pc.init)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(pc.logit_scale))
    model.logit_scale.requires_grad_(False)  # fixed: a learnable scale barely moved
    model.to(dev)
    tcfg = TrainConfig(max_steps=pc.steps, batch_size=pc.batch_size, lr=pc.lr, weight_decay=pc.weight_decay, optimizer="adamw",
                       warmup=pc.warmup, precision=pc.precision, log_period=pc.log_period, seed=pc.seed, device=str(dev))
    rank = get_rank()  # each rank draws its own share of the batch (rank 0: the single-process draws)
    sampler = BatchSampler(data, pc, templates, open_clip.get_tokenizer(MODEL_NAME), int(model.visual.image_size[0]), pc.seed + rank)
    opt = clip_adamw(model, pc.lr, pc.weight_decay)
    sched = FunctionLR(opt, functools.partial(warmup_cosine, steps=pc.steps, warmup=pc.warmup, lr=pc.lr))
    summary = train(PretrainLoss(model, pc.logit_scale, pc.dense_weight), drawn_batches(sampler, pc, micro_batch_size(tcfg), cfg.teacher.dense_image_size),
                    tcfg, run_dir(ckpt), resume=resume, device=dev, progress=progress, optimizer=opt, scheduler=sched, precision=pc.precision,
                    final_checkpoint=False, extra={"inputs": sha256_json(inputs)}, hint="try pretrain.precision=fp32 or a lower pretrain.lr")
    return model.eval(), summary


def _save(cfg, model, out: Path, ckpt: Path, man_path: Path, inputs: dict, summary: dict) -> None:
    """The weights (open_clip state dict in safetensors), ``open_clip_config.json``, the config and
    the manifest (``summary``: the training loop's, with ``wall_s``)."""
    from safetensors.torch import save_file

    pc = cfg.pretrain
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(ckpt) as tmp:
        save_file(sd, str(tmp), metadata={"model": MODEL_NAME, "format": "open_clip"})
    # local-dir: layout (open_clip_config.json beside the weights) so `local-dir:<out>` loads too
    mcfg = json.loads((MODEL_CONFIG_DIR / f"{MODEL_NAME}.json").read_text())
    write_json(out / "open_clip_config.json", {"model_cfg": mcfg, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}})
    save_config(cfg, out / "config.yaml")
    write_json(man_path, {
        "stage": "teacher_pretrain",
        "inputs": inputs,
        "steps": pc.steps,
        "final_loss": summary.get("loss"),
        "wall_s": summary["wall_s"],
        "torch": torch.__version__,
        "pretrain_config": to_dict(pc),
    })
