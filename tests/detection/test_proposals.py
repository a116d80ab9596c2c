"""Proposal files (hash, round trip, bad files) and proposal recall against a brute-force loop."""

from __future__ import annotations

import pytest
import torch

from distill.detection.proposals import load_proposals, proposal_recall, save_proposals
from distill.errors import DistillError


def test_save_load_roundtrip_and_hash(tmp_path):
    g = torch.Generator().manual_seed(0)
    boxes = [torch.rand(5, 4, generator=g) * 50, torch.zeros(0, 4), torch.rand(2, 4, generator=g) * 50]
    scores = [torch.rand(len(b), generator=g) for b in boxes]
    h1 = save_proposals(tmp_path / "p.safetensors", [7, 8, 9], boxes, scores)
    got, h = load_proposals(tmp_path / "p.safetensors")
    assert h == h1 and sorted(got) == [7, 8, 9]
    for iid, b, s in zip([7, 8, 9], boxes, scores):
        torch.testing.assert_close(got[iid][0], b)
        torch.testing.assert_close(got[iid][1], s)
    boxes[0][0, 0] += 1.0  # any change in the boxes changes the hash (keys the region cache)
    assert save_proposals(tmp_path / "q.safetensors", [7, 8, 9], boxes, scores) != h1
    with pytest.raises(DistillError, match="run `distill propose"):
        load_proposals(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(DistillError, match="not a readable proposals file"):
        load_proposals(tmp_path / "bad.safetensors")


def _iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_recall_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    props, gts, novel = [], [], []
    for _ in range(6):
        xy = torch.rand(12, 2, generator=g) * 80
        props.append(torch.cat([xy, xy + 5 + torch.rand(12, 2, generator=g) * 40], 1))
        gxy = torch.rand(4, 2, generator=g) * 80
        gts.append(torch.cat([gxy, gxy + 5 + torch.rand(4, 2, generator=g) * 40], 1))
        novel.append(torch.rand(4, generator=g) > 0.5)
    k = 7
    got = proposal_recall(props, gts, novel, k)
    hits = {"base": [0, 0], "novel": [0, 0]}
    for p, gt, nv in zip(props, gts, novel):
        for j in range(len(gt)):
            covered = any(_iou(gt[j].tolist(), p[i].tolist()) >= 0.5 for i in range(min(k, len(p))))
            key = "novel" if nv[j] else "base"
            hits[key][0] += int(covered)
            hits[key][1] += 1
    for key in ("base", "novel"):
        assert got[f"recall@{k}/{key}"] == pytest.approx(hits[key][0] / hits[key][1])
    assert got[f"recall@{k}/all"] == pytest.approx((hits["base"][0] + hits["novel"][0]) / 24)
    assert 0 < got[f"recall@{k}/all"] < 1
