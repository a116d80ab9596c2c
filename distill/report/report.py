"""``report.md``, ``docs/results.md`` and the README's results table, built only from the files a
run wrote.

Every number is read from a ``metrics.json`` (or ``metrics.jsonl``) under the run's work dir, and
stage timings from what the runner hands in; nothing is typed in. Sections whose files are missing
say so instead of inventing a row. The figures are :mod:`distill.report.figures`.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from distill.config import Config
from distill.errors import DistillError
from distill.files import write_text
from distill.report.figures import read_json_or_none as _read
from distill.report.figures import write_figures
from distill.report.tables import fmt, table

_PCT_WORDS = ("ap", "iou", "acc", "top1", "precision", "recall", "f1", "fraction", "delta", "before", "after")


def _kv_rows(m: dict) -> list[list[str]]:
    """Rows of a flat metrics dict: rates as percentages, counts and seconds as plain numbers."""
    rows = []
    for k, v in m.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        pct = any(w in k.lower() for w in _PCT_WORDS) and not k.lower().startswith("num")
        if pct and "delta" in k.lower() and math.isfinite(v):
            rows.append([k, f"{100 * v:+.1f}"])  # a change, in points: signed
            continue
        rows.append([k, fmt(v, pct)])
    return rows


DET_COLS = [("AP50 novel", "bbox/AP50_novel"), ("AP50 base", "bbox/AP50_base"), ("AP50 all", "bbox/AP50"), ("AP novel", "bbox/AP_novel"), ("AP base", "bbox/AP_base"), ("AP all", "bbox/AP"), ("GT-box top-1 novel", "region/top1_novel"), ("GT-box top-1 base", "region/top1_base")]
SEG_COLS = [("mIoU base (seen)", "miou/base"), ("mIoU novel (unseen)", "miou/novel"), ("mIoU all", "miou/all"), ("hIoU", "miou/hiou"), ("pixel acc", "pixel_acc")]
TEACHER_KEYS = ("zeroshot/top1_1x", "zeroshot/top1_1.5x", "zeroshot/top1_ens", "zeroshot/top1_ens_base", "zeroshot/top1_ens_novel", "zeroshot/top1_dense",
                "maskclip/miou_base", "maskclip/miou_novel", "maskclip/miou_all", "maskclip/miou_hiou")
DET_ORDER = ("vild_text", "vild", "vild_ensemble", "vild_selftrain", "one_stage_text", "one_stage")  # baseline -> ours, then the rest


def _model_table(rows: dict[str, dict], cols: list[tuple[str, str]]) -> str:
    return table(["model"] + [c for c, _ in cols], [[name] + [fmt(m.get(key)) for _, key in cols] for name, m in rows.items()])


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


def _detectors(work: Path) -> dict[str, dict]:
    det = _collect_tables(work, "det")
    return dict(sorted(det.items(), key=lambda kv: (DET_ORDER.index(kv[0]) if kv[0] in DET_ORDER else len(DET_ORDER), kv[0])))


# ------------------------------------------------------------------------------------------ sections
def _vocabulary(cfg: Config) -> tuple[set[str], list[str]]:
    """The novel class names and the report's vocabulary line: from ``data.vocab`` when it loads
    (the split lives in the vocabulary file, e.g. OV-COCO's coco_48_17.json), else from val's
    categories."""
    vocab = None
    if cfg.data.vocab:
        from distill.vocab import load_vocab

        try:
            vocab = load_vocab(cfg.data.vocab, cfg.data.split_file or None)
        except DistillError:
            vocab = None
    if vocab is not None:
        novel = {vocab.names[i] for i in vocab.novel_indices}
        return novel, [f"Vocabulary: {len(vocab)} classes, {len(novel)} novel: {', '.join(sorted(novel))}.", ""]
    if (g := _read(Path(cfg.data.val_json))) is not None:
        novel = {c["name"] for c in g.get("categories", []) if c.get("split") == "novel"}
        return novel, [f"Vocabulary: {len(g.get('categories', []))} classes, {len(novel)} novel: {', '.join(sorted(novel))}.", ""]
    return set(), []


def _teacher_section(tm: dict | None) -> list[str]:
    md = ["## Teacher (zero-shot)", ""]
    if not tm:
        return md + ["Teacher metrics not found (stage not run).", ""]
    rows = [[k, fmt(tm[k])] for k in TEACHER_KEYS if k in tm]
    md += ["Zero-shot top-1 on ground-truth crops of val objects (1x, 1.5x, both summed as in ViLD 3.2; dense = RoIAlign on the MaskCLIP map) and MaskCLIP pixel mIoU on val.", "",
           table(["metric", "value (%)"], rows), ""]
    if isinstance(tm.get("maskclip/absent"), str):
        md += [f"MaskCLIP pixel mIoU: not measured ({tm['maskclip/absent']}).", ""]
    return md


def _det_section(det: dict[str, dict]) -> list[str]:
    md = ["## Detection (val, generalized: every detection competes over base + novel)", ""]
    if not det:
        return md + ["No detection metrics found.", ""]
    return md + [_model_table(det, DET_COLS), "",
                 "GT-box top-1: the student's own region embedding of each val ground-truth box, classified over the whole vocabulary (compare the teacher's GT-crop top-1 above).", ""]


def _maskclip_row(m: dict) -> dict:
    """A teacher's ``maskclip/*`` metrics under the students' ``miou/*`` names (sized ``@`` keys left out)."""
    return {("pixel_acc" if k == "maskclip/pixel_acc" else k.replace("maskclip/", "miou/").replace("miou/miou_", "miou/")): v
            for k, v in m.items() if k.startswith("maskclip/") and "@" not in k}


def _seg_section(work: Path, tm: dict | None) -> list[str]:
    md = ["## Segmentation (val)", ""]
    seg = _collect_tables(work, "seg")
    tdm = _read(work / "teacher" / "dense_tower" / "metrics.json")  # the clipself stage's MaskCLIP
    for label, m in (("MaskCLIP on the CLIPSelf dense tower (zero-shot)", tdm), ("MaskCLIP teacher (zero-shot)", tm)):  # prepended: listed plain first
        if m and "maskclip/miou_all" in m:
            seg = {label: _maskclip_row(m)} | seg
    if not seg:
        return md + ["No segmentation metrics found.", ""]
    return md + [_model_table(seg, SEG_COLS), ""]


def _cam_section(cam: dict | None) -> list[str]:
    md = ["## CAM refinement (CLIP-ES, val, image-level labels only)", ""]
    if cam and isinstance(cam.get("rows"), list):
        rows = [[str(m.get("step")), fmt(m.get("miou")), fmt(m.get("miou_base")), fmt(m.get("miou_novel")), fmt(m.get("ignored_fraction")), str(m.get("note", ""))] for m in cam["rows"]]
        return md + [f"{cam.get('images_with_labels', '?')} {cam.get('split', '')} images.", "",
                     table(["step", "mIoU", "mIoU base (seen)", "mIoU novel (unseen)", "pixels ignored (%)", "note"], rows), ""]
    if cam:
        return md + [table(["metric", "value"], _kv_rows(cam)), ""]
    return md + ["No CAM metrics found.", ""]


def _labels_section(work: Path) -> list[str]:
    md = ["## Pseudo-labels (measured against the hidden ground truth)", ""]
    lab = None
    for p in sorted(work.glob("labels/**/metrics.json")):
        lab = _read(p)
        if lab:
            md += [f"From `{p.relative_to(work)}` (precision / recall of pseudo boxes at IoU 0.5):", "", table(["metric", "value"], _kv_rows(lab)), ""]
    if lab:
        return md
    md += ["No pseudo-label metrics found.", ""]
    for p in sorted(work.glob("labels/**/summary.json")):
        if (sm := _read(p)) and "labels/images" in sm:
            md += [f"`{p.parent.relative_to(work)}/labels.json`: {sm['labels/images']} images, {sm.get('labels/annotations', '?')} boxes; no ground truth given (`label.gt`), so their quality is not measured.", ""]
    return md


def _selftrain_section(work: Path) -> list[str]:
    md = ["## Self-training", ""]
    st = _read(work / "selftrain" / "metrics.json")
    if not st:
        return md + ["Self-training not run.", ""]
    counts = _read(work / "selftrain" / "counts.json") or {}
    how = "novel pseudo-labels of the unlabeled split"
    if counts.get("repeat", 1) > 1:
        how += f" (drawn {counts['repeat']}x per epoch)"
    if "train_split" in counts:
        how += f" and of the training images themselves ({counts['train_split'].get('pseudo_annotations', '?')} boxes merged into their base ground truth, VL-PLM)"
    return md + [f"One round: the ViLD detector trained further (from its weights, `det.init`) on base ground truth + {how}; AP50 on val, before and after.", "",
                 table(["metric", "value"], _kv_rows(st)), ""]


def _timings_section(times: dict[str, float]) -> list[str]:
    rows = [[k, f"{v:.1f}"] for k, v in times.items()] + [["total", f"{sum(times.values()):.1f}"]]
    return ["## Stage timings", "", table(["stage", "wall time (s)"], rows), ""]


def _tables(cfg: Config, timings: dict[str, float] | None) -> tuple[list[str], dict[str, dict], set[str]]:
    """Every table of the report (markdown lines), the detectors' metrics and the novel names."""
    work = Path(cfg.work_dir)
    novel, md = _vocabulary(cfg)
    tm = _read(work / "teacher" / "metrics.json")
    det = _detectors(work)
    md += _teacher_section(tm) + _det_section(det) + _seg_section(work, tm) + _cam_section(_read(work / "cam" / "metrics.json"))
    md += _labels_section(work) + _selftrain_section(work) + _timings_section(timings or {})
    return md, det, novel


def write_report(cfg: Config, summary_only: bool = False, timings: dict[str, float] | None = None) -> Path:
    """Write ``{work_dir}/report.md`` and (unless ``summary_only``) ``{work_dir}/figures/*.png``
    from the run's files; ``timings``: each stage's wall time (the runner's manifests)."""
    work = Path(cfg.work_dir)
    md, det, novel = _tables(cfg, timings)
    md = ["# distill run report", "", f"Work dir: `{work}`. Every number below is read from the run's metrics files.", ""] + md
    if not summary_only:
        md += write_figures(cfg, det, novel)
    out = work / "report.md"
    write_text(out, "\n".join(md) + "\n")
    return out


# ------------------------------------------------------------------------------ published results
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"

# The README's one table: (row, metrics file under the work dir, metric, keys of base, novel, all).
HEADLINE = (
    ("Teacher, zero-shot (GT crops)", "teacher/metrics.json", "top-1", ("zeroshot/top1_ens_base", "zeroshot/top1_ens_novel", "zeroshot/top1_ens")),
    ("ViLD-text", "det/vild_text/metrics.json", "box AP50", ("bbox/AP50_base", "bbox/AP50_novel", "bbox/AP50")),
    ("ViLD (text + image distillation)", "det/vild/metrics.json", "box AP50", ("bbox/AP50_base", "bbox/AP50_novel", "bbox/AP50")),
    ("ViLD + teacher ensemble", "det/vild_ensemble/metrics.json", "box AP50", ("bbox/AP50_base", "bbox/AP50_novel", "bbox/AP50")),
    ("ViLD + self-training", "det/vild_selftrain/metrics.json", "box AP50", ("bbox/AP50_base", "bbox/AP50_novel", "bbox/AP50")),
    ("MaskCLIP on the dense tower, zero-shot", "teacher/dense_tower/metrics.json", "mIoU", ("maskclip/miou_base", "maskclip/miou_novel", "maskclip/miou_all")),
    ("LSeg (base masks)", "seg/lseg/metrics.json", "mIoU", ("miou/base", "miou/novel", "miou/all")),
    ("LSeg + MaskCLIP distillation", "seg/lseg_distill/metrics.json", "mIoU", ("miou/base", "miou/novel", "miou/all")),
    ("LSeg on CLIP-ES masks", "seg/lseg_cam/metrics.json", "mIoU", ("miou/base", "miou/novel", "miou/all")),
    ("Pseudo-labels (unlabeled split)", "labels/unlabeled/metrics.json", "box recall", ("labels/recall_base", "labels/recall_novel", "labels/recall_all")),
)


def headline_table(work: Path) -> str:
    """The README's table: one row a :data:`HEADLINE` entry whose metrics file exists, in %."""
    rows = []
    for name, rel, metric, keys in HEADLINE:
        m = _read(Path(work) / rel)
        if isinstance(m, dict):
            rows.append([name, metric] + [fmt(m.get(k)) for k in keys])
    if not rows:
        raise DistillError(f"{work}: no metrics files of a finished run (run `distill run` first)")
    return table(["model", "metric", "base", "novel", "all"], rows)


def replace_block(text: str, block: str, where: str) -> str:
    """``text`` with the lines between :data:`MARK_START` and :data:`MARK_END` replaced by ``block``."""
    i, j = text.find(MARK_START), text.find(MARK_END)
    if i < 0 or j < i:
        raise DistillError(f"{where}: no '{MARK_START}' ... '{MARK_END}' block to replace")
    return text[: i + len(MARK_START)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


def publish(cfg: Config, readme: Path | None = None, results: Path | None = None, timings: dict[str, float] | None = None) -> list[Path]:
    """Rewrite the run's ``report.md``; with ``results``, write every table of the report there
    (docs/results.md); with ``readme``, replace its marked block by :func:`headline_table`. Both
    texts are made before anything is written, so a README without the block changes nothing.
    Returns the files written."""
    command = shlex.join(["distill", "report", str(cfg.work_dir)] + [a for opt, v in (("--readme", readme), ("--results", results)) if v is not None
                                                                     for a in (opt, str(v))])  # as it was run
    if results is not None and Path(results).is_dir():
        raise DistillError(f"{results}: is a folder (expected the path of a markdown file to write, e.g. docs/results.md)")
    texts: dict[Path, str] = {}
    if readme is not None:
        block = headline_table(Path(cfg.work_dir)) + (
            f"\n\nOn val, in %; base / novel are seen / unseen for segmentation. Written by `{command}` from the run's "
            "metrics files.\n")
        if not Path(readme).is_file():
            raise DistillError(f"{readme}: not found (expected a README holding a '{MARK_START}' block)")
        texts[Path(readme)] = replace_block(Path(readme).read_text(), block, str(readme))
    if results is not None:
        md, _, _ = _tables(cfg, timings)
        head = ["# Results of the default run", "", f"Generated by `{command}` from the metrics files of `{cfg.work_dir}`: "
                "every number is the run's own, in % unless named otherwise. Figures: the run's `report.md`.", ""]
        texts[Path(results)] = "\n".join(head + md) + "\n"
    written = [write_report(cfg, timings=timings)]
    for path, text in texts.items():
        write_text(path, text)
        written.append(path)
    return written
