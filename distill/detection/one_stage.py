"""A one-stage open-vocabulary student in the manner of ZSD-YOLO (Xie & Zheng 2021,
github.com/Johnathan-Xie/ZSD-YOLO), built on torchvision's FCOS (``det.arch: fcos``).

Why FCOS and not RetinaNet: FCOS predicts one box per location, so each location carries one
embedding (RetinaNet's 9 anchors a location would need 9); and ZSD-YOLO's background handling
(below) needs an objectness per prediction, which FCOS's class-agnostic focal loss gives directly.
The head is ZSD-YOLO's by default (``det.head_convs`` 0: the prediction convs read the FPN levels
directly, as YOLOv5's ``Detect`` reads the neck's); ``det.head_convs`` 4 builds FCOS's towers.

What ZSD-YOLO does, and what is kept (``models/yolo.py`` ``ZSDDetect``, ``SoftmaxSim``;
``utils/loss.py`` ``ComputeZSDLoss``, ``ZSDCrossEntropy``):

- the classification output of each prediction is an embedding of the teacher's size D; class
  probabilities are ``softmax(cos(embedding, text) * exp(t))`` over the vocabulary's text
  embeddings, ``t`` learned, initialised at 3.91 (``SoftmaxSim(temp=3.91)``: scale ~50);
- background is not a class: YOLO's objectness carries it (``BCEobj``), and a detection's
  confidence is objectness x class probability. Here the objectness is FCOS's classification
  branch with one class-agnostic output, trained with FCOS's sigmoid focal loss on the locations
  FCOS assigns to a box; the score torchvision's FCOS ranks by is then
  ``sqrt(objectness x class probability x centre-ness)``;
- on the locations assigned to a box: cross entropy of those class probabilities against the
  box's class (``ZSDCrossEntropy`` text loss, training classes only) and an L1 distance between
  the predicted embedding and the teacher's embedding of the box's crops (image loss,
  ``diff_exp`` 1). ZSD-YOLO takes the L1 on the raw output; the L1 here is ViLD's (section 3.3),
  on the L2-normalised embedding, summed over D, weight ``det.image_weight`` (the reference's
  hyper-parameter file, with its weights, is not in the public repository);
- self-labelling: boxes a base-trained detector finds with high objectness away from every
  ground-truth box become extra targets with class -1: objectness, box and image losses, no text
  loss (``ComputeZSDLoss`` keeps them in every term; ``ZSDCrossEntropy`` leaves class -1 out of
  the text loss unless ``self_text_loss_scalar``). Here they are the proposals of the class-
  agnostic RPN (``distill propose``) with objectness >= ``det.self_label_score`` and IoU <
  ``det.self_label_iou`` with every base box, whose teacher embeddings the region cache holds
  (:func:`select_self_labels`).

The vocabulary is an input (:meth:`OneStageDetector.set_vocabulary`, a non-persistent buffer), so
no checkpoint holds one and a trained student names any classes at inference.

Targets: ``boxes`` (N, 4) XYXY, ``labels`` (N,) training-vocabulary indices or -1 for a
self-label, optionally ``box_embeddings`` (N, D) teacher embeddings (zero rows: none).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import box_iou

from distill.detection.build import build_backbone, valid_boxes
from distill.errors import DistillError

ARCHS = ("faster_rcnn", "fcos")
LOGIT_SCALE_INIT = 3.91  # ZSD-YOLO models/yolo.py SoftmaxSim(temp=3.91): logits = cos * exp(3.91)


class EmbeddingBranch(FCOSClassificationHead):
    """FCOS's classification tower with two outputs: the class-agnostic objectness (FCOS's
    ``cls_logits`` with one class, prior 0.01) and a D-dimensional embedding per location."""

    def __init__(self, in_channels: int, embed_dim: int, num_convs: int = 4, norm_layer=None):
        super().__init__(in_channels, 1, 1, num_convs, norm_layer=norm_layer)
        self.embed = nn.Conv2d(in_channels, embed_dim, kernel_size=3, padding=1)
        nn.init.normal_(self.embed.weight, std=0.01)
        nn.init.zeros_(self.embed.bias)

    def forward(self, x: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        obj, emb = [], []
        for f in x:
            t = self.conv(f)
            obj.append(self.cls_logits(t).flatten(2).transpose(1, 2))  # (N, HW, 1)
            emb.append(self.embed(t).flatten(2).transpose(1, 2))  # (N, HW, D)
        return torch.cat(obj, 1), torch.cat(emb, 1)


class OneStageHead(FCOSHead):
    """FCOS's head with ZSD-YOLO's embedding classification (see the module docstring).

    Train: ``forward`` -> objectness (as ``cls_logits``, (N, HW, 1)), ``embeddings`` (N, HW, D)
    and FCOS's box outputs. Eval: ``cls_logits`` (N, HW, C) is ``logit(objectness x class
    probability)``, so torchvision's ``FCOS.postprocess_detections`` ranks by
    ``sqrt(objectness x probability x centre-ness)`` and keeps its thresholds, top-k and NMS."""

    def __init__(self, in_channels: int, embed_dim: int, num_convs: int = 0, text_weight: float = 1.0, image_weight: float = 0.5,
                 use_text: bool = True, use_image: bool = True, objectness_thresh: float = 0.0):
        nn.Module.__init__(self)  # FCOSHead's parts, with their norm set below
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        # GroupNorm of 8 channels a group: torchvision's GroupNorm(32) at FCOS's 256 channels, and
        # still more than one value a group on a 1 x 1 level at our narrower widths
        groups = max(1, in_channels // 8)
        while in_channels % groups:
            groups -= 1
        norm = partial(nn.GroupNorm, groups)
        self.classification_head = EmbeddingBranch(in_channels, embed_dim, num_convs, norm_layer=norm)
        self.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=norm)
        self.embed_dim = embed_dim
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.text_weight, self.image_weight = float(text_weight), float(image_weight)
        self.use_text, self.use_image = bool(use_text), bool(use_image)
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)
        self.register_buffer("novel_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.inference = "text"  # the only scoring a one-stage student has (no RoIs to crop)
        self.objectness_thresh = float(objectness_thresh)

    @property
    def num_classes(self) -> int:
        return int(self.text_embeddings.shape[0])

    def class_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """(..., D) embeddings -> (..., C) logits ``cos(emb, text) * exp(t)``."""
        if self.num_classes == 0:
            raise DistillError("one-stage student: no vocabulary (set_vocabulary was not called)")
        return F.normalize(emb, dim=-1) @ self.text_embeddings.t().to(emb.dtype) * self.logit_scale.exp()

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        obj, emb = self.classification_head(x)
        reg, ctr = self.regression_head(x)
        if self.training:
            return {"cls_logits": obj, "embeddings": emb, "bbox_regression": reg, "bbox_ctrness": ctr}
        logits = detection_logits(obj, self.class_logits(emb))
        if self.objectness_thresh > 0:  # ZSD-YOLO's --obj-conf-thresh: such locations never reach NMS
            logits = logits.masked_fill(torch.sigmoid(obj) < self.objectness_thresh, -1e4)
        return {"cls_logits": logits, "bbox_regression": reg, "bbox_ctrness": ctr}

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, torch.Tensor]:
        # objectness (focal), GIoU and centre-ness exactly as torchvision's FCOS with one class
        agnostic = [{"boxes": t["boxes"], "labels": torch.zeros_like(t["labels"])} for t in targets]
        fcos = super().compute_loss(agnostic, head_outputs, anchors, matched_idxs)
        losses = {"loss_objectness": fcos["classification"], "loss_box_giou": fcos["bbox_regression"], "loss_centerness": fcos["bbox_ctrness"]}
        emb, labels, teacher = _foreground(targets, head_outputs["embeddings"], matched_idxs, self.embed_dim)
        if self.use_text:
            named = labels >= 0  # self-labels (-1) have no class: no text loss (ZSDCrossEntropy)
            losses["loss_text"] = self.text_weight * loss_text(self.class_logits(emb[named]), labels[named])
        if self.use_image:
            has = teacher.norm(dim=1) > 0
            losses["loss_image"] = self.image_weight * loss_image(F.normalize(emb[has], dim=-1), teacher[has])
        return losses


def detection_logits(objectness: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(objectness) x softmax(class_logits))``: (N, HW, 1) and (N, HW, C) ->
    (N, HW, C), computed in log space (finite for probabilities down to ~1e-38)."""
    logp = (F.logsigmoid(objectness.float()) + F.log_softmax(class_logits.float(), -1)).clamp(max=-1e-7)
    return logp - torch.log1p(-logp.exp())


