"""The ViLD ablation on one world (ViLD Table 3 / the OV-COCO table, shapes-world analogue).

Rows (each trained with the same backbone, schedule and seed; evaluated on ``data.val_json`` over
the whole vocabulary):

- ``supervised``: a plain torchvision Faster R-CNN (linear classifier) trained on base boxes;
  it cannot name novel classes (novel AP = 0 by construction);
- ``vild_text``: ViLD-text only (section 3.2), text inference;
- ``vild_image``: ViLD-image only (section 3.3), student embeddings vs text embeddings;
- ``vild``: ViLD-text + ViLD-image (section 3.3, w = 0.5), text inference;
- ``vild_ensemble``: the ``vild`` model with the section 3.4 ensemble (teacher crops);
- ``vild_ensemble_heads``: section 3.4's ViLD-ensemble: ViLD-text and ViLD-image trained in
  separate heads, their scores ensembled, no teacher at test time;
- ``oracle``: ViLD-text trained on base AND novel boxes (upper bound);
- ``detpro`` / ``detpro_ensemble``: the ``vild`` / ``vild_ensemble`` rows with DetPro's learned
  prompts instead of the hand-written templates (detection/detpro.py; ``prompts.out``, learned
  first when missing);
- ``oadp_oake``, ``oadp_global``, ``oadp_block``, ``oadp``: the ``vild`` row with OADP's parts
  (Wang et al. CVPR 2023): region embeddings by object-aware extraction (``regions.mode=oake``),
  + global distillation (``det.global_weight`` 0.5), + block distillation (``det.block_weight``
  128, ``det.block_relation_weight`` 8), and all three;
- ``one_stage_text`` / ``one_stage``: the one-stage student (``det.arch=fcos``, ZSD-YOLO's method,
  detection/one_stage.py) with the text loss alone, and with image distillation on the base boxes
  and ZSD-YOLO's self-labels (:data:`ONE_STAGE_SELF_LABELS`).

:func:`run_ablation` writes ``det/ablation/metrics.json`` and ``det/ablation/ablation.md``.
"""

from __future__ import annotations

import time
from pathlib import Path


from distill.config import Config, save_config
from distill.files import write_json, write_text
from distill.report.tables import table

VARIANTS = ("supervised", "vild_text", "vild_image", "vild", "vild_ensemble", "vild_ensemble_heads", "oracle", "detpro", "detpro_ensemble",
            "oadp_oake", "oadp_global", "oadp_block", "oadp", "one_stage_text", "one_stage")
DISTILLED = ("vild_image", "vild", "vild_ensemble", "vild_ensemble_heads", "detpro", "detpro_ensemble", "oadp_oake", "oadp_global", "oadp_block", "oadp",
             "one_stage")
# the one_stage row's self-labelling (configs/shapes/one_stage.yaml): proposals per image, min RPN
# objectness, max IoU with a base box
ONE_STAGE_SELF_LABELS = {"self_labels": 10, "self_label_score": 0.5, "self_label_iou": 0.3}
# OADP's weights (configs/dp/models/global_.py, block.py)
OADP_GLOBAL = {"global_weight": 0.5}
OADP_BLOCK = {"block_weight": 128.0, "block_relation_weight": 8.0}  # rows that read the region cache
COLUMNS = ("bbox/AP50_novel", "bbox/AP50_base", "bbox/AP50", "bbox/AP_novel", "bbox/AP_base", "bbox/AP", "region/top1_novel", "region/top1_base")
LABELS = {
    "supervised": "Supervised Faster R-CNN (base only)",
    "vild_text": "ViLD-text",
    "vild_image": "ViLD-image",
    "vild": "ViLD (text + image)",
    "vild_ensemble": "ViLD + teacher crops (ensemble, 3.4)",
    "vild_ensemble_heads": "ViLD-ensemble (separate heads, no teacher, 3.4)",
    "oracle": "Oracle ViLD-text (base + novel boxes)",
    "detpro": "DetPro (ViLD with learned prompts)",
    "detpro_ensemble": "DetPro + teacher crops (ensemble)",
    "oadp_oake": "ViLD + OAKE (object-aware region embeddings)",
    "oadp_global": "ViLD + global distillation",
    "oadp_block": "ViLD + block distillation",
    "oadp": "OADP (OAKE + global + block)",
    "one_stage_text": "one-stage (text only)",
    "one_stage": "one-stage + distillation (ZSD-YOLO)",
}


