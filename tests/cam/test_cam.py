"""CLIP-ES CAMs (distill/cam/) on random tiny teachers, against independent references:
pytorch_grad_cam's GradCAM on open_clip's own forward, a per-image loop for the batched path, a
hand-written attention / repo-style CAA loop, and numbers computed by hand."""

import dataclasses
import json
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.config import load_config
from distill.errors import DistillError
from distill.ablate import cam as cam_ablate
from distill.cam import caa
from distill.cam import gradcam
from distill.cam import refine
from distill.cam import run as cam_run
from distill.teacher import build_random_teacher
from distill.vocab import Vocabulary


@pytest.fixture(scope="module")
def teacher():
    # 3 blocks, patch 8, native 32 px (4x4 tokens); dense 64 px (8x8 tokens)
    return build_random_teacher(embed_dim=32, image_size=32, patch=8, width=32, layers=3, heads=2, seed=1,
                                dense_image_size=64)


def _text(n, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


class OpenClipLogits(torch.nn.Module):
    """Independent reference model: open_clip's own encode_image (class-token pooling), cosine x scale."""

    def __init__(self, teacher, text, scale, softmax):
        super().__init__()
        self.clip = teacher.model  # a submodule: pytorch_grad_cam reads the device from its parameters
        self.t, self.text, self.scale, self.softmax = teacher, text, scale, softmax

    def forward(self, x):
        f = F.normalize(self.clip.encode_image(self.t.normalize(x)), dim=-1)
        logits = self.scale * f @ self.text.T
        return logits.softmax(-1) if self.softmax else logits


def _library_gradcam(teacher, image, text, targets, scale, softmax):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    g = image.shape[-1] // teacher.patch_size

    def reshape(t):
        return t[:, 1:].reshape(t.shape[0], g, g, t.shape[-1]).permute(0, 3, 1, 2)

    model = OpenClipLogits(teacher, text, scale, softmax)
    x = image[None].clone().requires_grad_(True)
    with GradCAM(model=model, target_layers=[teacher.model.visual.transformer.resblocks[-1].ln_1],
                 reshape_transform=reshape) as cam:
        return np.stack([cam(input_tensor=x, targets=[ClassifierOutputTarget(t)])[0] for t in targets])


def _renorm(maps):
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    return maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))


