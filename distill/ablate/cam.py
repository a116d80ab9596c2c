"""The CAM ablations: CLIP-ES's chain behind the pipeline's cam stage (Grad-CAM, softmax, CAA, CRF,
confidence ignore) and CLIMS's losses added one at a time (:func:`clims_ablation`), each scored as
mIoU against the ground-truth masks of a split."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from distill.cam.refine import cams_to_mask, crf_available, upsample_cams
from distill.cam.run import _batches, _check_cfg, _compute_batch, _gt_path, _image_path, _image_size, _load_teacher, _resolve_inputs, _text_features, teacher_for_cam, logit_scale_of, read_image_labels, read_word_list
from distill.errors import DistillError
from distill.report.tables import table
from distill.vocab import resolve_vocab

log = logging.getLogger(__name__)


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


# CLIMS: the baseline CAM, then its four losses added in the paper's order, then + CRF (and the baseline + CRF)
# ---------------------------------------------------------------------------------------------

CLIMS_ROWS = ("clims_baseline", "clims_otm", "clims_otm_btm", "clims_otm_btm_cbs", "clims", "clims_crf", "clims_baseline_crf")
CLIMS_NAMES = {"clims_baseline": "baseline CAM (image labels only)", "clims_otm": "CLIMS: OTM", "clims_otm_btm": "+ BTM",
               "clims_otm_btm_cbs": "+ CBS", "clims": "+ REG (CLIMS)", "clims_crf": "CLIMS + CRF",
               "clims_baseline_crf": "baseline CAM + CRF (no CLIMS loss)"}
_CRF_OF = {"clims": "clims_crf", "clims_baseline": "clims_baseline_crf"}  # the rows whose masks also go through the CRF


def clims_ablation(cfg, split: str = "val", *, teacher=None, max_images: int = 0, progress: bool = True) -> dict:
    """CLIMS on ``split`` from image-level labels: the baseline CAM it starts from, then CLIMS
    trained (on the train split) with OTM, + BTM, + CBS, + REG (each row's losses at the paper's
    weights, the others 0; every row from the same baseline), then + CRF, and the baseline + CRF (what
    the CRF alone does to a CAM no CLIMS loss trained); each scored as mIoU
    against the split's ground-truth masks with the same mask rule as the CLIP-ES rows
    (``cam.bg_thresh`` / ``bg_power``). Writes ``{cam.out}/clims_ablation/metrics.json``."""
    from distill.cam.clims import LOSSES, clims_cams, clims_settings, judge, load_clims, train_clims
    from distill.data.images import load_image
    from distill.engine.device import get_device
    from distill.eval.segmentation import SemSegEvaluator, semseg_classes
    from distill.files import write_json

    _check_cfg(cfg.cam, max_images)
    c, cc = cfg.cam, cfg.clims
    out = Path(c.out) / "clims_ablation"
    root, labels_path, _ = _resolve_inputs(cfg, split, None)
    vocab = resolve_vocab(cfg.data, cfg.cam.vocab, key="cam.vocab")
    entries = [e for e in read_image_labels(labels_path, vocab) if e.labels]
    if max_images:
        entries = entries[:max_images]
    teacher = teacher or judge(cfg)
    dev = get_device(cfg.teacher.device)  # where the networks make their CAMs, as `distill cam --method clims`
    t0 = time.time()
    base = out / "baseline.pth"
    nets, trained = {}, {}
    # a cached network is reused only when it was trained as this config says (and, for a CLIMS row,
    # from a baseline reused too); otherwise it is trained again
    reuse = have_base = _cached(base, clims_settings(cfg))
    for k, row in enumerate(("clims_otm", "clims_otm_btm", "clims_otm_btm_cbs", "clims")):
        on = LOSSES[: k + 1]
        weights = {x: (getattr(cc, f"{x}_weight") if x in on else 0.0) for x in LOSSES}
        path = out / f"{row}.pth"
        if reuse and _cached(path, clims_settings(cfg, "train", weights)):
            pass
        elif have_base:  # every row starts from the one baseline CAM
            trained[row] = train_clims(cfg, teacher=teacher, weights=weights, out=str(path), baseline=str(base), progress=progress)
        else:
            trained[row] = _first(cfg, teacher, weights, path, base, progress)
            have_base = True
        nets[row] = load_clims(path, cc.backbone, len(vocab)).to(dev)
    nets["clims_baseline"] = load_clims(base, cc.backbone, len(vocab)).to(dev)
    has_crf = crf_available()
    num_classes, base_ids, names = semseg_classes(vocab)
    evals = {r: SemSegEvaluator(num_classes, base_ids, names=names) for r in CLIMS_ROWS if r not in _CRF_OF.values() or has_crf}
    sem_root = Path(cfg.data.semantic_root)
    for e in entries:
        im = load_image(_image_path(root, e.file_name))
        gt = _read_gt(_gt_path(sem_root, e.file_name, split))
        ids = [int(vocab.ids[k]) for k in e.labels]
        for row in ("clims_baseline", "clims_otm", "clims_otm_btm", "clims_otm_btm_cbs", "clims"):
            cams = upsample_cams(clims_cams(nets[row], im, e.labels, cc.scales).numpy(), im.shape[:2])
            evals[row].process(cams_to_mask(cams, ids, bg_thresh=c.bg_thresh, bg_power=c.bg_power)[0], gt)
            if row in _CRF_OF and has_crf:
                evals[_CRF_OF[row]].process(cams_to_mask(cams, ids, bg_thresh=c.bg_thresh, bg_power=c.bg_power, image=im, crf=True)[0], gt)
    rows = _rows(CLIMS_ROWS, evals, {}, 0, c.conf_thresh)  # CRF without pydensecrf2: n/a, as CLIP-ES's rows
    md = table(["step", "mIoU", "base", "novel"], [[CLIMS_NAMES[r["step"]]] + (["n/a"] * 3 if r["miou"] is None else
                                                   [f"{100 * r[k]:.1f}" for k in ("miou", "miou_base", "miou_novel")]) for r in rows])
    metrics = {"split": split, "images": len(entries), "rows": rows, "table": md, "trained": trained,
               "settings": {"backbone": cc.backbone, "image_size": cc.image_size, "baseline_epochs": cc.baseline_epochs, "epochs": cc.epochs, "cbs_thresh": cc.cbs_thresh,
                            "bg_power": c.bg_power, "bg_thresh": c.bg_thresh, "crf": has_crf},
               "wall_s": round(time.time() - t0, 1)}
    write_json(out / "metrics.json", metrics)
    return metrics


def _first(cfg, teacher, weights, path: Path, base: Path, progress: bool) -> dict:
    """The first CLIMS row trains the baseline too (saved where the other rows read it)."""
    import shutil

    from distill.cam.clims import train_clims

    made = path.with_name(path.stem + "_baseline.pth")
    made.unlink(missing_ok=True)  # train_clims would read a stale one
    s = train_clims(cfg, teacher=teacher, weights=weights, out=str(path), progress=progress)
    shutil.move(str(made), str(base))
    return s


def _cached(path: Path, want: dict) -> bool:
    """Whether ``path`` holds a network trained with the settings ``want`` (logged when not)."""
    from distill.cam.clims import saved_settings

    if not path.is_file():
        return False
    got = saved_settings(path)
    if got != want:
        diff = sorted(k for k in set(want) | set(got or {}) if (got or {}).get(k) != want.get(k))
        log.warning("%s: trained with other settings (%s): training it again", path, ", ".join(diff) if got else "none saved")
        return False
    return True