def _variant_cfg(cfg: Config, v: str) -> Config:
    from distill.detection.train import with_det

    name = f"ablation_{v}"
    if v == "vild_text":
        return with_det(cfg, name=name, use_text=True, use_image=False, inference="text")
    if v == "vild_image":
        return with_det(cfg, name=name, use_text=False, use_image=True, inference="text")
    if v in ("vild", "vild_ensemble"):
        return with_det(cfg, name="ablation_vild", use_text=True, use_image=True, inference="text")
    if v.startswith("oadp"):
        import dataclasses

        c = cfg
        if v in ("oadp_oake", "oadp"):
            c = dataclasses.replace(c, regions=dataclasses.replace(c.regions, mode="oake"))
        extra = {**(OADP_GLOBAL if v in ("oadp_global", "oadp") else {}), **(OADP_BLOCK if v in ("oadp_block", "oadp") else {})}
        return with_det(c, name=name, use_text=True, use_image=True, inference="text", **extra)
    if v in ("detpro", "detpro_ensemble"):
        from distill.detection.detpro import with_prompts

        return with_det(with_prompts(cfg), name="ablation_detpro", use_text=True, use_image=True, inference="text")
    if v in ("one_stage_text", "one_stage"):
        distilled = v == "one_stage"
        return with_det(cfg, name=name, arch="fcos", inference="text", use_text=True, use_image=distilled, masks=False, image_head="shared",
                        global_weight=0.0, block_weight=0.0, block_relation_weight=0.0, **(ONE_STAGE_SELF_LABELS if distilled else {"self_labels": 0}))
    if v == "vild_ensemble_heads":
        return with_det(cfg, name=name, use_text=True, use_image=True, image_head="separate", inference="ensemble_heads")
    if v == "oracle":
        return with_det(cfg, name=name, use_text=True, use_image=False, train_on_all=True, inference="text")
    return with_det(cfg, name=name)


def train_supervised(cfg: Config, vocab, progress: bool = True) -> dict:
    """Plain Faster R-CNN on base boxes; evaluated over the whole vocabulary (it only ever
    predicts base classes)."""
    from distill.data.coco import CocoDetection, collate
    from distill.detection.build import build_plain_detector
    from distill.detection.train import DetTrainSet, det_dir, predict
    from distill.engine.train import make_loader, train
    from distill.eval.detection import evaluate_detection

    out = det_dir(cfg)
    base_idx = vocab.base_indices
    base = CocoDetection(cfg.data.train_json, cfg.data.image_root, vocab, skip_unknown=True)
    ds = DetTrainSet(base, {full: k for k, full in enumerate(base_idx)})
    model = build_plain_detector(cfg.det, len(base_idx))
    val = CocoDetection(cfg.data.val_json, cfg.data.image_root, vocab, skip_unknown=True)
    base_ids = [vocab.ids[i] for i in base_idx]

    def eval_fn(m) -> dict:
        res = predict(m, val, cfg.det.train.batch_size, vocab_ids=base_ids)
        write_json(out / "results_val.json", res)
        return evaluate_detection(cfg.data.val_json, res, out, vocab=vocab, max_dets=cfg.det.detections_per_img)

    save_config(cfg, out / "config.yaml")
    loader = make_loader(ds, cfg.det.train, collate_fn=collate, num_workers=cfg.data.num_workers)
    metrics = train(model, loader, cfg.det.train, out, eval_fn=eval_fn, progress=progress)
    write_json(out / "metrics.json", metrics)  # as train_detector does (run_ablation(reuse=True) reads it)
    return metrics