@pytest.mark.parametrize("softmax", [False, True])
def test_batched_gradcam_equals_pytorch_grad_cam(teacher, softmax):
    """Our one-backward batched Grad-CAM == pytorch_grad_cam.GradCAM run per class on open_clip's
    own forward (same layer resblocks[-1].ln_1), to 1e-5, at the teacher's native size."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    text, bg = _text(6), _text(3, seed=1)
    labels = [[0, 2, 5], [1, 4]]
    scale = 10.0  # 100 saturates the softmax of a random teacher (gradients ~1e-20: float noise)
    tokens, _, grid = gradcam.trunk_tokens(teacher, images)
    out = gradcam.last_block_gradcam(teacher, tokens, grid, labels, text, bg, softmax=softmax, logit_scale=scale, pool="model")
    r = 0
    for b, ks in enumerate(labels):
        if softmax:  # targets: the present classes' softmax scores over [present classes, background]
            ref = _library_gradcam(teacher, images[b], torch.cat([text[ks], bg]), list(range(len(ks))), scale, True)
        else:
            ref = _library_gradcam(teacher, images[b], text, ks, scale, False)
        mine = _renorm(refine.upsample_cams(out.cams[r : r + len(ks)].numpy(), (32, 32)))
        assert ref.shape == mine.shape == (len(ks), 32, 32)
        assert np.abs(ref - mine).max() < 1e-5
        assert ref.std() > 0.05  # a real map, not a constant
        r += len(ks)


class _RawGradCAM:
    """pytorch_grad_cam's GradCAM that also keeps each map as the library computes it, ReLU'd on the
    token grid, before its ``scale_cam_image`` (whose absolute 1e-7 epsilon flattens tiny maps)."""

    def __new__(cls, **kw):
        from pytorch_grad_cam import GradCAM

        class Raw(GradCAM):
            def get_cam_image(self, *a, **k):
                cam = super().get_cam_image(*a, **k)
                self.raw = np.maximum(cam, 0)
                return cam

        return Raw(**kw)


@pytest.mark.parametrize("pool", ["model", "mean"])
@pytest.mark.parametrize("softmax", [True, False])
def test_gradcam_at_production_scale_equals_pytorch_grad_cam_scale_free(teacher, softmax, pool):
    """At CLIP's logit scale 100 (production; CLIP-ES's softmax Grad-CAM) the softmax saturates and
    maps fall far below 1e-7 (here down to ~1e-15): pytorch_grad_cam's own output (its absolute
    1e-7 epsilon, applied twice) returns the smallest flattened (max 0.09 for a 1e-15 map), the
    regime of the bug fixed in 0376047. Our maps, normalised by
    ``normalize_cam``, must equal the library's raw maps normalised scale-free (min-max in float64,
    computed here) to 1e-5 (2.4e-6 seen), every map, however small. ``pool=model``: the library runs
    open_clip's own encode_image; ``pool=mean`` (the shapes configs' pooling): our ClipLogits forward
    (all blocks, no class-token shortcut)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    text, bg = _text(6), _text(3, seed=1)
    labels = [[0, 2, 5], [1, 4]]
    scale = 100.0
    tokens, _, grid = gradcam.trunk_tokens(teacher, images)
    out = gradcam.last_block_gradcam(teacher, tokens, grid, labels, text, bg, softmax=softmax, logit_scale=scale, pool=pool)
    reshape = gradcam.vit_reshape_transform(grid)
    layer = teacher.model.visual.transformer.resblocks[-1].ln_1
    raw_max, lib_max, r = [], [], 0
    for b, ks in enumerate(labels):
        t_emb, targets = (torch.cat([text[ks], bg]), list(range(len(ks)))) if softmax else (text, list(ks))
        model = OpenClipLogits(teacher, t_emb, scale, softmax) if pool == "model" else gradcam.ClipLogits(teacher, t_emb, logit_scale=scale, pool=pool, softmax=softmax)
        x = images[b][None].clone().requires_grad_(True)
        raws, libs = [], []
        with _RawGradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            for t in targets:
                libs.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(t)])[0])
                raws.append(cam.raw[0].astype(np.float64))
        raw = np.stack(raws)
        ref = raw - raw.min(axis=(1, 2), keepdims=True)
        ref = ref / ref.max(axis=(1, 2), keepdims=True)
        mine = out.cams[r : r + len(ks)].double().numpy()
        assert mine.shape == ref.shape == (len(ks), 4, 4)
        assert np.abs(mine - ref).max() < 1e-5, (b, np.abs(mine - ref).max(), raw.max(axis=(1, 2)))
        assert ref.std() > 0.05  # real maps, not constants
        raw_max += raw.max(axis=(1, 2)).tolist()
        lib_max += np.stack(libs).max(axis=(1, 2)).tolist()
        r += len(ks)
    if softmax:  # the regime: a map so far below the library's epsilon that its own output flattens it
        tiny = [i for i, m in enumerate(raw_max) if m < 1e-13]
        assert tiny and all(lib_max[i] < 0.5 for i in tiny), (raw_max, lib_max)
        assert np.allclose(out.cams.flatten(1).max(1).values.numpy(), 1.0)  # ours keep full scale


def test_class_token_shortcut_equals_full_last_block(teacher, monkeypatch):
    """With class-token pooling the last block runs at the class token only; CAMs, scores and the
    last block's attention (CAA's input) equal those of the full block."""
    torch.manual_seed(4)
    images = torch.rand(3, 3, 48, 48)
    text, bg = _text(5), _text(3, seed=2)
    labels = [[0, 4], [], [1, 2, 3]]
    tokens, _, grid = gradcam.trunk_tokens(teacher, images)
    assert gradcam._class_token_only(gradcam._visual(teacher), gradcam._blocks(gradcam._visual(teacher))[-1])
    fast = gradcam.last_block_gradcam(teacher, tokens, grid, labels, text, bg, logit_scale=10.0, pool="model")
    monkeypatch.setattr(gradcam, "_class_token_only", lambda visual, blk: False)
    full = gradcam.last_block_gradcam(teacher, tokens, grid, labels, text, bg, logit_scale=10.0, pool="model")
    assert fast.attn_last.shape == full.attn_last.shape == (2, 37, 37)
    for a, b in ((fast.cams, full.cams), (fast.scores, full.scores), (fast.attn_last, full.attn_last)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert full.cams.std() > 0.05


def test_plain_path_wrapper_equals_library_at_dense_size(teacher):
    """pytorch_gradcam (library GradCAM + our ViT reshape_transform, interpolated positions) equals the
    batched path at a non-square, non-native size; and ClipLogits(pool=model) at the native size
    equals open_clip's encode_image."""
    torch.manual_seed(1)
    img = torch.rand(3, 48, 64)
    text = _text(4)
    tokens, _, grid = gradcam.trunk_tokens(teacher, img[None])
    assert grid == (6, 8)
    out = gradcam.last_block_gradcam(teacher, tokens, grid, [[0, 3]], text, None, softmax=False, logit_scale=100.0)
    ref = gradcam.pytorch_gradcam(teacher, img, text, [0, 3], logit_scale=100.0)
    mine = _renorm(refine.upsample_cams(out.cams.numpy(), (48, 64)))
    assert np.abs(ref - mine).max() < 1e-5
    x = torch.rand(2, 3, 32, 32)
    model = gradcam.ClipLogits(teacher, text, logit_scale=100.0, pool="model")
    want = 100.0 * teacher.encode_images(x) @ text.T
    torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-5)


