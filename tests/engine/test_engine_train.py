"""Engine: exact resume, NaN guard, checkpoints readable with weights_only, accumulation, clipping,
periodic evaluation, fp16 AMP."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import Dataset

from distill.config import TrainConfig
from distill.engine import checkpoint as ckpt_lib
from distill.engine.train import make_loader, train
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


# --------------------------------------------------------------------------- clip_grad


class Lin(torch.nn.Module):
    """One linear layer, no randomness: its gradient is a function of the batch alone."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(48, 2)

    def forward(self, x, targets):
        y = torch.stack([t["y"] for t in targets])
        return {"loss_a": ((self.l(x.flatten(1)) - y) ** 2).mean()}


def _plain(**kw):
    """SGD without momentum or weight decay at a constant lr: one step is w - lr * g exactly."""
    return _cfg(**{"max_steps": 1, "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0, "warmup": 0, "schedule": "constant",
                   "checkpoint_period": 0, **kw})


def _first_grad(model, cfg):
    """The gradient of the first training batch (shuffle=False: images 0..3) at ``model``'s weights."""
    x, targets = collate([Toy()[i] for i in range(cfg.batch_size)])
    model.zero_grad()
    model(x, targets)["loss_a"].backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fraction", [0.25, 4.0])
def test_clip_grad_scales_the_step_to_the_total_norm(tmp_path, fraction):
    """clip_grad = c: the step is -lr * g * min(1, c / ||g||) with ||g|| the norm over ALL
    parameters (torch's clip_grad_norm_, eps 1e-6). Clipping to a quarter of the norm moves the
    weights a quarter as far as the plain step; a threshold above the norm changes nothing."""
    torch.manual_seed(0)
    m = Lin()
    init = {k: v.clone() for k, v in m.state_dict().items()}
    ref = Lin()
    ref.load_state_dict(init)
    g = _first_grad(ref, _plain())
    norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in g.values())))
    clip = fraction * norm
    cfg = _plain(clip_grad=clip)
    train(m, make_loader(Toy(), cfg, collate, shuffle=False), cfg, tmp_path, progress=False)
    coef = min(1.0, clip / (norm + 1e-6))
    names = dict(m.named_parameters())
    for n, p in names.items():
        expect = init[n] - cfg.lr * coef * g[n]
        # float32 rounding of w - lr * coef * g: a few ulps of |w| + |lr g| (~1e-7 relative);
        # without clipping (fraction 0.25) the step would be 4x longer: off by 0.75 lr |g|
        tol = 1e-6 * float((init[n].abs() + cfg.lr * g[n].abs()).max())
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=tol)
    moved = float(torch.sqrt(sum(((names[n].detach() - init[n]).double() ** 2).sum() for n in names)))
    assert moved == pytest.approx(cfg.lr * min(clip, norm), rel=1e-4)


# --------------------------------------------------------------------------- eval_period


class Probe(ToyModel):
    """ToyModel that records whether each training forward ran in train mode."""

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x, targets):
        self.modes.append(self.training)
        return super().forward(x, targets)


