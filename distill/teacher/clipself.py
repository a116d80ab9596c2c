"""CLIPSelf: the teacher's image tower distils itself for dense prediction (Wu et al., "CLIPSelf:
Vision Transformer Distills Itself for Open-Vocabulary Dense Prediction", ICLR 2024).

A student copy of the frozen teacher's image tower is fine-tuned so that its dense feature map --
the MaskCLIP value path of distill/teacher/dense.py, the map :func:`~distill.teacher.dense.pixel_embeddings`
computes -- RoIAligned over a box matches (loss ``1 - cos``) the frozen teacher's image embedding
(``encode_image``, the class-token pooling) of the crop of that box. Boxes are the cells of a random
m x n grid of each image; no labels of any kind are used, only images.

As in the released code (github.com/wusize/CLIPSelf, ``src/training/clipself.py``; grid boxes from
``GridDistillDataset`` in ``src/training/data.py``; dense map and RoI pooling from
``VisionTransformer._extract_roi_features_v2`` in ``src/open_clip/transformer.py``):

- grid shapes (m rows, n cols): m in 1..max_split, n in [(m + 1) // 2, min(2m, max_split)], one
  shape drawn uniformly per image; a random subset of at most ``max_boxes`` of its cells;
- teacher target: the crop of the cell (optionally enlarged by ``crop_scale``), resized to the
  teacher's input size, through the frozen tower's ``encode_image``;
- student: the whole image at ``teacher.dense_image_size``; the last block keeps its value path
  only (MaskCLIP / ``forward_without_attn``), tokens are L2-normalised, then RoIAlign with one
  output cell (adaptive sampling, aligned), normalised again;
- ``ln_post`` and ``proj`` stay frozen (the released ``lock`` leaves them out of the unlocked
  groups): the map stays in the joint space the frozen text tower reads.

Output: ``clipself.out`` (default ``{work_dir}/teacher/dense_tower.safetensors``), a full open_clip
state dict (the original text tower, the distilled image tower) whose metadata records the
fingerprint of the teacher it came from; ``teacher.dense_tower=<that file>`` makes every dense
consumer use it (:func:`distill.teacher.clip.attach_dense_tower`). A manifest beside it
(``dense_tower.manifest.json``) lets a rerun with the same inputs reuse it. The training loop is
distill/engine/train.py (resume, DDP, AMP, the non-finite guard); its ``metrics.jsonl`` and, while
it runs, its checkpoints are in ``teacher/dense_tower_train/``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from distill.config import TrainConfig, config_hash, to_dict
from distill.engine.device import autocast, autocast_dtype, full_precision, torch_threads
from distill.engine.distributed import get_rank, is_main
from distill.engine.optim import FunctionLR, clip_adamw, warmup_cosine
from distill.engine.train import DrawnBatches, micro_batch_size, run_dir, train
from distill.errors import DistillError
from distill.files import atomic_path, output_is_current, sha256_json, write_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- grids


def grid_choices(max_split: int) -> list[tuple[int, int]]:
    """The grid shapes (rows m, cols n) of the released ``GridDistillDataset._init_choices``:
    m in 1..max_split, n in [(m + 1) // 2, min(2m, max_split)] (aspect at most about 2:1)."""
    if max_split < 1:
        raise DistillError(f"clipself.max_split: expected >= 1, got {max_split}")
    return [(m, n) for m in range(1, max_split + 1) for n in range((m + 1) // 2, min(2 * m, max_split) + 1)]


def grid_boxes(rows: int, cols: int, height: float, width: float) -> torch.Tensor:
    """The cells of a rows x cols grid over a (height, width) image, row-major.

    Returns (rows * cols, 4) float32 XYXY absolute pixels; the cells tile the image exactly."""
    ys = torch.linspace(0, float(height), rows + 1)
    xs = torch.linspace(0, float(width), cols + 1)
    y0, x0 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4)


def expand_boxes(boxes: torch.Tensor, scale: float, height: float, width: float) -> torch.Tensor:
    """Boxes (N, 4) XYXY grown by ``scale`` around their centres, clipped to the image (the
    released ``crop_scale``)."""
    if scale == 1.0:
        return boxes
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    lo = torch.maximum(c - half, torch.zeros(2, device=boxes.device))
    hi = torch.minimum(c + half, torch.tensor([float(width), float(height)], device=boxes.device))
    return torch.cat([lo, hi], dim=1)


class GridSampler:
    """Draws training batches: whole images and, per image, the grid cells to distil.

    images: (N, 3, H, W) uint8. ``__call__(B)`` -> (images (B, 3, H, W) float in [0, 1], list of B
    boxes (k_i, 4) XYXY pixels of that image), deterministic from ``seed``."""

    def __init__(self, images: torch.Tensor, max_split: int, max_boxes: int, seed: int = 0):
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise DistillError(f"clipself: expected images (N, 3, H, W) with N >= 1, got {tuple(images.shape)}")
        self.images = images
        self.choices = grid_choices(max_split)
        self.max_boxes = max_boxes
        self.g = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)

    def __call__(self, B: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        H, W = self.images.shape[-2:]
        rows = torch.randint(len(self.images), (B,), generator=self.g)
        x = self.images[rows].float() / 255.0
        boxes = []
        for _ in range(B):
            m, n = self.rng.choice(self.choices)
            cells = grid_boxes(m, n, H, W)
            keep = torch.randperm(len(cells), generator=self.g)[: self.max_boxes]
            boxes.append(cells[keep])
        return x, boxes


# ----------------------------------------------------------------------------------------- loss


def _rois(boxes: list[torch.Tensor], device) -> torch.Tensor:
    return torch.cat([torch.cat([torch.full((len(b), 1), float(i), device=b.device), b.float()], dim=1) for i, b in enumerate(boxes)]).to(device)


@torch.no_grad()
def teacher_targets(teacher, images: torch.Tensor, boxes: list[torch.Tensor], crop_scale: float = 1.0) -> torch.Tensor:
    """The frozen teacher's ``encode_image`` of every box's crop.

    images: (B, 3, H, W) in [0, 1]; boxes: B tensors (k_i, 4) XYXY pixels.
    Returns (sum k_i, D) float32, L2-normalised, in box order."""
    from distill.teacher.regions import crop_and_resize

    H, W = images.shape[-2:]
    crop_boxes = [expand_boxes(b, crop_scale, H, W) for b in boxes]
    crops = crop_and_resize(images.to(teacher.device), _rois(crop_boxes, teacher.device), teacher.image_size)
    return teacher.encode_images(crops)


def student_roi_embeddings(visual, teacher, images: torch.Tensor, boxes: list[torch.Tensor], size: int | None = None) -> torch.Tensor:
    """RoIAlign of the student tower's MaskCLIP map (with gradients) over ``boxes``.

    images: (B, 3, H, W) in [0, 1], resized to ``size`` (default ``teacher.dense_image_size``);
    boxes: B tensors (k_i, 4) XYXY pixels of the (H, W) images.
    Returns (sum k_i, D) float32, L2-normalised."""
    from distill.teacher.dense import dense_feature_map

    size = size or teacher.dense_image_size
    H, W = images.shape[-2:]
    x = teacher.normalize(teacher.resize(images.to(teacher.device, torch.float32), size))
    fmap = dense_feature_map(visual, x)  # (B, D, h, w), unit vectors
    h, w = fmap.shape[-2:]
    scale = torch.tensor([w / W, h / H, w / W, h / H], device=boxes[0].device if boxes else "cpu")
    rois = _rois([b * scale for b in boxes], fmap.device)
    pooled = roi_align(fmap, rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return F.normalize(pooled.flatten(1), dim=-1)


def cosine_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` averaged over rows (both (N, D)); 0 for N = 0 (still differentiable)."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    return 1.0 - (F.normalize(student.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1).mean()


class ClipSelfLoss(torch.nn.Module):
    """The CLIPSelf loss of a batch ``(images (B, 3, H, W) in [0, 1], B boxes (k_i, 4) XYXY)``:
    ``{"loss_cosine": 1 - mean cos(student RoI, teacher crop)}`` (the training loop's model
    contract). Only the student tower is a submodule: the frozen :class:`~distill.teacher.clip.Teacher`
    gives the targets at its own precision (autocast off around it), never gradients, and is
    neither moved nor saved with the student."""

    def __init__(self, visual, teacher, crop_scale: float = 1.0):
        super().__init__()
        self.visual = visual
        self.teacher = [teacher]  # a list: not registered as a submodule
        self.crop_scale = crop_scale

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        teacher = self.teacher[0]
        with full_precision(teacher.device):
            target = teacher_targets(teacher, images, boxes, self.crop_scale)
        student = student_roi_embeddings(self.visual, teacher, images, boxes)
        with full_precision(teacher.device):
            return {"loss_cosine": cosine_loss(student, target)}


def clipself_loss(visual, teacher, images: torch.Tensor, boxes: list[torch.Tensor], crop_scale: float = 1.0, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """:class:`ClipSelfLoss` of one batch with the student under ``precision`` autocast.

    visual: the student tower (trainable); teacher: the frozen :class:`~distill.teacher.clip.Teacher`."""
    with autocast(teacher.device, precision):
        return ClipSelfLoss(visual, teacher, crop_scale)(images, boxes)


# ------------------------------------------------------------------------------------- training


def trainable_parameters(visual) -> list[tuple[str, torch.nn.Parameter]]:
    """The student's trainable parameters: the whole tower but ``ln_post`` and ``proj`` (frozen, as
    in the released code), so the map stays in the joint space of the frozen text tower."""
    out = []
    for n, p in visual.named_parameters():
        frozen = n == "proj" or n.startswith("ln_post.")
        p.requires_grad_(not frozen)
        if not frozen:
            out.append((n, p))
    return out


def _check(cc) -> None:
    bad = []
    if cc.steps < 1:
        bad.append(f"clipself.steps: expected >= 1, got {cc.steps}")
    if cc.batch_size < 1:
        bad.append(f"clipself.batch_size: expected >= 1, got {cc.batch_size}")
    if not cc.lr > 0:
        bad.append(f"clipself.lr: expected > 0, got {cc.lr}")
    if cc.weight_decay < 0:
        bad.append(f"clipself.weight_decay: expected >= 0, got {cc.weight_decay}")
    if cc.warmup < 0:
        bad.append(f"clipself.warmup: expected >= 0, got {cc.warmup}")
    if cc.max_split < 1:
        bad.append(f"clipself.max_split: expected >= 1, got {cc.max_split}")
    if cc.max_boxes < 1:
        bad.append(f"clipself.max_boxes: expected >= 1, got {cc.max_boxes}")
    if not cc.crop_scale >= 1.0:
        bad.append(f"clipself.crop_scale: expected >= 1.0, got {cc.crop_scale}")
    if not cc.image_dirs:
        bad.append("clipself.image_dirs: expected at least one image folder")
    if cc.threads < 0:
        bad.append(f"clipself.threads: expected >= 0, got {cc.threads}")
    if cc.log_period < 1:
        bad.append(f"clipself.log_period: expected >= 1, got {cc.log_period}")
    if not cc.out:
        bad.append("clipself.out: expected an output .safetensors path")
    if bad:
        raise DistillError(bad[0])
    autocast_dtype(cc.precision)


def image_folders(cfg) -> list[Path]:
    """``clipself.image_dirs`` resolved against ``data.image_root`` (absolute paths kept)."""
    root = Path(cfg.data.image_root)
    return [Path(d) if Path(d).is_absolute() else root / d for d in cfg.clipself.image_dirs]


def load_images(folders: list[Path], size: int) -> tuple[torch.Tensor, list[str]]:
    """Every image of ``folders`` as (N, 3, size, size) uint8 (resized when needed, bilinear with
    antialias), and their paths. A missing or empty folder is a :class:`DistillError`."""
    import numpy as np

    from distill.data.images import list_images, load_image

    paths = [p for f in folders for p in list_images(f)]
    out = []
    for p in paths:
        x = torch.from_numpy(np.ascontiguousarray(load_image(p))).permute(2, 0, 1)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            x = x.round().clamp(0, 255).to(torch.uint8)
        out.append(x)
    return torch.stack(out), [str(p) for p in paths]


def _inputs(cfg, teacher, paths: list[str]) -> dict:
    return {
        "teacher": teacher.fingerprint,
        "dense_image_size": teacher.dense_image_size,
        "clipself": config_hash(cfg.clipself),
        "images": sha256_json(sorted(paths))[:16],
        "num_images": len(paths),
    }


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name.replace(".safetensors", "") + ".manifest.json")


def uses_clipself(cfg) -> bool:
    """True when the teacher's dense tower is the file ``distill teacher clipself`` writes
    (``teacher.dense_tower`` is ``clipself.out``): the pipeline's clipself stage makes it."""
    from distill.files import is_output_of

    return is_output_of(cfg.teacher.dense_tower, cfg.clipself.out)


def clipself(cfg, teacher=None, force: bool = False, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune a copy of the teacher's image tower with CLIPSelf; returns ``clipself.out``.

    ``teacher`` defaults to ``build_teacher(cfg.teacher)`` without its dense tower (CLIPSelf always
    starts from, and distils from, the original tower). Reuses an existing output whose manifest
    inputs match, unless ``force``; ``resume`` continues a killed run from its last checkpoint
    (``<clipself.out without .safetensors>_train/checkpoints``)."""
    import dataclasses

    from distill.teacher.clip import build_teacher

    cc = cfg.clipself
    _check(cc)
    if teacher is None:
        teacher = build_teacher(dataclasses.replace(cfg.teacher, dense_tower=""))
    if getattr(teacher, "dense_tower", None) is not None:
        raise DistillError("clipself: the teacher already has a dense tower; CLIPSelf distils the original teacher (set teacher.dense_tower='')")
    out = Path(cc.out)
    images, paths = load_images(image_folders(cfg), teacher.dense_image_size)
    inputs = _inputs(cfg, teacher, paths)
    man = manifest_path(out)
    if not force and output_is_current(out, man, inputs):
        log.info("clipself: inputs unchanged, reusing %s", out)
        return out
    t0 = time.time()
    with torch_threads(cc.threads):
        student, summary = _train(cfg, teacher, images, inputs, out, resume, progress)
    if is_main():
        _save(cfg, teacher, student, out, man, inputs, {**summary, "wall_s": round(time.time() - t0, 1)})
    return out


def _train(cfg, teacher, images: torch.Tensor, inputs: dict, out: Path, resume: bool, progress: bool):
    """The student tower trained by the training loop, and the loop's summary."""
    cc = cfg.clipself
    torch.manual_seed(cc.seed)
    student = copy.deepcopy(teacher.model.visual).float().to(teacher.device)
    trainable_parameters(student)
    opt = clip_adamw(student, cc.lr, cc.weight_decay)
    sched = FunctionLR(opt, functools.partial(warmup_cosine, steps=cc.steps, warmup=cc.warmup, lr=cc.lr))
    tcfg = TrainConfig(max_steps=cc.steps, batch_size=cc.batch_size, lr=cc.lr, weight_decay=cc.weight_decay, optimizer="adamw",
                       warmup=cc.warmup, precision=cc.precision, log_period=cc.log_period, seed=cc.seed, device=str(teacher.device))
    sampler = GridSampler(images, cc.max_split, cc.max_boxes, cc.seed + get_rank())  # rank 0: the single-process draws
    B = micro_batch_size(tcfg)
    log.info("clipself: %d images, %d grid shapes up to %dx%d, %d steps of %d images", len(images), len(sampler.choices), cc.max_split, cc.max_split, cc.steps, cc.batch_size)
    batches = DrawnBatches(lambda: sampler(B), {"torch": sampler.g, "python": sampler.rng})
    summary = train(ClipSelfLoss(student, teacher, cc.crop_scale), batches, tcfg, run_dir(out), resume=resume, device=teacher.device,
                    progress=progress, optimizer=opt, scheduler=sched, precision=cc.precision, final_checkpoint=False,
                    extra={"inputs": sha256_json(inputs)}, hint="try clipself.precision=fp32 or a lower clipself.lr")
    return student.eval(), summary


def _first_logged(folder: Path, key: str) -> float | None:
    """``key`` in the first record of the training loop's ``metrics.jsonl`` in ``folder``."""
    for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if key in rec:
            return rec[key]
    return None


def _save(cfg, teacher, student, out: Path, man: Path, inputs: dict, summary: dict) -> None:
    """The full open_clip state dict (the teacher's, with the student as its image tower) and the
    manifest (``summary``: the training loop's, with ``wall_s``)."""
    from safetensors.torch import save_file

    cc = cfg.clipself
    sd = {k: v.detach().to("cpu").contiguous() for k, v in teacher.model.state_dict().items()}
    for k, v in student.state_dict().items():
        sd[f"visual.{k}"] = v.detach().to("cpu", sd[f"visual.{k}"].dtype).contiguous()
    with atomic_path(out) as tmp:
        save_file(sd, str(tmp), metadata={"format": "open_clip", "model": teacher.name, "teacher_fingerprint": teacher.fingerprint, "method": "clipself"})
    write_json(man, {
        "stage": "teacher_clipself",
        "inputs": inputs,
        "steps": cc.steps,
        "first_loss": _first_logged(run_dir(out), "loss_cosine"),
        "final_loss": summary.get("loss_cosine"),
        "wall_s": summary["wall_s"],
        "torch": torch.__version__,
        "clipself_config": to_dict(cc),
    })
