"""Inference: sliding window against whole-image, labels, PNG output, evaluation."""

import numpy as np
import pytest
import torch
from PIL import Image

from distill.errors import DistillError
from distill.segmentation.infer import (
    evaluate_model,
    logits_to_labels,
    predict_logits,
    segment_folder,
    sliding_window_logits,
)
from distill.segmentation.lseg import build_lseg


def _pointwise(x):  # a per-pixel function: any tiling gives the same result
    return torch.cat([x.sum(1, keepdim=True), x[:, :1] * 2 - x[:, 1:2]], 1)


@pytest.mark.parametrize("hw,window,stride", [((50, 70), 32, 0), ((50, 70), 32, 10), ((20, 70), 32, 16), ((64, 64), 64, 0)])
def test_sliding_window_equals_whole_for_pointwise(hw, window, stride):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *hw)
    out = sliding_window_logits(_pointwise, x, window, stride)
    torch.testing.assert_close(out, _pointwise(x))


def test_sliding_window_averages_overlaps():
    calls = []

    def fn(c):
        calls.append(tuple(c.shape[-2:]))
        return torch.ones(c.shape[0], 1, *c.shape[-2:]) * len(calls)

    out = sliding_window_logits(fn, torch.zeros(1, 3, 10, 16), window=10, stride=6)
    # windows at x = 0 and x = 6 (last aligned to the border): 1 on [0, 6), mean(1, 2) on [6, 10), 2 after
    assert calls == [(10, 10), (10, 10)]
    assert out[0, 0, 0, :6].eq(1).all() and out[0, 0, 0, 6:10].eq(1.5).all() and out[0, 0, 0, 10:].eq(2).all()


def test_labels_and_vocab_swap():
    logits = torch.zeros(1, 4, 2, 2)
    logits[0, 0, 0, 0] = 1
    logits[0, 1, 0, 1] = 1
    logits[0, 2, 1, 0] = 1
    logits[0, 3, 1, 1] = 1
    assert logits_to_labels(logits, [7, 3, 12]).tolist() == [[[0, 7], [3, 12]]]
    with pytest.raises(DistillError, match="channels"):
        logits_to_labels(logits, [1, 2])


def test_lseg_window_close_to_whole_and_folder_output(tmp_path):
    torch.manual_seed(0)
    m = build_lseg(8, "resnet18", features=8).eval()
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    x = torch.rand(1, 3, 64, 96)
    whole = predict_logits(m, x, text)
    win = predict_logits(m, x, text, window=64, stride=32)
    assert whole.shape == win.shape == (1, 4, 64, 96)
    # same windows as the image on the left part where only the first window counts
    torch.testing.assert_close(win[..., :32], predict_logits(m, x[..., :64], text)[..., :32])
    with pytest.raises(DistillError, match="C >= 1"):
        predict_logits(m, x, text[:0])
    # a folder with two sizes -> one PNG each with the vocabulary's ids
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / "a.png")
    Image.fromarray((np.random.default_rng(1).random((64, 33, 3)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / "sub" / "b.jpg")
    out = segment_folder(m, tmp_path / "imgs", text, [5, 9, 11], tmp_path / "pred")
    assert [p.relative_to(tmp_path / "pred").as_posix() for p in out] == ["a.png", "sub/b.png"]
    a = np.asarray(Image.open(out[0]))
    assert a.shape == (40, 50) and set(np.unique(a)) <= {0, 5, 9, 11}
    with torch.no_grad():
        from distill.data.images import load_image

        xa = torch.from_numpy(load_image(tmp_path / "imgs" / "a.png")).permute(2, 0, 1)[None].float() / 255
        ref = logits_to_labels(predict_logits(m, xa, text), [5, 9, 11])[0].numpy()
    assert (a == ref).all()


def test_evaluate_model_perfect_predictor():
    """A model whose logits are the one-hot ground truth gets mIoU 1 on every present class."""

    class Oracle(torch.nn.Module):
        def __init__(self, masks):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.masks = masks

        def semantic_logits(self, images, text):
            m = self.masks[: images.shape[0]].clone()
            self.masks = self.masks[images.shape[0] :]
            m[m == 255] = 0
            return torch.nn.functional.one_hot(m, 1 + text.shape[0]).permute(0, 3, 1, 2).float()

    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (5, 8, 8), generator=g)
    masks[0, 0] = 255
    ds = [(torch.rand(3, 8, 8), {"masks": masks[i]}) for i in range(5)]
    res = evaluate_model(Oracle(masks.clone()), ds, torch.randn(3, 4), [1, 2, 3], 4, [0, 1, 2], batch_size=2)
    assert res["miou/all"] == pytest.approx(1.0) and res["miou/novel"] == pytest.approx(1.0)
    assert res["pixel_acc"] == pytest.approx(1.0)
