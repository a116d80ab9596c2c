"""segmentation/build.py: the builders take the seg section; a wrong choice is a one-line error."""

from __future__ import annotations

import pytest
import torch

from distill.config import SegConfig
from distill.errors import DistillError
from distill.segmentation.build import build_segmenter, load_segmenter


@pytest.fixture(scope="module")
def teacher():
    from distill.teacher.clip import build_random_teacher

    return build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=4, heads=2, dense_image_size=32, seed=0)


def test_arch_names_its_builder_and_a_wrong_one_lists_the_valid(teacher):
    from distill.segmentation.clipseg import CLIPSeg
    from distill.segmentation.lseg import LSeg

    assert isinstance(build_segmenter(SegConfig(arch="lseg", backbone="teacher"), teacher), LSeg)
    assert isinstance(build_segmenter(SegConfig(arch="clipseg", backbone="teacher"), teacher), CLIPSeg)
    with pytest.raises(DistillError, match=r"^seg\.arch: 'unet' is not one of lseg, clipseg$"):
        build_segmenter(SegConfig(arch="unet"), teacher)
    with pytest.raises(DistillError, match=r"^seg\.distill_weight: .*arch=lseg"):
        build_segmenter(SegConfig(arch="clipseg", backbone="teacher", distill_weight=0.5), teacher)
    with pytest.raises(DistillError, match=r"^seg\.embed_dim: 8 differs"):
        build_segmenter(SegConfig(arch="lseg", backbone="teacher", embed_dim=8), teacher)


def test_load_segmenter_reads_the_saved_weights(tmp_path, teacher):
    from distill.engine.checkpoint import save_model

    seg = SegConfig(arch="lseg", backbone="teacher")
    torch.manual_seed(0)
    model = build_segmenter(seg, teacher)
    path = save_model(tmp_path / "model_final.pt", model)
    torch.manual_seed(1)
    loaded = load_segmenter(seg, teacher, path)
    assert not loaded.training
    own, got = model.state_dict(), loaded.state_dict()
    assert own.keys() == got.keys() and all(torch.equal(own[k], got[k]) for k in own)