def test_batched_equals_per_image_loop(teacher):
    """Images batched with different label counts (one empty) == one image at a time."""
    torch.manual_seed(2)
    images = torch.rand(3, 3, 64, 64)
    text, bg = _text(5), _text(4, seed=3)
    labels = [[1, 3], [], [0, 2, 4]]
    batched = cam_run.clip_es_cams(teacher, images, labels, text, bg, with_plain=True)
    for b in range(3):
        single = cam_run.clip_es_cams(teacher, images[b : b + 1], [labels[b]], text, bg, with_plain=True)[0]
        assert batched[b].labels == labels[b]
        for a, s in ((batched[b].gradcam, single.gradcam), (batched[b].refined, single.refined), (batched[b].plain, single.plain)):
            assert a.shape == (len(labels[b]), 8, 8)
            # CAMs are max-normalised to [0, 1]; a batch changes the GEMM blocking, and fp32
            # rounding (~1e-7) passes through the logit scale 100 and the softmax, so ~1e-5 per
            # element is expected (1.7e-5 seen on one CPU). 1e-4 is 1/40 of a saved 8-bit CAM step.
            torch.testing.assert_close(a, s, atol=1e-4, rtol=0)


def test_attention_recorder_matches_manual_softmax(teacher):
    """Recorded head-averaged attention == softmax(q k^T / sqrt(d)) from in_proj, by hand."""
    torch.manual_seed(3)
    images = torch.rand(2, 3, 64, 64)
    tokens, attn, grid = gradcam.trunk_tokens(teacher, images)
    assert len(attn) == 2 and attn[0].shape == (2, 65, 65)
    vis = teacher.model.visual
    x, _ = gradcam.embed_tokens(vis, teacher.normalize(images))
    blk = vis.transformer.resblocks[0]
    y = blk.ln_1(x)
    W, bias = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    q, k, _ = (y @ W.T + bias).chunk(3, dim=-1)
    H = blk.attn.num_heads
    d = q.shape[-1] // H
    q = q.reshape(2, 65, H, d).transpose(1, 2)
    k = k.reshape(2, 65, H, d).transpose(1, 2)
    a = ((q @ k.transpose(-1, -2)) / d**0.5).softmax(-1).mean(1)
    torch.testing.assert_close(attn[0], a, atol=1e-5, rtol=1e-4)
    # the hooks are gone afterwards
    assert not blk.attn._forward_pre_hooks and not blk.attn._forward_hooks


def _repo_caa(cam, attn_list, thr=0.4):
    """The repo's loop (generate_cams_voc12.py), written out in numpy for one class."""
    aw = np.mean(np.stack([a[1:, 1:] for a in attn_list[-8:]]), 0)
    t = aw / aw.sum(0, keepdims=True)
    t = t / t.sum(1, keepdims=True)
    for _ in range(2):
        t = t / t.sum(0, keepdims=True)
        t = t / t.sum(1, keepdims=True)
    t = (t + t.T) / 2
    t = t @ t
    h, w = cam.shape
    m = np.zeros((h, w), np.float32)
    for x0, y0, x1, y1 in caa.scoremap_boxes(cam, thr):
        m[y0:y1, x0:x1] = 1
    t = t * m.reshape(1, -1)
    return (t @ cam.reshape(-1, 1)).reshape(h, w)


def test_caa_equals_repo_loop():
    rng = np.random.default_rng(0)
    n_blocks, hw = 10, (5, 6)
    N = hw[0] * hw[1]
    attn = [torch.from_numpy(rng.dirichlet(np.ones(N + 1), N + 1).astype(np.float64)) for _ in range(n_blocks)]
    cams = torch.from_numpy(rng.random((3, *hw)))
    aff = caa.attention_affinity(attn, 8)
    assert torch.allclose(aff, aff.T)
    got = caa.refine_cams(cams, aff.double(), 0.4)
    for k in range(3):
        want = _repo_caa(cams[k].numpy(), [a.numpy() for a in attn])
        np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-5, atol=1e-7)


def test_scoremap_boxes_by_hand():
    cam = np.zeros((10, 12), np.float32)
    cam[1:4, 2:6] = 1.0  # box x 2..5, y 1..3 -> (2, 1, 6, 4)
    cam[6:9, 8:12] = 0.5  # touches the right border: x1 clipped to width - 1 = 11 (repo quirk)
    cam[5, 0] = 0.3  # below 0.4 * max: no box
    boxes = sorted(caa.scoremap_boxes(cam, 0.4))
    assert boxes == [(2, 1, 6, 4), (8, 6, 11, 9)]
    m = caa.box_mask(cam, 0.4)
    assert m.sum() == 4 * 3 + 3 * 3
    assert caa.scoremap_boxes(np.zeros((4, 4), np.float32)) == [(0, 0, 0, 0)]


