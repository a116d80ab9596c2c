"""Engine: exact resume, NaN guard, checkpoints readable with weights_only, schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import Dataset

from distill.config import TrainConfig
from distill.engine import checkpoint as ckpt_lib
from distill.engine.train import LRFactor, make_loader, train
from distill.errors import DistillError


class Toy(Dataset):
    """Random regression data; targets carry image ids. ``fail_at`` raises like a killed run."""

    def __init__(self, n=16, fail_after=None, nan_ids=()):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.y = torch.randn(n, 2, generator=g)
        self.calls = 0
        self.fail_after = fail_after
        self.nan_ids = set(nan_ids)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        x = self.x[i].clone()
        if i in self.nan_ids:
            x[0, 0, 0] = float("nan")
        return x, {"y": self.y[i], "image_id": 100 + i}


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class ToyModel(torch.nn.Module):
    """Two named losses; dropout + a random mask so the RNG matters for resume equality."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))

    def forward(self, x, targets):
        y = torch.stack([t["y"] for t in targets])
        p = self.net(x)
        noise = torch.rand_like(p)  # uses the global RNG like RPN / RoI sampling does
        return {"loss_a": ((p - y) ** 2).mean(), "loss_b": 0.1 * (p * noise).abs().mean()}


def _cfg(**kw):
    base = dict(max_steps=6, batch_size=4, lr=0.05, warmup=2, checkpoint_period=3, log_period=1, seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _losses(out_dir):
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    m1 = ToyModel()
    init = {k: v.clone() for k, v in m1.state_dict().items()}
    r1 = train(m1, make_loader(Toy(), cfg, collate), cfg, tmp_path / "a", progress=False)

    # killed while loading the batch of step 4 (after the step-3 checkpoint), then resumed
    m2 = ToyModel()
    m2.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        train(m2, make_loader(Toy(fail_after=3 * 4), cfg, collate), cfg, tmp_path / "b", progress=False)
    assert ckpt_lib.last_checkpoint(tmp_path / "b" / "checkpoints").name == "ckpt_0000003.pt"
    m3 = ToyModel()  # fresh weights: everything must come from the checkpoint
    r3 = train(m3, make_loader(Toy(), cfg, collate), cfg, tmp_path / "b", resume=True, progress=False)

    assert r1["step"] == r3["step"] == 6
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        assert la[s] == pytest.approx(lb[s], abs=1e-7), s
    assert r1["loss"] == pytest.approx(r3["loss"], abs=1e-7)
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(v, m3.state_dict()[k], rtol=0, atol=1e-7)
    # and training changed the weights at all
    assert any((init[k] - v).abs().max() > 1e-4 for k, v in m1.state_dict().items())
    # model_final.pt is a plain state_dict readable with weights_only
    sd = torch.load(tmp_path / "a" / "model_final.pt", weights_only=True)
    torch.testing.assert_close(sd["net.1.weight"], m1.state_dict()["net.1.weight"])


def test_nan_loss_stops_with_step_and_image_ids(tmp_path):
    cfg = _cfg(max_steps=8, checkpoint_period=2, batch_size=2)
    ds = Toy(n=4, nan_ids=(3,))
    with pytest.raises(DistillError) as e:
        train(ToyModel(), make_loader(ds, cfg, collate, shuffle=False), cfg, tmp_path, progress=False)
    msg = str(e.value)
    # batches are (100, 101), (102, 103): step 2 holds image 103
    assert msg.startswith("step 2: non-finite loss") and "103" in msg
    assert "none saved yet" in msg
    # with a checkpoint in between, the message names it and the file is kept
    ds2 = Toy(n=8, nan_ids=(7,))
    with pytest.raises(DistillError) as e:
        train(ToyModel(), make_loader(ds2, cfg, collate, shuffle=False), cfg, tmp_path / "b", progress=False)
    assert str(e.value).startswith("step 4:") and "ckpt_0000002.pt" in str(e.value)
    assert (tmp_path / "b" / "checkpoints" / "ckpt_0000002.pt").is_file()


def test_checkpoint_roundtrip_and_wrong_architecture(tmp_path):
    m = ToyModel()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3, 4, 4), [{"y": torch.zeros(2)}] * 2)["loss_a"].backward()
    opt.step()
    torch.manual_seed(7)
    p = ckpt_lib.save(tmp_path / "c.pt", m, opt, step=5)
    expect = torch.rand(3)
    torch.manual_seed(0)
    raw = torch.load(p, weights_only=True)  # everything is weights_only-safe
    assert raw["step"] == 5 and raw["arch"] == "ToyModel"
    m2 = ToyModel()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    st = ckpt_lib.load(p, m2, opt2, restore_rng=True)
    assert st["step"] == 5
    torch.testing.assert_close(torch.rand(3), expect)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    other = torch.nn.Linear(3, 3)
    with pytest.raises(DistillError, match="does not fit Linear"):
        ckpt_lib.load(p, other)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DistillError, match="not a readable checkpoint"):
        ckpt_lib.read(tmp_path / "junk.pt")


def test_lr_factor_warmup_cosine_step():
    f = LRFactor(100, 10, "cosine")
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx((0.001 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    s = LRFactor(90, 0, "step")
    assert [s(0), s(59), s(60), s(80)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    with pytest.raises(DistillError, match="train.schedule"):
        LRFactor(10, 0, "poly")


def test_grad_accumulation_matches_big_batch(tmp_path):
    """batch 4 in one step == batch 4 as 2 x 2 accumulated (no dropout / noise: linear model)."""

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(48, 2)

        def forward(self, x, targets):
            y = torch.stack([t["y"] for t in targets])
            return {"loss_a": ((self.l(x.flatten(1)) - y) ** 2).mean()}

    outs = []
    for accum in (1, 2):
        cfg = _cfg(max_steps=3, grad_accum=accum, checkpoint_period=0)
        torch.manual_seed(0)
        m = Lin()
        train(m, make_loader(Toy(), cfg, collate), cfg, tmp_path / str(accum), progress=False)
        outs.append(m.l.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