def loss_text(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ZSD-YOLO's text loss: mean cross entropy of (M, C) logits; 0 (with a graph) for M = 0."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)


def loss_image(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over M locations of the L1 distance (summed over D) between the student's normalised
    embedding and the teacher's; 0 (with a graph) for M = 0."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    return (student - teacher.to(student.dtype)).abs().sum(1).mean()


def _foreground(targets, embeddings: torch.Tensor, matched_idxs: list[torch.Tensor], dim: int):
    """The embeddings of the locations assigned to a box, with that box's label and teacher
    embedding (zeros where the box has none)."""
    emb, lab, tea = [], [], []
    for e, t, m in zip(embeddings, targets, matched_idxs):
        fg = m >= 0
        idx = m[fg]
        emb.append(e[fg])
        lab.append(t["labels"][idx])
        te = t.get("box_embeddings")
        tea.append(te[idx].to(e) if te is not None and len(te) else e.new_zeros(int(fg.sum()), dim))
    return torch.cat(emb), torch.cat(lab), torch.cat(tea)


class OneStageDetector(FCOS):
    """torchvision's FCOS with :class:`OneStageHead`; labels are vocabulary indices (-1 in a
    training target = a self-label). ``skipped_boxes`` counts zero-area / non-finite target boxes
    dropped."""

    def __init__(self, backbone, head: OneStageHead, anchor_generator: AnchorGenerator, **kw):
        super().__init__(backbone, num_classes=1, anchor_generator=anchor_generator, head=head, **kw)
        self.skipped_boxes = 0

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def set_vocabulary(self, text_emb: torch.Tensor, novel=None, names: list[str] | None = None) -> None:
        """Name ``text_emb`` (C, D)'s classes from now on (L2-normalised here)."""
        from distill.detection.vild import check_vocabulary

        text, novel = check_vocabulary(text_emb, novel, names, self.head.embed_dim)
        dev = self.head.logit_scale.device
        self.head.text_embeddings, self.head.novel_mask = text.to(dev), novel.to(dev)

    def forward(self, images, targets=None):
        """Train: ``model(images, targets)`` -> dict of losses (``loss_objectness``,
        ``loss_box_giou``, ``loss_centerness``, ``loss_text``, ``loss_image``). Eval:
        ``model(images)`` -> per image ``boxes``, ``scores``, ``labels`` (vocabulary indices)."""
        if isinstance(images, torch.Tensor):
            images = list(images.unbind(0)) if images.ndim == 4 else [images]
        if self.training:
            if targets is None:
                raise ValueError("OneStageDetector: targets are required in training")
            targets = [self._convert(t) for t in targets]
        return super().forward(list(images), targets)

    @torch.no_grad()
    def region_embeddings(self, images: list[torch.Tensor], boxes: list[torch.Tensor], branch: str = "text") -> list[torch.Tensor]:
        """The student's L2-normalised (N_i, D) embeddings of given ``boxes`` (XYXY, input pixels):
        the embedding at each box's centre on the level FCOS assigns the box to there (the level
        whose range [4 x size, 8 x size) holds half the box's longer side; torchvision
        ``FCOS.compute_loss``), i.e. the location the text and image losses train for that box.
        ``branch`` is accepted for the ViLD student's signature (one embedding here). Eval mode."""
        was = self.training
        self.eval()
        try:
            image_list, _ = self.transform(list(images))
            feats = list(self.backbone(image_list.tensors).values())
            _, emb = self.head.classification_head(feats)
            sizes = [int(s[0]) for s in self.anchor_generator.sizes]
            shapes = [f.shape[-2:] for f in feats]
            starts = torch.tensor([0] + [h * w for h, w in shapes]).cumsum(0)
            out = []
            for i, (b, im) in enumerate(zip(boxes, images)):
                (nh, nw), (h, w) = image_list.image_sizes[i], im.shape[-2:]
                b = b.to(emb.device).float() * torch.tensor([nw / w, nh / h, nw / w, nh / h], device=emb.device)
                half = (b[:, 2:] - b[:, :2]).max(1).values / 2
                level = torch.zeros(len(b), dtype=torch.long, device=emb.device)
                for k in range(1, len(sizes)):
                    level[half >= 4 * sizes[k]] = k
                cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
                rows = []
                for j in range(len(b)):
                    k = int(level[j])
                    stride = image_list.tensors.shape[-1] / shapes[k][1]
                    x = min(int(cx[j] / stride), shapes[k][1] - 1)
                    y = min(int(cy[j] / stride), shapes[k][0] - 1)
                    rows.append(emb[i, int(starts[k]) + y * shapes[k][1] + x])
                out.append(F.normalize(torch.stack(rows), dim=-1) if rows else emb.new_zeros(0, emb.shape[-1]))
        finally:
            self.train(was)
        return out

    def _convert(self, t: dict) -> dict:
        boxes, labels, ok = valid_boxes(t, self.num_classes, min_label=-1)  # -1: a self-label (no class)
        self.skipped_boxes += int((~ok).sum())
        out = {"boxes": boxes[ok], "labels": labels[ok]}
        if "box_embeddings" in t:
            out["box_embeddings"] = torch.as_tensor(t["box_embeddings"], dtype=torch.float32).reshape(len(boxes), self.head.embed_dim)[ok]
        return out


def level_sizes(det, num_levels: int) -> tuple[int, ...]:
    """FCOS's per-level size (the stride; its scale range is [4 x size, 8 x size] of the largest
    box side distance, torchvision ``FCOS.compute_loss``): the backbone's strides (ResNet stages
    ``det.returned_layers`` = 2 ** (k + 1), then the pool level at twice the last)."""
    strides = [2 ** (k + 1) for k in det.returned_layers]
    return tuple(strides + [strides[-1] * 2])[:num_levels]


def build_one_stage_detector(det, embed_dim: int, text_embeddings: torch.Tensor | None = None, novel=None, load_weights: bool = True) -> OneStageDetector:
    """The one-stage student of ``det`` (``det.arch == "fcos"``; a ResNet FPN backbone)."""

    if not det.backbone.startswith("resnet"):
        raise DistillError(f"det.arch=fcos: needs a ResNet FPN backbone (det.backbone), got {det.backbone}")
    backbone = build_backbone(det.backbone, det.pretrained_backbone, det.fpn_channels, det.returned_layers, det.freeze_backbone, load_weights)
    sizes = level_sizes(det, len(det.returned_layers) + 1)
    anchors = AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))
    head = OneStageHead(backbone.out_channels, embed_dim, num_convs=det.head_convs, text_weight=det.text_weight, image_weight=det.image_weight,
                        use_text=det.use_text, use_image=det.use_image, objectness_thresh=det.objectness_thresh)
    model = OneStageDetector(backbone, head, anchors, min_size=det.min_size, max_size=det.max_size, score_thresh=det.score_thresh,
                             nms_thresh=det.nms, detections_per_img=det.detections_per_img)
    if text_embeddings is not None:
        model.set_vocabulary(text_embeddings, novel)
    return model


def select_self_labels(proposals: torch.Tensor, scores: torch.Tensor, gt_boxes: torch.Tensor, min_score: float, max_iou: float, k: int) -> torch.Tensor:
    """Indices (into ``proposals``, best first, at most ``k``) of the proposals with objectness
    >= ``min_score`` whose IoU with every ground-truth box is < ``max_iou`` (ZSD-YOLO's
    self-labels: confident boxes of a base-trained detector where no base box is)."""
    keep = scores >= min_score
    if len(gt_boxes) and len(proposals):
        keep &= box_iou(proposals.float(), gt_boxes.float()).max(1).values < max_iou
    idx = torch.where(keep)[0]
    return idx[scores[idx].argsort(descending=True, stable=True)][: max(0, int(k))]


def is_one_stage_state(keys) -> bool:
    """Whether a state dict's keys are a one-stage student's (FCOS head, no RoI heads)."""
    return any(k.startswith("head.classification_head.embed.") for k in keys)
