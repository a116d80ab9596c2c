"""``report.md`` and its figures, built only from the files a run wrote.

Every number in the report is read from a ``metrics.json`` (or ``metrics.jsonl``, a manifest) under
the run's work dir; nothing is typed in. Sections whose files are missing say so instead of
inventing a row. Figures: per-class AP50 bars, training loss curves, detections on val images
(novel classes marked), segmentation overlays, CAM panels (copied from the CAM stage).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import Config
from distill.files import atomic_path, write_text
from distill.pipeline import stage_timings


def _read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(v: Any, pct: bool = True) -> str:
    """A metric as a percentage; None, NaN and COCO's -1 ("undefined") print as n/a."""
    if v is None or isinstance(v, bool) or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (int, float)):
        if pct and v == -1:
            return "n/a"
        return f"{100 * v:.1f}" if pct else f"{v:.4g}"
    return str(v)


_PCT_WORDS = ("ap", "iou", "acc", "top1", "precision", "recall", "f1", "fraction", "delta", "before", "after")


def _kv_rows(m: dict) -> list[list[str]]:
    """Rows of a flat metrics dict: rates as percentages, counts and seconds as plain numbers."""
    rows = []
    for k, v in m.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        pct = any(w in k.lower() for w in _PCT_WORDS) and not k.lower().startswith("num")
        if pct and "delta" in k.lower() and isinstance(v, (int, float)) and math.isfinite(v):
            rows.append([k, f"{100 * v:+.1f}"])  # a change, in points: signed
            continue
        rows.append([k, _fmt(v, pct)])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


DET_COLS = [("AP50 novel", "bbox/AP50_novel"), ("AP50 base", "bbox/AP50_base"), ("AP50 all", "bbox/AP50"), ("AP novel", "bbox/AP_novel"), ("AP base", "bbox/AP_base"), ("AP all", "bbox/AP"), ("GT-box top-1 novel", "region/top1_novel"), ("GT-box top-1 base", "region/top1_base")]
SEG_COLS = [("mIoU seen", "miou/seen"), ("mIoU unseen", "miou/unseen"), ("mIoU all", "miou/all"), ("hIoU", "miou/hiou"), ("pixel acc", "pixel_acc")]


def _rows_from(metrics: dict, cols: list[tuple[str, str]], prefix: str = "") -> list[str]:
    return [_fmt(metrics.get(prefix + key)) for _, key in cols]


def _collect_tables(work: Path, kind: str) -> dict[str, dict]:
    """``{row name: metrics}`` from ``<work>/<kind>/<name>/metrics.json`` and ablation tables.

    An ablation file may hold ``{"rows": {name: metrics}}``; plain files are one row each.
    """
    out: dict[str, dict] = {}
    base = work / kind
    if not base.is_dir():
        return out
    for p in sorted(base.glob("*/metrics.json")):
        m = _read(p)
        if not m:
            continue
        if isinstance(m.get("rows"), dict):
            for name, row in m["rows"].items():
                out[f"{name}"] = row
        else:
            out[p.parent.name] = m
    return out


# ------------------------------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _plt().close(fig)


def fig_per_class_ap(metrics: dict, novel: set[str], path: Path, title: str) -> bool:
    items = sorted(((k.split("/", 2)[2], v) for k, v in metrics.items() if k.startswith("bbox/AP50/")), key=lambda kv: -kv[1])
    if not items:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(items)), 3.8))
    colors = ["tab:orange" if n in novel else "tab:blue" for n, _ in items]
    ax.bar(range(len(items)), [100 * v for _, v in items], color=colors)
    ax.set_xticks(range(len(items)), [n for n, _ in items], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("AP50")
    ax.set_title(title)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label="base"), Patch(color="tab:orange", label="novel")], loc="upper right")
    _save(fig, path)
    return True


