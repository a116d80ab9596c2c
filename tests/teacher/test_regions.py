"""Region embeddings: crop mode against a brute-force loop of single crops, dense mode against
mean pooling, bad boxes clipped / skipped and counted."""

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.teacher import build_random_teacher
from distill.teacher.dense import patch_embeddings
from distill.teacher.regions import crop_and_resize, region_embeddings, scale_boxes


@pytest.fixture(scope="module")
def teacher():
    return build_random_teacher(seed=3)


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 48, 64, generator=g), torch.rand(3, 40, 40, generator=g)]


def _crop_reference(img, box, size):
    """Independent reference: bilinear sampling at the centres of a size x size grid over the box
    (pixel centres at integer + 0.5), edge pixels replicated -- i.e. crop then bilinear resize."""
    x1, y1, x2, y2 = [float(v) for v in box]
    H, W = img.shape[1:]
    xs = x1 + (torch.arange(size, dtype=torch.float64) + 0.5) * (x2 - x1) / size
    ys = y1 + (torch.arange(size, dtype=torch.float64) + 0.5) * (y2 - y1) / size
    gx = (xs / W) * 2 - 1  # grid_sample, align_corners=False: -1..1 spans pixel edges
    gy = (ys / H) * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    return F.grid_sample(img[None].double(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0].float()


def test_roi_align_equals_crop_then_resize():
    img = torch.rand(3, 30, 40)
    # integer box: literally crop and resize with F.interpolate
    crop = F.interpolate(img[None, :, 5:25, 8:33], size=(16, 16), mode="bilinear", align_corners=False)[0]
    got = crop_and_resize(img[None], torch.tensor([[0, 8.0, 5.0, 33.0, 25.0]]), 16)[0]
    assert torch.allclose(got, crop, atol=1e-5)
    # fractional box against grid_sample
    box = torch.tensor([3.3, 2.7, 37.9, 29.4])
    got = crop_and_resize(img[None], torch.cat([torch.zeros(1), box])[None], 16)[0]
    assert torch.allclose(got, _crop_reference(img, box, 16), atol=1e-5)


def test_crop_mode_equals_bruteforce_loop(teacher):
    images = _images()
    boxes = [
        torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.5, 4.25, 60.0, 20.75], [0.0, 0.0, 64.0, 48.0]]),
        torch.tensor([[5.0, 5.0, 35.0, 22.0]]),
    ]
    got = region_embeddings(teacher, images, boxes, mode="crop", batch_size=2)
    for img, bxs, emb in zip(images, boxes, got):
        H, W = img.shape[1:]
        for b, e in zip(bxs, emb):
            acc = 0
            for s in (1.0, 1.5):
                sb = scale_boxes(b[None], s, H, W)[0]
                crop = _crop_reference(img, sb, teacher.image_size)
                acc = acc + teacher.encode_images(crop[None])[0]
            ref = F.normalize(acc, dim=-1)
            assert torch.allclose(e, ref, atol=1e-5), (e - ref).abs().max()
    assert all(torch.allclose(e.norm(dim=-1), torch.ones(len(e))) for e in got)


def test_crop_mode_integer_box_matches_literal_crop(teacher):
    img = _images()[0]
    box = torch.tensor([[8.0, 6.0, 40.0, 38.0]])
    got = region_embeddings(teacher, [img], [box], scales=(1.0,))[0][0]
    crop = F.interpolate(img[None, :, 6:38, 8:40], size=(teacher.image_size,) * 2, mode="bilinear", align_corners=False)
    ref = teacher.encode_images(crop)[0]
    assert torch.allclose(got, ref, atol=1e-5)


def test_bad_boxes_clipped_and_skipped(teacher):
    img = _images()[1]  # 40 x 40
    boxes = torch.tensor([[-10.0, -5.0, 20.0, 30.0], [10.0, 10.0, 10.0, 30.0], [50.0, 50.0, 60.0, 60.0], [float("nan"), 0, 5, 5], [0.0, 0.0, 20.0, 30.0]])
    (emb,), info = region_embeddings(teacher, [img], [boxes], return_info=True)
    assert info["num_skipped"] == 3 and info["num_clipped"] == 1
    assert info["valid"][0].tolist() == [True, False, False, False, True]
    assert torch.isfinite(emb).all()
    assert torch.equal(emb[1:4], torch.zeros(3, teacher.embed_dim))
    # the clipped box equals its in-image version
    assert torch.allclose(emb[0], emb[4], atol=1e-6)
    # no boxes at all
    out = region_embeddings(teacher, [img], [torch.zeros(0, 4)])
    assert out[0].shape == (0, teacher.embed_dim)


def test_dense_whole_image_box_is_mean_pool(teacher):
    images = [torch.rand(3, 48, 64), torch.rand(3, 40, 40)]
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 48.0], [0.0, 0.0, 32.0, 24.0]]), torch.tensor([[0.0, 0.0, 40.0, 40.0]])]
    got = region_embeddings(teacher, images, boxes, mode="dense")
    for img, e in zip(images, got):
        fmap = patch_embeddings(teacher, img[None])[0]  # (D, h, w)
        ref = F.normalize(fmap.mean(dim=(1, 2)), dim=0)
        assert torch.allclose(e[0], ref, atol=1e-5)
    # top-left quarter box = mean of the top-left quarter of the map
    fmap = patch_embeddings(teacher, images[0][None])[0]
    h, w = fmap.shape[1:]
    ref = F.normalize(fmap[:, : h // 2, : w // 2].mean(dim=(1, 2)), dim=0)
    assert torch.allclose(got[0][1], ref, atol=1e-5)


def test_bad_mode_and_shapes(teacher):
    with pytest.raises(DistillError, match="regions.mode"):
        region_embeddings(teacher, [torch.rand(3, 8, 8)], [torch.zeros(0, 4)], mode="pixels")
    with pytest.raises(DistillError, match="2 images but 1"):
        region_embeddings(teacher, [torch.rand(3, 8, 8)] * 2, [torch.zeros(0, 4)])