def test_normalize_cam_is_scale_free():
    # A saturated softmax (class probability ~1) gives Grad-CAM gradients, hence maps, far below
    # pytorch_grad_cam's absolute 1e-7 epsilon; the map's shape must survive normalisation, or
    # CAA's 0.4 box (an 8-bit threshold) is empty and the class disappears.
    cam = torch.zeros(2, 6, 6)
    cam[0, 1:3, 2:5] = 3e-11
    cam[0, 4, 4] = 1e-11
    cam[1, 2:4, 2:4] = 5.0
    out = gradcam.normalize_cam(cam)
    torch.testing.assert_close(out, cam / cam.flatten(1).max(1).values[:, None, None])
    assert caa.scoremap_boxes(out[0].numpy(), 0.4) == [(2, 1, 5, 3)]
    assert float(gradcam.normalize_cam(torch.zeros(1, 3, 3)).abs().max()) == 0.0  # all-zero stays zero
    up = refine.upsample_cams(cam[:1].numpy(), (12, 12))
    assert abs(float(up.max()) - 1.0) < 1e-6


def test_cams_to_mask_numbers():
    cams = np.array([[[0.9, 0.1, 0.5, 0.02]], [[0.2, 0.7, 0.5, 0.01]]], np.float32)  # (2, 1, 4)
    mask, conf = refine.cams_to_mask(cams, [7, 3])
    # bg = 1 - max: [0.1, 0.3, 0.5, 0.98] -> argmax over [bg, 7, 3]
    assert mask.tolist() == [[7, 3, 0, 0]]  # ties go to the first (bg) as numpy argmax does
    np.testing.assert_allclose(conf[0], [0.9 / 1.2, 0.7 / 1.1, 0.5 / 1.5, 0.98 / 1.01], rtol=1e-6)
    mask, _ = refine.cams_to_mask(cams, [7, 3], conf_thresh=0.95)
    assert mask.tolist() == [[255, 255, 255, 0]]
    mask, conf = refine.cams_to_mask(cams, [7, 3], conf_thresh=0.95, conf_source="score")  # winning score itself
    assert mask.tolist() == [[255, 255, 255, 0]] and conf[0].tolist() == pytest.approx([0.9, 0.7, 0.5, 0.98])
    mask, _ = refine.cams_to_mask(cams, [7, 3], conf_thresh=0.85, conf_source="score")
    assert mask.tolist() == [[7, 255, 255, 0]]
    mask, _ = refine.cams_to_mask(cams, [7, 3], bg_thresh=0.6)
    assert mask.tolist() == [[7, 3, 0, 0]]
    mask, _ = refine.cams_to_mask(cams, [7, 3], bg_power=2.0)  # bg = (1 - max)^2 = [.01, .09, .25, .96]
    assert mask.tolist() == [[7, 3, 7, 0]]
    empty, _ = refine.cams_to_mask(np.zeros((0, 2, 3), np.float32), [])
    assert empty.shape == (2, 3) and empty.max() == 0


def test_crf_without_package_is_a_clear_error(monkeypatch):
    # hide pydensecrf2 when it is installed (make installs the crf extra): imports of it then fail
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    assert not refine.crf_available()
    with pytest.raises(DistillError, match=r"pip install 'distill\[crf\]'"):
        refine.cams_to_mask(np.ones((1, 4, 4), np.float32), [1], crf=True, image=np.zeros((4, 4, 3), np.uint8))


@pytest.mark.skipif(not refine.crf_available(), reason="needs pydensecrf2 (the crf extra)")
def test_crf_snaps_scores_to_colour_edges():
    # a red square on gray; the class score is a blurry blob shifted off the square: the dense CRF
    # (the repo's parameters) pulls the mask back onto the square's edges
    img = np.full((32, 32, 3), 128, np.uint8)
    img[8:24, 8:24] = (220, 30, 30)
    yy, xx = np.mgrid[:32, :32]
    cam = np.exp(-((yy - 18.0) ** 2 + (xx - 18.0) ** 2) / (2 * 7.0**2)).astype(np.float32)[None]
    square = np.zeros((32, 32), bool)
    square[8:24, 8:24] = True

    def iou(m):
        return (m & square).sum() / (m | square).sum()

    plain, _ = refine.cams_to_mask(cam, [5])
    crf, conf = refine.cams_to_mask(cam, [5], crf=True, image=img)
    assert iou(crf == 5) > iou(plain == 5) + 0.1 and iou(crf == 5) > 0.9
    assert conf.min() >= 0.0 and conf.max() <= 1.0 + 1e-6


