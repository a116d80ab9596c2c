"""VL-PLM pseudo-labels (Zhao et al., "Exploiting Unlabeled Data with Vision and Language Models
for Object Detection", ECCV 2022, section 3.2), as the reference code makes them (github
xiaofeng94/VL-PLM, tools/gen_PLs.py with tools/utils.py):

1. proposals: a two-stage detector trained on base classes (here a ViLD checkpoint, ``label.model``,
   e.g. the pipeline's ``det/vild_text/model_final.pt``) gives its RPN's boxes with RPN NMS 0.3 and
   1000 boxes after NMS (gen_PLs.py: ``cfg.MODEL.RPN.NMS_THRESH = 0.3``,
   ``POST_NMS_TOPK_TEST = 1000``); the top 100 (``pp_topK``) are kept with their objectness
   (utils.py ``get_region_proposal``: ``sigmoid(objectness_logits)``);
2. refinement: each box is re-regressed by the RoI head ``label.refine_steps`` = 10 times
   (``--roi_num``; utils.py ``refineBoxByRoIHead``: RoIAlign, box head, the class-agnostic deltas
   applied to the box, no clipping), keeping the RPN score
   (:meth:`~distill.detection.build.ViLDDetector.scored_proposals`);
3. CLIP score: boxes clipped to the image, those narrower or lower than 5 px dropped (utils.py
   ``get_CLIP_pred_for_proposals``); crops at 1x and 1.5x the box (``box_scalelist``), their
   normalised embeddings averaged and normalised, softmax of cos / 0.01 over the vocabulary alone,
   no background prompt (utils.py ``CLIP_score_multi_scale``, ``softmax_t=0.01``; gen_PLs.py
   ``textEmbCatNames = usedCatNames``), top-1 class and its probability
   (:meth:`~distill.labels.sources.TeacherSource.score_boxes`);
4. fusion: ``score = rpn_weight * rpn + (1 - rpn_weight) * clip`` with ``rpn_weight`` = 0.5
   (gen_PLs.py ``curScore = rpnScore * lamda + clipScores * (1 - lamda)``, ``--lamda``);
5. threshold 0.8 and class-wise NMS at IoU 0.6 (``--thres``, ``--nms_thres``): the labeler's filter
   (``label.score_thresh`` / ``label.nms`` default to them for this source,
   :data:`distill.labels.filtering.SOURCE_THRESH`).

Where this differs: a crop is resized to the teacher's square input (``region_embeddings``, as the
teacher source does) where the reference's CLIP ``preprocess`` resizes the short side and
centre-crops; the detector works at its own ``det.min_size`` / ``max_size``; the vocabulary is the
one given (the reference scores the novel classes only: give ``--vocab`` the novel names for that).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.errors import DistillError
from distill.files import sha256_json
from distill.labels.sources import TeacherSource, load_vild
from distill.vocab import Vocabulary

CROP_SCALES = (1.0, 1.5)  # utils.py get_CLIP_pred_for_proposals / gen_PLs.py box_scalelist
CLIP_TEMPERATURE = 0.01  # utils.py CLIP_score_multi_scale softmax_t
RPN_NMS = 0.3  # gen_PLs.py cfg.MODEL.RPN.NMS_THRESH
RPN_POST_NMS = 1000  # gen_PLs.py cfg.MODEL.RPN.POST_NMS_TOPK_TEST
MIN_SIDE = 5.0  # utils.py get_CLIP_pred_for_proposals: box[2] - box[0] >= 5 and box[3] - box[1] >= 5
DETECTOR_HINT = "a ViLD checkpoint trained on base classes, e.g. {work_dir}/det/vild_text/model_final.pt"


def fuse_scores(rpn: torch.Tensor, clip: torch.Tensor, rpn_weight: float = 0.5) -> torch.Tensor:
    """VL-PLM's score of a box (gen_PLs.py): ``rpn_weight * rpn + (1 - rpn_weight) * clip``."""
    return rpn * rpn_weight + clip * (1 - rpn_weight)


