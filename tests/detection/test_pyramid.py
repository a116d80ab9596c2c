"""OADP's distillation pyramid: the reference's blocks, the relation loss and the global loss by
hand, the warm-up ramp, blocks moving with the augmentation, and a ViLD student training with
global + block distillation end to end on the tiny COCO fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from distill.detection.pyramid import REF_IMAGES_PER_GPU, PyramidHeads, relation_loss
from distill.teacher.pyramid import block_boxes, partition

REPO = Path(__file__).resolve().parents[2]


def test_blocks_as_the_reference_partitions_them():
    """blocks.py: 224-px blocks, stride <= 112, spread to end at the border; then the image / 1.5."""
    assert partition(640, 224, 112) == [0, 104, 208, 312, 416]  # n = (640-224-1)//112+1 = 4, 416 = 4 x 104
    assert partition(224, 224, 112) == [0] and partition(200, 224, 112) == []
    b = block_boxes(128, 96, 64)
    assert b[0].tolist() == [16.0, 0.0, 112.0, 96.0]  # the centre square (the global target)
    # scale 1: x in [0, 32, 64], y in [0, 32]; scale 1.5 (85 x 64): x in [0, 21], y in [0]; then 56 x 42: none
    xs1, ys1 = [0, 32, 64], [0, 32]
    want = [[x, y, x + 64, y + 64] for x in xs1 for y in ys1] + [[x * 1.5, 0, (x + 64) * 1.5, 96] for x in (0, 21)]
    assert b[1:].tolist() == want
    assert block_boxes(40, 30, 64).tolist() == [[5.0, 0.0, 35.0, 30.0]]  # smaller than a block: the centre square only


def test_relation_loss_is_the_mse_of_cosine_relations_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    cs = [[float(torch.dot(s[i], s[j]) / (s[i].norm() * s[j].norm())) for j in range(4)] for i in range(4)]
    ct = [[float(torch.dot(t[i], t[j]) / (t[i].norm() * t[j].norm())) for j in range(4)] for i in range(4)]
    want = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(4) for j in range(4)) / 16
    assert abs(relation_loss(s, t).item() - want) < 1e-6
    assert relation_loss(2 * t, t).item() < 1e-10  # scale-free: only the relations count


class _Det:
    fpn_channels = 8
    box_head = "mlp2"
    box_head_dim = 16
    box_head_conv_dim = 8
    global_weight = 0.5
    block_weight = 128.0
    block_relation_weight = 8.0
    pyramid_warmup = 4


def test_global_loss_and_warmup_by_hand():
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    heads = PyramidHeads(_Det(), MultiScaleRoIAlign(["0"], 7, 2), embed_dim=5, in_channels=8).train()
    feats = {"0": torch.randn(2, 8, 16, 16), "pool": torch.randn(2, 8, 2, 2)}
    target = torch.nn.functional.normalize(torch.randn(2, 5), dim=-1)
    blocks = [torch.tensor([[0.0, 0, 8, 8], [4, 4, 16, 16]]), torch.tensor([[0.0, 0, 16, 16]])]
    block_t = [torch.randn(2, 5), torch.randn(1, 5)]
    seen = []
    for step in range(6):
        losses = heads(feats, blocks, [(16, 16), (16, 16)], target, block_t)
        seen.append(losses)
    emb = heads.global_proj(feats["pool"].mean(dim=(2, 3)))
    want = 0.5 * ((emb - target) ** 2).sum(1).mean() * REF_IMAGES_PER_GPU  # the last FPN level, full weight after the warm-up
    assert torch.allclose(seen[5]["loss_global"], want, atol=1e-6)
    ramps = [float((x["loss_global"] / want).detach()) for x in seen]
    assert np.allclose(ramps, [0, 0.25, 0.5, 0.75, 1, 1], atol=1e-5)  # linear over pyramid_warmup = 4 steps
    assert set(seen[5]) == {"loss_global", "loss_block", "loss_block_relation"}
    assert all(torch.isfinite(v) for v in seen[5].values())


def test_blocks_move_with_the_flip():
    from distill.data.transforms import detection_train_transforms

    tf = detection_train_transforms(flip_p=1.0, scale=(1.0, 1.0), seed=0)
    img = np.zeros((32, 32, 3), np.uint8)
    t = {"boxes": np.array([[0, 0, 8, 8]], np.float32), "labels": np.array([1]),
         "proposals": np.array([[0, 0, 4, 4]], np.float32), "proposal_embeddings": np.array([[1.0, 2.0]]),
         "blocks": np.array([[0, 0, 32, 32], [0, 0, 16, 16]], np.float32), "block_embeddings": np.array([[3.0], [4.0]])}
    _, out = tf(img, t)
    assert out["blocks"].tolist() == [[0, 0, 32, 32], [16, 0, 32, 16]] and out["block_embeddings"].tolist() == [[3.0], [4.0]]
    assert out["proposals"].tolist() == [[28, 0, 32, 4]] and out["proposal_embeddings"].tolist() == [[1.0, 2.0]]


def test_vild_with_the_pyramid_trains_end_to_end(tmp_path):
    from detection.test_configs import TINY, make_fixture

    from distill.config import load_config
    from distill.detection.proposals import run_proposals
    from distill.detection.train import det_dir, train_detector
    from distill.teacher.clip import build_random_teacher

    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue square", "split": "novel"}]
    files = make_fixture(tmp_path / "d", cats, [1, 2])
    cfg = load_config(REPO / "configs/shapes/vild.yaml", [
        f"work_dir={tmp_path / 'run'}", f"data.image_root={tmp_path / 'd' / 'images'}", f"data.train_json={files['train']}",
        f"data.train_full_json={files['train']}", f"data.val_json={files['val']}", *TINY,
        "det.global_weight=0.5", "det.block_weight=128", "det.block_relation_weight=8", "det.pyramid_warmup=1"])
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    run_proposals(cfg, progress=False)
    m = train_detector(cfg, progress=False, teacher=teacher)
    out = det_dir(cfg)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss_block" in r][-1]
    for k in ("loss_global", "loss_block", "loss_block_relation", "loss_vild_image"):
        assert k in last and np.isfinite(last[k]) and last[k] > 0, (k, last)
    assert 0.0 <= m["bbox/AP50"] <= 1.0
    # the teacher's block targets were cached once per train image: 64 px images, 32 px blocks ->
    # the centre square + 3 x 3 blocks at scale 1 + 2 x 2 at 1.5 (42 px) = 14 rows
    from distill.files import sha256_json
    from distill.teacher.cache import EmbeddingCache
    from distill.teacher.pyramid import pyramid_cache_key

    key = pyramid_cache_key(teacher)
    cache = EmbeddingCache(tmp_path / "run" / "embeddings" / "pyramid" / sha256_json(key)[:16], key, readonly=True)
    assert len(cache) == 4 and all(cache.get(i).shape == (14, 16) for i in cache.image_ids())
    assert len(block_boxes(64, 64, 32)) == 14
    ck = torch.load(out / "model_final.pt", weights_only=True)
    assert any(k.startswith("pyramid.block_head") for k in ck.get("model", ck))
