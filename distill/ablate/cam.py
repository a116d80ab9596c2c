"""The CLIP-ES ablation behind the pipeline's cam stage: each step of the chain (Grad-CAM, softmax,
CAA, CRF, confidence ignore) scored as mIoU against the ground-truth masks of a split."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from distill.cam.refine import cams_to_mask, crf_available, upsample_cams
from distill.cam.run import _batches, _check_cfg, _compute_batch, _gt_path, _image_path, _image_size, _load_teacher, _resolve_inputs, _text_features, teacher_for_cam, logit_scale_of, read_image_labels, read_word_list
from distill.errors import DistillError
from distill.report.tables import table
from distill.vocab import resolve_vocab


# Ablation: Grad-CAM -> softmax Grad-CAM -> + CAA -> + CRF -> + confidence ignore
# ---------------------------------------------------------------------------------------------

ABLATION_STEPS = ("gradcam", "softmax_gradcam", "caa", "crf", "conf_ignore")
# The same chain without CAA (CRF and confidence ignore on the softmax Grad-CAM), for teachers
# whose attention is no affinity (``cam.caa=false``).
NO_CAA_STEPS = ("crf_no_caa", "conf_ignore_no_caa")


def _read_gt(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise DistillError(f"{path}: ground-truth semantic PNG not found")
    return np.array(Image.open(path))


def cam_ablation(cfg, split: str = "val", *, teacher=None, max_images: int = 0) -> dict:
    """mIoU of each CLIP-ES step on ``split`` using image-level labels only, against the semantic
    PNGs (``data.semantic_root/{split}``). CRF is "n/a" without pydensecrf2; confidence ignore is
    scored on the non-ignored pixels, with the ignored fraction. Writes ``{cam.out}/metrics.json``."""
    from distill.data.images import load_image
    from distill.eval.segmentation import SemSegEvaluator, semseg_classes
    from distill.files import write_json

    _check_cfg(cfg.cam, max_images)
    c = cfg.cam
    root, labels_path, _ = _resolve_inputs(cfg, split, None)
    vocab = resolve_vocab(cfg.data, cfg.cam.vocab, key="cam.vocab")
    entries = read_image_labels(labels_path, vocab)
    if max_images:
        entries = entries[:max_images]
    teacher = teacher_for_cam(teacher or _load_teacher(cfg), cfg)
    text, bg = _text_features(teacher, cfg, vocab)
    has_crf = crf_available()
    num_classes, base, names = semseg_classes(vocab)
    steps = ABLATION_STEPS + NO_CAA_STEPS
    evals = {s: SemSegEvaluator(num_classes, base, names=names) for s in steps if not s.startswith("crf") or has_crf}
    ignored = {"conf_ignore": 0, "conf_ignore_no_caa": 0}
    total = 0
    sem_root = Path(cfg.data.semantic_root)
    t0 = time.time()
    for batch in _batches(entries, c.batch_size):
        imgs = [load_image(_image_path(root, e.file_name)) for e in batch]
        res = _compute_batch(teacher, cfg, imgs, [e.labels for e in batch], text, bg, with_plain=True)
        for e, im, r in zip(batch, imgs, res):
            H, W = im.shape[:2]
            gt = _read_gt(_gt_path(sem_root, e.file_name, split))
            ids = [int(vocab.ids[k]) for k in r.labels]
            kw = dict(bg_thresh=c.bg_thresh, bg_power=c.bg_power, image=im)
            maps = {
                "gradcam": upsample_cams(r.plain.numpy(), (H, W)),
                "softmax_gradcam": upsample_cams(r.gradcam.numpy(), (H, W)),
                "caa": upsample_cams(r.refined.numpy(), (H, W)),
            }
            for step, m in maps.items():
                evals[step].process(cams_to_mask(m, ids, **kw)[0], gt)
            total += gt.size
            for src, crf_step, conf_step in (("caa", "crf", "conf_ignore"),
                                             ("softmax_gradcam", "crf_no_caa", "conf_ignore_no_caa")):
                mask, conf = cams_to_mask(maps[src], ids, crf=has_crf, conf_source=c.conf_source, **kw)
                if has_crf:
                    evals[crf_step].process(mask, gt)
                ign = conf < c.conf_thresh  # cams_to_mask(conf_thresh=...) without a second CRF
                ignored[conf_step] += int(ign.sum())
                gt_kept = gt.copy()
                gt_kept[ign] = 255
                pred = mask.copy()
                pred[ign] = 0
                evals[conf_step].process(pred, gt_kept)
    wall = time.time() - t0
    rows = _rows(steps, evals, ignored, total, c.conf_thresh)
    by_step = {r["step"]: r for r in rows}
    final = "conf_ignore" if c.caa else "conf_ignore_no_caa"  # the chain run_cam's masks follow
    metrics = {
        "split": split,
        "images": len(entries),
        "images_with_labels": sum(1 for e in entries if e.labels),
        "rows": rows,
        "cam/miou_gradcam": by_step["gradcam"]["miou"],
        "cam/miou_final": by_step[final]["miou"],
        "cam/final_step": final,
        "cam/ignored_fraction": ignored[final] / max(total, 1),
        "settings": {"logit_scale": logit_scale_of(cfg, teacher), "pool": c.pool, "conf_source": c.conf_source, "bg_power": c.bg_power, "bg_thresh": c.bg_thresh,
                     "background_words": len(read_word_list(c.background)), "caa": c.caa, "caa_layers": c.caa_layers, "caa_power": c.caa_power,
                     "image_size": _image_size(cfg, teacher), "crf": has_crf},
        "wall_s": round(wall, 2),
        "table": ablation_table(rows),
    }
    write_json(Path(c.out) / "metrics.json", metrics)
    return metrics


def _rows(steps, evals: dict, ignored: dict, total: int, conf_thresh: float) -> list[dict]:
    """One row a step: mIoU (all / base / novel), pixel accuracy and, for the confidence-ignore
    steps, the ignored fraction; a step without an evaluator (CRF without pydensecrf2) is n/a."""
    rows = []
    for step in steps:
        if step not in evals:
            rows.append({"step": step, "miou": None, "note": "n/a (pydensecrf2 not installed)"})
            continue
        m = evals[step].evaluate()
        row = {"step": step, "miou": float(m["miou/all"]), "miou_base": float(m["miou/base"]),
               "miou_novel": float(m["miou/novel"]), "pixel_acc": float(m["pixel_acc"])}
        if step in ignored:
            row["ignored_fraction"] = ignored[step] / max(total, 1)
            row["note"] = f"mIoU over non-ignored pixels; conf < {conf_thresh} -> 255"
        if step in NO_CAA_STEPS:
            row["note"] = "; ".join(x for x in ("on the softmax Grad-CAM (no CAA)", row.get("note")) if x)
        rows.append(row)
    return rows


def ablation_table(rows: list[dict]) -> str:
    """Markdown table of the ablation rows (mIoU in points)."""
    names = {"gradcam": "Grad-CAM", "softmax_gradcam": "softmax Grad-CAM", "caa": "+ CAA",
             "crf": "+ CRF", "conf_ignore": "+ confidence ignore",
             "crf_no_caa": "softmax Grad-CAM + CRF", "conf_ignore_no_caa": "softmax Grad-CAM + CRF + confidence ignore"}
    out = []
    for r in rows:
        v = "n/a" if r["miou"] is None else f"{100 * r['miou']:.1f}"
        note = r.get("note", "")
        if "ignored_fraction" in r:
            note = f"{note}; {100 * r['ignored_fraction']:.1f}% pixels ignored"
        out.append([names.get(r["step"], r["step"]), v, note])
    return table(["step", "mIoU", "note"], out)
