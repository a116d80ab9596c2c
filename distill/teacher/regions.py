"""Teacher embeddings of image regions (the ViLD-image distillation targets).

Two modes:

- ``crop`` (ViLD, Gu et al. ICLR 2022, section 3.2): each box is cropped at 1x and 1.5x its size
  (same centre), both crops are resized to the teacher's input size, encoded, and the two image
  embeddings are summed and L2-normalised. Crop + resize of every box of every image is ONE
  batched ``torchvision.ops.roi_align`` call (``aligned=True``, ``sampling_ratio=1``): that samples
  each output pixel bilinearly at the centre of its bin, which is exactly what cropping the box and
  resizing it with bilinear interpolation (``align_corners=False``, no antialias) computes.
- ``dense``: one forward per image at ``teacher.dense_image_size`` through MaskCLIP's value path
  (teacher/dense.py), then RoIAlign (one output cell, adaptive sampling) over the patch embedding
  map, then L2-normalisation. A box covering the whole image gives the mean of the map.

Bad boxes: boxes are clipped to the image (the enlarged 1.5x box too); a box with zero width or
height after clipping (or a non-finite coordinate) is skipped and counted: its row is all zeros
(never NaN) and ``valid`` is False for it (see ``return_info``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from distill.errors import DistillError

MODES = ("crop", "dense", "oake")
_MIN_SIDE = 1e-3  # pixels; narrower boxes count as zero-area


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 4) XYXY -> (clipped boxes, valid (N,) bool: finite with positive width and height)."""
    boxes = boxes.float()
    finite = torch.isfinite(boxes).all(dim=1)
    b = torch.where(finite[:, None], boxes, torch.zeros_like(boxes))
    x1 = b[:, 0].clamp(0, width)
    y1 = b[:, 1].clamp(0, height)
    x2 = b[:, 2].clamp(0, width)
    y2 = b[:, 3].clamp(0, height)
    out = torch.stack([x1, y1, x2, y2], dim=1)
    valid = finite & ((x2 - x1) > _MIN_SIDE) & ((y2 - y1) > _MIN_SIDE)
    return out, valid


def scale_boxes(boxes: torch.Tensor, scale: float, height: int, width: int) -> torch.Tensor:
    """Enlarge (N, 4) XYXY boxes by ``scale`` around their centres, then clip to the image."""
    if scale == 1.0:
        return clip_boxes(boxes, height, width)[0]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    hw, hh = (boxes[:, 2] - boxes[:, 0]) * scale / 2, (boxes[:, 3] - boxes[:, 1]) * scale / 2
    return clip_boxes(torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=1), height, width)[0]


def _check_inputs(images, boxes) -> None:
    if len(images) != len(boxes):
        raise DistillError(f"region_embeddings: {len(images)} images but {len(boxes)} box tensors")
    for i, (im, b) in enumerate(zip(images, boxes)):
        if im.ndim != 3 or im.shape[0] != 3:
            raise DistillError(f"region_embeddings: image {i} must be (3, H, W), got {tuple(im.shape)}")
        if b.ndim != 2 or b.shape[1] != 4:
            raise DistillError(f"region_embeddings: boxes of image {i} must be (N, 4) XYXY, got {tuple(b.shape)}")