def test_resize_for_teacher_sizes():
    img = np.zeros((37, 50, 3), np.uint8)
    assert cam_run.resize_for_teacher(img, 64, 8, "square").shape == (3, 64, 64)
    assert cam_run.resize_for_teacher(img, 0, 16, "patch_multiple").shape == (3, 48, 64)  # ceil(37/16)*16, ceil(50/16)*16
    assert cam_run.resize_for_teacher(img, 100, 16, "patch_multiple").shape == (3, 80, 112)  # 74 -> 80, 100 -> 112
    with pytest.raises(DistillError, match="multiple of the patch size"):
        cam_run.resize_for_teacher(img, 60, 8, "square")


def _vocab():
    return Vocabulary(names=("red star", "blue circle", "green cross"), ids=(4, 9, 13))


def test_read_image_labels(tmp_path):
    p = tmp_path / "labels.json"
    p.write_text(json.dumps([
        {"image_id": 1, "file_name": "a/1.png", "category_ids": [13, 4, 4]},
        {"image_id": 2, "file_name": "a/2.png", "categories": ["Blue Circle"]},
        {"image_id": 3, "file_name": "a/3.png", "category_ids": []},
    ]))
    e = cam_run.read_image_labels(p, _vocab())
    assert [x.labels for x in e] == [[0, 2], [1], []]
    p.write_text(json.dumps([{"image_id": 1, "file_name": "a/1.png", "category_ids": [5]}]))
    with pytest.raises(DistillError, match=r"labels.json: entry 0 .*unknown category id 5"):
        cam_run.read_image_labels(p, _vocab())
    p.write_text(json.dumps([{"image_id": 1, "file_name": "a/1.png", "categories": ["pink star"]}]))
    with pytest.raises(DistillError, match="unknown class 'pink star'"):
        cam_run.read_image_labels(p, _vocab())


