"""Tiny-teacher pretraining: the loss against a brute-force reference, the sampler,
and an end-to-end run on a tiny world (checkpoint loadable by open_clip, reused when unchanged)."""

import json
import math
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml

from distill.cli import main
from distill.config import load_config
from distill.teacher.pretrain import BatchSampler, load_pairs, multi_positive_loss, pretrain
from distill.teacher.text import load_templates


def test_multi_positive_loss_bruteforce():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    keys = torch.tensor([3, 1, 3, 7, 1, 3])
    got = multi_positive_loss(img, txt, keys, 50.0)
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(6):
            pos = [j for j in range(6) if keys[j] == keys[i]]
            logz = math.log(sum(math.exp(50 * float(a[i] @ b[j])) for j in range(6)))
            total += -sum((50 * float(a[i] @ b[j]) - logz) / len(pos) for j in pos) / 6
    assert abs(float(got) - total / 2) < 1e-4
    # unique keys -> the usual CLIP loss
    keys = torch.arange(6)
    logits = 50 * img @ txt.t()
    clip = (F.cross_entropy(logits, keys) + F.cross_entropy(logits.t(), keys)) / 2
    assert torch.allclose(multi_positive_loss(img, txt, keys, 50.0), clip, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from distill.data.world import make_world

    root = tmp_path_factory.mktemp("world")
    cfg_path = root / "teacher.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "work_dir": str(root),
        "world": {"num_train": 8, "num_val": 4, "num_unlabeled": 2, "image_size": 64, "max_size": 30, "seed": 1},
        "teacher": {"dense_image_size": 64, "eval_dense_sizes": [64]},
        "pretrain": {"steps": 3, "batch_size": 16, "warmup": 1, "log_period": 1},
    }))
    cfg = load_config(cfg_path)
    make_world(cfg)
    return cfg_path, cfg


def test_sampler_batches(tiny_world):
    _, cfg = tiny_world
    data = load_pairs(cfg)
    assert len(data.boxes) == len(data.box_class) > 0 and data.images.dtype == torch.uint8
    tok = open_clip.get_tokenizer("distill-tiny-vit")
    s = BatchSampler(data, cfg.pretrain, load_templates(cfg.teacher.templates), tok, 64, seed=0)
    x, t, k = s(20)
    assert x.shape == (20, 3, 64, 64) and t.shape == (20, 32) and k.shape == (20,)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert int((k < len(data.names)).sum()) == 19  # 5% of 20 = 1 whole image, keyed past the classes
    x2, t2, k2 = BatchSampler(data, cfg.pretrain, load_templates(cfg.teacher.templates), tok, 64, seed=0)(20)
    assert torch.equal(x, x2) and torch.equal(k, k2)  # deterministic from the seed


def test_stuff_crops_name_background_and_clutter(tiny_world):
    """pretrain.stuff_fraction: that share of a batch are crops of bare background and clutter,
    keyed below every class / image key, with their texts; bare-background boxes overlap no object."""
    import dataclasses

    _, cfg = tiny_world
    cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, stuff_fraction=0.25))
    data = load_pairs(cfg)
    assert len(data.stuff_boxes) == len(data.stuff_class) == len(data.stuff_image) > 0
    assert {n.split()[-1] for n in data.stuff_names} <= {"background", "line", "blob", "ellipse"}
    assert any(n.endswith("background") for n in data.stuff_names)
    for b, r, c in zip(data.stuff_boxes, data.stuff_image, data.stuff_class):
        if data.stuff_names[c].endswith("background"):
            objs = data.boxes[data.box_image == r]
            iw = (torch.minimum(objs[:, 2], b[2]) - torch.maximum(objs[:, 0], b[0])).clamp(min=0)
            ih = (torch.minimum(objs[:, 3], b[3]) - torch.maximum(objs[:, 1], b[1])).clamp(min=0)
            assert float((iw * ih).max()) == 0.0
    tok = open_clip.get_tokenizer("distill-tiny-vit")
    templates = load_templates(cfg.teacher.templates)
    x, t, k = BatchSampler(data, cfg.pretrain, templates, tok, 64, seed=0)(20)
    assert x.shape == (20, 3, 64, 64) and int((k < 0).sum()) == 5  # 25% of 20
    names = [data.stuff_names[-1 - int(v)] for v in k[k < 0]]
    texts = {tuple(tok([tpl.format(n)])[0].tolist()): n for n in data.stuff_names for tpl in templates}
    assert [texts[tuple(row.tolist())] for row in t[k < 0]] == names
    # off (the default): no stuff crops
    _, _, k0 = BatchSampler(load_pairs(tiny_world[1]), tiny_world[1].pretrain, templates, tok, 64, seed=0)(20)
    assert int((k0 < 0).sum()) == 0


