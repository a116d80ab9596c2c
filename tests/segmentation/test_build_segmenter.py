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


def test_head_options_reach_the_model_and_the_configs_choose_them(teacher):
    """seg.logit_scale / seg.head_block* reach LSeg; the real configs use lang-seg's fixed scale,
    the shapes world keeps its learnable one; lang-seg's default head (--arch_option 0) everywhere."""
    from pathlib import Path

    from distill.config import load_config

    m = build_segmenter(SegConfig(arch="lseg", backbone="teacher"), teacher)
    assert not m.logit_scale.requires_grad and m.head_block is None  # the defaults: fixed, none
    m = build_segmenter(SegConfig(arch="lseg", backbone="teacher", logit_scale="learnable", head_block="bottleneck",
                                  head_block_depth=2, head_block_activation="tanh"), teacher)
    assert m.logit_scale.requires_grad and m.head_block.kind == "bottleneck" and m.head_block_depth == 2
    assert isinstance(m.head_block.activation, torch.nn.Tanh)
    root = Path(__file__).resolve().parents[2]
    for name, scale in (("shapes/lseg.yaml", "learnable"), ("shapes/lseg_distill.yaml", "learnable"), ("shapes/pipeline.yaml", "learnable"),
                        ("voc/lseg_voc.yaml", "fixed"), ("coco/lseg_cocostuff.yaml", "fixed")):
        seg = load_config(root / "configs" / name).seg
        assert (seg.logit_scale, seg.head_block) == (scale, "none"), name
    with pytest.raises(DistillError, match=r"^seg\.head_block_depth: expected >= 1"):
        SegConfig(head_block_depth=0)
    with pytest.raises(DistillError, match=r"seg\.head_block"):
        load_config(root / "configs/shapes/lseg.yaml", ["seg.head_block=2"])
