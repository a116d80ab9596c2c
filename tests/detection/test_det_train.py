"""The ViLD detector through the engine: killed + resumed == uninterrupted (step, losses, weights);
the training set's augmentation (det.augment) and its config checks."""

from __future__ import annotations

import json

import pytest
import torch

from distill.config import TrainConfig, load_config
from distill.detection.build import build_vild_detector
from distill.engine.train import make_loader, train
from distill.errors import DistillError

from test_configs import REPO, make_fixture  # noqa: E402  (same folder)
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


# --- the training set's augmentation (det.augment) ---------------------------------------------


def _shapes_cfg(tmp_path, *overrides):
    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue square", "split": "novel"}]
    files = make_fixture(tmp_path / "d", cats, [1, 2])
    return load_config(REPO / "configs/shapes/vild.yaml", [
        f"work_dir={tmp_path / 'run'}", f"data.image_root={tmp_path / 'd' / 'images'}", f"data.train_json={files['train']}",
        f"data.train_full_json={files['train']}", f"data.val_json={files['val']}", "data.vocab=", "det.use_image=false", *overrides])


def _sets(cfg):
    from distill.data.coco import CocoDetection
    from distill.detection.train import build_training_set
    from distill.vocab import resolve_vocab

    vocab = resolve_vocab(cfg.data, need_base=True)
    ds = build_training_set(cfg, vocab, None, vocab.base_indices)
    raw = CocoDetection(cfg.data.train_json, cfg.data.image_root, vocab, masks=cfg.det.masks, skip_unknown=True)
    return ds, raw, vocab


def test_training_set_is_not_augmented_by_default(tmp_path):
    cfg = _shapes_cfg(tmp_path)
    assert cfg.det.augment == "none"  # the shapes default
    ds, raw, vocab = _sets(cfg)
    assert ds.transforms is None
    for i in range(len(ds)):
        (img, t), (img0, t0) = ds[i], raw[i]
        base = t0["labels"] < len(vocab.base_indices)  # base labels keep their index (base first)
        assert torch.equal(img, img0) and torch.equal(t["boxes"], t0["boxes"][base]) and t["image_id"] == t0["image_id"]


def test_training_set_flips_when_configured(tmp_path):
    ds, raw, _ = _sets(_shapes_cfg(tmp_path, "det.augment=flip", "det.masks=true"))
    flipped = 0
    for i in range(len(ds)):
        for _ in range(4):
            (img, t), (img0, t0) = ds[i], raw[i]
            keep = torch.isin(t0["labels"], t["labels"])
            b0, m0 = t0["boxes"][keep], t0["masks"][keep]
            if torch.equal(img, img0):
                assert torch.equal(t["boxes"], b0) and torch.equal(t["masks"], m0)
            else:
                flipped += 1
                W = img.shape[-1]
                assert torch.equal(img, img0.flip(-1)) and torch.equal(t["masks"], m0.flip(-1))
                assert torch.allclose(t["boxes"], torch.stack([W - b0[:, 2], b0[:, 1], W - b0[:, 0], b0[:, 3]], 1))
    assert 0 < flipped < 4 * len(ds)


def test_training_set_lsj_canvas_and_eval_untouched(tmp_path):
    cfg = _shapes_cfg(tmp_path, "det.augment=lsj", "det.min_size=96", "det.max_size=96", "det.masks=true")
    ds, raw, _ = _sets(cfg)
    torch.manual_seed(0)
    first = [ds[i] for i in range(len(ds))]
    for img, t in first:
        assert img.shape == (3, 96, 96) and t["masks"].shape[1:] == (96, 96) and len(t["masks"]) == len(t["labels"]) == len(t["boxes"])
        wh = t["boxes"][:, 2:] - t["boxes"][:, :2]
        assert (wh > 0).all() and (t["boxes"] >= 0).all() and (t["boxes"] <= 96).all()
    torch.manual_seed(0)  # the engine seeds torch: the augmentation repeats with it
    again = [ds[i] for i in range(len(ds))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"]) for a, b in zip(first, again))
    assert raw.transforms is None and raw[0][0].shape == (3, 64, 64)  # evaluation sets never augment


def test_proposals_and_their_embeddings_follow_the_image(tmp_path):
    from distill.data.coco import CocoDetection
    from distill.data.transforms import DetectionTrainTransform, flip_ops
    from distill.detection.train import DetTrainSet

    cfg = _shapes_cfg(tmp_path)
    base = CocoDetection(cfg.data.train_json, cfg.data.image_root, None)
    iid = base.image_ids[0]
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [30.0, 5.0, 64.0, 9.0], [5.0, 5.0, 6.0, 6.0]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # the third: skipped by the teacher

    class Cache:
        def get(self, i):
            return emb if i == iid else torch.zeros(0, 2)

    ds = DetTrainSet(base, {0: 0, 1: 1}, {iid: (boxes, torch.ones(3))}, Cache(), 3, transforms=DetectionTrainTransform(flip_ops(1.0), seed=0))
    _, t = ds[0]
    assert torch.allclose(t["proposals"], torch.tensor([[54.0, 0.0, 64.0, 20.0], [0.0, 5.0, 34.0, 9.0]]))
    assert torch.equal(t["proposal_embeddings"], emb[:2])
    with pytest.raises(DistillError, match="not to its CocoDetection"):
        DetTrainSet(CocoDetection(cfg.data.train_json, cfg.data.image_root, None, transforms=lambda im, t: (im, t)), {0: 0})


def test_bad_augment_settings_are_one_line_errors_at_load():
    with pytest.raises(DistillError) as e:
        load_config(None, ["det.augment=jitter"])
    msg = str(e.value)
    assert "\n" not in msg and "det.augment" in msg and "none, flip, flip_zoom, lsj" in msg and "jitter" in msg
    with pytest.raises(DistillError, match=r"det\.augment: lsj needs det\.min_size == det\.max_size"):
        load_config(None, ["det.augment=lsj", "det.min_size=800", "det.max_size=1333"])
    with pytest.raises(DistillError, match=r"det\.lsj_scale"):
        load_config(None, ["det.augment=lsj", "det.lsj_scale=[2.0, 0.1]"])
    for path in ("configs/coco/vild_r50_ovcoco.yaml", "configs/lvis/vild_r50.yaml"):
        det = load_config(REPO / path).det
        assert (det.augment, det.lsj_scale, det.min_size, det.max_size) == ("lsj", (0.1, 2.0), 1024, 1024)
        assert (det.train.batch_size, det.train.max_steps, det.train.lr) == (256, 180000, 0.32)
