"""Filtering a source's raw predictions: per-class thresholds, NMS against a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from distill.errors import DistillError
from distill.labels.filtering import FilterOptions, filter_predictions, parse_class_thresh
from distill.vocab import load_vocab

VOCAB = "red square, blue circle, crimson square=red square, green cross"


def test_inline_vocab_prompt_mapping_and_class_thresh():
    v = load_vocab(VOCAB)
    assert v.names == ("red square", "blue circle", "green cross")
    assert v.prompts[0] == ("red square", "crimson square")
    t = parse_class_thresh(["crimson square=0.5", "green cross=0.25,blue circle=1"], v)
    assert t == ((0, 0.5), (1, 1.0), (2, 0.25))
    with pytest.raises(DistillError, match="label.class_thresh: class 'pink star' is not in the vocabulary"):
        parse_class_thresh(["pink star=0.5"], v)
    with pytest.raises(DistillError, match="expected 'class name=threshold'"):
        parse_class_thresh(["red square"], v)
    with pytest.raises(DistillError, match=r"must be in \[0, 1\]"):
        parse_class_thresh(["red square=3"], v)


def _nms_reference(boxes, scores, labels, thr):
    """Brute-force class-wise greedy NMS (independent of torchvision)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for j in keep:
            if labels[i] != labels[j]:
                continue
            a, b = boxes[i], boxes[j]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_filter_predictions_matches_bruteforce():
    g = torch.Generator().manual_seed(1)
    n = 60
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 20 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    opts = FilterOptions(score_thresh=0.2, class_thresh=((1, 0.6),), top_k=7, nms=0.3, min_area=40.0)
    out = filter_predictions({"boxes": boxes, "scores": scores, "labels": labels}, opts, 3)
    b, s, lab = boxes.tolist(), scores.tolist(), labels.tolist()
    cand = [i for i in range(n) if s[i] >= (0.6 if lab[i] == 1 else 0.2) and (b[i][2] - b[i][0]) * (b[i][3] - b[i][1]) >= 40.0]
    keep = _nms_reference([b[i] for i in cand], [s[i] for i in cand], [lab[i] for i in cand], 0.3)
    ref = [cand[k] for k in keep][:7]
    assert len(ref) == 7 and out["scores"].tolist() == [s[i] for i in ref]
    assert torch.equal(out["boxes"], boxes[ref]) and out["labels"].tolist() == [lab[i] for i in ref]
    # Mask areas replace box areas when masks are given.
    masks = torch.zeros(n, 8, 8, dtype=torch.bool)
    masks[:5, :2, :2] = True  # area 4
    masks[5:, :7, :7] = True  # area 49
    out = filter_predictions({"boxes": boxes, "scores": scores, "labels": labels, "masks": masks},
                             FilterOptions(score_thresh=0.0, top_k=0, nms=0.0, min_area=10.0), 3)
    assert len(out["scores"]) == n - 5 and out["masks"].shape == (n - 5, 8, 8)
