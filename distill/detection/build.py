"""Builders: explicit functions whose arguments say everything.

- :func:`build_backbone` - a torchvision FPN backbone by name, random init unless a local
  weights file is given;
- :func:`build_vild_detector` - the ViLD student (:class:`ViLDDetector`);
- :func:`build_detector` - the student of ``det.arch`` (ViLD, or the one-stage student of
  :mod:`distill.detection.one_stage`);
- :func:`load_detector` - a trained student from its ``model_final.pt``;
- :func:`train_transform` - the training augmentation of a ``det`` section (detector and
  proposal network);
- :func:`build_plain_detector` - a plain torchvision Faster R-CNN with the same backbone and
  settings (the supervised baseline, the class-agnostic proposal network, and the bench
  reference), wrapped so that it takes the same targets (labels = vocabulary indices).

Images: a list of (3, H, W) float tensors in [0, 1] (or a (B, 3, H, W) tensor); targets: dicts of
``boxes`` (N, 4) float XYXY absolute pixels, ``labels`` (N,) int64 vocabulary indices 0..C-1,
``image_id``, optionally ``masks`` (N, H, W) uint8, and for ViLD-image ``proposals`` (M, 4) XYXY
with ``proposal_embeddings`` (M, D) (the teacher's embeddings of those boxes).
Outputs in eval: per image ``boxes`` (K, 4) XYXY in input pixels, ``scores`` (K,), ``labels`` (K,)
vocabulary indices, ``masks`` (K, 1, H, W) when built with masks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from distill.config import DetConfig
from distill.detection.roi_pool import ThreadedMultiScaleRoIAlign
from distill.detection.vild import IMAGE_HEADS, TEACHER_MODES, ViLDImageHead, ViLDPredictor, ViLDRoIHeads
from distill.errors import DistillError

BACKBONES = ("resnet18_fpn", "resnet34_fpn", "resnet50_fpn", "resnet101_fpn", "mobilenet_v3_large_fpn")
BOX_HEADS = ("mlp2", "4conv1fc", "4conv2fc")


# ------------------------------------------------------------------------------------ backbone
def build_backbone(name: str, pretrained: str = "", fpn_channels: int = 256, returned_layers: tuple[int, ...] = (1, 2, 3, 4),
                   freeze: bool = True, load_weights: bool = True) -> nn.Module:
    """A torchvision FPN backbone (``out_channels`` = ``fpn_channels``).

    ResNets use ``BackboneWithFPN`` over the stages in ``returned_layers`` (1 = stride 4 ... 4 =
    stride 32) plus a max-pool level, as ``resnet_fpn_backbone`` does, with a configurable width.
    Random init uses trainable BatchNorm; with ``pretrained`` (a local state_dict of the torchvision
    classification model, e.g. resnet50-0676ba61.pth) the norms are frozen and the stem and first
    stage stay fixed, as in torchvision's detection recipes; ``freeze=False`` keeps every layer
    trainable with BatchNorm (weights from ``distill train backbone``). ``load_weights=False``
    builds the same layers without reading ``pretrained`` (a checkpoint replaces them anyway).
    """
    if name not in BACKBONES:
        raise DistillError(f"det.backbone: unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    frozen = bool(pretrained) and freeze
    norm = misc_ops.FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    if name.startswith("resnet"):
        layers = tuple(int(x) for x in returned_layers)
        if not layers or any(x not in (1, 2, 3, 4) for x in layers) or list(layers) != sorted(set(layers)):
            raise DistillError(f"det.returned_layers: expected increasing stages from 1..4, got {list(returned_layers)}")
        body = getattr(torchvision.models, name[: -len("_fpn")])(weights=None, norm_layer=norm)
        if pretrained and load_weights:
            _load_backbone_weights(body, pretrained)
        if frozen:
            for n, prm in body.named_parameters():  # trainable_layers=3 (torchvision default)
                if not n.startswith(("layer2", "layer3", "layer4")):
                    prm.requires_grad_(False)
        c = 512 if name in ("resnet18_fpn", "resnet34_fpn") else 2048
        in_ch = [c // 8 * 2 ** (i - 1) for i in layers]
        return BackboneWithFPN(body, {f"layer{k}": str(j) for j, k in enumerate(layers)}, in_ch, fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=None)
    bb = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, norm_layer=norm, trainable_layers=3 if frozen else 6)
    if pretrained and load_weights:
        _load_backbone_weights(bb.body, pretrained)
    return bb


def num_levels(det: DetConfig) -> int:
    """FPN levels fed to the RPN (returned stages + the max-pool level; 3 for mobilenet)."""
    return len(det.returned_layers) + 1 if det.backbone.startswith("resnet") else 3


def _load_backbone_weights(body: nn.Module, path: str) -> None:
    from distill.engine.checkpoint import load_file

    sd = load_file(path, "det.pretrained_backbone", "a local torchvision state_dict; `distill train backbone CONFIG` writes one")
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise DistillError(f"det.pretrained_backbone: {path}: not a state_dict ({type(sd).__name__})")
    own = body.state_dict()
    if not any(k in own for k in sd) and any(k.startswith("features.") for k in sd):  # mobilenet
        sd = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
    matched = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if len(matched) < 0.5 * len(own):
        raise DistillError(f"det.pretrained_backbone: {path}: only {len(matched)}/{len(own)} backbone tensors fit (another architecture?)")
    body.load_state_dict(matched, strict=False)


def _torchvision_model(det: DetConfig, num_classes: int, load_weights: bool = True) -> FasterRCNN:
    """torchvision Faster / Mask R-CNN with our sizes, anchors and sampling settings."""
    backbone = build_backbone(det.backbone, det.pretrained_backbone, det.fpn_channels, det.returned_layers, det.freeze_backbone, load_weights)
    n_levels = num_levels(det)
    kw = dict(
        min_size=det.min_size,
        max_size=det.max_size,
        rpn_pre_nms_top_n_train=det.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=det.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=det.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=det.rpn_post_nms_test,
        box_batch_size_per_image=det.roi_batch_size,
        box_score_thresh=det.score_thresh,
        box_nms_thresh=det.nms,
        box_detections_per_img=det.detections_per_img,
    )
    if det.anchor_sizes:
        sizes = tuple(det.anchor_sizes)
        if len(sizes) != n_levels:
            raise DistillError(f"det.anchor_sizes: {det.backbone} has {n_levels} FPN levels, got {len(sizes)} sizes")
        kw["rpn_anchor_generator"] = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * n_levels)
    elif not det.backbone.startswith("resnet"):  # torchvision's mobilenet FPN anchors (3 levels)
        kw["rpn_anchor_generator"] = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    kw["box_roi_pool"] = ThreadedMultiScaleRoIAlign([str(i) for i in range(max(1, n_levels - 1))], output_size=7, sampling_ratio=2)
    if det.box_head != "mlp2" or det.box_head_dim != 1024 or backbone.out_channels != 256:  # else torchvision's own
        kw["box_head"] = build_box_head(det, backbone.out_channels)
        kw["box_predictor"] = FastRCNNPredictor(det.box_head_dim, num_classes)
        if det.masks:
            kw["mask_predictor"] = MaskRCNNPredictor(256, 256, num_classes)
    if det.masks:
        kw["mask_roi_pool"] = ThreadedMultiScaleRoIAlign([str(i) for i in range(max(1, n_levels - 1))], output_size=14, sampling_ratio=2)
    cls = MaskRCNN if det.masks else FasterRCNN
    return cls(backbone, num_classes=None if "box_predictor" in kw else num_classes, **kw)


def build_box_head(det: DetConfig, in_channels: int, resolution: int = 7) -> nn.Module:
    """The box head ``det.box_head`` over pooled RoIs (N, ``in_channels``, ``resolution``,
    ``resolution``) -> (N, ``det.box_head_dim``); see the key's comment in config/sections.py."""
    if det.box_head == "mlp2":
        return TwoMLPHead(in_channels * resolution**2, det.box_head_dim)
    if det.box_head not in BOX_HEADS:
        raise DistillError(f"det.box_head: {det.box_head!r} is not one of {', '.join(BOX_HEADS)}")
    # torchvision's conv + fc head, its conv blocks Conv3x3 -> BatchNorm2d -> ReLU (the norm of
    # fasterrcnn_resnet50_fpn_v2 and of ViLD's use_batch_norm)
    n_fc = 1 if det.box_head == "4conv1fc" else 2
    head = FastRCNNConvFCHead((in_channels, resolution, resolution), [det.box_head_conv_dim] * 4, [det.box_head_dim] * n_fc, norm_layer=nn.BatchNorm2d)
    if det.box_head == "4conv1fc":
        return head
    # ViLD normalises its fc layers too: fc -> BatchNorm -> ReLU (modeling/vild_head.py,
    # ViLDFastrcnnHead.__call__: `activation=None if use_batch_norm`, then batch_norm_activation)
    layers: list[nn.Module] = []
    for m in head:
        layers.append(m)
        if isinstance(m, nn.Linear):
            layers.append(RoIBatchNorm1d(m.out_features))
    return nn.Sequential(*layers)


class RoIBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the RoIs of a batch that also takes a single RoI in training (as the
    reference's TensorFlow batch norm does: its batch variance is 0, so the output is the bias)
    where torch refuses one value per channel; the ViLD-ensemble image head can draw one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return super().forward(x.expand(2, -1))[:1]
        return super().forward(x)


# ------------------------------------------------------------------------------------ ViLD
def valid_boxes(t: dict, num_classes: int | None, min_label: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes (N, 4) float, labels (N,) int64, ok (N,) bool)`` of one image's target ``t``;
    ``ok`` marks finite boxes of positive width and height (the detectors skip the others and
    count them). Labels are vocabulary indices in [min_label, num_classes) (``num_classes=None``:
    not checked); anything else is a one-line error naming the image."""
    boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1)
    if labels.numel() != boxes.shape[0]:
        raise DistillError(f"image {t.get('image_id', '?')}: {boxes.shape[0]} boxes but {labels.numel()} labels")
    if num_classes is not None and labels.numel():
        bad = labels[(labels < min_label) | (labels >= num_classes)]
        if bad.numel():
            raise DistillError(f"image {t.get('image_id', '?')}: category index {bad[0].item()} outside the training vocabulary of {num_classes} classes")
    ok = torch.isfinite(boxes).all(1) & (boxes[:, 2:] > boxes[:, :2]).all(1)
    return boxes, labels, ok


class ViLDDetector(GeneralizedRCNN):
    """torchvision's GeneralizedRCNN with :class:`ViLDRoIHeads`; labels are vocabulary indices.

    ``teacher`` (optional, not part of the state) embeds region crops for ``image`` / ``ensemble``
    inference and is never saved. ``skipped_boxes`` counts zero-area / non-finite target boxes
    that were dropped.
    """

    def __init__(self, backbone, rpn, roi_heads: ViLDRoIHeads, transform, teacher=None, region_mode: str = "crop"):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.teacher = teacher
        self.region_mode = region_mode
        self.skipped_boxes = 0
        self.pyramid: nn.Module | None = None  # OADP's global + block distillation (detection/pyramid.py), training only

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def set_vocabulary(self, text_emb: torch.Tensor, novel=None, names: list[str] | None = None) -> None:
        """Classify over ``text_emb`` (C, D) from now on (``novel`` (C,) bool for the ensemble)."""
        self.roi_heads.set_vocabulary(text_emb, novel, names)

    def _convert_targets(self, targets: list[dict]) -> tuple[list[dict], list | None]:
        c = self.num_classes
        out, distill, has_distill = [], [], False
        pyr: list = []
        for t in targets:
            boxes, labels, ok = valid_boxes(t, c)
            self.skipped_boxes += int((~ok).sum())
            d = {"boxes": boxes[ok], "labels": labels[ok] + 1}  # torchvision: 0 = background
            if "masks" in t:
                d["masks"] = t["masks"][ok]
            out.append(d)
            if "blocks" in t and "block_embeddings" in t:
                pyr.append((torch.as_tensor(t["blocks"], dtype=torch.float32).reshape(-1, 4), t["block_embeddings"], t.get("global_embedding")))
            if "proposals" in t and "proposal_embeddings" in t:
                has_distill = True
                distill.append((torch.as_tensor(t["proposals"], dtype=torch.float32).reshape(-1, 4), t["proposal_embeddings"]))
            else:
                distill.append((boxes.new_zeros(0, 4), boxes.new_zeros(0, self.roi_heads.embed_dim)))
        self._pyramid_targets = pyr if len(pyr) == len(targets) else None
        return out, (distill if has_distill else None)

    def forward(self, images, targets=None):
        """Train: ``model(images, targets)`` -> dict of losses (``loss_objectness``,
        ``loss_rpn_box_reg``, ``loss_box_reg``, ``loss_vild_text``, ``loss_vild_image``
        [, ``loss_mask``]). Eval: ``model(images)`` -> list of per-image detections."""
        if isinstance(images, torch.Tensor):
            images = list(images.unbind(0)) if images.ndim == 4 else [images]
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        tv_targets, distill = None, None
        if self.training:
            if targets is None:
                raise ValueError("ViLDDetector: targets are required in training")
            tv_targets, distill = self._convert_targets(targets)
        image_list, tv_targets = self.transform(images, tv_targets)
        ratios = _box_ratios(image_list, original_sizes)
        if distill is not None:
            distill = [(b.to(r.device) * r, e) for (b, e), r in zip(distill, ratios)]
        features = self.backbone(image_list.tensors)
        pyramid_losses = {}
        if self.training and self.pyramid is not None:
            pyr = getattr(self, "_pyramid_targets", None)
            if pyr is None:
                raise DistillError("OADP pyramid: training targets carry no teacher block embeddings (det.global_weight / block_weight need them)")
            blocks = [(b.to(r.device) * r) for (b, _, _), r in zip(pyr, ratios)]
            glob = torch.stack([g for _, _, g in pyr]) if all(g is not None for _, _, g in pyr) else None
            pyramid_losses = self.pyramid(features, blocks, image_list.image_sizes, glob, [e for _, e, _ in pyr])
        proposals, rpn_losses = self.rpn(image_list, features, tv_targets)
        if not self.training and self.roi_heads.inference in TEACHER_MODES:
            self.roi_heads.image_embedder = self._make_embedder(images, ratios)
        try:
            detections, det_losses = self.roi_heads(features, proposals, image_list.image_sizes, tv_targets, distill)
        finally:
            self.roi_heads.image_embedder = None
        if self.training:
            return {**rpn_losses, **det_losses, **pyramid_losses}
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        for d in detections:
            d["labels"] = d["labels"] - 1
        return detections

    @torch.no_grad()
    def region_embeddings(self, images: list[torch.Tensor], boxes: list[torch.Tensor], branch: str = "text") -> list[torch.Tensor]:
        """The student's L2-normalised (N_i, D) region embeddings of given ``boxes`` (XYXY, input
        pixels): the box head and projection that ViLD-text and ViLD-image train, read on boxes
        the caller chooses (e.g. ground truth) instead of proposals. ``branch="image"`` reads the
        separate ViLD-image head where there is one (ViLD-ensemble). Eval mode."""
        was = self.training
        self.eval()
        try:
            image_list, _ = self.transform(list(images))
            scaled = [b.to(r) * r for b, r in zip(boxes, _box_ratios(image_list, [tuple(im.shape[-2:]) for im in images]))]
            features = self.backbone(image_list.tensors)
            heads = self.roi_heads
            pooled = heads.box_roi_pool(features, scaled, image_list.image_sizes)
            if branch == "image" and heads.image_head is not None:
                emb = heads.image_head(pooled)
            else:
                emb, _ = heads.box_predictor(heads.box_head(pooled))
        finally:
            self.train(was)
        return list(emb.split([len(b) for b in boxes]))

    def propose(self, images: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        """The RPN's top ``k`` class-agnostic boxes of each image ((3, H, W) float in [0, 1]):
        per image a (<= k, 4) float XYXY tensor in input pixels, best first. Eval mode."""
        return [b for b, _ in self.scored_proposals(images, k)]

    @torch.no_grad()
    def scored_proposals(self, images: list[torch.Tensor], k: int, refine_steps: int = 0, rpn_nms: float | None = None,
                         rpn_post_nms: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The RPN's top ``k`` boxes of each image ((3, H, W) float in [0, 1]) with their
        objectness (the sigmoid of the RPN logit, :meth:`RegionProposalNetwork.filter_proposals`),
        best first; each box then refined ``refine_steps`` times by the RoI head's class-agnostic
        regression (:meth:`ViLDRoIHeads.refine_boxes`; the objectness stays the RPN's). ``rpn_nms``
        / ``rpn_post_nms`` replace the RPN's test-time NMS IoU / post-NMS count for this call.
        Per image ``(boxes (<= k, 4) float XYXY in input pixels, scores (<= k,))``. Eval mode."""
        was, rpn = self.training, self.rpn
        saved = rpn.nms_thresh, dict(rpn._post_nms_top_n)
        self.eval()
        try:
            rpn.nms_thresh = rpn.nms_thresh if rpn_nms is None else float(rpn_nms)
            rpn._post_nms_top_n["testing"] = rpn._post_nms_top_n["testing"] if rpn_post_nms is None else int(rpn_post_nms)
            image_list, _ = self.transform(list(images))
            features = self.backbone(image_list.tensors)
            boxes, scores = _rpn_scored(rpn, image_list, features)
            boxes, scores = [b[:k] for b in boxes], [s[:k] for s in scores]  # each box is refined on its own: top k first
            for _ in range(int(refine_steps)):
                boxes = self.roi_heads.refine_boxes(features, boxes, image_list.image_sizes)
        finally:
            rpn.nms_thresh, rpn._post_nms_top_n = saved
            self.train(was)
        out = []
        for b, s, im, (nh, nw) in zip(boxes, scores, images, image_list.image_sizes):
            h, w = im.shape[-2:]
            out.append((b * torch.tensor([w / nw, h / nh, w / nw, h / nh], device=b.device), s))
        return out

    def _make_embedder(self, images: list[torch.Tensor], ratios: list[torch.Tensor]):
        if self.teacher is None:
            raise DistillError(f"det.inference={self.roi_heads.inference}: needs the teacher's crop embeddings; build the detector with teacher=...")
        teacher, mode = self.teacher, self.region_mode

        def embed(per_boxes: list[torch.Tensor]) -> list[torch.Tensor]:
            boxes = [(b / r).to(teacher.device) for b, r in zip(per_boxes, ratios)]
            return [e.to(per_boxes[0].device) for e in teacher_region_embeddings(teacher, images, boxes, mode)]

        return embed


