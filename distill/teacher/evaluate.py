"""Zero-shot quality of a teacher on a labelled split (``distill teacher evaluate``).

- Region classification: top-1 over ALL categories of ground-truth boxes of the val objects,
  embedded as ViLD crops at 1x, at 1.5x and 1x+1.5x summed (``top1_ens``), and with the ``dense``
  RoIAlign mode; reported over all objects and over objects of base / novel categories.
- The dense rows (``dense`` RoIAlign and MaskCLIP pixels) run on the teacher's dense tower: the
  CLIPSelf tower of ``teacher.dense_pretrained`` when set (``teacher/dense_pretrained`` names it),
  else the image tower itself; crops always use the original tower.
- MaskCLIP pixel zero-shot segmentation: argmax over the class texts plus background words
  (``teacher.background``; a pixel won by a background word is background), mIoU on the val
  semantic masks with :class:`distill.eval.segmentation.SemSegEvaluator`, at each
  ``teacher.eval_dense_sizes``. Skipped when ``data.semantic_root`` is empty (detection data such
  as COCO has no semantic masks): no ``maskclip/miou*`` key is written, only
  ``maskclip/absent`` saying why.

The classes are those of ``data.vocab`` (with its base/novel split; val categories outside it are
skipped, matched by name) when it is set, else the categories of the val json.

Metric keys: ``zeroshot/top1_1x``, ``zeroshot/top1_1.5x``, ``zeroshot/top1_ens``,
``zeroshot/top1_dense`` (+ ``_base`` / ``_novel``), ``maskclip/miou_all``, ``maskclip/miou_seen``,
``maskclip/miou_unseen``, ``maskclip/miou_hiou``, ``maskclip/pixel_acc`` (at
``teacher.dense_image_size``) and the same with ``@<size>`` for every evaluated size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.io import safe_join, write_json

log = logging.getLogger(__name__)


def _load_split(cfg, json_path: str, max_images: int | None):
    from distill.data.coco import load_coco, vocab_from_coco
    from distill.data.images import load_image

    data = load_coco(json_path)
    if cfg.data.vocab:
        from distill.vocab import load_vocab

        vocab = load_vocab(cfg.data.vocab, cfg.data.split_file or None)
        id2idx = {}
        for c in data["categories"]:
            try:
                id2idx[int(c["id"])] = vocab.index(c["name"])
            except DistillError:
                continue  # a val category outside the vocabulary: its objects are not evaluated
    else:
        vocab = vocab_from_coco(data, json_path)
        id2idx = vocab.id_to_index()
    anns: dict[int, list] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0) and int(a["category_id"]) in id2idx:
            anns.setdefault(int(a["image_id"]), []).append(a)
    images = sorted(data["images"], key=lambda im: im["id"])
    if max_images:
        images = images[:max_images]
    root = Path(cfg.data.image_root)
    out = []
    for im in images:
        arr = load_image(safe_join(root, im["file_name"]))
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
        objs = anns.get(int(im["id"]), [])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in objs], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([id2idx[int(a["category_id"])] for a in objs], dtype=torch.long)
        out.append((im, x, boxes, labels))
    return vocab, out


def _top1(emb: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, novel: torch.Tensor, prefix: str) -> dict:
    pred = (emb @ text.t()).argmax(1).cpu()
    ok = (pred == labels).float()
    res = {prefix: float(ok.mean()) if len(ok) else -1.0}
    for name, sel in (("base", ~novel), ("novel", novel)):
        res[f"{prefix}_{name}"] = float(ok[sel].mean()) if sel.any() else -1.0
    return res


def zero_shot_regions(teacher, vocab, samples, text: torch.Tensor, modes=("crop", "dense")) -> dict:
    """Top-1 of GT boxes (all / base / novel objects) for 1x, 1.5x, 1x+1.5x crops and dense."""
    from distill.teacher.regions import region_embeddings

    imgs = [s[1] for s in samples]
    boxes = [s[2] for s in samples]
    labels = torch.cat([s[3] for s in samples])
    novel = torch.tensor([vocab.split[int(c)] == "novel" for c in labels], dtype=torch.bool)
    res: dict = {"zeroshot/num_objects": int(len(labels))}
    bs = 16
    if "crop" in modes:
        e1 = torch.cat([torch.cat(region_embeddings(teacher, imgs[i : i + bs], boxes[i : i + bs], scales=(1.0,))) for i in range(0, len(imgs), bs)])
        e15 = torch.cat([torch.cat(region_embeddings(teacher, imgs[i : i + bs], boxes[i : i + bs], scales=(1.5,))) for i in range(0, len(imgs), bs)])
        ens = F.normalize(e1 + e15, dim=-1)  # = crop mode with scales (1.0, 1.5) (ViLD 3.2)
        res.update(_top1(e1, text, labels, novel, "zeroshot/top1_1x"))
        res.update(_top1(e15, text, labels, novel, "zeroshot/top1_1.5x"))
        res.update(_top1(ens, text, labels, novel, "zeroshot/top1_ens"))
    if "dense" in modes:
        ed = torch.cat([torch.cat(region_embeddings(teacher, imgs[i : i + bs], boxes[i : i + bs], mode="dense")) for i in range(0, len(imgs), bs)])
        res.update(_top1(ed, text, labels, novel, "zeroshot/top1_dense"))
    return res


def maskclip_miou(teacher, vocab, samples, text: torch.Tensor, bg_text: torch.Tensor | None, semantic_dir: Path, size: int) -> dict:
    """MaskCLIP pixel zero-shot segmentation mIoU (SemSegEvaluator) at dense input ``size``."""
    from distill.eval.segmentation import SemSegEvaluator, read_label_png, semseg_classes
    from distill.teacher.dense import maskclip_scores

    C, seen, names = semseg_classes(vocab)
    ev = SemSegEvaluator(C, seen, names=names)
    ids = torch.tensor(vocab.ids)
    allt = text if bg_text is None else torch.cat([text, bg_text])
    for im, x, _, _ in samples:
        stem = Path(im["file_name"])
        gt_path = safe_join(semantic_dir, stem.with_suffix(".png").name)
        if not gt_path.is_file():
            raise DistillError(f"{gt_path}: semantic mask not found (expected one PNG per image under {semantic_dir})")
        gt = read_label_png(gt_path)
        scores = maskclip_scores(teacher, x[None], allt, size=size, out_size=gt.shape)[0]
        idx = scores.argmax(0).cpu()
        pred = torch.where(idx < len(ids), ids[idx.clamp(max=len(ids) - 1)], torch.zeros_like(idx))
        ev.process(pred, torch.from_numpy(gt))
    m = ev.evaluate()
    return {k: m[k] for k in ("miou/all", "miou/seen", "miou/unseen", "miou/hiou", "pixel_acc")}


def evaluate_teacher(cfg, teacher=None, out_dir: str | Path | None = None, max_images: int | None = None, split: str = "val") -> dict:
    """Evaluate ``teacher`` (default: :func:`build_teacher` of ``cfg.teacher``) on the val split;
    writes ``{work_dir}/teacher/metrics.json`` (or ``out_dir/metrics.json``) and returns the dict."""
    from distill.teacher.clip import build_teacher
    from distill.teacher.text import load_templates, text_embeddings
    from distill.vocab import Vocabulary

    t0 = time.time()
    teacher = teacher or build_teacher(cfg.teacher)
    json_path = cfg.data.val_json if split == "val" else cfg.data.train_full_json
    vocab, samples = _load_split(cfg, json_path, max_images)
    cache_dir = Path(cfg.work_dir) / "embeddings" / "text"
    templates = load_templates(cfg.teacher.templates)
    text = text_embeddings(teacher, vocab, templates, cache_dir=cache_dir)
    res: dict = {"teacher/fingerprint": teacher.fingerprint, "teacher/dense_fingerprint": teacher.dense_key,
                 "teacher/dense_image_size": teacher.dense_image_size,
                 "teacher/dense_pretrained": cfg.teacher.dense_pretrained if getattr(teacher, "dense_visual", None) is not None else ""}
    res.update(zero_shot_regions(teacher, vocab, samples, text))
    if not cfg.data.semantic_root:
        res["maskclip/absent"] = "data.semantic_root is empty (no semantic masks)"
        sizes = []
    else:
        bg_text = None
        if cfg.teacher.background:
            bg_words = load_templates_words(cfg.teacher.background)
            bg_text = text_embeddings(teacher, Vocabulary(tuple(bg_words), source=cfg.teacher.background), templates, cache_dir=cache_dir)
        sem = Path(cfg.data.semantic_root) / split
        sizes = sorted(set(cfg.teacher.eval_dense_sizes) | {teacher.dense_image_size})
    for s in sizes:
        m = maskclip_miou(teacher, vocab, samples, text, bg_text, sem, s)
        for k, v in m.items():
            res[f"maskclip/{k.replace('/', '_')}@{s}"] = v
            if s == teacher.dense_image_size:
                res[f"maskclip/{k.replace('/', '_')}"] = v
    res["wall_s"] = round(time.time() - t0, 1)
    out = Path(out_dir) if out_dir else Path(cfg.work_dir) / "teacher"
    write_json(out / "metrics.json", res)
    return res


def load_templates_words(path: str) -> list[str]:
    """Background words: one a line, ``#`` comments."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{p}: background word file not found (teacher.background; one word or phrase a line)")
    words = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise DistillError(f"{p}: no background words")
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
    rows += ["", "| MaskCLIP pixels @size | mIoU all | seen | unseen | hIoU | pixel acc |", "|---|---|---|---|---|---|"]
    for k in sorted(kk for kk in res if kk.startswith("maskclip/miou_all@")):
        s = k.split("@")[1]
        g = lambda n: res[f"maskclip/{n}@{s}"]  # noqa: E731
        rows.append(f"| {s} | {g('miou_all'):.3f} | {g('miou_seen'):.3f} | {g('miou_unseen'):.3f} | {g('miou_hiou'):.3f} | {g('pixel_acc'):.3f} |")
    return "\n".join(rows)
