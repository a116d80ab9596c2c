"""Fixtures shared by the labeling CLI tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

DET = ["det.min_size=48", "det.max_size=48", "det.detections_per_img=20", "det.backbone=resnet18_fpn"]


@pytest.fixture(scope="module")
def vild_checkpoint_world(tmp_path_factory):
    """A random tiny teacher file, a ViLD checkpoint trained (0 steps) with the shipped templates
    ``shapes.txt``, saved as ``distill train`` saves it, and 2 images."""
    import torch
    from safetensors.torch import save_file

    from distill.config import load_config
    from distill.detection.build import build_vild_detector
    from distill.engine.checkpoint import save_model
    from distill.teacher.clip import build_teacher, student_meta
    from distill.teacher.text import text_embeddings
    from distill.vocab import load_vocab

    root = tmp_path_factory.mktemp("anywhere")
    torch.manual_seed(0)
    teacher = build_teacher(load_config(None, ["teacher.pretrained=", "teacher.device=cpu"]).teacher)
    save_file({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, str(root / "t.safetensors"))
    mcfg = load_config(None, ["teacher.templates=shapes.txt", "teacher.device=cpu", f"teacher.pretrained={root / 't.safetensors'}",
                              f"work_dir={root}", "data.vocab=red square, blue circle", *DET])
    teacher = build_teacher(mcfg.teacher)
    trained = load_vocab("red square, blue circle")
    model = build_vild_detector(mcfg.det, teacher.embed_dim, text_embeddings(teacher, trained, mcfg.teacher.templates), teacher=teacher)
    (root / "det").mkdir()
    save_model(root / "det" / "model_final.pt", model, student_meta(mcfg, teacher, trained_classes=list(trained.names)))
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(2):
        img = rng.integers(60, 200, (48, 48, 3), dtype=np.uint8)
        img[8:30, 10:34] = (230, 30, 30)
        Image.fromarray(img).save(root / "imgs" / f"{i}.png")
    return root
