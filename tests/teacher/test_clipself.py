"""CLIPSelf (teacher/clipself.py): grid cells, the loss against a brute-force reference, gradients
only in the student, an end-to-end run whose output changes the dense path and nothing else."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.config import load_config
from distill.errors import DistillError
from distill.teacher import build_random_teacher
from distill.teacher.clip import attach_dense_tower
from distill.teacher.clipself import (
    GridSampler,
    clipself,
    clipself_loss,
    expand_boxes,
    grid_boxes,
    grid_choices,
    manifest_path,
    student_roi_embeddings,
    teacher_targets,
    trainable_parameters,
)
from distill.teacher.dense import dense_feature_map, patch_embeddings, pixel_embeddings


def test_grid_choices_follow_the_released_rule():
    assert grid_choices(1) == [(1, 1)]
    assert grid_choices(2) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    ch = grid_choices(4)
    assert len(ch) == 12 and (1, 3) not in ch and (4, 1) not in ch and (4, 4) in ch
    for m, n in grid_choices(6):
        assert 1 <= m <= 6 and (m + 1) // 2 <= n <= min(2 * m, 6)


@pytest.mark.parametrize("m,n,H,W", [(1, 1, 64, 64), (3, 2, 128, 128), (4, 3, 50, 70)])
def test_grid_boxes_tile_the_image_exactly(m, n, H, W):
    b = grid_boxes(m, n, H, W)
    assert b.shape == (m * n, 4)
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum()
    assert float(area) == pytest.approx(H * W, rel=1e-6)
    # every pixel centre in exactly one cell
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    inside = (xs[None] >= b[:, 0, None, None]) & (xs[None] < b[:, 2, None, None]) & (ys[None] >= b[:, 1, None, None]) & (ys[None] < b[:, 3, None, None])
    assert torch.equal(inside.sum(0), torch.ones(H, W, dtype=torch.long))
    assert float(b.min()) == 0.0 and float(b[:, 2].max()) == W and float(b[:, 3].max()) == H


def test_expand_boxes_clips():
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 40.0]])
    e = expand_boxes(b, 1.5, 64, 64)
    assert torch.allclose(e, torch.tensor([[0.0, 0.0, 12.5, 12.5], [17.5, 15.0, 32.5, 45.0]]))
    assert expand_boxes(b, 1.0, 64, 64) is b


def test_sampler_is_deterministic_and_bounded():
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    x, boxes = GridSampler(imgs, 4, 3, seed=1)(6)
    x2, boxes2 = GridSampler(imgs, 4, 3, seed=1)(6)
    assert x.shape == (6, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert len(boxes) == 6 and all(1 <= len(b) <= 3 for b in boxes)
    assert torch.equal(x, x2) and all(torch.equal(a, b) for a, b in zip(boxes, boxes2))


def test_loss_matches_bruteforce_patch_mean_and_crop_cls():
    """For cells on patch boundaries, RoIAlign (1 x 1, aligned, adaptive sampling) of the map is the
    mean of the cell's patch embeddings; the target is encode_image of the cropped pixels."""
    t = build_random_teacher(seed=3)  # image 32, patch 8, dense 64 -> 8 x 8 patches
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g)
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [16.0, 32.0, 48.0, 64.0]]), torch.tensor([[0.0, 0.0, 32.0, 32.0]])]
    got = clipself_loss(t.model.visual, t, x, boxes)["loss_cosine"]
    p = patch_embeddings(t, x)  # (2, D, 8, 8)
    cos = []
    for i, bs in enumerate(boxes):
        for x0, y0, x1, y1 in bs.long().tolist():
            s = F.normalize(p[i, :, y0 // 8 : y1 // 8, x0 // 8 : x1 // 8].mean((1, 2)), dim=0)
            crop = F.interpolate(x[i : i + 1, :, y0:y1, x0:x1], size=(32, 32), mode="bilinear", align_corners=False)
            c = t.encode_images(crop)[0]
            cos.append(float(s @ c))
    assert float(got) == pytest.approx(1 - sum(cos) / len(cos), abs=2e-3)
    # the dense and pooled paths differ: the loss on the untouched tower is not ~0
    assert float(got) > 0.05


def test_gradients_reach_only_the_student():
    import copy

    t = build_random_teacher(seed=0)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    student = copy.deepcopy(t.model.visual)
    trainable = dict(trainable_parameters(student))
    assert "proj" not in trainable and not any(n.startswith("ln_post") for n in trainable)
    x = torch.rand(2, 3, 64, 64)
    boxes = [grid_boxes(2, 2, 64, 64), grid_boxes(1, 2, 64, 64)]
    loss = clipself_loss(student, t, x, boxes)["loss_cosine"]
    loss.backward()
    assert all(p.grad is None for p in t.model.parameters())
    assert student.conv1.weight.grad is not None and float(student.conv1.weight.grad.abs().sum()) > 0
    assert student.proj.grad is None
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # empty batch: finite zero loss
    z = student_roi_embeddings(student, t, x[:1], [torch.zeros(0, 4)])
    assert z.shape == (0, t.embed_dim)


def test_teacher_targets_equal_crop_region_embeddings():
    from distill.teacher.regions import region_embeddings

    t = build_random_teacher(seed=5)
    x = torch.rand(2, 3, 48, 48)
    boxes = [grid_boxes(3, 2, 48, 48), grid_boxes(1, 1, 48, 48)]
    got = teacher_targets(t, x, boxes)
    ref = torch.cat(region_embeddings(t, list(x), boxes, scales=(1.0,)))
    assert torch.allclose(got, ref, atol=1e-5)


def _folder(tmp_path, n=6, size=64):
    g = np.random.default_rng(0)
    for split in ("train", "unlabeled"):
        d = tmp_path / "images" / split
        d.mkdir(parents=True)
        for i in range(n // 2):
            a = np.zeros((size, size, 3), np.uint8)
            a[:] = g.integers(0, 256, 3)
            y, x = g.integers(0, size // 2, 2)
            a[y : y + size // 3, x : x + size // 3] = g.integers(0, 256, 3)
            Image.fromarray(a).save(d / f"{i:03d}.png")
    return tmp_path


def test_end_to_end_output_changes_only_the_dense_path(tmp_path):
    _folder(tmp_path)
    cfg = load_config(None, [f"work_dir={tmp_path}", f"data.image_root={tmp_path}/images", "clipself.steps=3", "clipself.batch_size=2",
                             "clipself.warmup=1", "clipself.lr=0.01", "clipself.log_period=1", "clipself.precision=fp32"])
    t = build_random_teacher(seed=0)
    out = clipself(cfg, teacher=t)
    assert out == tmp_path / "teacher" / "dense_tower.safetensors" and out.is_file()
    man = json.loads(manifest_path(out).read_text())
    assert man["inputs"]["num_images"] == 6 and man["steps"] == 3
    mtime = out.stat().st_mtime_ns
    assert clipself(cfg, teacher=t) == out and out.stat().st_mtime_ns == mtime  # unchanged inputs: reused

    t2 = attach_dense_tower(build_random_teacher(seed=0), str(out))
    # crops / text caches stay valid, dense ones do not
    assert t2.fingerprint == t.fingerprint and t2.dense_key != t.dense_key == t.fingerprint
    from distill.detection.proposals import region_cache_key

    assert region_cache_key(t2, "p", 5, "crop", (1.0,)) == region_cache_key(t, "p", 5, "crop", (1.0,))
    assert region_cache_key(t2, "p", 5, "dense", (1.0,)) != region_cache_key(t, "p", 5, "dense", (1.0,))
    x = torch.rand(2, 3, 40, 40)
    assert not torch.allclose(pixel_embeddings(t2, x), pixel_embeddings(t, x), atol=1e-4)
    assert torch.equal(t2.encode_images(x), t.encode_images(x))  # crops / CLS: the original tower
    assert t2.dense_tower is not t2.model.visual and all(not p.requires_grad for p in t2.dense_tower.parameters())
    # the saved tower is exactly what the dense path runs
    with torch.no_grad():
        ref = dense_feature_map(t2.dense_tower, t2.normalize(t2.resize(x, t2.dense_image_size)))
    assert torch.allclose(patch_embeddings(t2, x), ref, atol=1e-6)
    # a dense file of another teacher is refused
    with pytest.raises(DistillError, match="distilled from teacher"):
        attach_dense_tower(build_random_teacher(seed=1), str(out))


@pytest.mark.parametrize(
    "override,match",
    [
        ("clipself.steps=0", "clipself.steps"),
        ("clipself.max_split=0", "clipself.max_split"),
        ("clipself.max_boxes=0", "clipself.max_boxes"),
        ("clipself.lr=-1", "clipself.lr"),
        ("clipself.crop_scale=0.5", "clipself.crop_scale"),
        ("clipself.precision=fp8", "precision"),
        ("clipself.bogus=1", "valid keys"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, override, match):
    with pytest.raises(DistillError, match=match) as e:
        cfg = load_config(None, [f"work_dir={tmp_path}", override])
        clipself(cfg, teacher=build_random_teacher(seed=0))
    assert "\n" not in str(e.value)


def test_missing_dense_file_and_image_folder_are_clear(tmp_path):
    with pytest.raises(DistillError, match="teacher.dense_tower: .* not found"):
        attach_dense_tower(build_random_teacher(seed=0), str(tmp_path / "nope.safetensors"))
    cfg = load_config(None, [f"work_dir={tmp_path}", f"data.image_root={tmp_path}/none"])
    with pytest.raises(DistillError, match="not found"):
        clipself(cfg, teacher=build_random_teacher(seed=0))


def test_cli_clipself_and_evaluate_with_dense_tower(tmp_path):
    """`distill teacher clipself` on a tiny world, then `teacher evaluate` with
    teacher.dense_tower: the crop rows are unchanged, the dense rows come from the new tower."""
    import yaml

    from distill.cli import main
    from distill.data.world import make_world

    cfg_path = tmp_path / "t.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "work_dir": str(tmp_path),
        "world": {"num_train": 4, "num_val": 3, "num_unlabeled": 2, "image_size": 64, "max_size": 30, "seed": 1},
        "teacher": {"dense_image_size": 64, "eval_dense_sizes": [64]},
        "pretrain": {"steps": 2, "batch_size": 16, "warmup": 1, "log_period": 1},
        "clipself": {"steps": 2, "batch_size": 2, "warmup": 1, "log_period": 1, "precision": "fp32"},
    }))
    make_world(load_config(cfg_path))
    assert main(["teacher", "pretrain", str(cfg_path)]) == 0
    assert main(["teacher", "clipself", str(cfg_path)]) == 0
    dense = tmp_path / "teacher" / "dense_tower.safetensors"
    assert dense.is_file()
    assert main(["teacher", "evaluate", str(cfg_path), "--max-images", "3", "--out", str(tmp_path / "before")]) == 0
    assert main(["teacher", "evaluate", str(cfg_path), f"teacher.dense_tower={dense}", "--max-images", "3", "--out", str(tmp_path / "after")]) == 0
    a = json.loads((tmp_path / "before" / "metrics.json").read_text())
    b = json.loads((tmp_path / "after" / "metrics.json").read_text())
    assert a["zeroshot/top1_1x"] == b["zeroshot/top1_1x"] and a["teacher/dense_tower"] == ""
    assert b["teacher/dense_tower"] == str(dense) and a["teacher/dense_fingerprint"] != b["teacher/dense_fingerprint"]
    assert a["teacher/fingerprint"] == b["teacher/fingerprint"]
    assert 0.0 <= b["maskclip/miou_all"] <= 1.0