def _tiny_world(tmp_path, sizes=((40, 56), (64, 64), (37, 50), (48, 48))):
    """Images (sizes not multiples of the patch), labels (one image without labels) and GT PNGs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    entries = []
    for i, (h, w) in enumerate(sizes):
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        gt = np.zeros((h, w), np.uint8)
        gt[h // 4 : h // 2, w // 4 : w // 2] = 4
        gt[h // 2 :, w // 2 :] = 13
        img[gt == 4] = (220, 20, 20)
        img[gt == 13] = (20, 200, 20)
        (root / "images" / "val").mkdir(parents=True, exist_ok=True)
        (root / "semantic" / "val").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / "val" / f"{i + 1:06d}.png"), img[..., ::-1])
        cv2.imwrite(str(root / "semantic" / "val" / f"{i + 1:06d}.png"), gt)
        entries.append({"image_id": i + 1, "file_name": f"val/{i + 1:06d}.png", "category_ids": [] if i == 2 else [4, 13]})
    (root / "image_labels_val.json").write_text(json.dumps(entries))
    (root / "vocab.txt").write_text("red star\nblue circle\ngreen cross\n")
    (tmp_path / "bg.txt").write_text("# words\nstripes\nnoise\n")
    return root


def _cfg(tmp_path, root, *extra, config=None):
    vocab = json.dumps([{"id": 4, "name": "red star", "split": "base"}, {"id": 9, "name": "blue circle", "split": "novel"},
                        {"id": 13, "name": "green cross", "split": "base"}])
    (root / "vocab.json").write_text(vocab)
    return load_config(config, [
        f"work_dir={tmp_path}/run", f"data.image_root={root}/images", f"data.semantic_root={root}/semantic",
        f"data.image_labels={root}/image_labels_{{split}}.json", f"data.vocab={root}/vocab.json",
        f"cam.background={tmp_path}/bg.txt", "cam.batch_size=2", "teacher.templates=", *extra,
    ])


def test_run_cam_outputs(tmp_path, teacher):
    root = _tiny_world(tmp_path)
    cfg = _cfg(tmp_path, root, "cam.num_panels=1", "cam.image_size=64")
    s = cam_run.run_cam(cfg, "val", teacher=teacher)
    assert (s["images"], s["processed"], s["skipped_no_labels"], s["panels"]) == (4, 3, 1, 1)
    out = tmp_path / "run" / "cam"
    masks = sorted(p.name for p in (out / "masks" / "val").iterdir())
    assert masks == ["000001.png", "000002.png", "000004.png"]  # 000003 has no labels
    ign = tot = 0
    for name, (h, w) in zip(masks, [(40, 56), (64, 64), (48, 48)]):
        m = cv2.imread(str(out / "masks" / "val" / name), cv2.IMREAD_UNCHANGED)
        assert m.shape == (h, w) and m.dtype == np.uint8
        assert set(np.unique(m).tolist()) <= {0, 4, 13, 255}
        ign += int((m == 255).sum())
        tot += m.size
        z = np.load(out / "seeds" / "val" / name.replace(".png", ".npz"))
        assert z["category_ids"].tolist() == [4, 13]
        assert z["gradcam"].shape == z["refined"].shape == (2, 8, 8)
        assert z["size"].tolist() == [h, w]
    assert s["ignored_fraction"] == pytest.approx(ign / tot)
    assert (out / "panels" / "val" / "000001.png").stat().st_size > 1000
    assert json.loads((out / "summary_val.json").read_text())["processed"] == 3
    assert not list(out.rglob("*.tmp*"))


def test_voc_config_wiring(tmp_path, teacher):
    """configs/voc/clip_es.yaml loads; with its paths pointed at a fixture it runs end to end
    (patch_multiple resize, VOC's 25 background words, the repo's single template)."""
    cfg = load_config("configs/voc/clip_es.yaml")
    assert (cfg.teacher.model, cfg.cam.resize, cfg.cam.crf, cfg.cam.conf_thresh) == ("ViT-B-16-quickgelu", "patch_multiple", True, 0.95)
    assert len(cam_run.read_word_list(cfg.cam.background)) == 25
    assert cam_run.read_word_list(cfg.cam.background) == list(cam_run.CLIP_ES_VOC_BACKGROUND)
    root = _tiny_world(tmp_path)
    labels = [{"image_id": 1, "file_name": "000001.png", "category_ids": [15, 12]},
              {"image_id": 2, "file_name": "000002.png", "categories": ["bird"]}]
    (tmp_path / "voc_labels.json").write_text(json.dumps(labels))
    cfg = load_config("configs/voc/clip_es.yaml", [
        f"work_dir={tmp_path}/voc", f"data.image_root={root}/images", "cam.crf=false", "cam.num_panels=0",
        "cam.background=distill/prompts/background_voc.txt"])
    s = cam_run.run_cam(cfg, str(root / "images" / "val"), str(tmp_path / "voc_labels.json"), teacher=teacher)
    assert s["processed"] == 2
    m = cv2.imread(str(tmp_path / "voc" / "cam" / "masks" / "val" / "000001.png"), cv2.IMREAD_UNCHANGED)
    assert m.shape == (40, 56) and set(np.unique(m).tolist()) <= {0, 12, 15, 255}
    z = np.load(tmp_path / "voc" / "cam" / "seeds" / "val" / "000001.npz")
    assert z["gradcam"].shape == (2, 5, 7)  # 40x56 rounded up to 40x56 -> /8 (random teacher patch 8)
    if not refine.crf_available():
        with pytest.raises(DistillError, match="pydensecrf2"):
            cam_run.run_cam(load_config("configs/voc/clip_es.yaml", [f"work_dir={tmp_path}/voc2", f"data.image_root={root}/images"]),
                      str(root / "images" / "val"), str(tmp_path / "voc_labels.json"), teacher=teacher)


@pytest.mark.parametrize("caa", [True, False])
def test_ablation_rows_and_cross_check(tmp_path, teacher, caa):
    root = _tiny_world(tmp_path)
    # the ablation's CRF rows run whenever pydensecrf2 is installed; run_cam's masks follow cam.crf
    cfg = _cfg(tmp_path, root, "cam.num_panels=0", "cam.image_size=64", f"cam.caa={str(caa).lower()}",
               f"cam.crf={str(refine.crf_available()).lower()}")
    m = cam_ablate.cam_ablation(cfg, "val", teacher=teacher)
    steps = [r["step"] for r in m["rows"]]
    assert steps == list(cam_ablate.ABLATION_STEPS + cam_ablate.NO_CAA_STEPS)
    for r in m["rows"]:
        if r["step"].startswith("crf") and not refine.crf_available():
            assert r["miou"] is None and "n/a" in r["note"]
        else:
            assert 0.0 <= r["miou"] <= 1.0
    assert "| + CAA |" in m["table"] and "| softmax Grad-CAM + CRF + confidence ignore |" in m["table"]
    final = {r["step"]: r for r in m["rows"]}[m["cam/final_step"]]
    assert m["cam/final_step"] == ("conf_ignore" if caa else "conf_ignore_no_caa")
    assert m["cam/miou_final"] == final["miou"] and m["settings"]["caa"] is caa
    saved = json.loads((tmp_path / "run" / "cam" / "metrics.json").read_text())
    assert saved["rows"] == m["rows"]
    # the ablation's final step == the masks run_cam writes (same config): recompute mIoU by hand
    cam_run.run_cam(cfg, "val", teacher=teacher)
    inter = np.zeros(14)
    union = np.zeros(14)
    ign = tot = 0
    for i in (1, 2, 4):  # image 3 has no labels: the ablation predicts background everywhere
        mk = cv2.imread(str(tmp_path / "run" / "cam" / "masks" / "val" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        gt = cv2.imread(str(root / "semantic" / "val" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        keep = mk != 255
        ign += int((~keep).sum())
        tot += mk.size
        for c in (0, 4, 13):
            p, g = (mk == c) & keep, (gt == c) & keep
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    gt3 = cv2.imread(str(root / "semantic" / "val" / "000003.png"), cv2.IMREAD_UNCHANGED)
    tot += gt3.size
    for c in (0, 4, 13):
        g = gt3 == c
        inter[c] += g.sum() if c == 0 else 0
        union[c] += gt3.size if c == 0 else g.sum()
    valid = union > 0
    assert final["miou"] == pytest.approx((inter[valid] / union[valid]).mean(), abs=1e-6)
    assert final["ignored_fraction"] == pytest.approx(ign / tot)


def test_cli_unknown_class_exits_2(tmp_path, capsys):
    from distill.cli import main

    root = _tiny_world(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "file_name": "val/000001.png", "category_ids": [99]}]))
    rc = main(["cam", "configs/shapes/cam.yaml", f"data.image_root={root}/images", f"data.vocab={root}/vocab.txt",
               f"work_dir={tmp_path}/run", "--images", "val", "--labels", str(bad)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown category id 99" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# cam.tower: the CLIPSelf dense tower as the CAMs' image tower
# ---------------------------------------------------------------------------------------------


def _teacher_with_dense_tower():
    """The ``teacher`` fixture's architecture with ``dense_tower`` set to a perturbed, frozen copy
    of its own image tower (as :func:`distill.teacher.clip.attach_dense_tower` leaves it), and a
    reference teacher whose ``model.visual`` *is* (a copy of) that dense tower."""
    import copy
    import dataclasses

    t = build_random_teacher(embed_dim=32, image_size=32, patch=8, width=32, layers=3, heads=2, seed=1,
                             dense_image_size=64)
    dense = copy.deepcopy(t.model.visual)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    dense.eval().requires_grad_(False)
    t.dense_tower = dense
    ref_model = copy.deepcopy(t.model)
    ref_model.visual = copy.deepcopy(dense)
    ref = dataclasses.replace(t, model=ref_model, dense_tower=None)
    return t, ref


def test_cam_tower_errors(tmp_path, teacher):
    root = _tiny_world(tmp_path)
    assert teacher.dense_tower is None
    cfg = _cfg(tmp_path, root, "cam.num_panels=0", "cam.image_size=64", "cam.tower=dense_tower")
    with pytest.raises(DistillError, match=r"cam\.tower=dense_tower") as e:
        cam_run.teacher_for_cam(teacher, cfg)
    assert "\n" not in str(e.value)
    for entry in (cam_run.run_cam, cam_ablate.cam_ablation):  # both entry points refuse before computing anything
        with pytest.raises(DistillError, match=r"cam\.tower=dense_tower"):
            entry(cfg, "val", teacher=teacher)
    assert not (tmp_path / "run" / "cam" / "masks").exists()
    with pytest.raises(DistillError, match=r"cam\.tower: 'bogus' is not one of teacher, dense"):
        _cfg(tmp_path, root, "cam.num_panels=0", "cam.tower=bogus")  # refused when the config is read
    good = _cfg(tmp_path, root, "cam.num_panels=0")  # a Config built in code: refused where it is used
    bad = dataclasses.replace(good, cam=dataclasses.replace(good.cam, tower="bogus"))
    with pytest.raises(DistillError, match=r"cam\.tower: 'bogus'"):
        cam_run.teacher_for_cam(teacher, bad)
    for entry in (cam_run.run_cam, cam_ablate.cam_ablation):
        with pytest.raises(DistillError, match=r"cam\.tower: 'bogus'"):
            entry(bad, "val", teacher=teacher)
    # the default reads the teacher's own tower: the very same teacher object
    assert cam_run.teacher_for_cam(teacher, _cfg(tmp_path, root)) is teacher


def test_cam_tower_dense_swaps_only_the_image_tower(tmp_path):
    t, ref = _teacher_with_dense_tower()
    root = _tiny_world(tmp_path)
    cfg = _cfg(tmp_path, root, "cam.tower=dense_tower")
    dt = cam_run.teacher_for_cam(t, cfg)
    assert dt is not t and dt.model.visual is t.dense_tower and gradcam._visual(dt) is t.dense_tower
    assert t.model.visual is not t.dense_tower  # the teacher itself is untouched
    # text and logit scale: the original model's
    assert dt.model.logit_scale is t.model.logit_scale
    assert dt.model.encode_text.__self__ is t.model
    torch.testing.assert_close(dt.encode_text(["a red star", "noise"]), t.encode_text(["a red star", "noise"]))
    assert cam_run.teacher_for_cam(dt, cfg) is dt  # applying it twice changes nothing
    # CAMs through the dense tower == CAMs of a teacher whose own tower is the dense one, != the teacher's
    torch.manual_seed(5)
    images = torch.rand(2, 3, 64, 64)
    text, bg = _text(5), _text(3, seed=1)
    labels = [[0, 3], [1, 2, 4]]
    dense = cam_run.clip_es_cams(dt, images, labels, text, bg, logit_scale=10.0)
    want = cam_run.clip_es_cams(ref, images, labels, text, bg, logit_scale=10.0)
    own = cam_run.clip_es_cams(t, images, labels, text, bg, logit_scale=10.0)
    for d, w, o in zip(dense, want, own):
        torch.testing.assert_close(d.gradcam, w.gradcam, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(d.refined, w.refined, atol=1e-5, rtol=1e-4)
        assert (d.gradcam - o.gradcam).abs().max() > 0.05


def test_run_cam_reads_the_tower_cam_tower_names(tmp_path):
    """run_cam with cam.tower=dense_tower writes the seeds of the dense tower (those of a teacher whose
    own tower is that one, logit scale read from the model); cam.tower=teacher those of its own."""
    t, ref = _teacher_with_dense_tower()
    root = _tiny_world(tmp_path, sizes=((40, 56), (64, 64)))

    def seeds(name, tower, teacher):
        cfg = _cfg(tmp_path, root, "cam.num_panels=0", "cam.image_size=64", "cam.crf=false", "cam.logit_scale=0",
                   f"cam.tower={tower}", f"work_dir={tmp_path}/{name}")
        assert cfg.cam.out == f"{tmp_path}/{name}/cam"
        cam_run.run_cam(cfg, "val", teacher=teacher)
        return [np.load(tmp_path / name / "cam" / "seeds" / "val" / f"{i:06d}.npz")["gradcam"].astype(np.float32) for i in (1, 2)]

    dense = seeds("dense", "dense_tower", t)
    for d, r, o in zip(dense, seeds("ref", "teacher", ref), seeds("own", "teacher", t)):
        np.testing.assert_allclose(d, r, atol=2e-3)  # float16 seeds
        assert np.abs(d - o).max() > 0.05


def test_caa_power_is_the_number_of_affinity_factors():
    rng = np.random.default_rng(1)
    N = 12
    attn = [torch.from_numpy(rng.dirichlet(np.ones(N + 1), N + 1)) for _ in range(3)]
    one = caa.attention_affinity(attn, 8, power=1)
    assert torch.allclose(one, one.T)
    torch.testing.assert_close(caa.attention_affinity(attn, 8), one @ one)  # the repo's default: squared
    torch.testing.assert_close(caa.attention_affinity(attn, 8, power=3), one @ one @ one)


def test_caa_power_below_one_is_a_config_error():
    from distill.config import CamConfig

    with pytest.raises(DistillError, match="cam.caa_power"):
        cam_run._check_cfg(CamConfig(caa_power=0))


# linyq2117/CLIP-ES clip_text.py, new_class_names (VOC order), copied verbatim: what
# generate_cams_voc12.py embeds, each string whole in 'a clean origami {}.'
CLIP_ES_VOC_PROMPTS = (
    'aeroplane', 'bicycle', 'bird avian', 'boat', 'bottle',
    'bus', 'car', 'cat', 'chair seat', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person with clothes,people,human',
    'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor screen',
)
CLIP_ES_VOC_NAMES = (  # clip_text.py class_names
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor',
)


def test_voc_prompts_are_the_repos_strings(teacher, monkeypatch):
    """configs/voc/clip_es.yaml: one renamed prompt per class, the repo's exact string, one sentence
    per class with the repo's template; "person" embeds "person with clothes,people,human" alone
    (not "person" averaged with "people" and "human"); the 25 background words and the template."""
    cfg = load_config("configs/voc/clip_es.yaml")
    vocab = cam_run.resolve_vocab(cfg.data, cfg.cam.vocab, key="cam.vocab")
    assert vocab.names == CLIP_ES_VOC_NAMES and vocab.ids == tuple(range(1, 21))
    assert vocab.prompts == tuple((p,) for p in CLIP_ES_VOC_PROMPTS)
    assert vocab.index("person") == 14 and vocab.index("tvmonitor") == 19  # names still identify the classes
    assert cam_run.read_word_list(cfg.cam.background) == list(cam_run.CLIP_ES_VOC_BACKGROUND)
    seen: list[str] = []
    encode = teacher.encode_text

    def spy(texts, *a, **k):
        seen.extend(texts)
        return encode(texts, *a, **k)

    monkeypatch.setattr(teacher, "encode_text", spy)
    text, bg = cam_run._text_features(teacher, cfg, vocab)
    assert seen[:20] == [f"a clean origami {p}." for p in CLIP_ES_VOC_PROMPTS]  # the classes, one sentence each
    assert seen[20:] == [f"a clean origami {w}." for w in cam_run.CLIP_ES_VOC_BACKGROUND]
    person = encode(["a clean origami person with clothes,people,human."])[0]
    torch.testing.assert_close(text[14], F.normalize(person.float(), dim=0))
    assert text.shape == (20, 32) and bg.shape == (25, 32)
