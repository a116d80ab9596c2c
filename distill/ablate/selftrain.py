"""The self-training ablation: the same ViLD weights fine-tuned once per variant of :data:`ABLATION`
(base ground truth only as the control; + novel pseudo-labels of the unlabeled split, drawn 1x or
5x per epoch; + those of the training images, as VL-PLM), each scored on val."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distill.errors import DistillError
from distill.files import read_json, write_json, write_text
from distill.labels.selftrain import self_train
from distill.report.tables import fmt, table

# name -> (pseudo-labels of the unlabeled split, repeat, pseudo-labels of the training images)
ABLATION = {
    "control": (False, 1, False),  # base ground truth only: just more steps
    "unlabeled": (True, 1, False),
    "unlabeled_x5": (True, 5, False),
    "unlabeled+train": (True, 1, True),
    "unlabeled_x5+train": (True, 5, True),
}


def selftrain_ablation(cfg, pseudo_json, train_pseudo_json=None, *, variants=tuple(ABLATION), keep: str = "novel",
                       score_thresh: float = 0.0, progress: bool = False) -> dict:
    """The same detector (``cfg.det.init``) fine-tuned once per variant of :data:`ABLATION`, each
    as ``det.name + "_st_" + variant``; returns ``{variant: {AP50_novel, AP50_base, ...}}`` and
    writes ``{work_dir}/selftrain/ablation/metrics.json``. ``cfg`` is the fine-tuning config (``det.init``,
    ``det.train.max_steps``), as the pipeline's selftrain stage builds it; ``keep`` and
    ``score_thresh`` go to :func:`self_train` as the stage passes ``selftrain.keep`` / ``score_thresh``."""
    from distill.detection.train import train_detector

    bad = [v for v in variants if v not in ABLATION]
    if bad:
        raise DistillError(f"selftrain ablation variants {bad}: valid are {', '.join(ABLATION)}")
    if not cfg.det.init:
        raise DistillError("selftrain ablation: det.init must name the detector to fine-tune")
    if any(ABLATION[v][2] for v in variants) and not train_pseudo_json:
        raise DistillError("selftrain ablation: the +train variants need pseudo-labels of the training images (train_pseudo_json)")
    work = Path(cfg.work_dir)
    rows: dict[str, dict] = {}
    before = Path(cfg.det.init).parent / "metrics.json"
    if before.is_file():
        b = read_json(before, "detector metrics")
        rows["before"] = {k.split("/")[1]: b[k] for k in ("bbox/AP50_novel", "bbox/AP50_base", "bbox/AP50") if k in b}
    for v in variants:
        use_pseudo, repeat, train_split = ABLATION[v]
        vcfg = dataclasses.replace(cfg, det=dataclasses.replace(cfg.det, name=f"{cfg.det.name}_st_{v.replace('+', '_')}"))
        if use_pseudo:
            m = self_train(vcfg, pseudo_json, keep=keep, score_thresh=score_thresh, repeat=repeat,
                           train_pseudo_json=train_pseudo_json if train_split else None,
                           progress=progress, out_dir=work / "selftrain" / "ablation" / v.replace("+", "_"))
            m = {k.split("/")[1]: val for k, val in m.items() if k.endswith("_after")}
            m = {k[: -len("_after")]: val for k, val in m.items()}
        else:
            after = train_detector(vcfg, progress=progress)
            m = {k.split("/")[1]: after[k] for k in ("bbox/AP50_novel", "bbox/AP50_base", "bbox/AP50") if k in after}
        rows[v] = m
        write_json(work / "selftrain" / "ablation" / "metrics.json", rows)
    write_text(work / "selftrain" / "ablation" / "table.md", ablation_table(rows))
    return rows


def ablation_table(rows: dict) -> str:
    """``rows`` of :func:`selftrain_ablation` as a markdown table of AP50 novel / base / all, in %."""
    return table(["fine-tuning data", "AP50 novel", "AP50 base", "AP50 all"],
                 [[v, fmt(m.get("AP50_novel")), fmt(m.get("AP50_base")), fmt(m.get("AP50"))] for v, m in rows.items()]) + "\n"
