"""CLIP-ES on a folder: the per-batch chain (:func:`clip_es_cams`), the inputs it reads (image-level
labels, background words, templates) and ``distill cam`` (:func:`run_cam`), sharded across ranks.
Outputs are described in :mod:`distill.cam`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from distill.cam.caa import attention_affinity, refine_cams
from distill.cam.gradcam import last_block_gradcam, normalize_cam, patch_size_of, trunk_tokens
from distill.cam.refine import cams_to_mask, crf_available, dense_crf, upsample_cams
from distill.errors import DistillError
from distill.vocab import resolve_vocab


# The 25 background words of the repo for VOC (clip_text.py: BACKGROUND_CATEGORY), for reference;
# distill/prompts/background_voc.txt holds the same list.
CLIP_ES_VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
)


# ---------------------------------------------------------------------------------------------


@dataclass
class ImageCams:
    """CAMs of one image at patch resolution. ``labels``: vocabulary indices present."""

    labels: list[int]
    gradcam: torch.Tensor  # (K, h, w) softmax (or plain) Grad-CAM, normalised
    refined: torch.Tensor | None  # (K, h, w) after CAA, normalised; None without CAA
    plain: torch.Tensor | None = None  # (K, h, w) plain Grad-CAM (ablation)


def clip_es_cams(
    teacher,
    images: torch.Tensor,
    labels: Sequence[Sequence[int]],
    text: torch.Tensor,
    bg_text: torch.Tensor | None,
    *,
    logit_scale: float = 100.0,
    pool: str = "mean",
    caa: bool = True,
    caa_layers: int = 8,
    caa_power: int = 2,
    box_thresh: float = 0.4,
    softmax: bool = True,
    with_plain: bool = False,
) -> list[ImageCams]:
    """CLIP-ES CAMs for a batch. images: (B, 3, H, W) float [0, 1], H, W multiples of the patch
    size; labels[b]: vocabulary indices present in image b (may be empty); text (C, D), bg_text
    (M, D) L2-normalised. ``with_plain`` also computes plain Grad-CAM (second last-block pass)."""
    tokens, attn, grid = trunk_tokens(teacher, images, record_attention=caa)
    out = last_block_gradcam(teacher, tokens, grid, labels, text, bg_text, softmax=softmax,
                             logit_scale=logit_scale, pool=pool, need_attention=caa)
    plain = None
    if with_plain:
        plain = last_block_gradcam(teacher, tokens, grid, labels, text, None, softmax=False,
                                   logit_scale=logit_scale, pool=pool, need_attention=False).cams
    results = []
    r = 0
    j = 0  # index into attn_last (images with labels only)
    for b, ks in enumerate(labels):
        n = len(ks)
        cams = out.cams[r : r + n]
        refined = None
        if caa and n:
            per_block = [a[b] for a in attn] + [out.attn_last[j]]
            aff = attention_affinity(per_block, caa_layers, caa_power)
            refined = normalize_cam(refine_cams(cams, aff, box_thresh))
        elif caa:
            refined = cams.clone()
        results.append(ImageCams(list(ks), cams.cpu(), None if refined is None else refined.cpu(),
                                 None if plain is None else plain[r : r + n].cpu()))
        r += n
        j += 1 if n else 0
    return results


# ---------------------------------------------------------------------------------------------
# Plain Grad-CAM through pytorch_grad_cam (the reference, and the bench's per-class loop)
# ---------------------------------------------------------------------------------------------


def read_word_list(source: str, what: str = "cam.background") -> list[str]:
    """Background words: a file (one a line, ``#`` comments) or the words themselves; "" = none."""
    from distill.config import WORDS_EXPECTED
    from distill.files import read_lines

    return list(read_lines(source, what, WORDS_EXPECTED)) if source else []


def read_templates(source: str) -> list[str] | None:
    """``cam.templates``: a template file (one a line, with ``{}``) or the templates themselves."""
    from distill.teacher.text import load_templates

    return list(load_templates(source, "cam.templates")) if source else None


@dataclass
class LabelEntry:
    image_id: int
    file_name: str
    labels: list[int]  # vocabulary indices, sorted, unique


def read_image_labels(path: str | Path, vocab) -> list[LabelEntry]:
    """``[{"image_id", "file_name", "category_ids": [...]} ...]`` (the world's image_labels json);
    ``"categories": [names]`` is accepted instead of ids. Unknown ids / names are errors."""
    from distill.files import read_json

    data = read_json(path, "image-level labels")
    if isinstance(data, dict) and "images" in data:
        data = data["images"]
    if not isinstance(data, list):
        raise DistillError(f"{path}: expected a list of {{image_id, file_name, category_ids}} objects")
    id_to_index = {int(i): k for k, i in enumerate(vocab.ids)}
    name_to_index = {}  # a class's name, then its prompt texts (prompt name, synonyms)
    for k, words in enumerate([(n,) for n in vocab.names] + list(vocab.prompts)):
        for p in words:
            name_to_index.setdefault(p.strip().lower(), k % len(vocab))
    out = []
    for n, e in enumerate(data):
        if not isinstance(e, dict) or "file_name" not in e:
            raise DistillError(f"{path}: entry {n}: expected an object with file_name and category_ids")
        labels = []
        if "category_ids" in e:
            for c in e["category_ids"] or []:
                if isinstance(c, bool) or not isinstance(c, int) or c not in id_to_index:
                    raise DistillError(
                        f"{path}: entry {n} ({e['file_name']}): unknown category id {c!r}; "
                        f"valid ids: {', '.join(map(str, vocab.ids[:30]))}{' ...' if len(vocab) > 30 else ''}"
                    )
                labels.append(id_to_index[c])
        for name in e.get("categories", []) or []:
            key = str(name).strip().lower()
            if key not in name_to_index:
                raise DistillError(
                    f"{path}: entry {n} ({e['file_name']}): unknown class {name!r}; "
                    f"valid: {', '.join(vocab.names[:20])}{' ...' if len(vocab) > 20 else ''}"
                )
            labels.append(name_to_index[key])
        image_id = e.get("image_id", n)
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise DistillError(f"{path}: entry {n}: image_id must be an int, got {image_id!r}")
        out.append(LabelEntry(image_id, str(e["file_name"]), sorted(set(labels))))
    return out


def resize_for_teacher(image: np.ndarray, size: int, patch: int, mode: str = "square") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float [0, 1] with h, w multiples of ``patch`` (see module doc)."""
    H, W = image.shape[:2]
    if mode == "square":
        if size % patch:
            raise DistillError(f"cam.image_size: {size} is not a multiple of the patch size {patch}")
        th, tw = size, size
    elif mode == "patch_multiple":
        s = size / max(H, W) if size else 1.0  # size 0: the original scale (repo: scales=[1.0])
        th = int(math.ceil(H * s / patch) * patch)
        tw = int(math.ceil(W * s / patch) * patch)
    else:
        raise DistillError(f"cam.resize: {mode!r} is not one of square, patch_multiple")
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float()[None] / 255.0
    if (th, tw) != (H, W):
        # bicubic as the repo (PIL BICUBIC), antialiased when shrinking
        x = F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    return x[0]


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---------------------------------------------------------------------------------------------
# Stage: images + image-level labels -> seeds, masks, panels
# ---------------------------------------------------------------------------------------------


def _text_features(teacher, cfg, vocab) -> tuple[torch.Tensor, torch.Tensor | None]:
    from distill.teacher.text import text_embeddings
    from distill.vocab import Vocabulary

    templates = read_templates(cfg.cam.templates) if cfg.cam.templates else (cfg.teacher.templates or None)
    text = text_embeddings(teacher, vocab, templates)
    words = read_word_list(cfg.cam.background)
    bg = None
    if words:
        bvocab = Vocabulary(names=tuple(dict.fromkeys(words)), source="cam.background")
        bg = text_embeddings(teacher, bvocab, templates)
    return text.float(), None if bg is None else bg.float()


def _resolve_inputs(cfg, images: str | None, labels: str | None) -> tuple[Path, Path, str]:
    """``images`` is a split name (train / val / unlabeled: ``data.image_root``) or a folder."""
    images = images or cfg.cam.images
    labels = labels or cfg.cam.labels
    if not images:
        raise DistillError("cam.images: expected a split name (train, val, ...) or an image folder")
    p = Path(images)
    if not p.is_dir() and "/" not in images and (Path(cfg.data.image_root) / images).is_dir():
        root, split = Path(cfg.data.image_root), images
        labels = labels or cfg.data.image_labels.replace("{split}", split)
    elif p.is_dir():
        root, split = p, p.name
    elif "/" not in images and labels and Path(cfg.data.image_root).is_dir():
        # a flat image folder (VOC: JPEGImages/): the split is the set of images the labels json lists
        root, split = Path(cfg.data.image_root), images
    else:
        raise DistillError(f"cam.images: {images!r} is neither an image folder nor a split under {cfg.data.image_root}")
    if not labels:
        raise DistillError("cam.labels: expected an image-level labels json (--labels)")
    return root, Path(labels), split


def _image_path(root: Path, file_name: str) -> Path:
    from distill.files import safe_join

    p = safe_join(root, file_name)
    if not p.is_file():
        alt = safe_join(root, Path(file_name).name)
        if alt.is_file():
            return alt
    return p


def _rel_stem(file_name: str, split: str) -> Path:
    """Output name relative to ``masks/``: ``{split}/{stem}`` (``train/000012``)."""
    fn = Path(file_name)
    parts = fn.parts
    if fn.is_absolute() or ".." in parts:  # an input name must not steer outputs out of cam.out
        raise DistillError(f"{file_name!r}: image-label file_name is absolute or contains '..' (expected a path relative to the image folder)")
    if len(parts) >= 2:
        return Path(*parts[:-1]) / fn.stem
    return Path(split) / fn.stem


def _gt_path(sem_root: Path, file_name: str, split: str) -> Path:
    """The semantic PNG of an image: ``{semantic_root}/{split}/{stem}.png`` (the world's layout),
    else the flat ``{semantic_root}/{stem}.png`` (VOC's SegmentationClass(Aug)/)."""
    nested = Path(sem_root) / _rel_stem(file_name, split).with_suffix(".png")
    if not nested.is_file():
        flat = Path(sem_root) / f"{Path(file_name).stem}.png"
        if flat.is_file():
            return flat
    return nested


def _write_png(path: Path, mask: np.ndarray) -> None:
    from distill.files import write_bytes

    ok, buf = cv2.imencode(".png", mask)
    if not ok:
        raise DistillError(f"{path}: could not encode PNG")
    write_bytes(path, buf.tobytes())


def _write_npz(path: Path, **arrays) -> None:
    import io as _io

    from distill.files import write_bytes

    buf = _io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(path, buf.getvalue())


def _check_cfg(c, max_images: int = 0) -> None:
    if max_images < 0:
        raise DistillError(f"max_images: expected >= 0 (0 = all images), got {max_images}")
    if c.tower not in ("teacher", "dense_tower"):
        raise DistillError(f"cam.tower: {c.tower!r} is not one of teacher, dense_tower")
    if c.pool not in ("mean", "model"):
        raise DistillError(f"cam.pool: {c.pool!r} is not one of mean, model")
    if c.resize not in ("square", "patch_multiple"):
        raise DistillError(f"cam.resize: {c.resize!r} is not one of square, patch_multiple")
    if not 0 <= c.conf_thresh <= 1:
        raise DistillError(f"cam.conf_thresh: expected a value in [0, 1], got {c.conf_thresh}")
    if c.caa_layers < 1:
        raise DistillError(f"cam.caa_layers: expected >= 1, got {c.caa_layers}")
    if c.caa_power < 1:
        raise DistillError(f"cam.caa_power: expected an integer >= 1, got {c.caa_power}")
    if c.conf_source not in ("prob", "score"):
        raise DistillError(f"cam.conf_source: {c.conf_source!r} is not one of prob, score")
    if c.batch_size < 1:
        raise DistillError(f"cam.batch_size: expected >= 1, got {c.batch_size}")


def _image_size(cfg, teacher) -> int:
    return cfg.cam.image_size or getattr(teacher, "dense_image_size", 0) or cfg.teacher.dense_image_size


def _compute_batch(teacher, cfg, batch_imgs: list[np.ndarray], batch_labels: list[list[int]], text, bg,
                   with_plain: bool = False, caa: bool = True) -> list[ImageCams]:
    """Resize and run :func:`clip_es_cams`; images of different sizes (patch_multiple) run one by one."""
    c = cfg.cam
    ps = patch_size_of(teacher)
    size = _image_size(cfg, teacher) if c.resize == "square" else c.image_size
    xs = [resize_for_teacher(im, size, ps, c.resize) for im in batch_imgs]
    kw = dict(logit_scale=logit_scale_of(cfg, teacher), pool=c.pool, caa=caa, caa_layers=c.caa_layers,
              caa_power=c.caa_power, box_thresh=c.caa_box_thresh, with_plain=with_plain)
    if all(x.shape == xs[0].shape for x in xs):
        return clip_es_cams(teacher, torch.stack(xs), batch_labels, text, bg, **kw)
    out = []
    for x, lab in zip(xs, batch_labels):
        out += clip_es_cams(teacher, x[None], [lab], text, bg, **kw)
    return out


def _bg_rule(c) -> str:
    """The background score of :func:`cams_to_mask` in words (the panels' title)."""
    if c.bg_thresh > 0:
        return f"{c.bg_thresh:g}"
    return "1 - max CAM" if c.bg_power == 1 else f"(1 - max CAM) ** {c.bg_power:g}"


def logit_scale_of(cfg, teacher) -> float:
    """``cam.logit_scale``, or the teacher's learned ``exp(logit_scale)`` when it is <= 0 (CLIP-ES
    3.2 uses 100, which is OpenAI CLIP's learned scale)."""
    if cfg.cam.logit_scale > 0:
        return float(cfg.cam.logit_scale)
    return float(teacher.model.logit_scale.exp())


class _DenseTowerModel:
    """``teacher.model`` with ``visual`` replaced by the dense tower (text and logit scale kept).
    Only ``visual`` is swapped: CLIP-ES reads the tower through it (``_visual``); the model's own
    ``encode_image`` would still run the original tower."""

    def __init__(self, model, visual):
        self._model, self.visual = model, visual

    def __getattr__(self, name):
        if name == "_model":  # not set yet (copy / pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self._model, name)


def teacher_for_cam(teacher, cfg):
    """``teacher`` as CLIP-ES reads it: ``cam.tower=dense_tower`` swaps in the CLIPSelf dense tower."""
    import dataclasses

    if cfg.cam.tower == "teacher":
        return teacher
    if cfg.cam.tower != "dense_tower":
        raise DistillError(f"cam.tower: {cfg.cam.tower!r} is not one of teacher, dense_tower")
    dv = getattr(teacher, "dense_tower", None)
    if dv is None:
        raise DistillError("cam.tower=dense_tower: the teacher has no dense tower (set teacher.dense_tower to the file `distill teacher clipself` writes)")
    if isinstance(teacher.model, _DenseTowerModel):
        return teacher
    return dataclasses.replace(teacher, model=_DenseTowerModel(teacher.model, dv))


def _load_teacher(cfg):
    from distill.engine.distributed import init_distributed
    from distill.teacher.clip import build_teacher

    _, world, local_rank = init_distributed()  # a no-op unless launched by torchrun
    device = None
    if world > 1 and torch.cuda.is_available() and not cfg.teacher.device:
        device = f"cuda:{local_rank}"
    tcfg = cfg.teacher  # only cam.tower=dense_tower reads the CLIPSelf tower: tower=teacher builds without it
    if cfg.cam.tower != "dense_tower":
        import dataclasses

        tcfg = dataclasses.replace(tcfg, dense_tower="")
    return build_teacher(tcfg, device=device)


def _write_outputs(cfg, out: Path, rel: Path, vocab, e, im: np.ndarray, r, panel: bool) -> tuple[np.ndarray, bool]:
    """One image's seeds (npz), mask (PNG, 255 = ignore) and, when ``panel`` and its refined CAMs
    exist, its panel; returns the mask and whether a panel was written."""
    H, W = im.shape[:2]
    c = cfg.cam
    cat_ids = [int(vocab.ids[k]) for k in r.labels]
    refined = upsample_cams(r.refined.numpy(), (H, W)) if r.refined is not None else None
    used = refined if c.caa else upsample_cams(r.gradcam.numpy(), (H, W))
    mask, conf = cams_to_mask(used, cat_ids, bg_thresh=c.bg_thresh, bg_power=c.bg_power, image=im, crf=c.crf,
                              conf_thresh=c.conf_thresh, conf_source=c.conf_source)
    seeds = dict(category_ids=np.asarray(cat_ids, np.int64), gradcam=r.gradcam.numpy().astype(np.float16),
                 size=np.asarray([H, W], np.int64))
    if c.caa:  # the refined seeds exist only when the masks use them
        seeds["refined"] = r.refined.numpy().astype(np.float16)
    _write_npz(out / "seeds" / rel.with_suffix(".npz"), **seeds)
    _write_png(out / "masks" / rel.with_suffix(".png"), mask)
    if not panel or (refined is None and c.method != "clims"):
        return mask, False
    from distill.cam.panels import save_panel

    save_panel(out / "panels" / rel.with_suffix(".png"), im, upsample_cams(r.gradcam.numpy(), (H, W)),
               refined, mask, [vocab.names[k] for k in r.labels], cat_ids,
               title=f"{e.file_name} (id {e.image_id})",
               seed_mask=cams_to_mask(used, cat_ids, bg_thresh=c.bg_thresh, bg_power=c.bg_power)[0],
               caa_used=c.caa, crf=c.crf, bg_rule=_bg_rule(c),
               cam_label="CLIMS CAM" if c.method == "clims" else "softmax Grad-CAM")
    return mask, True


def run_cam(cfg, images: str | None = None, labels: str | None = None, *, teacher=None,
            max_images: int = 0) -> dict:
    """The ``cam`` stage: CLIP-ES seeds, refined masks and panels for every labelled image.

    images: a split name (``train``) or an image folder (default ``cam.images``); labels: an
    image-level labels json (default ``cam.labels``, or ``data.image_labels`` for a split).
    Images without labels are skipped and counted. Returns the summary written to
    ``{cam.out}/summary.json``.
    """
    from distill.config import save_config
    from distill.data.images import load_image
    from distill.files import write_json

    _check_cfg(cfg.cam, max_images)
    root, labels_path, split = _resolve_inputs(cfg, images, labels)
    vocab = resolve_vocab(cfg.data, cfg.cam.vocab, key="cam.vocab")
    entries = read_image_labels(labels_path, vocab)
    if max_images:
        entries = entries[:max_images]
    todo = [e for e in entries if e.labels]
    skipped = len(entries) - len(todo)
    # Rank-sharded under torchrun (docs/architecture.md, Scale): rank r takes images r, r + W, ...
    from distill.engine.distributed import get_rank, get_world_size

    if cfg.cam.crf and not crf_available():
        dense_crf(np.zeros((1, 1, 3), np.uint8), np.ones((1, 1, 1), np.float32))  # raises the DistillError
    clims = None
    if cfg.cam.method == "clims":  # CLIMS's CAM network (cam/clims.py) instead of the teacher's Grad-CAM; no CAA
        import dataclasses

        from distill.cam.clims import clims_network

        clims = clims_network(cfg, vocab, teacher=teacher)
        cfg = dataclasses.replace(cfg, cam=dataclasses.replace(cfg.cam, caa=False))
    else:
        teacher = teacher_for_cam(teacher or _load_teacher(cfg), cfg)
    rank, world = get_rank(), get_world_size()
    todo = todo[rank::world]
    text, bg = _text_features(teacher, cfg, vocab) if clims is None else (None, None)
    out = Path(cfg.cam.out)
    t0 = time.time()
    n_done = n_panels = 0
    ignored = total = 0
    for batch in _batches(todo, cfg.cam.batch_size):
        imgs = [load_image(_image_path(root, e.file_name)) for e in batch]
        # cam.caa=false: masks from the softmax Grad-CAM; CAA then runs only for the panels' images
        caa = cfg.cam.caa or n_panels < cfg.cam.num_panels
        if clims is not None:
            from distill.cam.clims import clims_cams

            res = [ImageCams(list(e.labels), clims_cams(clims, im, e.labels, cfg.clims.scales), None) for e, im in zip(batch, imgs)]
        else:
            res = _compute_batch(teacher, cfg, imgs, [e.labels for e in batch], text, bg, caa=caa)
        for e, im, r in zip(batch, imgs, res):
            mask, panel = _write_outputs(cfg, out, _rel_stem(e.file_name, split), vocab, e, im, r,
                                         panel=n_panels < cfg.cam.num_panels)
            ignored += int((mask == 255).sum())
            total += mask.size
            n_panels += panel
            n_done += 1
    wall = time.time() - t0
    summary = {
        "split": split,
        "method": cfg.cam.method,
        "images": len(entries),
        "processed": n_done,
        "skipped_no_labels": skipped,
        "ignored_fraction": ignored / max(total, 1),
        "panels": n_panels,
        "masks": str(out / "masks" / split),
        "wall_s": round(wall, 3),
        "images_per_s": round(n_done / wall, 3) if wall > 0 else None,
    }
    if world > 1:
        summary.update(rank=rank, world_size=world)
    write_json(out / (f"summary_{split}.json" if world == 1 else f"summary_{split}_rank{rank}.json"), summary)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    return summary


# ---------------------------------------------------------------------------------------------
