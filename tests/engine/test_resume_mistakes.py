"""--resume mistakes found by a new-user sweep: a checkpoint past max_steps (it silently rewrote
model_final.pt under a config saying fewer steps), a garbled ``last_checkpoint`` pointer (it
started from scratch and deleted the intact checkpoints), a file that is not a PyTorch
checkpoint (torch's text suggested weights_only=False)."""

from __future__ import annotations

import logging

import pytest

from distill.cam.clims import load_clims
from distill.detection.build import _load_backbone_weights
from distill.engine import checkpoint as ckpt_lib
from distill.engine.train import make_loader, train
from distill.errors import DistillError

from engine.test_engine_train import Toy, ToyModel, _cfg, collate


def _trained(out):
    cfg = _cfg(max_steps=5, checkpoint_period=2)
    train(ToyModel(), make_loader(Toy(), cfg, collate), cfg, out, progress=False)
    return sorted(p.name for p in (out / "checkpoints").glob("ckpt_*.pt"))


def test_resume_past_max_steps_is_refused_and_writes_nothing(tmp_path):
    assert _trained(tmp_path) == ["ckpt_0000004.pt", "ckpt_0000005.pt"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cfg = _cfg(max_steps=3, checkpoint_period=2)
    with pytest.raises(DistillError) as e:
        train(ToyModel(), make_loader(Toy(), cfg, collate), cfg, tmp_path, resume=True, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "ckpt_0000005.pt" in msg and "step 5" in msg and "max_steps 3" in msg, msg
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_garbled_pointer_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog, capsys):
    _trained(tmp_path)
    ck = tmp_path / "checkpoints"
    (ck / "last_checkpoint").write_bytes(b"\x00\xffgarbage\x13")
    (ck / "ckpt_0000005.pt").write_bytes(b"truncated")  # the newest is unreadable too
    with caplog.at_level(logging.WARNING, logger="distill"):
        assert ckpt_lib.last_checkpoint(ck) == ck / "ckpt_0000004.pt"
    assert any("last_checkpoint" in r.getMessage() and "ckpt_0000004.pt" in r.getMessage() for r in caplog.records), caplog.text
    cfg = _cfg(max_steps=5, checkpoint_period=2)
    train(ToyModel(), make_loader(Toy(), cfg, collate), cfg, tmp_path, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "ckpt_0000004.pt at step 4" in out and "starting from scratch" not in out, out
    assert ckpt_lib.read(ck / "ckpt_0000004.pt")["step"] == 4  # kept, not deleted by a run from scratch


def test_a_png_named_pt_is_not_a_pytorch_checkpoint(tmp_path):
    png = tmp_path / "image.pt"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(DistillError) as e:
        ckpt_lib.read(png)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{png}: not a readable checkpoint (not a PyTorch checkpoint: a PNG image)") and "weights_only" not in msg, msg


@pytest.mark.parametrize("key,load", [
    ("det.pretrained_backbone", lambda p: _load_backbone_weights(None, p)),
    ("clims.out", lambda p: load_clims(p, "resnet18", 3)),
])
def test_user_named_weights_files_missing_or_unreadable_are_one_line(tmp_path, key, load):
    """The files a config names (a backbone, a CLIMS network) go through one loader
    (checkpoint.load_file): a missing file or a PNG is one line naming the key, the path and
    what was expected, before any model is touched."""
    png = tmp_path / "a.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    for path, says in ((tmp_path / "gone.pt", "file not found (expected "), (png, "not a readable file (not a PyTorch checkpoint: a PNG image); expected ")):
        with pytest.raises(DistillError) as e:
            load(str(path))
        msg = str(e.value)
        assert msg.startswith(f"{key}: {path}: {says}") and "\n" not in msg, msg
