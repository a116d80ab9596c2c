"""The teacher's targets of OADP's global and block distillation (Wang et al., CVPR 2023, 3.3;
github.com/LutingWang/OADP, ``oadp/oake/blocks.py`` and ``globals.py``).

Blocks (``blocks.py`` ``Dataset``): squares of the tower's input side ``r`` (224 px for CLIP) laid
over the image with a stride of at most ``r / 2`` and spread evenly so they end at the border
(``_partition``: ``n = (L - r - 1) // s + 1`` steps of ``(L - r) / n``), then again on the image
shrunk by 1.5, and so on while a block still fits; an image smaller than a block has only the
first entry. The first entry is the whole image's centre square, which is also what the global
target reads (``globals.py``: CLIP's own transform, resize + centre crop), so its embedding is
the global target. The reference's centre-square tuple reads ``((w - h) / 2, 0, h, h)``, XYWH
for a wide image; here it is the XYXY square ``[(w - h) / 2, 0, (w + h) / 2, h]``.

Any image size works: blocks overlap rather than requiring the size to divide evenly.
"""

from __future__ import annotations

import torch

RESCALE = 1.5  # blocks.py Dataset(rescale=1.5)


def partition(length: int, block: int, max_stride: int) -> list[int]:
    """Block starts along one side (blocks.py ``_partition``)."""
    if length < block:
        return []
    out = [0]
    if length == block:
        return out
    n = (length - block - 1) // max_stride + 1
    q, r = divmod(length - block, n)
    for i in range(n):
        out.append(out[-1] + q + (i < r))
    return out


def block_boxes(width: int, height: int, block: int, max_stride: int | None = None, rescale: float = RESCALE) -> torch.Tensor:
    """(K, 4) XYXY boxes in the image's pixels: the centre square first, then the blocks of every
    scale (blocks.py ``_preprocess`` / ``_partitions``; a block at scale ``k`` covers ``block * k``
    pixels of the original image)."""
    stride = max_stride or block // 2
    side = min(width, height)
    boxes = [[(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2]]
    w, h, scale = width, height, 1.0
    while True:
        xs, ys = partition(w, block, stride), partition(h, block, stride)
        if not xs or not ys:
            break
        for x in xs:  # itertools.product(partition(w), partition(h)): x outer
            for y in ys:
                boxes.append([x * scale, y * scale, (x + block) * scale, (y + block) * scale])
        w, h = int(w / rescale), int(h / rescale)
        scale *= rescale
    return torch.tensor(boxes, dtype=torch.float32)


@torch.no_grad()
def pyramid_embeddings(teacher, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (3, H, W) in [0, 1] -> (block boxes (K, 4), the teacher's unit embeddings of
    them (K, D)); row 0 (the centre square) is the global target."""
    from distill.teacher.regions import crop_and_resize

    H, W = int(image.shape[1]), int(image.shape[2])
    boxes = block_boxes(W, H, teacher.image_size)
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1).to(teacher.device)
    crops = crop_and_resize(image[None].to(teacher.device), rois, teacher.image_size)
    return boxes, teacher.encode_images(crops)


def pyramid_cache_key(teacher) -> dict:
    return {"kind": "pyramid", "teacher": teacher.fingerprint, "precision": teacher.precision, "block": teacher.image_size, "rescale": RESCALE}
