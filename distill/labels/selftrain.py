"""Self-training: one round of training the detector on base ground truth plus NOVEL pseudo-labels
of the unlabeled split.

1. :func:`pseudo_to_extra` turns ``labels.json`` (made by ``distill label`` on any folder under
   ``data.image_root``) into a training json: ``file_name`` rebased onto ``data.image_root``,
   image ids taken from ``data.unlabeled_json`` by file name when the image is there (ids are
   unique across the world's splits) else offset past every id in use, only the kept classes'
   annotations (default: the novel classes; base classes have real ground truth) above a score;
2. :func:`self_train` trains ``det.name + "_selftrain"`` with ``data.extra=[that json] * repeat``
   through :func:`distill.detection.train.train_detector` and writes
   ``{work_dir}/selftrain/metrics.json`` with novel AP50 before (the detector ``det.name``'s
   metrics.json) and after.

Two options address what a base-only training set does to novel classes:

- ``repeat``: the pseudo-labeled images are drawn ``repeat`` times per epoch. 300 unlabeled images
  beside 1,500 base-labeled ones would otherwise be 1 image in 6; semi-supervised detectors batch
  labeled and pseudo-labeled images 1:1 (Unbiased Teacher, Liu et al. ICLR 2021, section 4.1).
- ``train_pseudo_json``: novel pseudo-labels of the TRAINING images themselves, merged into their
  base ground truth (:func:`merge_pseudo`), as VL-PLM does on COCO's base split (Zhao et al.,
  "Exploiting Unlabeled Data with Vision and Language Models for Object Detection", ECCV 2022,
  section 3.3). Without them every novel object in the base split is a background example, which
  cancels much of what the unlabeled split teaches.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from distill.errors import DistillError
from distill.files import read_json, write_json
from distill.vocab import Vocabulary

ID_OFFSET = 10_000_000


def pseudo_to_extra(
    pseudo_json: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    image_root: str | os.PathLike,
    vocab: Vocabulary,
    keep: str = "novel",
    score_thresh: float = 0.0,
    id_json: str | os.PathLike | None = None,
) -> dict:
    """Write a COCO training json of ``pseudo_json``'s labels; returns counts.

    ``keep``: ``novel`` | ``base`` | ``all`` (by ``vocab``'s split, classes matched by name)."""
    if keep not in ("novel", "base", "all"):
        raise DistillError(f"selftrain keep: {keep!r} is not one of novel, base, all")
    pred = read_json(pseudo_json, "pseudo-label COCO")
    for k in ("images", "annotations", "categories", "info"):
        if k not in pred:
            raise DistillError(f"{pseudo_json}: missing {k!r} (expected labels.json written by distill label)")
    src_root = Path(pred["info"].get("images_root", ""))
    root = Path(image_root).resolve()
    ids: dict[str, int] = {}
    if id_json and Path(id_json).is_file():
        ids = {im["file_name"]: int(im["id"]) for im in read_json(id_json, "COCO")["images"]}
    used = max(ids.values(), default=0)
    name_to_index = {}
    for c in pred["categories"]:
        try:
            name_to_index[c["id"]] = vocab.index(c["name"])
        except DistillError:
            continue  # a class outside the training vocabulary: dropped
    wanted = {i for i in range(len(vocab)) if keep == "all" or vocab.split[i] == keep}
    images, id_map = [], {}
    for im in pred["images"]:
        p = (src_root / im["file_name"]).resolve()
        if root not in p.parents:
            raise DistillError(f"{pseudo_json}: image {p} is not under data.image_root {root} (label a folder inside it)")
        rel = p.relative_to(root).as_posix()
        new_id = ids.get(rel, ID_OFFSET + used + int(im["id"]))
        id_map[im["id"]] = new_id
        images.append({**im, "id": new_id, "file_name": rel})
    anns = []
    for a in pred["annotations"]:
        idx = name_to_index.get(a["category_id"])
        if idx is None or idx not in wanted or float(a.get("score", 1.0)) < score_thresh or a["image_id"] not in id_map:
            continue
        anns.append({**a, "id": len(anns) + 1, "image_id": id_map[a["image_id"]], "category_id": int(vocab.ids[idx])})
    info = {**pred["info"], "selftrain_keep": keep, "selftrain_score_thresh": score_thresh}
    write_json(out_json, {"info": info, "images": images, "annotations": anns, "categories": vocab.categories()}, indent=None)
    return {"images": len(images), "annotations": len(anns)}


def merge_pseudo(gt_json: str | os.PathLike, pseudo_extra_json: str | os.PathLike, out_json: str | os.PathLike) -> dict:
    """``gt_json``'s images and annotations plus the annotations of ``pseudo_extra_json`` (written by
    :func:`pseudo_to_extra` with ``id_json=gt_json``) on the same images; returns counts.

    Pseudo-labels on images that ``gt_json`` does not hold are an error (they would be dropped)."""
    gt = read_json(gt_json, "COCO")
    extra = read_json(pseudo_extra_json, "pseudo-label COCO")
    ids = {int(im["id"]) for im in gt["images"]}
    stray = [a["image_id"] for a in extra["annotations"] if int(a["image_id"]) not in ids]
    if stray:
        raise DistillError(f"{pseudo_extra_json}: {len(stray)} pseudo-label(s) on images not in {gt_json} (first image id {stray[0]})")
    next_id = max((int(a["id"]) for a in gt["annotations"]), default=0) + 1
    added = [{**a, "id": next_id + k} for k, a in enumerate(extra["annotations"])]
    info = {**gt.get("info", {}), "merged_pseudo": str(pseudo_extra_json), "merged_pseudo_annotations": len(added)}
    write_json(out_json, {**gt, "info": info, "annotations": list(gt["annotations"]) + added}, indent=None)
    return {"images": len(gt["images"]), "annotations": len(gt["annotations"]), "pseudo_annotations": len(added)}


def self_train(
    cfg,
    pseudo_json: str | os.PathLike,
    *,
    keep: str = "novel",
    score_thresh: float = 0.0,
    repeat: int = 1,
    train_pseudo_json: str | os.PathLike | None = None,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
) -> dict:
    """One self-training round (see the module docstring); returns the metrics and writes them to
    ``out_dir`` (default ``{work_dir}/selftrain``) with the training jsons it made."""
    from distill.detection.train import det_dir, train_detector
    from distill.vocab import resolve_vocab

    if int(repeat) < 1:
        raise DistillError(f"selftrain repeat: expected an integer >= 1, got {repeat!r}")
    work = Path(cfg.work_dir)
    before_path = det_dir(cfg) / "metrics.json"
    before = read_json(before_path, "detector metrics") if before_path.is_file() else {}
    out = Path(out_dir) if out_dir else work / "selftrain"
    vocab = resolve_vocab(cfg.data, need_base=True)
    extra = out / "extra_pseudo_novel.json"
    counts = pseudo_to_extra(pseudo_json, extra, image_root=cfg.data.image_root, vocab=vocab, keep=keep,
                             score_thresh=score_thresh, id_json=cfg.data.unlabeled_json)
    counts["repeat"] = int(repeat)
    data = dataclasses.replace(cfg.data, extra=tuple(cfg.data.extra) + (str(extra),) * int(repeat))
    if train_pseudo_json:
        train_extra = out / "train_pseudo_novel.json"
        # the training images have base ground truth: only their novel objects take pseudo-labels
        c = pseudo_to_extra(train_pseudo_json, train_extra, image_root=cfg.data.image_root, vocab=vocab, keep="novel",
                            score_thresh=score_thresh, id_json=cfg.data.train_json)
        merged = out / "train_plus_pseudo.json"
        counts["train_split"] = {**c, **merge_pseudo(cfg.data.train_json, train_extra, merged)}
        data = dataclasses.replace(data, train_json=str(merged))
    cfg2 = dataclasses.replace(cfg, det=dataclasses.replace(cfg.det, name=f"{cfg.det.name}_selftrain"), data=data)
    after = train_detector(cfg2, progress=progress)
    m = {}
    for k in ("bbox/AP50_novel", "bbox/AP50_base", "bbox/AP50"):
        if k in after:
            m[f"selftrain/{k.split('/')[1]}_after"] = after[k]
        if k in before:
            m[f"selftrain/{k.split('/')[1]}_before"] = before[k]
        if k in after and k in before:
            m[f"selftrain/{k.split('/')[1]}_delta"] = after[k] - before[k]
    write_json(out / "metrics.json", m)
    write_json(out / "counts.json", counts)
    return m