def _box_ratios(image_list, original_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per image, the (4,) XYXY factors from input pixels to the transformed image's pixels."""
    return [
        torch.tensor([n[1] / o[1], n[0] / o[0], n[1] / o[1], n[0] / o[0]], device=image_list.tensors.device)
        for n, o in zip(image_list.image_sizes, original_sizes)
    ]


def _rpn_scored(rpn, image_list, features: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """torchvision ``RegionProposalNetwork.forward`` in eval, keeping the objectness
    probabilities that ``filter_proposals`` returns and ``forward`` drops."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    feats = list(features.values())
    objectness, deltas = rpn.head(feats)
    anchors = rpn.anchor_generator(image_list, feats)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    return rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)


def teacher_region_embeddings(teacher, images: list[torch.Tensor], boxes: list[torch.Tensor], mode: str = "crop") -> list[torch.Tensor]:
    """The teacher's L2-normalised (N_i, D) embeddings of ``boxes`` (XYXY, image pixels) of
    ``images`` via ``distill.teacher.regions.region_embeddings`` (ViLD 3.2: 1x + 1.5x crops)."""
    from distill.teacher.regions import region_embeddings

    return region_embeddings(teacher, [im.to(teacher.device) for im in images], boxes, mode=mode)


# ViLDRoIHeads arguments that are det settings of the same name
_HEAD_SETTINGS = ("temperature", "text_weight", "image_weight", "use_text", "use_image", "inference", "ensemble_alpha",
                  "ensemble_beta", "ensemble_candidates", "score_thresh", "detections_per_img")


def build_vild_detector(det: DetConfig, embed_dim: int, text_embeddings: torch.Tensor | None = None, novel=None, teacher=None, region_mode: str = "crop",
                        load_weights: bool = True) -> ViLDDetector:
    """The ViLD student. ``embed_dim`` = the teacher's D; ``text_embeddings`` (C, D) optional
    (the vocabulary can be set later with ``set_vocabulary``); ``teacher`` for image / ensemble
    inference. ``load_weights=False`` skips reading ``det.pretrained_backbone`` (for a model whose
    trained checkpoint is loaded next: labeling and evaluation need only that file)."""
    base = _torchvision_model(det, num_classes=2, load_weights=load_weights)
    rh = base.roi_heads
    in_ch = det.box_head_dim  # the box head's output width
    mask_kw = {}
    if det.masks:
        mask_kw = dict(mask_roi_pool=rh.mask_roi_pool, mask_head=rh.mask_head, mask_predictor=MaskRCNNPredictor(256, 256, 1))
    if det.image_head not in IMAGE_HEADS:
        raise DistillError(f"det.image_head: {det.image_head!r} is not one of {', '.join(IMAGE_HEADS)}")
    predictor = ViLDPredictor(in_ch, embed_dim)
    image_head = None
    if det.image_head == "separate":  # ViLD 3.4: the same architecture, its own weights
        image_head = ViLDImageHead(build_box_head(det, base.backbone.out_channels), in_ch, embed_dim)
    heads = ViLDRoIHeads(rh.box_roi_pool, rh.box_head, predictor, nms_thresh=det.nms, batch_size_per_image=det.roi_batch_size,
                         image_head=image_head, **{k: getattr(det, k) for k in _HEAD_SETTINGS}, **mask_kw)
    model = ViLDDetector(base.backbone, base.rpn, heads, base.transform, teacher=teacher, region_mode=region_mode)
    if det.global_weight > 0 or det.block_weight > 0 or det.block_relation_weight > 0:  # OADP's pyramid
        from distill.detection.pyramid import PyramidHeads

        model.pyramid = PyramidHeads(det, rh.box_roi_pool, embed_dim, base.backbone.out_channels)
    if text_embeddings is not None:
        model.set_vocabulary(text_embeddings, novel)
    return model


def build_detector(det: DetConfig, embed_dim: int, text_embeddings: torch.Tensor | None = None, novel=None, teacher=None, region_mode: str = "crop",
                   load_weights: bool = True):
    """The open-vocabulary student of ``det.arch``: the ViLD student (:func:`build_vild_detector`)
    or the one-stage student (:func:`distill.detection.one_stage.build_one_stage_detector`)."""
    if det.arch == "fcos":
        from distill.detection.one_stage import build_one_stage_detector

        return build_one_stage_detector(det, embed_dim, text_embeddings, novel, load_weights=load_weights)
    return build_vild_detector(det, embed_dim, text_embeddings, novel, teacher=teacher, region_mode=region_mode, load_weights=load_weights)


def check_arch(state: dict, det: DetConfig, where: str) -> None:
    """A one-line error when the state dict ``state`` is the other student's than ``det.arch``."""
    from distill.detection.one_stage import is_one_stage_state

    one_stage = is_one_stage_state(state)
    if one_stage != (det.arch == "fcos"):
        found = "a one-stage (det.arch=fcos)" if one_stage else "a ViLD (det.arch=faster_rcnn)"
        raise DistillError(f"{where}: {found} checkpoint, but det.arch is {det.arch}; set det.arch to the checkpoint's")


def load_detector(path: str | Path, det: DetConfig, teacher, region_mode: str = "crop") -> tuple[ViLDDetector, dict]:
    """The trained ViLD student saved at ``path`` (the ``model_final.pt`` of ``distill train det``
    or a training checkpoint, read through :mod:`distill.engine.checkpoint`), built from the
    ``det`` section it was trained with for ``teacher`` (its embedding size; it embeds the crops
    of ``image`` / ``ensemble`` inference with ``region_mode``). Eval mode, on the CPU, with no
    vocabulary: the caller sets one (:meth:`ViLDDetector.set_vocabulary`).

    Returns ``(model, meta)``: the meta the file carries (training config, teacher identity,
    trained classes: :func:`distill.teacher.clip.student_meta`; ``{}`` for a file without)."""
    from distill.engine import checkpoint

    state = checkpoint.read(path)
    check_arch(state["model"], det, str(path))
    model = build_detector(det, teacher.embed_dim, None, teacher=teacher, region_mode=region_mode, load_weights=False)
    checkpoint.load_model_state(model, state["model"], str(path))
    return model.eval(), state.get("meta") or {}


def train_transform(det: DetConfig):
    """The training augmentation ``det.augment`` (None for ``none``); the LSJ canvas is
    ``det.max_size`` (= ``det.min_size``, checked at load), which the detector then keeps as is."""
    from distill.data.transforms import detection_train_transform

    return detection_train_transform(det.augment, det.max_size, det.lsj_scale)


# ------------------------------------------------------------------------------------ plain
class PlainDetector(nn.Module):
    """A torchvision Faster R-CNN taking vocabulary-index labels (0..C-1) like ViLD.

    ``class_agnostic=True`` maps every box to one "object" class (the proposal network).
    """

    def __init__(self, model: FasterRCNN, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        self.skipped_boxes = 0

    def forward(self, images, targets=None):
        if isinstance(images, torch.Tensor):
            images = list(images.unbind(0)) if images.ndim == 4 else [images]
        if not self.training:
            out = self.model(images)
            for d in out:
                d["labels"] = d["labels"] - 1
            return out
        tv = []
        for t in targets:
            boxes, labels, ok = valid_boxes(t, None if self.class_agnostic else self.num_classes)
            self.skipped_boxes += int((~ok).sum())
            lab = torch.ones_like(labels[ok]) if self.class_agnostic else labels[ok] + 1
            tv.append({"boxes": boxes[ok], "labels": lab})
        return self.model(images, tv)


def build_plain_detector(det: DetConfig, num_classes: int, class_agnostic: bool = False) -> PlainDetector:
    """Plain torchvision Faster R-CNN (linear classifier over ``num_classes`` + background)."""
    n = 1 if class_agnostic else num_classes
    return PlainDetector(_torchvision_model(det, num_classes=n + 1), n, class_agnostic)
