"""`distill train seg` wiring on a tiny world with a random tiny teacher: LSeg, LSeg + pixel
distillation, CLIPSeg, resume, data.masks, the COCO-Stuff / VOC configs, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.config import load_config
from distill.errors import DistillError
from distill.segmentation.build import build_segmenter, load_segmenter
from distill.segmentation.train import SemSegFolder, train_seg

KEYS = ("miou/base", "miou/novel", "miou/all", "miou/hiou", "pixel_acc")


@pytest.mark.parametrize(
    "config,extra",
    [
        ("configs/shapes/lseg.yaml", {}),
        ("configs/shapes/lseg_distill.yaml", {}),
        ("configs/shapes/clipseg.yaml", {}),
    ],
)
def test_train_eval_reload(config, extra, tiny_world, tiny_teacher, overrides):
    root, data = tiny_world
    cfg = load_config(config, overrides(root, data, **extra))
    m = train_seg(cfg, teacher=tiny_teacher, progress=False)
    out = root / "seg" / cfg.seg.name
    assert (out / "model_final.pt").is_file() and (out / "config.yaml").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    for k in KEYS:
        assert 0.0 <= saved[k] <= 1.0 and saved[k] == m[k]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in lines if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(r["loss"]) for r in losses)
    if cfg.seg.distill_weight > 0:
        assert "loss_distill" in losses[0] and losses[0]["loss_distill"] > 0
    # the checkpoint names the classes it was trained on: the base classes, in vocabulary order
    from distill.engine.checkpoint import read
    from distill.vocab import resolve_vocab

    vocab = resolve_vocab(cfg.data)
    assert read(out / "model_final.pt")["meta"]["trained_classes"] == [vocab.names[i] for i in vocab.base_indices]
    # reload and predict with another vocabulary than the training one
    model = load_segmenter(cfg.seg, tiny_teacher, out / "model_final.pt")
    from distill.segmentation.infer import predict_logits

    text = torch.nn.functional.normalize(torch.randn(6, tiny_teacher.embed_dim), dim=1)
    assert predict_logits(model, torch.rand(1, 3, 48, 48), text).shape == (1, 7, 48, 48)


def test_resume_continues(tiny_world, tiny_teacher, overrides, capsys):
    """A resumed run restarts from the 2-step checkpoint and executes step 3 only (training is
    deterministic, so a silent rerun from scratch would give the same losses: the engine's
    resume line and the step-1/2 log rows kept from the first run tell the two apart)."""
    root, data = tiny_world
    cfg = load_config("configs/shapes/clipseg.yaml", overrides(root, data, **{"seg.max_eval_images": 1}))
    train_seg(cfg, teacher=tiny_teacher, progress=False)
    log = root / "seg" / "clipseg" / "metrics.jsonl"
    first = [x for x in log.read_text().splitlines() if '"loss"' in x]
    assert [json.loads(x)["step"] for x in first] == [1, 2]
    tagged = [json.dumps(dict(json.loads(x), run="first")) for x in first]  # a scratch run would rewrite these rows
    log.write_text("".join(t + "\n" for t in tagged))
    capsys.readouterr()
    cfg3 = load_config("configs/shapes/clipseg.yaml", overrides(root, data, **{"seg.max_eval_images": 1, "seg.train.max_steps": 3}))
    m = train_seg(cfg3, teacher=tiny_teacher, resume=True, progress=False)
    assert "at step 2" in capsys.readouterr().out
    rows = [json.loads(x) for x in log.read_text().splitlines() if '"loss"' in x]
    assert m["step"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
    assert [r.get("run") for r in rows] == ["first", "first", None]  # steps 1-2 not executed again


def test_data_masks_override_and_bad_masks(tiny_world, tiny_teacher, overrides):
    root, data = tiny_world
    cam = root / "cam_masks"
    cam.mkdir()
    for p in sorted((data / "semantic" / "train_base").glob("*.png"))[:4]:  # CAM masks for 4 images only
        Image.fromarray(np.where(np.asarray(Image.open(p)) > 0, 2, 0).astype(np.uint8)).save(cam / p.name)
    cfg = load_config("configs/shapes/lseg.yaml", overrides(root, data, **{"data.masks": str(cam)}))
    from distill.segmentation.train import seg_paths

    assert seg_paths(cfg).train_masks == cam
    ds = SemSegFolder(seg_paths(cfg).train_images, cam, [1, 2, 3, 4])
    assert len(ds) == 4 and set(ds[0][1]["masks"].unique().tolist()) <= {0, 2}
    # a mask of the wrong size, then one with an id outside the vocabulary
    bad = root / "bad"
    bad.mkdir()
    name = sorted(cam.glob("*.png"))[0].name
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad / name)
    with pytest.raises(DistillError, match="mask is 12x10"):
        SemSegFolder(seg_paths(cfg).train_images, bad, [1, 2, 3, 4])[0]
    Image.fromarray(np.full((48, 48), 9, np.uint8)).save(bad / name)
    with pytest.raises(DistillError, match=r"class ids \[9\] are outside the vocabulary"):
        SemSegFolder(seg_paths(cfg).train_images, bad, [1, 2, 3, 4])[0]
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(bad / "999999.png")
    with pytest.raises(DistillError, match="no image for mask"):
        SemSegFolder(seg_paths(cfg).train_images, bad, [1, 2, 3, 4])


@pytest.mark.parametrize("config", ["configs/voc/lseg_voc.yaml", "configs/coco/lseg_cocostuff.yaml"])
def test_real_configs_wiring(config, tiny_world, tiny_teacher, overrides):
    """The COCO-Stuff / VOC configs with their paths pointed at the tiny fixture (same layout of
    options: list files, teacher backbone, sliding window, split file)."""
    root, data = tiny_world
    stems = sorted(p.stem for p in (data / "semantic" / "train").glob("*.png"))
    (root / "train.txt").write_text("\n".join(stems[:4]) + "\n")
    (root / "val.txt").write_text("\n".join(sorted(p.stem for p in (data / "semantic" / "val").glob("*.png"))) + "\n")
    over = overrides(root, data)
    over = [o for o in over if not o.startswith("data.vocab")]
    paths = {
        "seg.train_images": data / "images" / "train",
        "seg.train_masks": data / "semantic" / "train",
        "seg.val_images": data / "images" / "val",
        "seg.val_masks": data / "semantic" / "val",
        "seg.window": 32,
        "seg.window_stride": 16,
        "seg.eval_batch_size": 1,
        "seg.train.precision": "fp32",
        "seg.train.optimizer": "adamw",
        "seg.train.lr": 1e-3,
    }
    if "voc" in config:
        paths.update({"seg.train_list": root / "train.txt", "seg.val_list": root / "val.txt"})
    else:
        (root / "stuff_vocab.json").write_text(json.dumps([{"id": i, "name": f"stuff {i}", "split": "novel" if i == 4 else "base"} for i in range(1, 5)]))
        paths["data.vocab"] = root / "stuff_vocab.json"
    cfg = load_config(config, over + [f"{k}={v}" for k, v in paths.items()])
    assert cfg.seg.backbone == "teacher" and cfg.seg.distill_weight > 0
    m = train_seg(cfg, teacher=tiny_teacher, progress=False)
    for k in ("miou/base", "pixel_acc"):
        assert 0.0 <= m[k] <= 1.0
    if "voc" in config:
        assert m["miou/novel"] == -1.0  # VOC's novel classes (16..20) never occur in the fixture  # 20 VOC classes, the last five novel; the fixture only uses ids 1..4
        from distill.vocab import resolve_vocab

        assert resolve_vocab(cfg.data).novel_indices == [15, 16, 17, 18, 19]


def test_cli_train_seg_bad_input(tmp_path, capsys):
    from distill.cli import main

    assert main(["train", "seg", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "seg", "configs/shapes/lseg.yaml", "seg.arch=unet", f"work_dir={tmp_path}", "teacher.pretrained="]) == 2


# ---------------------------------------------------------------------------------------------
# seg.backbone=dense_tower: LSeg's encoder starts from the teacher's CLIPSelf dense tower
# ---------------------------------------------------------------------------------------------


def _with_dense_tower(scale=0.05):
    """The ``tiny_teacher`` architecture with ``dense_tower``: a perturbed, frozen copy of its own
    tower (as ``attach_dense_tower`` leaves it)."""
    import copy

    from distill.teacher.clip import build_random_teacher

    t = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=4, heads=2, dense_image_size=32, seed=0)
    dense = copy.deepcopy(t.model.visual)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    t.dense_tower = dense.eval().requires_grad_(False)
    return t


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dense_tower_backbone_without_dense_tower_is_one_line_error(tiny_world, overrides):
    from distill.teacher.clip import build_random_teacher

    root, data = tiny_world
    tiny_teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=4, heads=2, dense_image_size=32, seed=0)
    assert tiny_teacher.dense_tower is None
    cfg = load_config("configs/shapes/lseg.yaml", overrides(root, data, **{"seg.backbone": "dense_tower"}))
    for call in (lambda: build_segmenter(cfg.seg, tiny_teacher), lambda: train_seg(cfg, teacher=tiny_teacher, progress=False)):
        with pytest.raises(DistillError, match=r"seg\.backbone=dense_tower") as e:
            call()
        assert "teacher.dense_tower" in str(e.value) and "\n" not in str(e.value)
    assert not (root / "seg" / "lseg" / "model_final.pt").exists()


def test_dense_tower_backbone_starts_from_a_copy_of_the_dense_tower(tiny_world, overrides):

    root, data = tiny_world
    t = _with_dense_tower()
    dense0, own0 = _snapshot(t.dense_tower), _snapshot(t.model.visual)
    assert not _same(dense0, own0)
    cfg = load_config("configs/shapes/lseg.yaml", overrides(root, data, **{"seg.backbone": "dense_tower", "seg.finetune_backbone": "true"}))
    m = build_segmenter(cfg.seg, t)
    enc = m.encoder.visual
    assert enc is not t.dense_tower and enc is not t.model.visual
    assert _same({k: v.float() for k, v in enc.state_dict().items()}, dense0)
    assert all(p.requires_grad for p in enc.parameters())  # fine-tuned: the copy, never the teacher's tower
    assert all(not p.requires_grad for p in t.dense_tower.parameters())
    # seg.backbone=teacher on the same teacher: its own tower, not the dense one
    own = build_segmenter(load_config("configs/shapes/lseg.yaml", overrides(root, data, **{"seg.backbone": "teacher"})).seg, t)
    assert _same(own.encoder.visual.state_dict(), own0)
    # training the student leaves both teacher towers as they were, and moves the student's copy
    train_seg(cfg, teacher=t, progress=False)
    assert _same(_snapshot(t.dense_tower), dense0) and _same(_snapshot(t.model.visual), own0)
    assert all(not p.requires_grad for p in t.dense_tower.parameters())
    from distill.engine import checkpoint

    sd = checkpoint.read(root / "seg" / "lseg" / "model_final.pt")
    sd = sd.get("model", sd)
    trained = {k[len("encoder.visual."):]: v for k, v in sd.items() if k.startswith("encoder.visual.")}
    assert trained.keys() == dense0.keys()
    assert any(not torch.equal(trained[k].float(), dense0[k]) for k in dense0)


def test_clipseg_reads_the_dense_tower_frozen_when_asked(tiny_world, overrides):
    """CLIPSeg's frozen ViT is the CLIPSelf tower with seg.backbone=dense_tower (the shapes
    config; the same module, never trained), the teacher's own tower otherwise; without a dense
    tower, a one-line error."""
    from distill.teacher.clip import build_random_teacher

    root, data = tiny_world
    t = _with_dense_tower()
    dense0 = _snapshot(t.dense_tower)
    own = build_segmenter(load_config("configs/shapes/clipseg.yaml", overrides(root, data, **{"seg.backbone": "teacher"})).seg, t)
    assert own.backbone.visual is t.model.visual
    cfg = load_config("configs/shapes/clipseg.yaml", overrides(root, data, **{"seg.name": "clipseg_dense"}))
    assert cfg.seg.backbone == "dense_tower"
    m = build_segmenter(cfg.seg, t)
    assert m.backbone.visual is t.dense_tower
    train_seg(cfg, teacher=t, progress=False)
    assert _same(_snapshot(t.dense_tower), dense0)
    plain = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=4, heads=2, dense_image_size=32, seed=0)
    with pytest.raises(DistillError, match=r"seg\.backbone=dense_tower") as e:
        build_segmenter(cfg.seg, plain)
    assert "\n" not in str(e.value)


def test_refused_resume_leaves_config_yaml(tiny_world, tiny_teacher, overrides):
    """--resume with a config whose model does not fit the checkpoint exits with the mismatch and
    leaves config.yaml describing model_final.pt (it was rewritten before the checkpoint was read)."""
    root, data = tiny_world
    train_seg(load_config("configs/shapes/lseg.yaml", overrides(root, data)), teacher=tiny_teacher, progress=False)
    out = root / "seg" / "lseg"
    before = (out / "config.yaml").read_bytes()
    cfg = load_config("configs/shapes/lseg.yaml", overrides(root, data, **{"seg.features": 32}))
    with pytest.raises(DistillError, match="does not fit"):
        train_seg(cfg, teacher=tiny_teacher, resume=True, progress=False)
    assert (out / "config.yaml").read_bytes() == before
