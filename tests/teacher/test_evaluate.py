"""Teacher evaluation on a tiny world with a random teacher: the reported numbers equal
brute-force recomputations (top-1 per object; per-class IoU with numpy), and the streaming
evaluation equals, key for key, the whole-split implementation it replaced (kept here as the
reference)."""

from pathlib import Path

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.config import load_config
from distill.data.images import load_image
from distill.errors import DistillError
from distill.eval.segmentation import read_label_png
from distill.teacher import build_random_teacher
from distill.teacher.dense import maskclip_scores
from distill.teacher.evaluate import BATCH_IMAGES, _load_split, _split_index, evaluate_teacher, load_templates_words
from distill.teacher.regions import region_embeddings
from distill.teacher.text import text_embeddings
from distill.vocab import Vocabulary


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from distill.data.world import make_world

    root = tmp_path_factory.mktemp("w")
    cfg = load_config(None, [f"work_dir={root}", "world.num_train=2", "world.num_val=20", "world.num_unlabeled=1", "world.image_size=64", "world.max_size=30", "teacher.eval_dense_sizes=[32]"])
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


# ------------------------------------------------------------- the whole-split reference (before streaming)
def _reference_metrics(cfg, t) -> dict:
    """The implementation before streaming: every image of the split decoded to float32 first,
    crops embedded 16 images per call, top-1 over the concatenated embeddings, then MaskCLIP image
    by image, size by size."""
    from distill.eval.segmentation import SemSegEvaluator, semseg_classes

    vocab, index = _split_index(cfg, cfg.data.val_json, None)
    samples = []
    for im, boxes, labels in index:
        arr = load_image(Path(cfg.data.image_root) / im["file_name"])
        samples.append((im, torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0, boxes, labels))
    text = text_embeddings(t, vocab, cfg.teacher.templates)
    imgs, boxes = [s[1] for s in samples], [s[2] for s in samples]
    labels = torch.cat([s[3] for s in samples])
    novel = torch.tensor([vocab.split[int(c)] == "novel" for c in labels], dtype=torch.bool)
    res = {"zeroshot/num_objects": int(len(labels))}

    def top1(emb, prefix):
        ok = ((emb @ text.t()).argmax(1).cpu() == labels).float()
        res[prefix] = float(ok.mean()) if len(ok) else -1.0
        for name, sel in (("base", ~novel), ("novel", novel)):
            res[f"{prefix}_{name}"] = float(ok[sel].mean()) if sel.any() else -1.0

    bs = 16
    chunks = lambda **kw: torch.cat([torch.cat(region_embeddings(t, imgs[i : i + bs], boxes[i : i + bs], **kw)) for i in range(0, len(imgs), bs)])  # noqa: E731
    e1, e15 = chunks(scales=(1.0,)), chunks(scales=(1.5,))
    top1(e1, "zeroshot/top1_1x")
    top1(e15, "zeroshot/top1_1.5x")
    top1(F.normalize(e1 + e15, dim=-1), "zeroshot/top1_ens")
    top1(chunks(mode="dense"), "zeroshot/top1_dense")
    bg = text_embeddings(t, Vocabulary(tuple(load_templates_words(cfg.teacher.background))), cfg.teacher.templates)
    allt = torch.cat([text, bg])
    C, base, names = semseg_classes(vocab)
    ids = torch.tensor(vocab.ids)
    for size in sorted(set(cfg.teacher.eval_dense_sizes) | {t.dense_image_size}):
        ev = SemSegEvaluator(C, base, names=names)
        for im, x, _, _ in samples:
            gt = read_label_png(Path(cfg.data.semantic_root) / "val" / Path(im["file_name"]).with_suffix(".png").name)
            idx = maskclip_scores(t, x[None], allt, size=size, out_size=gt.shape)[0].argmax(0).cpu()
            ev.process(torch.where(idx < len(ids), ids[idx.clamp(max=len(ids) - 1)], torch.zeros_like(idx)), torch.from_numpy(gt))
        m = ev.evaluate()
        for k in ("miou/all", "miou/base", "miou/novel", "miou/hiou", "pixel_acc"):
            res[f"maskclip/{k.replace('/', '_')}@{size}"] = m[k]
            if size == t.dense_image_size:
                res[f"maskclip/{k.replace('/', '_')}"] = m[k]
    return res


def test_streaming_equals_whole_split_reference(world, tmp_path):
    """Same images, same crops, same order: every metric identical (==, not approx) to the
    whole-split reference, with the split in 2 batches (16 + 4 images), decoded in the main
    process and by a worker; metrics.json holds the same numbers."""
    t = build_random_teacher(seed=0, dense_image_size=32)
    over = [f"work_dir={world.work_dir}", "world.image_size=64", "teacher.eval_dense_sizes=[32, 48]"]
    cfg = load_config(None, over)
    assert len(_split_index(cfg, cfg.data.val_json, None)[1]) == 20 > BATCH_IMAGES
    ref = _reference_metrics(cfg, t)
    assert ref["zeroshot/num_objects"] > BATCH_IMAGES and 0 < ref["maskclip/miou_all"] < 1
    assert set(ref) >= {"zeroshot/top1_dense_novel", "maskclip/miou_all@32", "maskclip/miou_all@48", "maskclip/pixel_acc@48"}
    for workers in (0, 1):
        res = evaluate_teacher(load_config(None, [*over, f"data.num_workers={workers}"]), teacher=t, out_dir=tmp_path / str(workers))
        assert {k: v for k, v in res.items() if k.startswith(("zeroshot/", "maskclip/"))} == ref
        saved = json.loads((tmp_path / str(workers) / "metrics.json").read_text())
        assert {k: saved[k] for k in ref} == ref


def test_max_images_and_bad_inputs(world, tmp_path):
    """max_images evaluates the first images by id; a missing semantic mask is refused before any
    image is embedded, an undecodable image with its path, both in one line."""
    cfg = world
    t = build_random_teacher(seed=0, dense_image_size=32)
    res = evaluate_teacher(cfg, teacher=t, out_dir=tmp_path / "few", max_images=3)
    n = sum(len(lab) for _, _, lab in _split_index(cfg, cfg.data.val_json, 3)[1])
    assert res["zeroshot/num_objects"] == n
    vocab, samples = _load_split(cfg, cfg.data.val_json, 3)
    assert [s[0]["id"] for s in samples] == sorted(im["id"] for im, _, _ in _split_index(cfg, cfg.data.val_json, None)[1])[:3]
    # an empty image file and a missing semantic PNG (on a copy of the data)
    import shutil

    data = tmp_path / "data"
    shutil.copytree(Path(cfg.data.image_root).parent, data)
    first = samples[0][0]["file_name"]
    over = [f"work_dir={cfg.work_dir}", "world.image_size=64", "teacher.eval_dense_sizes=[32]", f"data.image_root={data / 'images'}",
            f"data.semantic_root={data / 'semantic'}"]
    (data / "images" / first).write_bytes(b"")
    with pytest.raises(DistillError, match="empty file") as e:
        evaluate_teacher(load_config(None, over), teacher=t, out_dir=tmp_path / "bad")
    assert "\n" not in str(e.value)
    (data / "semantic" / "val" / Path(first).with_suffix(".png").name).unlink()
    with pytest.raises(DistillError, match="semantic mask not found") as e:
        evaluate_teacher(load_config(None, over), teacher=t, out_dir=tmp_path / "bad")
    assert "\n" not in str(e.value)
