"""ViLD (Gu et al., ICLR 2022): an open-vocabulary Faster R-CNN distilled from a CLIP teacher.

The box predictor of torchvision's Faster R-CNN becomes a ViLD head (section 3):
region feature -> linear projection to the teacher's embedding size D -> L2 norm -> cosine
logits against the frozen text embeddings of the *current* vocabulary plus a learned background
embedding, divided by a temperature (tau = 0.01, section 3.2); box regression is class-agnostic.

The vocabulary is an input: :meth:`ViLDRoIHeads.set_vocabulary` stores the (C, D) text
embeddings in a NON-persistent buffer, so no checkpoint contains a vocabulary and a trained
detector accepts any vocabulary at inference.

Losses are pure functions of tensors and finite on empty input:
- :func:`loss_vild_text`: cross entropy over [background, training classes] (section 3.2,
  ViLD-text; training uses the BASE classes' text embeddings only, novel ones never appear);
- :func:`loss_vild_image`: L1 between the student's normalised region embeddings of
  precomputed proposals and the teacher's image embeddings of the same regions (section 3.3,
  ViLD-image; weight 0.5 for R50, section 4);
- :func:`box_loss_class_agnostic`: smooth L1 as torchvision's ``fastrcnn_loss`` with one box
  per region.

Inference (``inference``): ``text`` scores with the student's embedding (ViLD), ``image`` with
the teacher's crop embeddings of the detected boxes alone, ``ensemble`` = section 3.4's geometric
mean of the two, :func:`ensemble_scores`. Without the teacher at test time: ``image_head`` scores
with the student's image-branch embedding and ``ensemble_heads`` is section 3.4's ViLD-ensemble,
the same geometric mean over the text branch and the image branch. With ``image_head=separate``
(ViLD-ensemble's training) the image branch is its own box head + projection
(:class:`ViLDImageHead`) trained by ViLD-image alone; with ``shared`` both branches read the one
embedding.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops

from distill.errors import DistillError

INFERENCE_MODES = ("text", "image", "ensemble", "image_head", "ensemble_heads")
TEACHER_MODES = ("image", "ensemble")  # inference modes that crop the teacher at test time
IMAGE_HEADS = ("shared", "separate")


def check_vocabulary(text_emb: torch.Tensor, novel, names: list[str] | None, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text (C, D) L2-normalised float, novel (C,) bool)`` of a vocabulary given to a student;
    a wrong shape, an empty vocabulary or a NaN / inf / zero embedding is a one-line error."""
    if text_emb.ndim != 2 or text_emb.shape[1] != embed_dim:
        raise DistillError(f"vocabulary: text embeddings of shape {tuple(text_emb.shape)}, expected (C, {embed_dim})")
    if text_emb.shape[0] == 0:
        raise DistillError("vocabulary: empty (expected at least one class)")
    bad = (~torch.isfinite(text_emb)).any(dim=1) | (text_emb.norm(dim=1) == 0)
    if bad.any():
        idx = torch.where(bad)[0].tolist()
        which = [names[i] for i in idx] if names else idx
        raise DistillError(f"vocabulary: the teacher embeds classes {which} to NaN / inf / zero vectors; fix or drop them")
    if novel is None:
        novel = torch.zeros(text_emb.shape[0], dtype=torch.bool)
    novel = torch.as_tensor(novel, dtype=torch.bool)
    if novel.shape != (text_emb.shape[0],):
        raise DistillError(f"vocabulary: novel mask of shape {tuple(novel.shape)} for {text_emb.shape[0]} classes")
    return F.normalize(text_emb.detach().float(), dim=1), novel