def pad_replicate(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (3, H_i, W_i) images into (B, 3, Hmax, Wmax), padding by edge replication (so bilinear
    samples near an image's border see its own edge pixels, as a crop of that image would)."""
    Hm = max(int(im.shape[1]) for im in images)
    Wm = max(int(im.shape[2]) for im in images)
    out = []
    for im in images:
        im = im.float()
        if im.shape[1:] != (Hm, Wm):
            im = F.pad(im[None], (0, Wm - im.shape[2], 0, Hm - im.shape[1]), mode="replicate")[0]
        out.append(im)
    return torch.stack(out)


def crop_and_resize(images: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """Batched crop + bilinear resize: images (B, 3, H, W), rois (K, 5) [batch_index, x1, y1, x2, y2]
    in pixels -> (K, 3, size, size). Equals ``F.interpolate(img[:, y1:y2, x1:x2], size,
    mode="bilinear", align_corners=False)`` for integer boxes."""
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)


@torch.no_grad()
def region_embeddings(
    teacher,
    images: Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor],
    mode: str = "crop",
    scales: Sequence[float] = (1.0, 1.5),
    batch_size: int | None = None,
    return_info: bool = False,
):
    """Teacher embeddings of boxes.

    Args:
        images: list of (3, H_i, W_i) float in [0, 1].
        boxes: list of (N_i, 4) float XYXY absolute pixels of image i.
        mode: ``crop`` (ViLD 3.2), ``dense`` (RoIAlign on MaskCLIP patch embeddings) or ``oake``
            (OADP 3.2: adaptive square crop, masked object token; distill/teacher/oake.py).
        scales: crop scales whose embeddings are summed (crop mode; ViLD uses 1x and 1.5x).
        batch_size: crops encoded per forward (default ``teacher.batch_size``).
    Returns:
        list of (N_i, D) float32 on the teacher's device, rows L2-normalised (zero rows for skipped
        boxes); with ``return_info`` also a dict ``{"valid": list[(N_i,) bool], "num_skipped": int,
        "num_clipped": int}``.
    """
    if mode not in MODES:
        raise DistillError(f"regions.mode: {mode!r} is not one of {', '.join(MODES)}")
    images = list(images)
    boxes = [torch.as_tensor(b, dtype=torch.float32) for b in boxes]
    boxes = [b.reshape(0, 4) if b.numel() == 0 else b for b in boxes]
    _check_inputs(images, boxes)
    if mode == "crop" and not scales:
        raise DistillError("regions.scales: expected at least one crop scale (ViLD: 1.0, 1.5)")
    dev = teacher.device
    D = teacher.embed_dim
    valids, clipped_all, n_clipped = [], [], 0
    for im, b in zip(images, boxes):
        H, W = int(im.shape[1]), int(im.shape[2])
        cb, v = clip_boxes(b.to("cpu"), H, W)
        n_clipped += int(((cb != b.to("cpu").float()) & torch.isfinite(b.to("cpu"))).any(dim=1)[v].sum())
        valids.append(v)
        clipped_all.append(cb)
    outs = [torch.zeros(int(b.shape[0]), D, device=dev) for b in boxes]
    total = sum(int(v.sum()) for v in valids)
    if total:
        if mode == "crop":
            _crop_mode(teacher, images, clipped_all, valids, outs, scales, batch_size or teacher.batch_size)
        elif mode == "oake":
            _oake_mode(teacher, images, clipped_all, valids, outs, batch_size or teacher.batch_size)
        else:
            _dense_mode(teacher, images, clipped_all, valids, outs)
    info = {
        "valid": [v.to(dev) for v in valids],
        "num_skipped": sum(int((~v).sum()) for v in valids),
        "num_clipped": n_clipped,
    }
    return (outs, info) if return_info else outs


def _crop_mode(teacher, images, boxes, valids, outs, scales, bs) -> None:
    dev = teacher.device
    padded = pad_replicate(images).to(dev)
    rois, owners = [], []
    for i, (im, b, v) in enumerate(zip(images, boxes, valids)):
        idx = torch.nonzero(v).flatten()
        if idx.numel() == 0:
            continue
        H, W = int(im.shape[1]), int(im.shape[2])
        per_scale = [scale_boxes(b[idx], float(s), H, W) for s in scales]
        rois.append(torch.stack(per_scale))  # (S, n, 4)
        owners.append(torch.stack([torch.full_like(idx, i), idx], dim=1))
    rois_t = torch.cat(rois, dim=1).to(dev)  # (S, K, 4)
    own = torch.cat(owners)  # (K, 2): image index, box index
    K = own.shape[0]
    acc = torch.zeros(K, teacher.embed_dim, device=dev)
    bidx = own[:, 0].to(dev, torch.float32)[:, None]
    for s in range(rois_t.shape[0]):
        for a in range(0, K, bs):
            r = torch.cat([bidx[a : a + bs], rois_t[s, a : a + bs]], dim=1)
            crops = crop_and_resize(padded, r, teacher.image_size)
            acc[a : a + bs] += teacher.encode_images(crops, batch_size=bs)
    acc = F.normalize(acc, dim=-1)
    for i in range(len(images)):
        sel = own[:, 0] == i
        if sel.any():
            outs[i][own[sel, 1].to(dev)] = acc[sel.to(dev)]


def _oake_mode(teacher, images, boxes, valids, outs, bs) -> None:
    """OADP's object-aware extraction (distill/teacher/oake.py): adaptive square crops read by the
    masked object token, the tower's patch stride halved as the reference runs it."""
    from distill.teacher.oake import UPSAMPLE, adaptive_squares, crop_squares, grid_size, object_masks, object_token_embeddings

    dev = teacher.device
    visual = teacher.model.visual
    g = grid_size(visual, teacher.image_size, UPSAMPLE)
    for i, (im, b, v) in enumerate(zip(images, boxes, valids)):
        idx = torch.nonzero(v).flatten()
        if idx.numel() == 0:
            continue
        H, W = int(im.shape[1]), int(im.shape[2])
        sq = adaptive_squares(b[idx], H, W)
        bg = object_masks(b[idx], sq, g)
        for a in range(0, len(idx), bs):
            crops = crop_squares(im[None].to(dev), torch.zeros(len(sq[a : a + bs]), dtype=torch.long), sq[a : a + bs], teacher.image_size)
            with torch.no_grad(), teacher.autocast():
                e = object_token_embeddings(visual, teacher.normalize(crops), bg[a : a + bs].to(dev), UPSAMPLE)
            outs[i][idx[a : a + bs].to(dev)] = F.normalize(e.float(), dim=-1)


def _dense_mode(teacher, images, boxes, valids, outs) -> None:
    from distill.teacher.dense import patch_embeddings

    dev = teacher.device
    size = teacher.dense_image_size
    bs = max(1, teacher.batch_size // 4)
    for a in range(0, len(images), bs):
        chunk = list(range(a, min(a + bs, len(images))))
        x = torch.stack([teacher.resize(images[i][None].float().to(dev), size)[0] for i in chunk])
        fmap = patch_embeddings(teacher, x, size=size)  # (b, D, h, w), unit vectors
        h, w = fmap.shape[-2:]
        rois = []
        for j, i in enumerate(chunk):
            H, W = int(images[i].shape[1]), int(images[i].shape[2])
            b = boxes[i][valids[i]].to(dev)
            sx, sy = w / W, h / H
            scaled = b * torch.tensor([sx, sy, sx, sy], device=dev)
            rois.append(torch.cat([torch.full((b.shape[0], 1), float(j), device=dev), scaled], dim=1))
        r = torch.cat(rois)
        if r.shape[0] == 0:
            continue
        # One output cell with adaptive sampling (ceil(box side) samples per side, spaced <= 1 patch).
        pooled = roi_align(fmap, r, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        pooled = F.normalize(pooled.flatten(1), dim=-1)
        start = 0
        for i in chunk:
            n = int(valids[i].sum())
            outs[i][torch.nonzero(valids[i]).flatten().to(dev)] = pooled[start : start + n]
            start += n


def embed_regions_to_cache(
    teacher,
    items,
    cache,
    mode: str = "crop",
    scales: Sequence[float] = (1.0, 1.5),
    images_per_batch: int = 8,
) -> dict:
    """Fill an :class:`~distill.teacher.cache.EmbeddingCache` with region embeddings, resuming
    where it stopped.

    Args:
        items: iterable of ``(image_id, image (3, H, W) in [0, 1], boxes (N, 4) XYXY)``; images
            already in the cache are skipped (their image is still read; pass a filtered iterable
            to avoid even that).
    Returns:
        ``{"images": written, "skipped_boxes": n, "clipped_boxes": n}``.
    """
    stats = {"images": 0, "skipped_boxes": 0, "clipped_boxes": 0}
    batch: list = []

    def run() -> None:
        embs, info = region_embeddings(teacher, [b[1] for b in batch], [b[2] for b in batch], mode=mode, scales=scales, return_info=True)
        cache.write([b[0] for b in batch], embs)
        stats["images"] += len(batch)
        stats["skipped_boxes"] += info["num_skipped"]
        stats["clipped_boxes"] += info["num_clipped"]
        batch.clear()

    for image_id, image, boxes in items:
        if int(image_id) in cache:
            continue
        batch.append((int(image_id), image, boxes))
        if len(batch) >= images_per_batch:
            run()
    if batch:
        run()
    cache.close()
    return stats


def embed_regions_sharded(
    teacher,
    image_ids: Sequence[int],
    load: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    cache,
    mode: str = "crop",
    scales: Sequence[float] = (1.0, 1.5),
    images_per_batch: int = 8,
) -> dict:
    """Fill an :class:`~distill.teacher.cache.EmbeddingCache` with the region embeddings of
    ``image_ids``, rank-sharded under torchrun and resumable.

    The missing ids are cut into the cache's shards (:meth:`~distill.teacher.cache.EmbeddingCache.plan`:
    fixed runs of ``shard_size`` consecutive images); rank ``r`` of ``W`` embeds shards ``r, r + W,
    ...`` in batches of ``images_per_batch`` that never cross a shard (so a shard is computed from
    the same batches whatever ``W``), skips shards already on disk (a killed run's), and writes each
    shard atomically. After a barrier rank 0 lists every shard in the index and marks it complete;
    after a second one the other ranks re-read it. In one process the index is also rewritten after
    every shard (as :meth:`~distill.teacher.cache.EmbeddingCache.write` does).

    Args:
        load: ``image_id -> (image (3, H, W) in [0, 1], boxes (N, 4) XYXY)``, called only for the
            images this rank embeds.
    Returns:
        this rank's counts: ``{"images", "skipped_boxes", "clipped_boxes", "shards", "shards_skipped"}``.
    """
    from distill.engine.distributed import barrier, get_rank, get_world_size, rank_shards

    rank, world = get_rank(), get_world_size()
    plan = cache.plan(image_ids)
    stats = {"images": 0, "skipped_boxes": 0, "clipped_boxes": 0, "shards": 0, "shards_skipped": 0}
    written: dict[int, dict] = {}
    bs = max(1, int(images_per_batch))
    for j in rank_shards(len(plan), rank, world):
        k, ids = plan[j]
        stats["shards"] += 1
        entry = cache.shard_done(k, ids)
        if entry is None:
            embs: list[torch.Tensor] = []
            for a in range(0, len(ids), bs):
                items = [load(i) for i in ids[a : a + bs]]
                out, info = region_embeddings(teacher, [it[0] for it in items], [it[1] for it in items], mode=mode, scales=scales, return_info=True)
                embs.extend(e.to("cpu") for e in out)
                stats["skipped_boxes"] += info["num_skipped"]
                stats["clipped_boxes"] += info["num_clipped"]
            entry = cache.write_shard(k, ids, embs)
            stats["images"] += len(ids)
        else:
            stats["shards_skipped"] += 1
        if world == 1:
            cache.add_shards([entry])
        else:
            written[k] = entry
    barrier()
    if rank == 0:
        cache.finish(plan, written)
    barrier()
    if rank != 0:
        cache.refresh()
    return stats