def run_ablation(cfg: Config, variants: tuple[str, ...] = VARIANTS, progress: bool = True, teacher=None,
                 seeds: tuple[int, ...] | None = None, reuse: bool = False) -> dict:
    """Train / evaluate every variant for each seed; returns ``{variant: metrics}`` (the mean over
    seeds of :data:`COLUMNS` when there are several, with each seed's rows under ``"_seeds"``) and
    writes the table.

    At 300 steps on the shapes world, ViLD-text's novel AP50 moves by 11 points between training
    seeds (it names novel classes by composing base attributes, which some seeds learn better), so
    the comparison is made on the mean over seeds when more than one is given. The config's own
    seed trains ``det/ablation_<variant>``; another seed ``s`` trains ``det/ablation_<variant>_s<s>``.
    ``reuse``: a row whose directory already holds the metrics of a run with the same settings
    (:func:`finished_run`) is read instead of trained again, so a stopped ablation, or rows trained
    by separate processes in this work dir, can be completed and tabulated.
    """
    from distill.detection.proposals import proposals_dir, run_proposals
    from distill.detection.train import build_teacher_and_text
    from distill.vocab import resolve_vocab

    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        from distill.errors import DistillError

        raise DistillError(f"ablation variants {bad}: valid are {', '.join(VARIANTS)}")
    seeds = tuple(seeds) if seeds else (cfg.det.train.seed,)
    t0 = time.perf_counter()
    out = Path(cfg.work_dir) / "det" / "ablation"
    vocab = resolve_vocab(cfg.data, need_base=True)
    if teacher is None:
        teacher, _ = build_teacher_and_text(cfg, vocab)
    from distill.detection.backbone import pretrain_backbone, uses_pretrained_backbone

    if uses_pretrained_backbone(cfg) and not Path(cfg.det.backbone_pretrain.out).is_file():  # as the pipeline's backbone stage
        pretrain_backbone(cfg, progress=progress)
    needs_props = any(v in DISTILLED for v in variants)
    if needs_props and not (proposals_dir(cfg) / "proposals_train.safetensors").is_file():
        run_proposals(cfg, progress=progress)
    per_seed: dict[int, dict[str, dict]] = {}
    results: dict[str, dict] = {}
    for s in seeds:
        per_seed[s] = {}
        for v in variants:
            t1 = time.perf_counter()
            m = finished_run(_seed_cfg(cfg, v, s)) if reuse else None
            if m is None:
                m = _run_variant(cfg, v, s, vocab, teacher, progress)
                m["variant_seconds"] = round(time.perf_counter() - t1, 1)
            else:
                m["variant_seconds"] = m.get("seconds") or m.get("train_time_s")
                m["reused"] = True
            per_seed[s][v] = m
            results = _combine(per_seed)
            _write_table(out, cfg, results)
    results["_meta"] = {"seconds": round(time.perf_counter() - t0, 1), "max_steps": cfg.det.train.max_steps, "seeds": list(seeds)}
    _write_table(out, cfg, results)
    return results


def _seed_cfg(cfg: Config, v: str, seed: int) -> Config:
    """The config row ``v`` trains with for ``seed`` (the config's seed keeps the plain name)."""
    from distill.detection.train import with_det

    suffix = "" if seed == cfg.det.train.seed else f"_s{seed}"
    vcfg = _variant_cfg(cfg, v)
    vcfg = with_det(vcfg, name=vcfg.det.name + suffix, train={"seed": seed})
    if v in ("vild_ensemble", "detpro_ensemble"):
        weights = Path(vcfg.work_dir) / "det" / vcfg.det.name / "model_final.pt"  # the vild / detpro row's model
        vcfg = with_det(vcfg, name=f"ablation_{v}{suffix}", inference="ensemble", checkpoint=str(weights))
    return vcfg


# the sections that decide a row's result (the world is the work dir's data)
_RUN_SECTIONS = ("data", "teacher", "regions", "proposals", "det")


def _run_settings(d: dict, work_dir: str) -> str:
    import json

    text = json.dumps({k: d.get(k) for k in _RUN_SECTIONS}, sort_keys=True, default=str)
    return text.replace(str(work_dir), "{work_dir}") if work_dir else text


def finished_run(vcfg: Config) -> dict | None:
    """The metrics in ``det/<name>/metrics.json`` when that directory's ``config.yaml`` has the same
    data, teacher, regions, proposals and det settings as ``vcfg`` (paths compared relative to each
    one's work dir) and the run reached its evaluation; else None."""
    import yaml

    from distill.config import to_dict
    from distill.detection.train import det_dir
    from distill.errors import DistillError
    from distill.files import read_json

    d = det_dir(vcfg)
    if not ((d / "metrics.json").is_file() and (d / "config.yaml").is_file()):
        return None
    try:
        saved = yaml.safe_load((d / "config.yaml").read_text()) or {}
        m = read_json(d / "metrics.json")
    except (OSError, DistillError, yaml.YAMLError):  # unreadable: train the row again
        return None
    if _run_settings(saved, saved.get("work_dir", "")) != _run_settings(to_dict(vcfg), vcfg.work_dir):
        return None
    return m if isinstance(m, dict) and "bbox/AP50" in m else None


def _run_variant(cfg: Config, v: str, seed: int, vocab, teacher, progress: bool) -> dict:
    from distill.detection.train import train_detector

    if v.startswith("detpro") and not Path(cfg.prompts.out).is_file():
        from distill.detection.detpro import train_prompts

        train_prompts(cfg, teacher=teacher, progress=progress)
    vcfg = _seed_cfg(cfg, v, seed)
    if v == "supervised":
        return train_supervised(vcfg, vocab, progress)
    if v in ("vild_ensemble", "detpro_ensemble"):
        weights = Path(vcfg.det.checkpoint)  # the vild / detpro row's model
        if not weights.is_file():
            train_detector(_seed_cfg(cfg, v.replace("_ensemble", ""), seed), progress=progress, teacher=teacher)
        return train_detector(vcfg, eval_only=True, progress=progress, teacher=teacher)
    return train_detector(vcfg, progress=progress, teacher=teacher)


