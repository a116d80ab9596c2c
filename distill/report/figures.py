"""The report's figures, drawn from the run's files: per-class AP50 bars, training loss curves,
detections on val images (novel classes marked), segmentation overlays, CAM panels (copied from
the CAM stage). Each ``fig_*`` returns False (and draws nothing) when its files are missing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from distill.config import Config
from distill.files import atomic_path


def read_json_or_none(p: Path) -> dict | list | None:
    """The json in ``p``, or None when it is missing or unreadable (the report then says so)."""
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


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
    gt = read_json_or_none(gt_json)
    res = read_json_or_none(results_json)
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
    gt = read_json_or_none(gt_json)
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


def write_figures(cfg: Config, det: dict[str, dict], novel: set[str]) -> list[str]:
    """Draw ``{work_dir}/figures/*.png`` and return the report's figure section (markdown lines):
    per-class AP50 of the first detector in ``det`` (the ensemble first), loss curves of every
    ``*/*/metrics.jsonl``, detections and segmentation overlays on val, three CAM panels."""
    work = Path(cfg.work_dir)
    figs = work / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    gt_val = Path(cfg.data.val_json)
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
    md = ["## Figures", ""]
    for title, rel in made:
        md += [f"### {title}", "", f"![{title}]({rel})", ""]
    return md