def fig_loss_curves(jsonl_files: dict[str, Path], path: Path) -> bool:
    series: dict[str, dict[str, list]] = {}
    for name, p in jsonl_files.items():
        try:
            lines = p.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = rec.get("step")
            if step is None:
                continue
            # one line per run: its total loss when logged, else each named loss
            keys = ["loss"] if "loss" in rec else [k for k in rec if k.startswith("loss")]
            for k in keys:
                v = rec[k]
                if isinstance(v, (int, float)) and math.isfinite(v):
                    s = series.setdefault(f"{name}: {k}", {"x": [], "y": []})
                    s["x"].append(step)
                    s["y"].append(v)
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in sorted(series.items()):
        ax.plot(s["x"], s["y"], label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("Training loss per model (total)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return True


def fig_detections(gt_json: Path, results_json: Path, image_root: Path, path: Path, n: int = 6, score_thresh: float = 0.3, novel: set[str] | None = None) -> bool:
    """Detections on the first val images; ``novel`` (class names) overrides the json's ``split``."""
    gt = _read(gt_json)
    res = _read(results_json)
    if not gt or res is None:
        return False
    from PIL import Image

    cats = {c["id"]: c for c in gt["categories"]}
    if novel:
        cats = {k: {**c, "split": "novel" if c["name"] in novel else "base"} for k, c in cats.items()}
    by_img: dict[int, list] = {}
    for r in res:
        if r.get("score", 0) >= score_thresh:
            by_img.setdefault(r["image_id"], []).append(r)
    gt_by_img: dict[int, list] = {}
    for a in gt["annotations"]:
        gt_by_img.setdefault(a["image_id"], []).append(a)
    # images that have novel objects first: the interesting ones
    imgs = sorted(gt["images"], key=lambda im: -sum(cats[a["category_id"]].get("split") == "novel" for a in gt_by_img.get(im["id"], [])))[:n]
    plt = _plt()
    fig, axes = plt.subplots(1, len(imgs), figsize=(3.2 * len(imgs), 3.6))
    axes = np.atleast_1d(axes)
    for ax, im in zip(axes, imgs):
        ax.imshow(Image.open(image_root / im["file_name"]).convert("RGB"))
        for r in _display_nms(by_img.get(im["id"], []))[:6]:
            x, y, w, h = r["bbox"]
            c = cats.get(r["category_id"], {"name": str(r["category_id"])})
            novel = c.get("split") == "novel"
            col = "orange" if novel else "cyan"
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, ec=col, lw=1.5))
            ax.text(x, y - 1, f"{c['name']}{' (novel)' if novel else ''} {r['score']:.2f}", color="black", fontsize=6, bbox=dict(fc=col, alpha=0.8, pad=0.5, lw=0))
        ax.set_title(f"image {im['id']}", fontsize=8)
        ax.axis("off")
    fig.suptitle("Detections on val (orange = novel class, cyan = base)", fontsize=10)
    _save(fig, path)
    return True


def _display_nms(dets: list[dict], iou: float = 0.5) -> list[dict]:
    """Highest-scoring first, dropping boxes that overlap a kept one by IoU > ``iou`` whatever
    their class (for the figure only: the evaluation sees every detection)."""
    import torch
    from torchvision.ops import nms

    if not dets:
        return []
    b = torch.tensor([r["bbox"] for r in dets], dtype=torch.float32)
    b[:, 2:] += b[:, :2]
    keep = nms(b, torch.tensor([float(r["score"]) for r in dets]), iou)
    return [dets[i] for i in keep.tolist()]


def fig_seg_overlays(image_root: Path, gt_json: Path, gt_dir: Path, pred_dir: Path, path: Path, n: int = 4) -> bool:
    gt = _read(gt_json)
    if not gt or not pred_dir.is_dir():
        return False
    from PIL import Image

    names = {0: "background"} | {c["id"]: c["name"] for c in gt["categories"]}
    preds = sorted(pred_dir.glob("*.png"))[:n]
    if not preds:
        return False
    plt = _plt()
    cmap = plt.get_cmap("tab20", max(names) + 1)
    fig, axes = plt.subplots(len(preds), 3, figsize=(7.5, 2.6 * len(preds)))
    axes = np.atleast_2d(axes)
    file_of = {Path(im["file_name"]).stem: im["file_name"] for im in gt["images"]}
    for row, p in zip(axes, preds):
        img = Image.open(image_root / file_of.get(p.stem, p.name)).convert("RGB") if p.stem in file_of else None
        pred = np.array(Image.open(p))
        g = gt_dir / p.name
        gtm = np.array(Image.open(g)) if g.is_file() else np.zeros_like(pred)
        for ax, (title, arr) in zip(row, [("image", None), ("ground truth", gtm), ("prediction", pred)]):
            if img is not None:
                ax.imshow(img)
            if arr is not None:
                show = np.ma.masked_where((arr == 0) | (arr == 255), arr)
                ax.imshow(show, cmap=cmap, vmin=0, vmax=max(names), alpha=0.6, interpolation="nearest")
                present = [v for v in np.unique(arr) if v not in (0, 255)]
                ax.set_xlabel(", ".join(names.get(int(v), str(v)) for v in present)[:60], fontsize=6)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Segmentation on val", fontsize=10)
    _save(fig, path)
    return True


