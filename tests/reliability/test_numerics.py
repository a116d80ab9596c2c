"""Numerical safety at the user's level: a training run whose loss turns non-finite stops with a
one-line error naming the step and the image ids of the batch, and keeps the last good checkpoint
(the engine's own unit test covers a toy model; this one goes through ``distill train seg``).

"Good" is checked, not assumed: the checkpoint the error names is reloaded into the student and
its loss on clean training batches must be finite. The checkpoint of the step before the bad one
holds the very weights that gave the non-finite loss, so it must not be the one named (nor the
one ``--resume`` picks up)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from distill.engine import checkpoint as ckpt_lib

from ._fixtures import REPO, cli_error, make_teacher_dir, make_tiny_world, seg_overrides


def _losses_on_clean_batches(run_dir, ckpt_path) -> list[float]:
    """Rebuild the run's student from its saved config, load ``ckpt_path`` and return its training
    loss (train mode, as the engine computes it) on every clean batch of 2 training images."""
    from distill.config import load_config
    from distill.segmentation.build import load_segmenter
    from distill.segmentation.train import SemSegFolder, collate, seg_paths, text_for
    from distill.vocab import resolve_vocab
    from distill.teacher.clip import build_teacher

    cfg = load_config(run_dir / "config.yaml")
    teacher = build_teacher(cfg.teacher, device="cpu")
    vocab = resolve_vocab(cfg.data)
    text = text_for(teacher, vocab, cfg).float()
    base = vocab.base_indices
    model = load_segmenter(cfg.seg, teacher, ckpt_path)
    model.set_vocabulary(text[base], [vocab.ids[i] for i in base])
    model.train()
    paths = seg_paths(cfg)
    ds = SemSegFolder(paths.train_images, paths.train_masks, vocab.ids, size=cfg.seg.image_size, augment=False)
    out = []
    with torch.no_grad():
        for i in range(0, len(ds) - 1, 2):
            images, targets = collate([ds[i], ds[i + 1]])
            assert all(bool(torch.isfinite(x).all()) for x in (images, targets["masks"].float()))  # clean inputs
            out.append(float(sum(model(images, targets).values())))
    return out


def test_exploding_training_stops_naming_step_and_images_and_keeps_last_good_checkpoint(tmp_path, capsys):
    tm = make_teacher_dir(tmp_path / "t", seed=0)
    w = tmp_path / "w"
    make_tiny_world(w)
    cfg = str(REPO / "configs/shapes/lseg.yaml")
    # adamw, constant lr 200 after a 2-step warm-up: step 1 updates at lr 0.2 (training at lr 1
    # stays finite), step 2 at lr 100 (any lr >= 10 gives a NaN loss on the next step), so step 3
    # is the first non-finite loss: ckpt 1 holds good weights, ckpt 2 the weights that exploded
    ov = seg_overrides(w, tm, **{"seg.train.lr": 200, "seg.train.warmup": 2, "seg.train.schedule": "constant",
                                 "seg.train.max_steps": 6, "seg.train.checkpoint_period": 1})
    line = cli_error(capsys, ["train", "seg", cfg, *ov])
    m = re.match(r"error: step (\d+): non-finite loss", line)
    assert m, line
    step = int(m.group(1))
    assert step == 3, line
    ids = re.search(r"image ids \[([\d, ]+)\]", line)
    assert ids, line
    ids = [int(x) for x in ids.group(1).split(",")]
    assert len(ids) == 2 and all(1 <= i <= 8 for i in ids), line  # batch 2; train images are ids 1..8
    run = w / "seg" / "lseg"
    ck = run / "checkpoints"
    named = re.search(r"last good checkpoint: (\S+\.pt)\b", line)
    assert named, line
    good = Path(named.group(1))
    state = torch.load(good, weights_only=True)
    flat = torch.cat([v.float().flatten() for v in state["model"].values() if torch.is_tensor(v)])
    assert flat.numel() > 0 and bool(torch.isfinite(flat).all()), f"{good}: {int((~torch.isfinite(flat)).sum())} non-finite values"
    # the honest property: the named weights give a finite loss on clean batches (all 4 of them)
    losses = _losses_on_clean_batches(run, good)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), f"{good.name} (step {int(state['step'])}): losses {losses}"
    assert good == ck / "ckpt_0000001.pt" and state["step"] == 1, line
    # the weights of step 2 gave the non-finite loss: set aside as .nonfinite, not resumable
    bad = ck / "ckpt_0000002.pt.nonfinite"
    assert bad.is_file() and not (ck / "ckpt_0000002.pt").exists(), sorted(p.name for p in ck.iterdir())
    assert "ckpt_0000002.pt, whose weights gave this loss" in line, line
    assert not all(torch.isfinite(torch.tensor(_losses_on_clean_batches(run, bad)))), "the set-aside weights were fine?"
    assert ckpt_lib.last_checkpoint(ck) == good  # what --resume restarts from
    assert not (run / "model_final.pt").exists()
    # a checkpoint of the bad step was not written
    assert not (ck / f"ckpt_{step:07d}.pt").exists()

    # --resume restarts from the good checkpoint, not the set-aside one (a run from scratch would
    # explode at step 3 too: the resume line tells them apart); the same weights explode again
    from distill.cli import main

    capsys.readouterr()
    rc = main(["train", "seg", cfg, *ov, "--resume"])
    out = capsys.readouterr()
    assert rc == 2 and f"resuming from {good} at step 1" in out.out, out.out[-500:]
    assert "step 3: non-finite loss" in out.err and f"last good checkpoint: {good} " in out.err
