"""Label sources: a segmentation student's semantic map split into scored instances; a student's
templates are the ones it was trained with or an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.labels.filtering import FilterOptions, filter_predictions
from distill.labels.sources import SegSource
from distill.vocab import load_vocab


class _FakeSeg(torch.nn.Module):
    """semantic_logits(images, text) -> fixed (1, 1 + C, H, W) logits: two blobs of class 0 and one
    of class 1 on background (stands in for an LSeg / CLIPSeg student)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def semantic_logits(self, images, text):
        b, _, h, w = images.shape
        lo = torch.zeros(b, 1 + text.shape[0], h, w)
        lo[:, 0] = 2.0
        lo[:, 1, 2:6, 2:8] = 4.0  # class 0, 24 px
        lo[:, 1, 10:12, 10:12] = 4.0  # class 0, 4 px
        lo[:, 2, 8:16, 0:4] = 3.0  # class 1, 32 px (overlaps nothing)
        return lo


def test_seg_source_instances_from_components():
    src = SegSource(_FakeSeg(), torch.randn(2, 8), load_vocab("a,b"))
    pred = src([torch.zeros(3, 16, 16, dtype=torch.uint8)])[0]
    order = np.argsort(pred["boxes"][:, 0].numpy() * 100 + pred["boxes"][:, 1].numpy())
    boxes = pred["boxes"][order].tolist()
    assert boxes == [[0, 8, 4, 16], [2, 2, 8, 6], [10, 10, 12, 12]]
    assert pred["labels"][order].tolist() == [1, 0, 0]
    assert [int(m.sum()) for m in pred["masks"][order]] == [32, 24, 4]
    # score = mean softmax probability of the class over its component
    p_a = np.exp(4) / (np.exp(2) + np.exp(4) + np.exp(0))
    p_b = np.exp(3) / (np.exp(2) + np.exp(0) + np.exp(3))
    np.testing.assert_allclose(pred["scores"][order].numpy(), [p_b, p_a, p_a], rtol=1e-5)
    kept = filter_predictions(pred, FilterOptions(score_thresh=0.0, min_area=5.0, nms=0.5, top_k=10), 2)
    assert len(kept["scores"]) == 2  # the 4 px blob is below min_area


@pytest.mark.parametrize("source", ["vild", "seg"])
def test_student_config_naming_a_missing_template_file_is_an_error(tmp_path, source):
    """A student whose training config names a template file that is not there: a one-line error
    naming the setting and the file, never the default templates in its place."""
    from distill.config import load_config
    from distill.labels.sources import build_source

    ckpt = tmp_path / "run" / "model_final.pt"
    ckpt.parent.mkdir()
    torch.save({"w": torch.zeros(1)}, ckpt)  # an older file: no meta, its config.yaml beside it
    (ckpt.parent / "config.yaml").write_text("teacher:\n  templates: nosuch_templates.txt\n")
    cfg = load_config(None, [f"label.source={source}", f"label.model={ckpt}", "teacher.device=cpu"])
    with pytest.raises(DistillError, match=r"teacher\.templates.*nosuch_templates\.txt") as e:
        build_source(cfg, load_vocab("a, b"))
    assert "\n" not in str(e.value)