def test_eval_period_evaluates_during_training(tmp_path):
    """eval_period = 3 over 7 steps (as the COCO / LVIS configs evaluate every 10k / 20k steps):
    eval_fn runs after steps 3 and 6 and at the end, on the weights of that step, its metrics are
    logged with the step, and training goes on in train mode with unchanged losses."""
    cfg = _cfg(max_steps=7, eval_period=3, checkpoint_period=0, schedule="constant", warmup=0)
    seen = []

    def eval_fn(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        model.eval()  # as the real evaluators do; the engine must put the model back in train mode
        return {"wsum": float(sum(v.double().sum() for v in model.state_dict().values()))}

    torch.manual_seed(0)
    m = Probe()
    init = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, make_loader(Toy(), cfg, collate), cfg, tmp_path / "eval", eval_fn=eval_fn, progress=False)
    assert len(seen) == 3
    assert m.modes == [True] * 7  # every training forward after an evaluation ran in train mode
    rows = [json.loads(l) for l in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval"]["wsum"]) for r in rows if "eval" in r]
    assert [s for s, _ in evals] == [3, 6, 7]

    # the weights each evaluation saw are those of an uninterrupted run stopped at that step
    # (constant lr: a 3-step run is the first 3 steps of the 7-step one); evaluating changed nothing
    for k, steps in enumerate((3, 6, 7)):
        c = _cfg(max_steps=steps, checkpoint_period=0, schedule="constant", warmup=0)
        torch.manual_seed(0)
        ref = Probe()
        ref.load_state_dict(init)
        train(ref, make_loader(Toy(), c, collate), c, tmp_path / f"ref{steps}", progress=False)
        for name, v in ref.state_dict().items():
            assert torch.equal(seen[k][name], v), (steps, name)
    assert _losses(tmp_path / "eval") == _losses(tmp_path / "ref7")


# --------------------------------------------------------------------------- fp16 AMP


class Overflow(torch.nn.Module):
    """A linear layer whose fp16 weight gradient is exactly 1.5 x the GradScaler's scale.

    Inputs are 32 everywhere, batch 3, loss = sum(out) / 64: d loss / d W = 3 * 32 / 64 = 1.5 per
    entry, exact in fp16. Scaled by the initial 65536 it is 98304 > 65504 (fp16 max): inf, so the
    first step must be skipped and the scale halved; at 32768 it is 49152, finite and exact."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 2)

    def forward(self, x, targets):
        return {"loss": self.l(x.flatten(1)).float().sum() / 64}


class Const(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.full((4,), 32.0), {"image_id": i}


@pytest.mark.gpu
def test_amp_fp16_grad_scaler_skips_an_overflowing_step_and_resumes_its_scale(tmp_path):
    """precision=amp_fp16 on CUDA: the GradScaler (not a plain backward) sees the inf gradient of
    step 1, skips it (weights unchanged, scale 65536 -> 32768), then steps; the scale is saved in
    the checkpoint and restored by --resume (a fresh scaler would overflow and skip again)."""
    kw = dict(batch_size=3, lr=0.5, momentum=0.0, weight_decay=0.0, warmup=0, schedule="constant", optimizer="sgd",
              precision="amp_fp16", device="cuda", checkpoint_period=0, log_period=1, seed=0)
    torch.manual_seed(0)
    m = Overflow()
    init = {k: v.clone() for k, v in m.state_dict().items()}
    cfg1 = TrainConfig(max_steps=1, **kw)
    r1 = train(m, make_loader(Const(), cfg1, collate, shuffle=False), cfg1, tmp_path, progress=False)
    assert math.isfinite(r1["loss"])
    ck = ckpt_lib.read(tmp_path / "checkpoints" / "ckpt_0000001.pt")
    assert ck["scaler"].get("scale") == 32768.0  # one backoff (x0.5) for one overflow
    for k, v in ckpt_lib.read(tmp_path / "model_final.pt")["model"].items():
        assert torch.equal(v.cpu(), init[k]), k  # the overflowing step was skipped

    cfg3 = TrainConfig(max_steps=3, **kw)
    m2 = Overflow()  # fresh weights: everything comes from the checkpoint
    train(m2, make_loader(Const(), cfg3, collate, shuffle=False), cfg3, tmp_path, resume=True, progress=False)
    ck = ckpt_lib.read(tmp_path / "checkpoints" / "ckpt_0000003.pt")
    assert ck["scaler"].get("scale") == 32768.0  # no more overflows, far from the 2000-step growth interval
    # steps 2 and 3 both applied the exact unscaled gradient: W - 2 * lr * 1.5, b - 2 * lr * 3/64
    w = m2.l.weight.detach().cpu()
    b = m2.l.bias.detach().cpu()
    torch.testing.assert_close(w, init["l.weight"] - 2 * 0.5 * 1.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(b, init["l.bias"] - 2 * 0.5 * 3 / 64, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- drawn batches, hooks


def _drawn(fail_after=None, nan_at=None):
    """Batches drawn from a torch, a python and a numpy generator (as the teacher's crops, CLIPSelf's
    grids and the backbone's crops are); raises like a killed run after ``fail_after`` draws."""
    import random

    import numpy as np

    from distill.engine.train import DrawnBatches

    g, r, n = torch.Generator().manual_seed(5), random.Random(5), np.random.default_rng(5)
    calls = [0]

    def draw():
        calls[0] += 1
        if fail_after is not None and calls[0] > fail_after:
            raise KeyboardInterrupt("killed")
        x = torch.randn(4, 3, 4, 4, generator=g) * r.uniform(0.5, 2.0) + float(n.normal())
        if nan_at is not None and calls[0] == nan_at:
            x[0, 0, 0, 0] = float("nan")
        return x, [{"y": torch.full((2,), float(r.random()))} for _ in range(4)]

    return DrawnBatches(draw, {"torch": g, "python": r, "numpy": n})


def test_drawn_batches_resume_equals_uninterrupted_run(tmp_path):
    """A run on DrawnBatches killed after its step-3 checkpoint and resumed gives the losses and
    weights of the uninterrupted run: the generators' states are in the checkpoint. With
    final_checkpoint=False neither model_final.pt nor the checkpoints stay once training finished."""
    cfg = _cfg()
    torch.manual_seed(0)
    m1 = ToyModel()
    init = {k: v.clone() for k, v in m1.state_dict().items()}
    train(m1, _drawn(), cfg, tmp_path / "a", progress=False)
    m2 = ToyModel()
    m2.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        train(m2, _drawn(fail_after=4), cfg, tmp_path / "b", progress=False, final_checkpoint=False)
    assert ckpt_lib.last_checkpoint(tmp_path / "b" / "checkpoints").name == "ckpt_0000003.pt"
    m3 = ToyModel()
    train(m3, _drawn(), cfg, tmp_path / "b", resume=True, progress=False, final_checkpoint=False)  # fresh generators: restored
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    assert all(la[s] == lb[s] for s in la)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m3.state_dict()[k]), k
    assert (tmp_path / "a" / "model_final.pt").is_file() and not (tmp_path / "b" / "model_final.pt").exists()
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_hooks_see_every_step_after_the_loop_s_own():
    """A trainer's hook runs after the loop's: before_train once, after_step with the step count, the
    step's losses and the lr the step used (the schedule's value), after_train once, close always."""
    from distill.engine.hooks import Hook

    class Record(Hook):
        def __init__(self):
            self.events = []

        def before_train(self, loop):
            self.events.append(("before", loop.step))

        def after_step(self, loop):
            self.events.append((loop.step, sorted(loop.step_losses), loop.lr))

        def after_train(self, loop):
            self.events.append(("after", loop.step))

        def close(self, loop):
            self.events.append(("close", loop.step))

    import tempfile

    from distill.engine.optim import LRFactor

    cfg = _cfg(max_steps=4, checkpoint_period=0)
    rec = Record()
    with tempfile.TemporaryDirectory() as d:
        train(ToyModel(), _drawn(), cfg, d, progress=False, hooks=[rec])
        with pytest.raises(KeyboardInterrupt):
            train(ToyModel(), _drawn(fail_after=2), cfg, d, progress=False, hooks=[fail := Record()])
    f = LRFactor(cfg.max_steps, cfg.warmup, cfg.schedule)
    assert rec.events == [("before", 0)] + [(s, ["loss", "loss_a", "loss_b"], pytest.approx(cfg.lr * f(s - 1))) for s in (1, 2, 3, 4)] + [("close", 4), ("after", 4)]
    assert fail.events[0] == ("before", 0) and fail.events[-1] == ("close", 2)  # killed: closed, no after_train


def test_precision_autocasts_on_cpu_only_when_asked(tmp_path):
    """tcfg.precision is AMP on CUDA only; a trainer's ``precision`` applies on every device."""

    class Probe(ToyModel):
        def forward(self, x, targets):
            self.seen = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
            return super().forward(x, targets)

    cfg = _cfg(max_steps=1, checkpoint_period=0, precision="amp_bf16")
    m = Probe()
    train(m, _drawn(), cfg, tmp_path / "a", progress=False)
    assert m.seen[0] is False
    train(m, _drawn(), cfg, tmp_path / "b", progress=False, precision="amp_bf16")
    assert m.seen == (True, torch.bfloat16)


def test_nonfinite_loss_on_drawn_batches_names_the_step_and_the_hint(tmp_path):
    cfg = _cfg(max_steps=4, checkpoint_period=0)
    with pytest.raises(DistillError) as e:
        train(ToyModel(), _drawn(nan_at=2), cfg, tmp_path, progress=False, hint="try a lower lr")
    msg = str(e.value)
    assert msg.startswith("step 2: non-finite loss (loss_a=nan, loss_b=nan); training stopped")
    assert msg.endswith("last good checkpoint: none saved yet; try a lower lr") and "image ids" not in msg
