"""Teacher evaluation on a tiny world with a random teacher: the reported numbers equal
brute-force recomputations (top-1 per object; per-class IoU with numpy)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from distill.config import load_config
from distill.eval.segmentation import read_label_png
from distill.teacher import build_random_teacher
from distill.teacher.dense import maskclip_scores
from distill.teacher.evaluate import _load_split, evaluate_teacher, load_templates_words
from distill.teacher.regions import region_embeddings
from distill.teacher.text import text_embeddings
from distill.vocab import Vocabulary


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from distill.data.world import make_world

    root = tmp_path_factory.mktemp("w")
    cfg = load_config(None, [f"work_dir={root}", "world.num_train=2", "world.num_val=4", "world.num_unlabeled=1", "world.image_size=64", "world.max_size=30", "teacher.eval_dense_sizes=[32]"])
    make_world(cfg)
    return cfg


def test_metrics_equal_bruteforce(world, tmp_path):
    cfg = world
    t = build_random_teacher(seed=0, dense_image_size=32)
    res = evaluate_teacher(cfg, teacher=t, out_dir=tmp_path)
    assert (tmp_path / "metrics.json").is_file()
    vocab, samples = _load_split(cfg, cfg.data.val_json, None)
    text = text_embeddings(t, vocab, cfg.teacher.templates)
    hits, novel_hits, n, n_novel = 0, 0, 0, 0
    for _, x, boxes, labels in samples:
        for b, y in zip(boxes, labels):
            e = region_embeddings(t, [x], [b[None]], scales=(1.0, 1.5))[0][0]
            ok = int((e @ text.t()).argmax()) == int(y)
            hits += ok
            n += 1
            if vocab.split[int(y)] == "novel":
                novel_hits += ok
                n_novel += 1
    assert res["zeroshot/num_objects"] == n > 0
    assert res["zeroshot/top1_ens"] == pytest.approx(hits / n, abs=1e-9)
    if n_novel:
        assert res["zeroshot/top1_ens_novel"] == pytest.approx(novel_hits / n_novel, abs=1e-9)
    # MaskCLIP mIoU (all classes present in gt or prediction) recomputed with numpy
    bg = text_embeddings(t, Vocabulary(tuple(load_templates_words(cfg.teacher.background))), cfg.teacher.templates)
    allt = torch.cat([text, bg])
    ids = np.array(vocab.ids)
    C = max(vocab.ids) + 1
    inter, union = np.zeros(C), np.zeros(C)
    for im, x, _, _ in samples:
        gt = read_label_png(Path(cfg.data.semantic_root) / "val" / Path(im["file_name"]).name)
        s = maskclip_scores(t, x[None], allt, size=32, out_size=gt.shape)[0].argmax(0).numpy()
        pred = np.where(s < len(ids), ids[np.minimum(s, len(ids) - 1)], 0)
        keep = gt != 255
        for c in range(C):
            p, g = (pred == c) & keep, (gt == c) & keep
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    present = union > 0
    assert res["maskclip/miou_all@32"] == pytest.approx(float((inter[present] / union[present]).mean()), abs=1e-9)
    assert res["maskclip/miou_all"] == res["maskclip/miou_all@32"]
