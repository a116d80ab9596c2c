"""Self-training: one round of training the detector on base ground truth plus NOVEL pseudo-labels
of the unlabeled split (issue 7, item 6).

1. :func:`pseudo_to_extra` turns ``labels.json`` (made by ``distill label`` on any folder under
   ``data.image_root``) into a training json: ``file_name`` rebased onto ``data.image_root``,
   image ids taken from ``data.unlabeled_json`` by file name when the image is there (ids are
   unique across the world's splits) else offset past every id in use, only the kept classes'
   annotations (default: the novel classes; base classes have real ground truth) above a score;
2. :func:`self_train` trains ``det.name + "_selftrain"`` with ``data.extra=[that json]`` through
   :func:`distill.detection.train.train_detector` and writes ``{work_dir}/selftrain/metrics.json``
   with novel AP50 before (the detector ``det.name``'s metrics.json) and after.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from distill.errors import DistillError
from distill.io import read_json, write_json
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


def self_train(cfg, pseudo_json: str | os.PathLike, *, keep: str = "novel", score_thresh: float = 0.0, progress: bool = True) -> dict:
    """One self-training round (see the module docstring); returns and writes the metrics."""
    from distill.detection.train import det_dir, det_vocab, train_detector

    work = Path(cfg.work_dir)
    before_path = det_dir(cfg) / "metrics.json"
    before = read_json(before_path, "detector metrics") if before_path.is_file() else {}
    out = work / "selftrain"
    extra = out / "extra_pseudo_novel.json"
    counts = pseudo_to_extra(pseudo_json, extra, image_root=cfg.data.image_root, vocab=det_vocab(cfg), keep=keep,
                             score_thresh=score_thresh, id_json=cfg.data.unlabeled_json)
    cfg2 = dataclasses.replace(
        cfg,
        det=dataclasses.replace(cfg.det, name=f"{cfg.det.name}_selftrain"),
        data=dataclasses.replace(cfg.data, extra=tuple(cfg.data.extra) + (str(extra),)),
    )
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
