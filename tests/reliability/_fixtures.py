"""Shared builders for the reliability suite: a tiny random teacher saved as an open_clip
``local-dir:`` folder (so a CLI subprocess can load it), a tiny shapes world, config overrides for
tiny training / labeling runs, and helpers that run the CLI in-process or as a subprocess.

Everything is generated in ``tmp_path``; nothing is read from runs/ or downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A tiny ViT teacher (open_clip config), small enough that a CLI subprocess trains in seconds.
TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_teacher_dir(folder: Path, seed: int = 0) -> str:
    """Write a seeded random open_clip model as ``folder/open_clip_config.json`` + safetensors;
    returns the ``teacher.model`` value (``local-dir:<folder>``)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**{k: v for k, v in TINY_MODEL_CFG.items()})
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    cfg = {"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def teacher_overrides(teacher_model: str) -> list[str]:
    # no CLIPSelf dense tower (the shapes configs name one the pipeline's clipself stage writes):
    # LSeg and the CAMs read the teacher's own tower
    return [f"teacher.model={teacher_model}", "teacher.pretrained=", "teacher.templates=", "teacher.device=cpu",
            "teacher.dense_image_size=32", "teacher.batch_size=16", "teacher.dense_tower=", "seg.backbone=teacher",
            "cam.tower=teacher"]


WORLD = {
    "world.image_size": 64, "world.num_train": 8, "world.num_val": 4, "world.num_unlabeled": 4,
    "world.colors": "[red, green, blue]", "world.shapes": "[circle, square, triangle]", "world.num_novel": 2,
    "world.min_size": 12, "world.max_size": 28, "world.max_objects": 3, "world.clutter": 1,
    "world.num_captions_per_image": 1,
}


def world_overrides(work_dir: Path, **extra) -> list[str]:
    o = {"work_dir": str(work_dir), **WORLD, **extra}
    return [f"{k}={v}" for k, v in o.items()]


def make_tiny_world(work_dir: Path, **extra) -> Path:
    """The shapes world with 8 train / 4 val / 4 unlabeled 64x64 images under work_dir/data."""
    from distill.config import load_config
    from distill.data.world import make_world

    return make_world(load_config(None, world_overrides(work_dir, **extra)))


SEG_TINY = {
    "seg.image_size": 32, "seg.features": 16, "seg.backbone": "teacher", "seg.train.max_steps": 6,
    "seg.train.batch_size": 2, "seg.train.warmup": 0, "seg.train.log_period": 1,
    "seg.train.checkpoint_period": 1, "seg.train.seed": 0, "seg.train.deterministic": "true",
    "seg.train.device": "cpu", "seg.eval_batch_size": 2, "seg.augment": "false", "data.num_workers": 0,
}


def seg_overrides(work_dir: Path, teacher_model: str, **extra) -> list[str]:
    o = {**SEG_TINY, **extra}
    return world_overrides(work_dir) + teacher_overrides(teacher_model) + [f"{k}={v}" for k, v in o.items()]


def env() -> dict:
    """Environment of a CLI subprocess: offline, one thread, deterministic."""
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""})
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "distill.cli", *args]


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), env=env(), cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def cli_error(capsys, argv: list[str]) -> str:
    """Run ``distill argv`` in-process; assert exit code 2 with a single-line error and no
    traceback on stderr; return that line."""
    from distill.cli import main

    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit {rc}, stderr: {err}"
    assert "Traceback" not in err
    # progress bars (tqdm, on stderr while a run was under way) are not part of the error
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