# ------------------------------------------------------------------------------------------ report
def write_report(cfg: Config, summary_only: bool = False) -> Path:
    """Write ``{work_dir}/report.md`` and ``{work_dir}/figures/*.png`` from the run's files."""
    work = Path(cfg.work_dir)
    figs = work / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    md: list[str] = ["# distill run report", "", f"Work dir: `{work}`. Every number below is read from the run's metrics files.", ""]
    gt_val = Path(cfg.data.val_json)
    novel: set[str] = set()
    vocab = None
    if cfg.data.vocab:  # the split lives in the vocabulary file (OV-COCO: coco_48_17.json), not in val
        from distill.errors import DistillError
        from distill.vocab import load_vocab

        try:
            vocab = load_vocab(cfg.data.vocab, cfg.data.split_file or None)
        except DistillError:
            vocab = None
    if vocab is not None:
        novel = {vocab.names[i] for i in vocab.novel_indices}
        md += [f"Vocabulary: {len(vocab)} classes, {len(novel)} novel: {', '.join(sorted(novel))}.", ""]
    elif (g := _read(gt_val)) is not None:
        novel = {c["name"] for c in g.get("categories", []) if c.get("split") == "novel"}
        md.append(f"Vocabulary: {len(g.get('categories', []))} classes, {len(novel)} novel: {', '.join(sorted(novel))}.")
        md.append("")

    tm = _read(work / "teacher" / "metrics.json")
    md += ["## Teacher (zero-shot)", ""]
    if tm:
        keys = ["zeroshot/top1_1x", "zeroshot/top1_1.5x", "zeroshot/top1_ens", "zeroshot/top1_ens_base", "zeroshot/top1_ens_novel", "zeroshot/top1_dense", "maskclip/miou_seen", "maskclip/miou_unseen", "maskclip/miou_all", "maskclip/miou_hiou"]
        rows = [[k, _fmt(tm[k])] for k in keys if k in tm]
        md += ["Zero-shot top-1 on ground-truth crops of val objects (1x, 1.5x, both summed as in ViLD 3.2; dense = RoIAlign on the MaskCLIP map) and MaskCLIP pixel mIoU on val.", "", table(["metric", "value (%)"], rows), ""]
        if isinstance(tm.get("maskclip/absent"), str):
            md += [f"MaskCLIP pixel mIoU: not measured ({tm['maskclip/absent']}).", ""]
    else:
        md += ["Teacher metrics not found (stage not run).", ""]

    md += ["## Detection (val, generalized: every detection competes over base + novel)", ""]
    det = _collect_tables(work, "det")
    order = ["vild_text", "vild", "vild_ensemble", "vild_selftrain"]  # baseline -> ours, then the rest
    det = dict(sorted(det.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    if det:
        md += [table(["model"] + [c for c, _ in DET_COLS], [[name] + _rows_from(m, DET_COLS) for name, m in det.items()]), ""]
        md += ["GT-box top-1: the student's own region embedding of each val ground-truth box, classified over the whole vocabulary (compare the teacher's GT-crop top-1 above).", ""]
    else:
        md += ["No detection metrics found.", ""]

    md += ["## Segmentation (val)", ""]
    seg = _collect_tables(work, "seg")
    tdm = _read(work / "teacher" / "dense" / "metrics.json")  # the clipself stage's MaskCLIP
    for label, m in (("MaskCLIP on the CLIPSelf dense tower (zero-shot)", tdm), ("MaskCLIP teacher (zero-shot)", tm)):  # prepended: listed plain first
        if m and "maskclip/miou_all" in m:
            seg = {label: {("pixel_acc" if k == "maskclip/pixel_acc" else k.replace("maskclip/", "miou/").replace("miou/miou_", "miou/")): v
                           for k, v in m.items() if k.startswith("maskclip/") and "@" not in k}} | seg
    if seg:
        md += [table(["model"] + [c for c, _ in SEG_COLS], [[name] + _rows_from(m, SEG_COLS) for name, m in seg.items()]), ""]
    else:
        md += ["No segmentation metrics found.", ""]

    md += ["## CAM refinement (CLIP-ES, val, image-level labels only)", ""]
    cam = _read(work / "cam" / "metrics.json")
    if cam and isinstance(cam.get("rows"), list):
        rows = [[str(m.get("step")), _fmt(m.get("miou")), _fmt(m.get("miou_seen")), _fmt(m.get("miou_unseen")), _fmt(m.get("ignored_fraction")), str(m.get("note", ""))] for m in cam["rows"]]
        md += [f"{cam.get('images_with_labels', '?')} {cam.get('split', '')} images.", "", table(["step", "mIoU", "mIoU seen", "mIoU unseen", "pixels ignored (%)", "note"], rows), ""]
    elif cam:
        md += [table(["metric", "value"], _kv_rows(cam)), ""]
    else:
        md += ["No CAM metrics found.", ""]

    md += ["## Pseudo-labels (measured against the hidden ground truth)", ""]
    lab = None
    for p in sorted(work.glob("labels/**/metrics.json")):
        lab = _read(p)
        if lab:
            md += [f"From `{p.relative_to(work)}` (precision / recall of pseudo boxes at IoU 0.5):", "", table(["metric", "value"], _kv_rows(lab)), ""]
    if not lab:
        md += ["No pseudo-label metrics found.", ""]
        for p in sorted(work.glob("labels/**/summary.json")):
            if (sm := _read(p)) and "labels/images" in sm:
                md += [f"`{p.parent.relative_to(work)}/labels.json`: {sm['labels/images']} images, {sm.get('labels/annotations', '?')} boxes; no ground truth given (`label.gt`), so their quality is not measured.", ""]

    st = _read(work / "selftrain" / "metrics.json")
    md += ["## Self-training", ""]
    if st:
        counts = _read(work / "selftrain" / "counts.json") or {}
        how = "novel pseudo-labels of the unlabeled split"
        if counts.get("repeat", 1) > 1:
            how += f" (drawn {counts['repeat']}x per epoch)"
        if "train_split" in counts:
            how += f" and of the training images themselves ({counts['train_split'].get('pseudo_annotations', '?')} boxes merged into their base ground truth, VL-PLM)"
        md += [f"One round: the ViLD detector trained further (from its weights, `det.init`) on base ground truth + {how}; AP50 on val, before and after.", "", table(["metric", "value"], _kv_rows(st)), ""]
    else:
        md += ["Self-training not run.", ""]

    times = stage_timings(cfg)
    md += ["## Stage timings", "", table(["stage", "wall time (s)"], [[k, f"{v:.1f}"] for k, v in times.items()] + [["total", f"{sum(times.values()):.1f}"]]), ""]

    if not summary_only:
        md += ["## Figures", ""]
        made = []
        for name, m in sorted(det.items(), key=lambda kv: kv[0] != "vild_ensemble"):  # ours first
            if fig_per_class_ap(m, novel, figs / f"ap_per_class_{name}.png", f"Per-class AP50 on val: {name}"):
                made.append((f"Per-class AP50 ({name})", f"figures/ap_per_class_{name}.png"))
                break
        jsonl = {p.parent.name: p for p in sorted(work.glob("*/*/metrics.jsonl"))}
        if fig_loss_curves(jsonl, figs / "loss_curves.png"):
            made.append(("Training loss curves", "figures/loss_curves.png"))
        for p in sorted(work.glob("det/*/results_val.json")) + sorted(work.glob("det/*/predictions_val.json")):
            if fig_detections(gt_val, p, Path(cfg.data.image_root), figs / f"detections_{p.parent.name}.png", novel=novel):
                made.append((f"Detections ({p.parent.name})", f"figures/detections_{p.parent.name}.png"))
        for d in sorted(work.glob("seg/*/pred_val")):
            if fig_seg_overlays(Path(cfg.data.image_root), gt_val, Path(cfg.data.semantic_root) / "val", d, figs / f"seg_{d.parent.name}.png"):
                made.append((f"Segmentation ({d.parent.name})", f"figures/seg_{d.parent.name}.png"))
        for i, p in enumerate(sorted(work.glob("cam/panels/**/*.png"))[:3]):
            dst = figs / f"cam_panel_{i}.png"
            shutil.copyfile(p, dst)
            made.append((f"CAM panel {p.stem}", f"figures/{dst.name}"))
        for title, rel in made:
            md += [f"### {title}", "", f"![{title}]({rel})", ""]
    out = work / "report.md"
    write_text(out, "\n".join(md) + "\n")
    return out