def _combine(per_seed: dict[int, dict[str, dict]]) -> dict:
    """One seed: its rows as they are. Several: each row's mean over the seeds that ran it, and
    ``"_seeds"`` holding every seed's rows."""
    if len(per_seed) == 1:
        return dict(next(iter(per_seed.values())))
    rows: dict[str, dict] = {}
    for v in dict.fromkeys(v for runs in per_seed.values() for v in runs):
        ms = [runs[v] for runs in per_seed.values() if v in runs]
        row = {}
        for c in COLUMNS:
            xs = [m[c] for m in ms if isinstance(m.get(c), (int, float)) and m[c] == m[c]]
            row[c] = sum(xs) / len(xs) if len(xs) == len(ms) else None
        row["variant_seconds"] = sum(m.get("variant_seconds") or 0.0 for m in ms)
        row["n_seeds"] = len(ms)
        rows[v] = row
    rows["_seeds"] = {s: dict(runs) for s, runs in per_seed.items()}
    return rows


def table_markdown(results: dict) -> str:
    """The rows of ``results`` (``_``-keys left out) as a markdown table, in %; "-" where missing."""
    rows = []
    for v, m in results.items():
        if v.startswith("_"):
            continue
        cells = [f"{100 * m[c]:.1f}" if isinstance(m.get(c), (int, float)) and m[c] == m[c] else "-" for c in COLUMNS]
        rows.append([LABELS.get(v, v), *cells])
    return table(["model", *(c.replace("bbox/", "") for c in COLUMNS)], rows) + "\n"


def deltas(results: dict) -> dict:
    """ViLD against ViLD-text, in AP50 points (ViLD Table 3's comparison; None where a row is
    missing): novel and base differences, and ViLD's novel AP50 as a fraction of its base AP50."""
    def get(v, c):
        return results.get(v, {}).get(c)

    vn, tn = get("vild", "bbox/AP50_novel"), get("vild_text", "bbox/AP50_novel")
    vb, tb = get("vild", "bbox/AP50_base"), get("vild_text", "bbox/AP50_base")
    return {
        "vild_minus_text_AP50_novel": None if vn is None or tn is None else round(100 * (vn - tn), 2),
        "vild_minus_text_AP50_base": None if vb is None or tb is None else round(100 * (vb - tb), 2),
        "vild_novel_over_base_AP50": None if vn is None or not vb else round(vn / vb, 3),
    }


def _write_table(out: Path, cfg: Config, results: dict) -> None:
    seeds = results.get("_seeds")
    diffs = deltas(results)
    if seeds:
        head = f"# ViLD ablation ({cfg.work_dir}, {cfg.det.train.max_steps} steps, mean over seeds {', '.join(map(str, seeds))})\n\n"
        md = table_markdown(results)
        for s, rows in seeds.items():
            md += f"\nSeed {s} (" + ", ".join(f"{k}: {v}" for k, v in deltas(rows).items()) + ")\n\n" + table_markdown(rows)
    else:
        head = f"# ViLD ablation ({cfg.work_dir}, {cfg.det.train.max_steps} steps, seed {cfg.det.train.seed})\n\n"
        md = table_markdown(results)
    text = (
        head
        + md
        + "\nAP in %, COCO-style, generalized (every detection competes over base + novel). region/top1: the "
        + "student's zero-shot top-1 over the whole vocabulary on val ground-truth boxes (the teacher's own "
        + "GT-crop top-1 is zeroshot/top1_ens in teacher/metrics.json).\n\n"
        + ("ViLD vs ViLD-text (on the mean over seeds): " if seeds else "ViLD vs ViLD-text: ")
        + ", ".join(f"{k}: {v}" for k, v in diffs.items())
        + "\n"
    )
    write_text(out / "ablation.md", text)

    def flat(rows: dict) -> dict:
        return {v: {c: m.get(c) for c in COLUMNS} | {"seconds": m.get("variant_seconds")} for v, m in rows.items() if not v.startswith("_")}

    extra = {"seeds": {str(s): {"rows": flat(rows), "deltas": deltas(rows)} for s, rows in seeds.items()}} if seeds else {}
    write_json(out / "metrics.json", {"rows": flat(results), "deltas": diffs, **extra, **({"meta": results["_meta"]} if "_meta" in results else {})})