# --------------------------------------------------------------------------------- the head
class ViLDPredictor(nn.Module):
    """Region features (N, F) -> (region embeddings (N, D) L2-normalised, box deltas (N, 4)).

    ``background`` is the learned background embedding (section 3.2), normalised where used.
    """

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.projection = nn.Linear(in_channels, embed_dim)
        self.bbox_pred = nn.Linear(in_channels, 4)  # class-agnostic regression
        self.background = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0))
        nn.init.normal_(self.bbox_pred.weight, std=0.001)  # as torchvision / detectron2
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        emb = F.normalize(self.projection(x), dim=-1)
        return emb, self.bbox_pred(x)


class ViLDImageHead(nn.Module):
    """ViLD-ensemble's image branch (section 3.4): its own box head (the text branch's
    architecture, fresh weights) and projection; pooled RoI features -> (N, D) L2-normalised."""

    def __init__(self, box_head: nn.Module, in_channels: int, embed_dim: int):
        super().__init__()
        self.box_head = box_head
        self.projection = nn.Linear(in_channels, embed_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.box_head(pooled).flatten(1)), dim=-1)


def vild_logits(region_emb: torch.Tensor, text_emb: torch.Tensor, background: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Cosine logits / temperature (ViLD eq. 1).

    Args:
        region_emb: (N, D) L2-normalised region embeddings.
        text_emb: (C, D) L2-normalised class text embeddings.
        background: (D,) background embedding (normalised here) or None (no background column).
    Returns:
        (N, 1 + C) with column 0 = background, or (N, C) when ``background`` is None.
    """
    classifier = text_emb
    if background is not None:
        classifier = torch.cat([F.normalize(background, dim=0)[None].to(text_emb.dtype), text_emb], 0)
    return region_emb @ classifier.t() / temperature


def loss_vild_text(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ViLD-text (section 3.2): mean cross entropy of (N, 1 + C) logits vs labels in [0, C]
    (0 = background). Returns 0 (with a graph) for N = 0."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)


def loss_vild_image(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """ViLD-image (section 3.3): 1/M sum_r ||e_student(r) - e_teacher(r)||_1 over M regions,
    both (M, D) L2-normalised. Returns 0 (with a graph) for M = 0."""
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(f"loss_vild_image: shapes differ {tuple(student_emb.shape)} vs {tuple(teacher_emb.shape)}")
    if student_emb.shape[0] == 0:
        return student_emb.sum() * 0.0
    return (student_emb - teacher_emb.to(student_emb.dtype)).abs().sum(dim=1).mean()


def box_loss_class_agnostic(deltas: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torchvision ``fastrcnn_loss``'s box term with one (class-agnostic) box per region:
    smooth L1 (beta 1/9) over positives, summed and divided by the number of sampled regions."""
    if labels.numel() == 0:
        return deltas.sum() * 0.0
    pos = torch.where(labels > 0)[0]
    return F.smooth_l1_loss(deltas[pos], targets[pos], beta=1 / 9, reduction="sum") / labels.numel()


def ensemble_scores(
    s_text: torch.Tensor, s_image: torch.Tensor, is_novel: torch.Tensor, alpha: float = 2 / 3, beta: float = 2 / 3
) -> torch.Tensor:
    """ViLD section 3.4 (model ensembling), geometric mean per class:

        base  i: s_text_i ** alpha       * s_image_i ** (1 - alpha)     (alpha = lambda = 2/3)
        novel i: s_text_i ** (1 - beta)  * s_image_i ** beta             (beta  = lambda = 2/3)

    Args: s_text, s_image (N, C) in [0, 1]; is_novel (C,) bool.
    """
    a = torch.where(is_novel, torch.full_like(s_text[:1], 1 - beta)[0], torch.full_like(s_text[:1], alpha)[0])
    return s_text.clamp_min(0) ** a * s_image.clamp_min(0) ** (1 - a)


# --------------------------------------------------------------------------------- RoI heads
class ViLDRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with the ViLD predictor, ViLD losses and open-vocabulary inference.

    Call :meth:`set_vocabulary` before any forward. In training, ``distill`` carries per image the
    precomputed proposals (M_i, 4) (XYXY, in the transformed image's pixels) and the teacher's
    (M_i, D) embeddings of them; they share one RoIAlign + box-head pass with the sampled RoIs.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: ViLDPredictor,
        *,
        temperature: float = 0.01,
        text_weight: float = 1.0,
        image_weight: float = 0.5,
        use_text: bool = True,
        use_image: bool = True,
        inference: str = "text",
        ensemble_alpha: float = 2 / 3,
        ensemble_beta: float = 2 / 3,
        ensemble_candidates: int = 100,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        mask_roi_pool: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        image_head: nn.Module | None = None,
    ):
        super().__init__(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            None,
            score_thresh,
            nms_thresh,
            detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        if inference not in INFERENCE_MODES:
            raise DistillError(f"det.inference: {inference!r} is not one of {', '.join(INFERENCE_MODES)}")
        if temperature <= 0:
            raise DistillError(f"det.temperature: expected > 0, got {temperature}")
        self.temperature = float(temperature)
        self.text_weight = float(text_weight)
        self.image_weight = float(image_weight)
        self.use_text = bool(use_text)
        self.use_image = bool(use_image)
        self.inference = inference
        self.ensemble_alpha = float(ensemble_alpha)
        self.ensemble_beta = float(ensemble_beta)
        self.ensemble_candidates = int(ensemble_candidates)
        self.embed_dim = box_predictor.projection.out_features
        self.image_head = image_head  # None = the image branch shares the text branch's embedding
        # The vocabulary: inputs, never saved (persistent=False).
        self.register_buffer("text_embeddings", torch.zeros(0, self.embed_dim), persistent=False)
        self.register_buffer("novel_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        # Set by the detector for image / ensemble inference: boxes per image -> (n_i, D) teacher
        # embeddings. Not a module: the teacher is never part of the student's state.
        self.image_embedder: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.text_embeddings.shape[0])

    def set_vocabulary(self, text_emb: torch.Tensor, novel: torch.Tensor | list[bool] | None = None, names: list[str] | None = None) -> None:
        """Use ``text_emb`` (C, D) (L2-normalised here) as the classifier; ``novel`` (C,) bool
        marks the classes that the ensemble weights towards the image branch."""
        text, novel = check_vocabulary(text_emb, novel, names, self.embed_dim)
        dev = self.box_predictor.projection.weight.device
        self.text_embeddings, self.novel_mask = text.to(dev), novel.to(dev)

    # ------------------------------------------------------------------------------ scores
    def text_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """(N, D) region embeddings -> (N, C) class probabilities of the text branch: softmax over
        [background, classes] with the background column dropped. A student trained without the
        ViLD-text loss has no trained background: softmax over the classes only."""
        if self.use_text:
            return F.softmax(vild_logits(emb, self.text_embeddings, self.box_predictor.background, self.temperature), -1)[:, 1:]
        return F.softmax(vild_logits(emb, self.text_embeddings, None, self.temperature), -1)

    def image_scores(self, teacher_emb: torch.Tensor) -> torch.Tensor:
        """(N, D) image-branch embeddings (the teacher's crops or the student's image head)
        -> (N, C) softmax(cos / tau) over the classes (no background)."""
        return F.softmax(vild_logits(teacher_emb.to(self.text_embeddings), self.text_embeddings, None, self.temperature), -1)

    # ------------------------------------------------------------------------------ forward
    def forward(self, features, proposals, image_shapes, targets=None, distill=None):  # noqa: C901
        """Args:
            features: FPN features (dict of (B, 256, h, w)).
            proposals: list of (P_i, 4) RPN boxes, XYXY transformed-image pixels.
            image_shapes: list of (H, W) after the transform.
            targets: training only; list of {"boxes" (N, 4), "labels" (N,) in 1..C (0 = bg),
                "masks"?}.
            distill: training only; list of (boxes (M_i, 4), teacher embeddings (M_i, D)) or None.
        Returns:
            (detections, losses): detections are per-image dicts of "boxes", "scores", "labels"
            (1..C), "masks"? in eval; losses a dict in training.
        """
        if self.num_classes == 0:
            raise DistillError("ViLD: no vocabulary set (call set_vocabulary(text_embeddings) first)")
        if self.training:
            return self._forward_train(features, proposals, image_shapes, targets, distill)
        return self._forward_infer(features, proposals, image_shapes)

    def _forward_train(self, features, proposals, image_shapes, targets, distill):
        if targets is None:
            raise ValueError("ViLDRoIHeads: targets are required in training")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        use_image = self.use_image and distill is not None
        rois = proposals
        n_sampled = sum(len(p) for p in proposals)
        if use_image:
            rois = list(proposals) + [d[0].to(proposals[0]) for d in distill]  # one RoIAlign pass
        pooled = self.box_roi_pool(features, _per_image_rois(rois, len(proposals)), image_shapes)
        if use_image:
            order = _interleave_index(proposals, [d[0] for d in distill], pooled.device)
            if self.image_head is not None:  # ViLD-ensemble: each branch sees only its own RoIs
                emb_s, deltas_s = self.box_predictor(self.box_head(pooled[order[0]]))
                emb_d = self.image_head(pooled[order[1]])
            else:
                emb, deltas = self.box_predictor(self.box_head(pooled))
                emb_s, deltas_s, emb_d = emb[order[0]], deltas[order[0]], emb[order[1]]
        else:
            emb_s, deltas_s = self.box_predictor(self.box_head(pooled))
        labels_cat = torch.cat(labels)
        reg_cat = torch.cat(regression_targets)
        losses = {"loss_box_reg": box_loss_class_agnostic(deltas_s, reg_cat, labels_cat)}
        if self.use_text:
            logits = vild_logits(emb_s, self.text_embeddings, self.box_predictor.background, self.temperature)
            losses["loss_vild_text"] = self.text_weight * loss_vild_text(logits, labels_cat)
        if self.use_image:
            if use_image:
                teacher = torch.cat([d[1] for d in distill]).to(emb_d)
                losses["loss_vild_image"] = self.image_weight * loss_vild_image(emb_d, teacher)
            else:  # stable names: a batch without cached regions contributes 0
                losses["loss_vild_image"] = emb_s.sum() * 0.0
                if self.image_head is not None:  # keep the image head in the graph (DDP)
                    losses["loss_vild_image"] = losses["loss_vild_image"] + sum(p.sum() * 0.0 for p in self.image_head.parameters())
        assert emb_s.shape[0] == n_sampled
        if self.has_mask():
            mask_props, pos_matched = [], []
            for p, lab, m in zip(proposals, labels, matched_idxs):
                pos = torch.where(lab > 0)[0]
                mask_props.append(p[pos])
                pos_matched.append(m[pos])
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_props, image_shapes)))
            gt_masks = [t["masks"] for t in targets]
            agnostic = [torch.zeros_like(t["labels"]) for t in targets]  # one mask channel
            if sum(len(p) for p in mask_props) == 0:
                losses["loss_mask"] = mask_logits.sum() * 0.0
            else:
                losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_props, gt_masks, agnostic, pos_matched)
        return [], losses

    @torch.no_grad()
    def refine_boxes(self, features, boxes: list[torch.Tensor], image_shapes) -> list[torch.Tensor]:
        """One pass of the box head's class-agnostic regression over given ``boxes`` (per image
        (N_i, 4) XYXY in the transformed image's pixels): RoIAlign at the boxes, box head, deltas
        decoded onto them; not clipped (VL-PLM tools/utils.py ``refineBoxByRoIHead`` applies
        detectron2's ``predict_boxes``, which does not clip). Eval only; returns the new boxes."""
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        _, deltas = self.box_predictor(self.box_head(pooled))
        return list(self.box_coder.decode(deltas, boxes)[:, 0].split([len(b) for b in boxes]))

    @torch.no_grad()
    def _forward_infer(self, features, proposals, image_shapes):
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        emb, deltas = self.box_predictor(self.box_head(pooled))
        boxes = self.box_coder.decode(deltas, proposals)[:, 0]  # (N, 4) class-agnostic
        scores = self.text_scores(emb)  # text / teacher modes: the text branch (candidates)
        if self.inference in ("image_head", "ensemble_heads"):  # the student's own image branch
            emb_i = emb if self.image_head is None else self.image_head(pooled)
            s_img = self.image_scores(emb_i)
            if self.inference == "image_head":
                scores = s_img
            else:
                scores = ensemble_scores(scores, s_img, self.novel_mask, self.ensemble_alpha, self.ensemble_beta)
        counts = [len(p) for p in proposals]
        results = []
        per_boxes, per_scores = [], []
        for b, s, shape in zip(boxes.split(counts), scores.split(counts), image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            if self.inference in TEACHER_MODES:  # candidates for the teacher: best text-scored boxes
                keep = _candidates(b, s, self.ensemble_candidates)
                b, s = b[keep], s[keep]
            per_boxes.append(b)
            per_scores.append(s)
        if self.inference in TEACHER_MODES:
            if self.image_embedder is None:
                raise DistillError(f"det.inference={self.inference}: needs the teacher (build the detector with one)")
            t_emb = self.image_embedder(per_boxes)
            s_img = [self.image_scores(e) for e in t_emb]
            if self.inference == "image":
                per_scores = s_img
            else:
                per_scores = [
                    ensemble_scores(st, si, self.novel_mask, self.ensemble_alpha, self.ensemble_beta) for st, si in zip(per_scores, s_img)
                ]
        for b, s in zip(per_boxes, per_scores):
            results.append(self._select(b, s))
        if self.has_mask():
            mask_props = [r["boxes"] for r in results]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_props, image_shapes)))
            probs = maskrcnn_inference(mask_logits, [torch.zeros_like(r["labels"]) for r in results])
            for p, r in zip(probs, results):
                r["masks"] = p
        return results, {}

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-class NMS + top-k as torchvision's ``postprocess_detections`` (class-agnostic
        boxes repeated for every class). Labels are 1..C."""
        n, c = scores.shape
        labels = torch.arange(1, c + 1, device=scores.device).expand(n, c).reshape(-1)
        b = boxes[:, None].expand(n, c, 4).reshape(-1, 4)
        s = scores.reshape(-1)
        keep = torch.where(s > self.score_thresh)[0]
        b, s, labels = b[keep], s[keep], labels[keep]
        keep = box_ops.remove_small_boxes(b, min_size=1e-2)
        b, s, labels = b[keep], s[keep], labels[keep]
        keep = box_ops.batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": b[keep], "scores": s[keep], "labels": labels[keep]}


def _candidates(boxes: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of at most ``k`` boxes with the highest max-class score after a loose
    class-agnostic NMS (0.9) that drops near-duplicates before the (costly) teacher crops."""
    best = scores.max(dim=1).values if scores.numel() else scores.new_zeros(len(boxes))
    keep = box_ops.nms(boxes, best, 0.9)
    return keep[:k]


def _per_image_rois(rois: list[torch.Tensor], n_images: int) -> list[torch.Tensor]:
    """[sampled_0..sampled_{B-1}, distill_0..distill_{B-1}] -> per-image concatenations."""
    if len(rois) == n_images:
        return rois
    return [torch.cat([rois[i], rois[n_images + i]]) for i in range(n_images)]


def _interleave_index(sampled: list[torch.Tensor], distill: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of sampled and distilled RoIs in the per-image concatenated order."""
    s_idx, d_idx, off = [], [], 0
    for s, d in zip(sampled, distill):
        s_idx.append(torch.arange(off, off + len(s), device=device))
        off += len(s)
        d_idx.append(torch.arange(off, off + len(d), device=device))
        off += len(d)
    return torch.cat(s_idx), torch.cat(d_idx)
