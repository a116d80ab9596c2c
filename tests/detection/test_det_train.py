"""The ViLD detector through the engine: killed + resumed == uninterrupted (step, losses, weights)."""

from __future__ import annotations

import json

import pytest
import torch

from distill.config import TrainConfig
from distill.detection.build import build_vild_detector
from distill.engine.train import make_loader, train

from test_vild import D, images_targets, tiny_det, unit  # noqa: E402  (same folder)


class TinySet(torch.utils.data.Dataset):
    def __init__(self, n=8, kill_after=None):
        self.items = []
        for i in range(n // 2):
            imgs, tg = images_targets(n=2, seed=i)
            for im, t in zip(imgs, tg):
                self.items.append((im, dict(t, image_id=len(self.items))))
        self.calls, self.kill_after = 0, kill_after

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.calls += 1
        if self.kill_after is not None and self.calls > self.kill_after:
            raise KeyboardInterrupt("killed")
        return self.items[i]


def collate(b):
    return [x[0] for x in b], [x[1] for x in b]


def _rows(path):
    return {r["step"]: r for r in (json.loads(l) for l in path.read_text().splitlines()) if "loss" in r}


@pytest.mark.slow
def test_vild_resume_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, optimizer="adamw", warmup=1, checkpoint_period=2, log_period=1, seed=0, device="cpu")
    torch.manual_seed(0)
    m1 = build_vild_detector(tiny_det(), D, unit(3, D))
    init = {k: v.clone() for k, v in m1.state_dict().items()}
    train(m1, make_loader(TinySet(), cfg, collate), cfg, tmp_path / "a", progress=False)

    m2 = build_vild_detector(tiny_det(), D, unit(3, D))
    m2.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        train(m2, make_loader(TinySet(kill_after=2 * 2), cfg, collate), cfg, tmp_path / "b", progress=False)
    m3 = build_vild_detector(tiny_det(), D, unit(3, D))
    r3 = train(m3, make_loader(TinySet(), cfg, collate), cfg, tmp_path / "b", resume=True, progress=False)
    assert r3["step"] == 4
    a, b = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in (3, 4):
        for k in ("loss", "loss_vild_text", "loss_vild_image", "loss_objectness", "loss_box_reg"):
            assert a[s][k] == pytest.approx(b[s][k], rel=1e-5, abs=1e-7), (s, k)
    sd1, sd3 = m1.state_dict(), m3.state_dict()
    for k in sd1:
        torch.testing.assert_close(sd1[k], sd3[k], rtol=1e-5, atol=1e-6)
