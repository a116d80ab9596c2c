"""RoIAlign split over threads == torchvision's one-thread kernel: the pooled features bit for bit,
the feature-map gradient up to float summation order; the multi-scale pooler matches
torchvision's MultiScaleRoIAlign at every level."""

from __future__ import annotations

import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

from distill.detection.roi_pool import ThreadedMultiScaleRoIAlign, roi_align


def _rois(g, n, B, size, max_side=60):
    xy = torch.rand(n, 2, generator=g) * (size - 20)
    wh = 4 + torch.rand(n, 2, generator=g) * max_side
    return torch.cat([torch.randint(B, (n, 1), generator=g).float(), xy, xy + wh], 1)


def test_split_roi_align_equals_torchvision_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 16, 16, generator=g)
    rois = _rois(g, 37, 3, 128)
    w = torch.randn(37, 8, 7, 7, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run on one thread (conftest); the split needs >= 2
    try:
        a = x.clone().requires_grad_()
        ours = roi_align(a, rois, (7, 7), 1 / 8, 2, False)
        (ours * w).sum().backward()
    finally:
        torch.set_num_threads(old)
    b = x.clone().requires_grad_()
    ref = tv_roi_align(b, rois, (7, 7), 1 / 8, 2, False)
    (ref * w).sum().backward()
    assert torch.equal(ours, ref)
    # each feature cell's gradient is a sum of up to a few hundred products of O(1) terms, added
    # in another order: fp32 rounding (~6e-8 relative per add) stays far below 1e-5 of the scale
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5 * float(b.grad.abs().max()))


def test_threaded_multiscale_pooler_equals_torchvision():
    g = torch.Generator().manual_seed(1)
    feats = {"0": torch.randn(2, 4, 32, 32, generator=g), "1": torch.randn(2, 4, 16, 16, generator=g), "2": torch.randn(2, 4, 8, 8, generator=g)}
    boxes = [_rois(g, 40, 1, 256, max_side=400)[:, 1:].clamp(max=255) for _ in range(2)]
    shapes = [(256, 256), (256, 256)]
    tv = MultiScaleRoIAlign(["0", "1", "2"], 7, 2)
    ref = tv(feats, boxes, shapes)
    assert len(set(tv.map_levels(boxes).tolist())) >= 2  # RoIs pooled from more than one level
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours = ThreadedMultiScaleRoIAlign(["0", "1", "2"], 7, 2)(feats, boxes, shapes)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(ours, ref)
