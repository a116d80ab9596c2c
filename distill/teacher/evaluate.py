"""Zero-shot quality of a teacher on a labelled split (``distill teacher evaluate``).

- Region classification: top-1 over ALL categories of ground-truth boxes of the val objects,
  embedded as ViLD crops at 1x, at 1.5x and 1x+1.5x summed (``top1_ens``), and with the ``dense``
  RoIAlign mode; reported over all objects and over objects of base / novel categories.
- The dense rows (``dense`` RoIAlign and MaskCLIP pixels) run on the teacher's dense tower: the
  CLIPSelf tower of ``teacher.dense_tower`` when set (``teacher/dense_tower`` names it),
  else the image tower itself; crops always use the original tower.
- MaskCLIP pixel zero-shot segmentation: argmax over the class texts plus background words
  (``teacher.background``; a pixel won by a background word is background), mIoU on the val
  semantic masks with :class:`distill.eval.segmentation.SemSegEvaluator`, at each
  ``teacher.eval_dense_sizes``. Skipped when ``data.semantic_root`` is empty (detection data such
  as COCO has no semantic masks): no ``maskclip/miou*`` key is written, only
  ``maskclip/absent`` saying why.

The split streams: images are decoded and embedded :data:`BATCH_IMAGES` at a time (the crop
batches of the whole-split implementation this replaced, so the numbers are the same) and only
per-object hits and the segmentation confusion matrices are kept, so memory does not grow with the
split (``bench/memory.py teacher_eval``).

The classes are the vocabulary of :func:`distill.vocab.resolve_vocab` (``data.vocab``, else the
categories of ``data.train_full_json``, with the base/novel split); the split's categories are
matched to it by name (then synonym), and those outside it are skipped.

Metric keys: ``zeroshot/top1_1x``, ``zeroshot/top1_1.5x``, ``zeroshot/top1_ens``,
``zeroshot/top1_dense`` (+ ``_base`` / ``_novel``), ``maskclip/miou_all``, ``maskclip/miou_base``,
``maskclip/miou_novel``, ``maskclip/miou_hiou``, ``maskclip/pixel_acc`` (at
``teacher.dense_image_size``) and the same with ``@<size>`` for every evaluated size; the MaskCLIP
refinements they were measured with: ``teacher/key_smoothing``, ``teacher/prompt_denoising``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from distill.errors import DistillError
from distill.files import safe_join, write_json

log = logging.getLogger(__name__)


BATCH_IMAGES = 16  # images decoded and embedded together (their crops share encoder batches)


def _split_index(cfg, json_path: str, max_images: int | None):
    """The vocabulary and, per image (sorted by id), ``(image dict, boxes (N, 4) float32 XYXY
    absolute pixels, labels (N,) long vocabulary indices)``: annotations only, no pixels."""
    from distill.data.coco import load_coco
    from distill.vocab import name_key, resolve_vocab

    if max_images is not None and max_images < 0:
        raise DistillError(f"max_images: expected >= 0 (0 = all images), got {max_images}")
    data = load_coco(json_path)
    vocab = resolve_vocab(cfg.data)
    by_name = {name_key(n): i for i, n in enumerate(vocab.names)}
    id2idx = {}
    for c in data["categories"]:
        try:  # a class of the vocabulary by its name, else by a synonym
            id2idx[int(c["id"])] = by_name[name_key(c["name"])] if name_key(c["name"]) in by_name else vocab.index(c["name"])
        except DistillError:
            continue  # a category outside the vocabulary: its objects are not evaluated
    anns: dict[int, list] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0) and int(a["category_id"]) in id2idx:
            anns.setdefault(int(a["image_id"]), []).append(a)
    images = sorted(data["images"], key=lambda im: im["id"])
    if max_images:
        images = images[:max_images]
    index = []
    for im in images:
        objs = anns.get(int(im["id"]), [])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in objs], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([id2idx[int(a["category_id"])] for a in objs], dtype=torch.long)
        index.append((im, boxes, labels))
    return vocab, index


class _SplitImages(Dataset):
    """Position in the index -> (position, (H, W, 3) uint8 array or None, error or None); a
    decoding error travels back as text so that the main process raises it as one line."""

    def __init__(self, root: Path, index: list):
        self.root, self.files = root, [im["file_name"] for im, _, _ in index]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from distill.data.images import load_image

        try:
            return i, load_image(safe_join(self.root, self.files[i])), None
        except DistillError as e:
            return i, None, str(e)


def iter_split(cfg, index: list, batch_size: int = BATCH_IMAGES):
    """Batches of ``(image dict, image (3, H, W) float32 in [0, 1], boxes, labels)`` in index
    order, decoded ``batch_size`` at a time (``data.num_workers`` decoding processes): only the
    batches in flight are in memory, never the split.

    A batch's images are views into one buffer (each (H, W, 3) in memory, as
    ``from_numpy(array).permute(2, 0, 1).float()`` lays it out): freed as a whole when the batch
    is dropped, so a long split does not fragment the heap with image-sized blocks."""
    loader = DataLoader(_SplitImages(Path(cfg.data.image_root), index), batch_size=batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, collate_fn=list)
    for batch in loader:
        for _, arr, err in batch:
            if err is not None:
                raise DistillError(err)
        buf = torch.empty(sum(arr.size for _, arr, _ in batch), dtype=torch.float32)
        out, start = [], 0
        for i, arr, _ in batch:
            x = buf[start : start + arr.size].view(arr.shape)
            x.copy_(torch.from_numpy(arr)).div_(255.0)
            out.append((index[i][0], x.permute(2, 0, 1), index[i][1], index[i][2]))
            start += arr.size
        del buf, batch, x
        yield out
        del out


def _load_split(cfg, json_path: str, max_images: int | None):
    """The vocabulary and the whole split as a list of ``(image dict, image, boxes, labels)``:
    for small splits (tests, benches); evaluation streams with :func:`iter_split`."""
    vocab, index = _split_index(cfg, json_path, max_images)
    return vocab, [s for batch in iter_split(cfg, index) for s in batch]


def _top1(ok: torch.Tensor, novel: torch.Tensor, prefix: str) -> dict:
    ok = ok.float()
    res = {prefix: float(ok.mean()) if len(ok) else -1.0}
    for name, sel in (("base", ~novel), ("novel", novel)):
        res[f"{prefix}_{name}"] = float(ok[sel].mean()) if sel.any() else -1.0
    return res


class ZeroShotRegions:
    """reset / process / evaluate: top-1 over all classes of ground-truth boxes, per object, for
    1x, 1.5x and 1x+1.5x (summed, ``ens``) crops and the ``dense`` RoIAlign mode; reported over all
    objects and over objects of base / novel categories. Keeps one bool per object and mode.

    Args:
        text: (C, D) class text embeddings (rows of the vocabulary).
        modes: ``crop`` (1x, 1.5x, ens) and / or ``dense``.
    """

    def __init__(self, teacher, vocab, text: torch.Tensor, modes=("crop", "dense")):
        self.teacher, self.text, self.modes = teacher, text, tuple(modes)
        self.is_novel = torch.tensor([sp == "novel" for sp in vocab.split], dtype=torch.bool)
        self.reset()

    def reset(self) -> None:
        self.ok: dict[str, list[torch.Tensor]] = {}
        self.novel: list[torch.Tensor] = []

    def _hit(self, key: str, emb: torch.Tensor, labels: torch.Tensor) -> None:
        pred = (emb @ self.text.t()).argmax(1).cpu()
        self.ok.setdefault(key, []).append(pred == labels)

    @torch.no_grad()
    def process(self, images, boxes, labels) -> None:
        """images: list of (3, H_i, W_i) float in [0, 1]; boxes: list of (N_i, 4) float XYXY
        absolute pixels; labels: list of (N_i,) long vocabulary indices."""
        from distill.teacher.regions import region_embeddings

        lab = torch.cat(list(labels))
        self.novel.append(self.is_novel[lab])
        if "crop" in self.modes:
            e1 = torch.cat(region_embeddings(self.teacher, images, boxes, scales=(1.0,)))
            e15 = torch.cat(region_embeddings(self.teacher, images, boxes, scales=(1.5,)))
            self._hit("1x", e1, lab)
            self._hit("1.5x", e15, lab)
            self._hit("ens", F.normalize(e1 + e15, dim=-1), lab)  # = crop mode with scales (1.0, 1.5) (ViLD 3.2)
        if "dense" in self.modes:
            self._hit("dense", torch.cat(region_embeddings(self.teacher, images, boxes, mode="dense")), lab)

    def evaluate(self) -> dict:
        novel = torch.cat(self.novel) if self.novel else torch.zeros(0, dtype=torch.bool)
        res: dict = {"zeroshot/num_objects": int(len(novel))}
        for key in ("1x", "1.5x", "ens", "dense"):
            if key in self.ok:
                res.update(_top1(torch.cat(self.ok[key]), novel, f"zeroshot/top1_{key}"))
        return res


class MaskClipPixels:
    """reset / process / evaluate: MaskCLIP pixel zero-shot segmentation at dense input ``size``,
    argmax over the class texts plus background texts (a pixel won by a background text is
    background 0), mIoU with the streaming :class:`~distill.eval.segmentation.SemSegEvaluator`.

    Args:
        text: (C, D) class text embeddings; bg_text: (B, D) background texts or None.
    """

    def __init__(self, teacher, vocab, text: torch.Tensor, bg_text: torch.Tensor | None, size: int,
                 key_smoothing: float = 0.0, prompt_denoising: float = 0.0):
        from distill.eval.segmentation import SemSegEvaluator, semseg_classes

        C, base, names = semseg_classes(vocab)
        self.teacher, self.size = teacher, size
        self.refine = dict(key_smoothing=key_smoothing, prompt_denoising=prompt_denoising)
        self.ev = SemSegEvaluator(C, base, names=names)
        self.ids = torch.tensor(vocab.ids)
        self.text = text if bg_text is None else torch.cat([text, bg_text])

    def reset(self) -> None:
        self.ev.reset()

    @torch.no_grad()
    def process(self, image: torch.Tensor, gt: np.ndarray) -> None:
        """image: (3, H, W) float in [0, 1]; gt: (H', W') category ids, 255 = ignore."""
        from distill.teacher.dense import maskclip_scores

        scores = maskclip_scores(self.teacher, image[None], self.text, size=self.size, out_size=gt.shape, **self.refine)[0]
        idx = scores.max(0).indices.cpu()  # = argmax(0) (first maximum), 8x faster on CPU than argmax over dim 0
        ids = self.ids
        pred = torch.where(idx < len(ids), ids[idx.clamp(max=len(ids) - 1)], torch.zeros_like(idx))
        self.ev.process(pred, torch.from_numpy(gt))

    def evaluate(self) -> dict:
        m = self.ev.evaluate()
        return {k: m[k] for k in ("miou/all", "miou/base", "miou/novel", "miou/hiou", "pixel_acc")}


def _semantic_paths(index: list, semantic_dir: Path) -> list[Path]:
    """One ``<stem>.png`` per image under ``semantic_dir``, all checked before any computing."""
    paths = []
    for im, _, _ in index:
        p = safe_join(semantic_dir, Path(im["file_name"]).with_suffix(".png").name)
        if not p.is_file():
            raise DistillError(f"{p}: semantic mask not found (expected one PNG per image under {semantic_dir})")
        paths.append(p)
    return paths


def _process_batch(batch: list, regions: ZeroShotRegions, pixels: dict, gt_paths: list[Path]) -> None:
    from distill.eval.segmentation import read_label_png

    regions.process([b[1] for b in batch], [b[2] for b in batch], [b[3] for b in batch])
    if pixels:
        for (_, x, _, _), p in zip(batch, gt_paths):
            gt = read_label_png(p)
            for ev in pixels.values():
                ev.process(x, gt)


def evaluate_teacher(cfg, teacher=None, out_dir: str | Path | None = None, max_images: int | None = None, split: str = "val") -> dict:
    """Evaluate ``teacher`` (default: :func:`build_teacher` of ``cfg.teacher``) on the val split;
    writes ``{work_dir}/teacher/metrics.json`` (or ``out_dir/metrics.json``) and returns the dict."""
    from distill.teacher.clip import build_teacher
    from distill.teacher.text import text_embeddings
    from distill.vocab import Vocabulary

    t0 = time.time()
    teacher = teacher or build_teacher(cfg.teacher)
    json_path = cfg.data.val_json if split == "val" else cfg.data.train_full_json
    vocab, index = _split_index(cfg, json_path, max_images)
    if not index:
        raise DistillError(f"{json_path}: no images to evaluate")
    cache_dir = Path(cfg.work_dir) / "embeddings" / "text"
    templates = cfg.teacher.templates  # hand-written, or a learned prompt file (teacher/prompt_learning.py)
    text = text_embeddings(teacher, vocab, templates, cache_dir=cache_dir)
    res: dict = {"teacher/fingerprint": teacher.fingerprint, "teacher/dense_fingerprint": teacher.dense_key,
                 "teacher/dense_image_size": teacher.dense_image_size,
                 "teacher/dense_tower": cfg.teacher.dense_tower if getattr(teacher, "dense_tower", None) is not None else ""}
    regions = ZeroShotRegions(teacher, vocab, text)
    pixels: dict[int, MaskClipPixels] = {}
    gt_paths: list[Path] = []
    if cfg.data.semantic_root:
        bg_text = None
        if cfg.teacher.background:
            bg_words = load_templates_words(cfg.teacher.background)
            bg_text = text_embeddings(teacher, Vocabulary(tuple(bg_words), source="teacher.background"), templates, cache_dir=cache_dir)
        gt_paths = _semantic_paths(index, Path(cfg.data.semantic_root) / split)
        from distill.teacher.dense import refinements

        refine = refinements(cfg.teacher)
        pixels = {s: MaskClipPixels(teacher, vocab, text, bg_text, s, **refine)
                  for s in sorted(set(cfg.teacher.eval_dense_sizes) | {teacher.dense_image_size})}
        res.update({f"teacher/{k}": v for k, v in refine.items()})
    done = 0
    for batch in iter_split(cfg, index):
        _process_batch(batch, regions, pixels, gt_paths[done : done + len(batch)])
        done += len(batch)
        del batch  # the next batch is decoded without this one alive
        log.debug("teacher evaluate: %d / %d images", done, len(index))
    res.update(regions.evaluate())
    if not pixels:
        res["maskclip/absent"] = "data.semantic_root is empty (no semantic masks)"
    for s, ev in pixels.items():
        for k, v in ev.evaluate().items():
            res[f"maskclip/{k.replace('/', '_')}@{s}"] = v
            if s == teacher.dense_image_size:
                res[f"maskclip/{k.replace('/', '_')}"] = v
    res["wall_s"] = round(time.time() - t0, 1)
    out = Path(out_dir) if out_dir else Path(cfg.work_dir) / "teacher"
    write_json(out / "metrics.json", res)
    return res


def load_templates_words(value: str) -> list[str]:
    """``teacher.background``: a file of background words (one a line, ``#`` comments) or the words themselves."""
    from distill.config import WORDS_EXPECTED
    from distill.files import read_lines

    words = list(read_lines(value, "teacher.background", WORDS_EXPECTED))
    if not words:
        raise DistillError(f"teacher.background: {value.strip()}: no background words (expected {WORDS_EXPECTED})")
    return words


def format_table(res: dict) -> str:
    """The accuracy table printed by ``distill teacher evaluate``."""
    rows = ["| region embedding | all | base | novel |", "|---|---|---|---|"]
    for name, key in (("crop 1x", "top1_1x"), ("crop 1.5x", "top1_1.5x"), ("crop 1x+1.5x (ViLD)", "top1_ens"), ("dense RoIAlign (MaskCLIP)", "top1_dense")):
        k = f"zeroshot/{key}"
        if k in res:
            rows.append(f"| {name} | {res[k]:.3f} | {res[k + '_base']:.3f} | {res[k + '_novel']:.3f} |")
    if "maskclip/absent" in res:
        return "\n".join(rows + ["", f"MaskCLIP pixels: not measured ({res['maskclip/absent']})"])
    rows += ["", "| MaskCLIP pixels @size | mIoU all | base | novel | hIoU | pixel acc |", "|---|---|---|---|---|---|"]
    for k in sorted(kk for kk in res if kk.startswith("maskclip/miou_all@")):
        s = k.split("@")[1]
        g = lambda n: res[f"maskclip/{n}@{s}"]  # noqa: E731
        rows.append(f"| {s} | {g('miou_all'):.3f} | {g('miou_base'):.3f} | {g('miou_novel'):.3f} | {g('miou_hiou'):.3f} | {g('pixel_acc'):.3f} |")
    return "\n".join(rows)