def keep_boxes(boxes: torch.Tensor, height: int, width: int, min_side: float = MIN_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 4) XYXY -> (clipped boxes, keep (N,) bool: both sides >= ``min_side`` after clipping),
    utils.py ``scale_box(box, 1, max_H, max_W)`` then the 5 px test."""
    b = torch.stack([boxes[:, 0].clamp(min=0), boxes[:, 1].clamp(min=0), boxes[:, 2].clamp(max=width), boxes[:, 3].clamp(max=height)], 1)
    return b, ((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side)


class VLPLMSource(TeacherSource):
    """VL-PLM labels (see the module docstring): ``detector`` (a ViLD student, eval) proposes and
    refines, the teacher scores the crops, the two scores are fused. Returns per image ``boxes``
    (N, 4) XYXY pixels, ``scores`` (N,) fused, ``labels`` (N,) the teacher's top-1 class; the
    labeler's filter then applies the threshold and the NMS."""

    def __init__(self, teacher, vocab: Vocabulary, detector, *, templates=None, max_proposals: int = 100,
                 refine_steps: int = 10, rpn_weight: float = 0.5, max_side: int = 1024, detector_fingerprint: str = "") -> None:
        if refine_steps < 0:
            raise DistillError(f"label.refine_steps: expected >= 0, got {refine_steps}")
        if not 0.0 <= rpn_weight <= 1.0:
            raise DistillError(f"label.rpn_weight: expected a weight in [0, 1], got {rpn_weight}")
        self.detector = detector
        self.refine_steps = int(refine_steps)
        self.rpn_weight = float(rpn_weight)
        super().__init__(teacher, vocab, templates=templates, background=(), proposals="rpn", max_proposals=max_proposals,
                         proposer=self._propose_refined, max_side=max_side, scales=CROP_SCALES, logit_scale=1.0 / CLIP_TEMPERATURE)
        self.fingerprint = sha256_json({"teacher_source": self.fingerprint, "detector": detector_fingerprint, "vlplm": {
            "refine_steps": self.refine_steps, "rpn_weight": self.rpn_weight, "rpn_nms": RPN_NMS, "rpn_post_nms": RPN_POST_NMS,
            "min_side": MIN_SIDE}})[:16]

    def _propose_refined(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, H, W) uint8 -> (boxes (N, 4) clipped, >= 5 px a side; their RPN objectness (N,))."""
        dev = next(self.detector.parameters()).device
        boxes, rpn = self.detector.scored_proposals([img.to(dev, torch.float32) / 255.0], self.max_proposals, self.refine_steps,
                                                    rpn_nms=RPN_NMS, rpn_post_nms=RPN_POST_NMS)[0]
        boxes, keep = keep_boxes(boxes.float().cpu(), int(img.shape[1]), int(img.shape[2]))
        return boxes[keep], rpn.float().cpu()[keep]

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor], extras: list | None = None) -> list[dict]:
        props = [self._propose_refined(im) for im in images]
        out = []
        for (boxes, rpn), (clip, labels) in zip(props, self.score_boxes(images, [b for b, _ in props])):
            out.append({"boxes": boxes, "scores": fuse_scores(rpn, clip, self.rpn_weight), "labels": labels})
        return out


def build_vlplm_source(cfg, vocab: Vocabulary, device: torch.device | None = None) -> tuple[VLPLMSource, str]:
    """The VL-PLM source of ``cfg.label`` (its base detector ``cfg.label.model``, scored by
    ``cfg.teacher``); a missing checkpoint or one without class-agnostic box regression is a
    one-line error naming ``label.model``."""
    from distill.teacher.clip import build_teacher

    lcfg = cfg.label
    ckpt = lcfg.model.strip()
    if not ckpt or ckpt == "teacher":
        raise DistillError(f"label.model: label.source=vlplm needs the base detector's checkpoint ({DETECTOR_HINT})")
    if not Path(ckpt).is_file():
        raise DistillError(f"label.model: {ckpt}: detector checkpoint not found ({DETECTOR_HINT})")
    check_box_regression(ckpt)
    detector, _, fp = load_vild(cfg, vocab, device)
    teacher = build_teacher(cfg.teacher, device=device)
    src = VLPLMSource(teacher, vocab, detector, templates=cfg.teacher.templates or None, max_proposals=lcfg.max_proposals,
                      refine_steps=lcfg.refine_steps, rpn_weight=lcfg.rpn_weight, max_side=lcfg.max_side, detector_fingerprint=fp)
    return src, src.fingerprint


def check_box_regression(ckpt: str) -> None:
    """A one-line error unless ``ckpt`` holds an RoI box head with class-agnostic regression (4
    outputs: a ViLD student); e.g. the class-agnostic proposal network's torchvision predictor
    regresses per class (background + object)."""
    from distill.engine.checkpoint import read

    try:
        state = read(ckpt)["model"]
    except DistillError as e:
        raise DistillError(f"label.model: {e}") from None
    key = next((k for k in state if k.endswith("roi_heads.box_predictor.bbox_pred.weight")), None)
    if key is None:
        raise DistillError(f"label.model: {ckpt}: no RoI box head to refine the boxes with ({DETECTOR_HINT})")
    n = int(state[key].shape[0])
    if n != 4:
        raise DistillError(f"label.model: {ckpt}: its box regression has {n} outputs, one box per class; VL-PLM refines "
                           f"with a class-agnostic one (4 outputs): give {DETECTOR_HINT}")