def test_stuff_crops_on_a_world_without_the_fields_is_a_clear_error(tiny_world, tmp_path):
    import dataclasses

    from distill.errors import DistillError

    _, cfg = tiny_world
    caps = json.loads(open(cfg.data.captions).read())
    for e in caps:
        e.pop("background"), e.pop("clutter")
    old = tmp_path / "captions.json"
    old.write_text(json.dumps(caps))
    cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, stuff_fraction=0.1), data=dataclasses.replace(cfg.data, captions=str(old)))
    with pytest.raises(DistillError, match="captions.json.*background.*distill world make"):
        load_pairs(cfg)


def test_pretrain_end_to_end_and_reuse(tiny_world):
    cfg_path, cfg = tiny_world
    assert main(["teacher", "pretrain", str(cfg_path)]) == 0
    ckpt = cfg.work_dir + "/teacher/teacher.safetensors"
    m = open_clip.create_model("distill-tiny-vit", pretrained=ckpt)  # open_clip loads it as is
    assert float(m.logit_scale.detach().exp()) == pytest.approx(50.0, rel=1e-5)
    man = json.loads(open(cfg.work_dir + "/teacher/manifest.json").read())
    assert man["steps"] == 3 and math.isfinite(man["final_loss"])
    mtime = os.stat(ckpt).st_mtime_ns
    assert str(pretrain(cfg)) == ckpt and os.stat(ckpt).st_mtime_ns == mtime  # inputs unchanged: reused
    pretrain(load_config(cfg_path, ["pretrain.steps=2"]))
    assert os.stat(ckpt).st_mtime_ns != mtime  # inputs changed: retrained
    # evaluate through the CLI: metrics.json with the named keys, values in [0, 1]
    assert main(["teacher", "evaluate", str(cfg_path), "--max-images", "3"]) == 0
    res = json.loads(open(cfg.work_dir + "/teacher/metrics.json").read())
    for k in ("zeroshot/top1_1x", "zeroshot/top1_1.5x", "zeroshot/top1_ens", "zeroshot/top1_ens_novel", "zeroshot/top1_dense", "maskclip/miou_all", "maskclip/miou_all@64"):
        assert k in res and (-1.0 == res[k] or 0.0 <= res[k] <= 1.0)


def test_dense_region_loss_matches_dense_region_embeddings():
    from distill.teacher import build_random_teacher
    from distill.teacher.pretrain import dense_region_loss
    from distill.teacher.regions import region_embeddings

    t = build_random_teacher(seed=0)  # dense_image_size 64
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g)
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [8.0, 4.0, 40.0, 30.0]]), torch.tensor([[10.0, 20.0, 50.0, 60.0]])]
    labels = torch.tensor([0, 2, 1])
    text = F.normalize(torch.randn(3, t.embed_dim, generator=g), dim=-1)
    mean = torch.tensor(t.mean).view(1, 3, 1, 1)
    std = torch.tensor(t.std).view(1, 3, 1, 1)
    got = dense_region_loss(t.model, x, boxes, labels, text, 50.0, mean, std)
    emb = torch.cat(region_embeddings(t, list(x), boxes, mode="dense"))
    assert torch.allclose(got, F.cross_entropy(50.0 * emb @ text.t(), labels), atol=1e-4)


def test_killed_pretraining_resumes_to_the_same_teacher(tiny_world, tmp_path, monkeypatch):
    """pretrain runs on the training loop: killed after its step-2 checkpoint and resumed, it writes
    the teacher of the uninterrupted run bit for bit (model, optimizer, schedule and the sampler's
    generators come back), with the loop's metrics.jsonl; the checkpoints go once it finished."""
    import functools

    from safetensors.torch import load_file

    import distill.teacher.pretrain as P
    from distill.config import TrainConfig

    _, cfg = tiny_world
    monkeypatch.setattr(P, "TrainConfig", functools.partial(TrainConfig, checkpoint_period=2))
    full = pretrain(cfg, out_dir=tmp_path / "a", progress=False)
    draw = P.BatchSampler.__call__
    calls = []

    def killed(self, B):
        calls.append(B)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return draw(self, B)

    monkeypatch.setattr(P.BatchSampler, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, out_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "teacher_train" / "checkpoints" / "ckpt_0000002.pt").is_file()
    monkeypatch.setattr(P.BatchSampler, "__call__", draw)
    resumed = pretrain(cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "b" / "teacher_train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss_contrastive"]) for r in rows)
    assert not (tmp_path / "b" / "teacher_train" / "checkpoints").exists()
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert man["final_loss"] == rows[-1]["loss"]
