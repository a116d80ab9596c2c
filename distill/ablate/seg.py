"""The segmentation ablation on the shapes world: the MaskCLIP teacher zero-shot, LSeg on
base classes only, LSeg + pixel distillation, CLIPSeg; mIoU base / novel / all and hIoU on val
with the full vocabulary. ``distill ablate seg`` is the command line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from distill.config import Config
from distill.files import write_json, write_text
from distill.report.tables import table

COLUMNS = ("miou/base", "miou/novel", "miou/all", "miou/hiou", "pixel_acc")


@torch.no_grad()
def evaluate_teacher_zero_shot(cfg: Config, teacher, max_images: int = 0) -> dict:
    """MaskCLIP zero-shot (MaskCLIP section 3.2, refined as ``teacher.key_smoothing`` /
    ``teacher.prompt_denoising`` say) on the students' val masks, with the
    teacher evaluation's own evaluator (:class:`~distill.teacher.evaluate.MaskClipPixels`: argmax
    over the class texts and ``teacher.background``'s words, a background word wins -> 0), at
    ``teacher.dense_image_size``. Returns every metric of the streaming evaluator (per class too)."""
    from distill.segmentation.train import SemSegFolder, seg_paths, text_for
    from distill.teacher.evaluate import MaskClipPixels, load_templates_words
    from distill.vocab import Vocabulary, resolve_vocab

    vocab = resolve_vocab(cfg.data)
    text = text_for(teacher, vocab, cfg).float()
    bg = None
    if cfg.teacher.background:
        words = Vocabulary(tuple(dict.fromkeys(load_templates_words(cfg.teacher.background))), source="teacher.background")
        bg = text_for(teacher, words, cfg).float()
    paths = seg_paths(cfg)
    val = SemSegFolder(paths.val_images, paths.val_masks, vocab.ids)
    from distill.teacher.dense import refinements

    pixels = MaskClipPixels(teacher, vocab, text, bg, teacher.dense_image_size, **refinements(cfg.teacher))
    for j in range(len(val) if not max_images else min(max_images, len(val))):
        image, target = val[j]
        pixels.process(image, np.asarray(target["masks"]))
    return pixels.ev.evaluate()


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table, values in percent."""
    body = [[name, *(f"{100 * m.get(k, float('nan')):.1f}" for k in COLUMNS)] for name, m in rows.items()]
    return table(["model", "mIoU base", "mIoU novel", "mIoU all", "hIoU", "pixel acc"], body) + "\n"


def ablate_seg(
    lseg_cfg: Config,
    distill_cfg: Config,
    clipseg_cfg: Config,
    out_dir: str | os.PathLike | None = None,
    teacher=None,
    progress: bool = False,
) -> dict:
    """Train the three students (fixed step counts from their configs), evaluate them and the
    teacher on val; print the table and write ``metrics.json`` + ``table.md`` into ``out_dir``
    (default ``{work_dir}/seg/ablation``). Returns {"rows": {model: metrics}, "deltas": {...}}."""
    from distill.engine.device import get_device
    from distill.segmentation.train import train_seg

    out = Path(out_dir) if out_dir else Path(lseg_cfg.work_dir) / "seg" / "ablation"
    if teacher is None:
        from distill.teacher.clip import build_teacher

        teacher = build_teacher(lseg_cfg.teacher, device=get_device(lseg_cfg.seg.train.device))
    rows: dict[str, dict] = {}
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    rows["maskclip_teacher"] = evaluate_teacher_zero_shot(lseg_cfg, teacher, lseg_cfg.seg.max_eval_images)
    times["maskclip_teacher"] = time.perf_counter() - t0
    for name, cfg in (("lseg_base_only", lseg_cfg), ("lseg_pixel_distill", distill_cfg), ("clipseg", clipseg_cfg)):
        t0 = time.perf_counter()
        rows[name] = train_seg(cfg, teacher=teacher, out_dir=out / name, progress=progress)
        times[name] = time.perf_counter() - t0
    slim = {n: {k: float(m[k]) for k in COLUMNS if k in m} for n, m in rows.items()}
    gain = slim["lseg_pixel_distill"]["miou/novel"] - slim["lseg_base_only"]["miou/novel"]
    deltas = {  # what pixel distillation adds (LSeg section 4's comparison), in mIoU points
        "distill_novel_gain_points": round(100 * gain, 2),
        "distill_minus_teacher_hiou_points": round(100 * (slim["lseg_pixel_distill"]["miou/hiou"] - slim["maskclip_teacher"]["miou/hiou"]), 2),
    }
    table = format_table(slim)
    result = {
        "rows": slim,
        "deltas": deltas,
        "steps": {"lseg": lseg_cfg.seg.train.max_steps, "lseg_distill": distill_cfg.seg.train.max_steps, "clipseg": clipseg_cfg.seg.train.max_steps},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "per_class": {n: {k: v for k, v in m.items() if k.startswith("iou/")} for n, m in rows.items()},
    }
    write_json(out / "metrics.json", result)
    write_text(out / "table.md", table)
    print(table)
    print(", ".join(f"{k}={v}" for k, v in deltas.items()))
    return result
