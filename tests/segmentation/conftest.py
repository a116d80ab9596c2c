"""Tiny fixtures for the segmentation tests: a random tiny teacher and a tiny semantic world."""

import json

import numpy as np
import pytest
from PIL import Image

COLORS = {1: (230, 30, 30), 2: (30, 200, 40), 3: (40, 60, 230), 4: (230, 220, 30)}
NAMES = ["red square", "green square", "blue square", "yellow square"]
NOVEL_ID = 4


def make_world(root, n_train: int = 6, n_val: int = 3, size: int = 48, seed: int = 0):
    """images/{train,val}/, semantic/{train,train_base,val}/ with 1-3 coloured squares per image,
    vocab.json with 4 classes (the last novel). Returns the data folder."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    k = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for _ in range(n):
            k += 1
            img = rng.integers(90, 140, size=(size, size, 3), dtype=np.uint8)
            sem = np.zeros((size, size), np.uint8)
            for _ in range(rng.integers(1, 4)):
                c = int(rng.integers(1, 5))
                s = int(rng.integers(8, 20))
                y, x = rng.integers(0, size - s, size=2)
                img[y : y + s, x : x + s] = COLORS[c]
                sem[y : y + s, x : x + s] = c
            sem[:1, :] = 255  # an ignored row
            for sub, m in ((split, sem),) + (((("train_base"), np.where(sem == NOVEL_ID, 255, sem).astype(np.uint8)),) if split == "train" else ()):
                (data / "semantic" / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(m).save(data / "semantic" / sub / f"{k:06d}.png")
            (data / "images" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(data / "images" / split / f"{k:06d}.png")
    vocab = [{"id": i + 1, "name": n, "synonyms": [], "split": "novel" if i + 1 == NOVEL_ID else "base"} for i, n in enumerate(NAMES)]
    (data / "vocab.json").write_text(json.dumps(vocab))
    return data


def world_overrides(root, data, **extra):
    o = {
        "work_dir": str(root),
        "data.image_root": str(data / "images"),
        "data.semantic_root": str(data / "semantic"),
        "data.vocab": str(data / "vocab.json"),
        "teacher.templates": "",
        "seg.image_size": 32,
        "seg.pretrained_backbone": "",  # resnet18 at random init (the backbone stage's file is not here)
        "seg.features": 16,
        "seg.clipseg_hidden": 32,
        "seg.clipseg_reduce_dim": 16,
        "seg.clipseg_heads": 2,
        "seg.clipseg_queries": 2,
        "seg.train.max_steps": 2,
        "seg.train.batch_size": 2,
        "seg.train.warmup": 0,
        "seg.train.log_period": 1,
        "seg.train.checkpoint_period": 1,
        "seg.eval_batch_size": 2,
    }
    o.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def tiny_teacher():
    from distill.teacher.clip import build_random_teacher

    import copy

    t = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=4, heads=2, dense_image_size=32, seed=0)
    # the shapes LSeg configs read the dense (CLIPSelf) tower; here a frozen copy of the teacher's own
    t.dense_tower = copy.deepcopy(t.model.visual).eval().requires_grad_(False)
    return t


@pytest.fixture()
def tiny_world(tmp_path):
    return tmp_path, make_world(tmp_path)


@pytest.fixture()
def overrides():
    """``overrides(root, data, **extra) -> ["key=value", ...]`` for a config on the tiny world."""
    return world_overrides
