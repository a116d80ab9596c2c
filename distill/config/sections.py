"""The sections of :class:`Config`: frozen dataclasses, one per stage. Each key's comment says what
it means; enum-like keys are ``Literal`` and checked when a file is read (:mod:`distill.config.load`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distill.errors import DistillError

# --------------------------------------------------------------------------------------------
# Sections. Each stage owns its section; defaults are those of the embedded shapes world.
# --------------------------------------------------------------------------------------------


# engine/device.py PRECISIONS; auto = amp_bf16 where the device runs bf16 natively, else fp32
Precision = Literal["fp32", "amp_bf16", "amp_fp16", "auto"]


@dataclass(frozen=True)
class WorldConfig:
    """The procedural shapes world (distill/data/world.py)."""

    seed: int = 0
    image_size: int = 128
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
    # Novel categories by name ("red star"); empty = chosen from the seed so that every colour and
    # every shape also occurs in a base category.
    novel: tuple[str, ...] = ()
    num_novel: int = 8
    num_train: int = 1500
    num_val: int = 300
    num_unlabeled: int = 300
    min_objects: int = 1
    max_objects: int = 6
    min_size: int = 10
    max_size: int = 60
    clutter: int = 3  # at most this many non-category clutter shapes per image
    num_captions_per_image: int = 2
    # Object fill: pattern (each shape also has its own fill texture, a local cue as natural
    # categories have fur, wheels or leaves) | flat (one colour: only the outline tells the shape,
    # which no patch-level reading of the teacher can see; the earlier world).
    fill: str = "pattern"


@dataclass(frozen=True)
class DataConfig:
    """Where a stage finds images and annotations. ``{work_dir}`` expands to the run's folder."""

    image_root: str = "{work_dir}/data/images"  # COCO file_name is relative to this
    train_json: str = "{work_dir}/data/instances_train_base.json"  # base boxes only (OV protocol)
    train_full_json: str = "{work_dir}/data/instances_train.json"  # all classes (oracle)
    val_json: str = "{work_dir}/data/instances_val.json"
    unlabeled_json: str = "{work_dir}/data/instances_unlabeled.json"  # hidden GT for quality
    semantic_root: str = "{work_dir}/data/semantic"  # <split>/<stem>.png, 0 = bg, 255 = ignore
    image_labels: str = "{work_dir}/data/image_labels_{split}.json"
    captions: str = "{work_dir}/data/captions.json"
    vocab: str = ""  # a vocabulary source (file or inline); empty = the categories of train_full_json
    split_file: str = ""  # optional base/novel split file
    extra: tuple[str, ...] = ()  # extra COCO jsons (pseudo-labels) added to training
    masks: str = ""  # semantic masks folder overriding semantic_root for seg training (CAM output)
    num_workers: int = 0


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen CLIP teacher (distill/teacher/clip.py)."""

    model: str = "distill-tiny-vit"  # an open_clip model name (ours are registered on import)
    pretrained: str = "{work_dir}/teacher/teacher.safetensors"  # tag, local file, or local-dir:...
    precision: Precision = "fp32"  # autocast of the teacher's forward (engine/device.py)
    dense_image_size: int = 128  # input size for dense paths (MaskCLIP pixels, dense RoIAlign, CAM)
    templates: str = "shapes.txt"  # prompt templates: a file (one a line, {} = class name, {article} = a / an before it; a bare name may be one shipped in distill/prompts/: vild.txt is ViLD's set) or the templates themselves; or a learned prompt file (*.safetensors of `distill train prompts`)
    cache_dtype: Literal["fp16", "fp32"] = "fp16"  # storage dtype of the embedding cache
    batch_size: int = 256
    device: str = ""  # "" = cuda when available else cpu
    background: str = "background_shapes.txt"  # background words (teacher evaluate: MaskCLIP mIoU): a file, one a line, or the words themselves
    eval_dense_sizes: tuple[int, ...] = (64, 128)  # MaskCLIP mIoU measured at each dense input size
    # MaskCLIP section 3.2 refinements of the zero-shot pixel scores (teacher evaluate's maskclip/*
    # rows), the reference's thresholds (maskclip_plus_head.py refine_clip_output; its "kspd"
    # configs use 1.0 / 0.5). key_smoothing: positions whose top class probability is below it take
    # the key-affinity-weighted scores; prompt_denoising: a class whose top probability over the
    # image is below it is dropped. 0 = off.
    key_smoothing: float = 0.0
    prompt_denoising: float = 0.0
    # CLIPSelf image tower (``distill teacher clipself`` writes {work_dir}/teacher/dense_tower.safetensors):
    # when set, the dense paths (MaskCLIP pixels, dense RoIAlign, seg pixel distillation) use it;
    # crops, the class token and text keep the original teacher. "" = off.
    dense_tower: str = ""

    def __post_init__(self) -> None:
        for key in ("key_smoothing", "prompt_denoising"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise DistillError(f"teacher.{key}: expected a probability threshold in [0, 1] (0 = off), got {v}")


@dataclass(frozen=True)
class PretrainConfig:
    """Contrastive pretraining of the tiny teacher on captions of ALL classes (teacher/pretrain.py)."""

    steps: int = 1200  # 0 = no pretraining: the pipeline's teacher stage evaluates teacher.pretrained as given (an external CLIP)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 50
    logit_scale: float = 50.0
    whole_image_fraction: float = 0.05
    # Stuff crops: this fraction of each batch are crops of what no caption names -- the background
    # texture ("a photo of a striped background") and the clutter items ("a gray blob") -- from the
    # world's captions.json "background" / "clutter" fields. Web CLIP has seen "grass", "wall" and
    # "sky" as often as objects; CLIP-ES's background words (3.2) rely on it. 0 = off.
    stuff_fraction: float = 0.0
    crop_scale_min: float = 0.9
    crop_scale_max: float = 1.6
    crop_shift: float = 0.1  # random crop-centre shift, as a fraction of the box side
    precision: Precision = "amp_bf16"
    seed: int = 0
    log_period: int = 50
    threads: int = 0  # torch intra-op threads while pretraining (0 = torch default; 1 can be faster on a CPU shared with other jobs)
    init: str = ""  # start from this checkpoint (fine-tuning) instead of random weights
    dense_weight: float = 0.0  # weight of the dense-region loss (MaskCLIP path + RoIAlign of GT boxes vs class texts)
    dense_images: int = 8  # whole images per step for the dense-region loss


@dataclass(frozen=True)
class ClipSelfConfig:
    """CLIPSelf dense self-distillation of the teacher's image tower (teacher/clipself.py; Wu et al.,
    ICLR 2024): a student copy of the tower is fine-tuned so that its MaskCLIP map, RoIAligned over
    the cells of a random grid, matches the frozen teacher's embedding of each cell's crop. No labels."""

    steps: int = 2400  # fixed step count (cosine decay to 0)
    batch_size: int = 8  # whole images per step
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 20
    max_split: int = 8  # grid rows / cols up to this (paper: 6 at 1024 px); cells >= 128/8 px here
    max_boxes: int = 16  # grid cells distilled per image per step (a random subset of the grid)
    crop_scale: float = 1.0  # teacher crop = cell side x crop_scale around its centre (official default 1)
    image_dirs: tuple[str, ...] = ("train", "unlabeled")  # image folders, relative to data.image_root unless absolute
    out: str = "{work_dir}/teacher/dense_tower.safetensors"
    precision: Precision = "fp32"  # student forward / backward (teacher: teacher.precision)
    seed: int = 0
    log_period: int = 25
    threads: int = 0  # torch intra-op threads while training (0 = torch default)


@dataclass(frozen=True)
class PromptsConfig:
    """DetPro prompt learning (detection/detpro.py; Du et al., CVPR 2022, github.com/dyabel/detpro):
    a CoOp context learned on the cached region embeddings of the training proposals, base classes
    only; one context per IoU group of positives (context grading), negatives pushed towards a
    uniform class distribution (background interpretation). ``distill train prompts CONFIG``
    writes ``out``; ``teacher.templates=<out>`` then uses it wherever templates are read."""

    enabled: bool = False  # the pipeline's detpro stage: train the prompts, then ViLD with them (det/vild_detpro)
    ctx_len: int = 8  # context vectors (run.py: ctx_num 8, class token at the end)
    # IoU edges of the positive groups: group g holds base proposals with edges[g] <= IoU < edges[g+1]
    # (detpro.sh: [0.5,0.6) ... [0.9,1.1)); one context is learned per group and the groups ensembled
    iou_edges: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.1)
    neg_iou: tuple[float, float] = (0.1, 0.5)  # negatives: proposals with IoU in [lo, hi) (run.py data_iou_filter(train_neg, 0.1, bg_thr))
    neg_fraction: float = 0.1  # of the negatives, this random fraction is used (run.py neg_split 10)
    epochs: int = 6  # run.py: 6 epochs, SGD lr 2e-3, cosine, batch 512
    batch_size: int = 512
    lr: float = 0.002
    temperature: float = 0.01  # prompt/config.py
    init_std: float = 0.02  # context init N(0, 0.02) (coop_mini.py)
    # "" = that random init (DetPro's run.py); else words whose token embeddings start the context
    # (CoOp's ctx_init, e.g. "a photo of a"): the context length is then their token count
    ctx_init: str = ""
    seed: int = 0
    out: str = "{work_dir}/prompts/detpro.safetensors"

    def __post_init__(self) -> None:
        e = self.iou_edges
        if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:])) or e[0] < 0:
            raise DistillError(f"prompts.iou_edges: expected at least 2 increasing IoU edges >= 0, got {list(e)}")
        if len(self.neg_iou) != 2 or not 0 <= self.neg_iou[0] < self.neg_iou[1] <= e[0]:
            raise DistillError(f"prompts.neg_iou: expected [lo, hi) with 0 <= lo < hi <= the first positive edge {e[0]}, got {list(self.neg_iou)}")
        if self.ctx_len < 1:
            raise DistillError(f"prompts.ctx_len: expected >= 1, got {self.ctx_len}")
        if not 0 < self.neg_fraction <= 1:
            raise DistillError(f"prompts.neg_fraction: expected a fraction in (0, 1], got {self.neg_fraction}")


@dataclass(frozen=True)
class RegionConfig:
    """Teacher region embeddings (teacher/regions.py)."""

    mode: Literal["crop", "dense", "oake"] = "crop"  # crop (ViLD 3.2: 1x + 1.5x crops) | dense (RoIAlign on MaskCLIP map) | oake (OADP 3.2: adaptive square crop read by a masked object token)
    scales: tuple[float, ...] = (1.0, 1.5)
    max_proposals: int = 300
    shard_size: int = 256  # images per cache shard
    precision: Literal["", "fp32", "amp_bf16", "amp_fp16", "auto"] = ""  # "" = teacher.precision


@dataclass(frozen=True)
class ProposalConfig:
    """Class-agnostic RPN proposals (detection/proposals.py)."""

    top_k: int = 300
    nms: float = 0.7
    min_size: float = 4.0
    name: str = "rpn"  # the class-agnostic network's folder: proposals/<name>/
    batch_size: int = 16  # images per forward when writing proposals
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=600))


@dataclass(frozen=True)
class TrainConfig:
    """The shared training engine (engine/train.py)."""

    max_steps: int = 2000
    batch_size: int = 8
    lr: float = 0.02
    weight_decay: float = 1e-4
    momentum: float = 0.9
    optimizer: Literal["sgd", "adamw"] = "sgd"
    warmup: int = 100
    schedule: Literal["cosine", "step", "poly", "constant"] = "cosine"
    grad_accum: int = 1
    precision: Precision = "fp32"  # autocast during training (AMP only on CUDA by default)
    clip_grad: float = 0.0
    eval_period: int = 0  # 0 = only at the end
    checkpoint_period: int = 500
    log_period: int = 20
    seed: int = 0
    deterministic: bool = False
    device: str = ""


@dataclass(frozen=True)
class BackbonePretrainConfig:
    """``distill train backbone``: the detector's ResNet pretrained on crops of base-class boxes
    (detection/backbone.py), the stand-in for ImageNet weights where nothing can be downloaded."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 0.002  # AdamW, one-cycle schedule
    crop_size: int = 48  # px; the shapes world's objects are 10-60 px
    context: tuple[float, ...] = (1.1, 1.6)  # crop side / box's longer side, drawn uniformly
    seed: int = 0
    out: str = "{work_dir}/backbone/base_crops.pth"


@dataclass(frozen=True)
class DetConfig:
    """The ViLD student (detection/)."""

    name: str = "vild"
    # faster_rcnn = the ViLD student (two-stage); fcos = the one-stage student in the manner of
    # ZSD-YOLO on torchvision's FCOS (detection/one_stage.py): embedding per location, objectness
    # for background, text + image losses on the locations FCOS assigns to a box; scores with its
    # own embedding only (det.inference: text)
    arch: Literal["faster_rcnn", "fcos"] = "faster_rcnn"
    # fcos, ZSD-YOLO's self-labelling: per image at most self_labels proposals of the class-agnostic
    # RPN (distill propose) with objectness >= self_label_score and IoU < self_label_iou with every
    # base box become class-less targets (objectness, box and image losses; needs use_image)
    # fcos: conv layers of each tower before the prediction convs: 0 = ZSD-YOLO's head (YOLOv5's
    # Detect: the prediction convs read the neck's levels directly; what makes a one-stage student
    # fast, bench/one_stage.py) | 4 = FCOS's towers (GroupNorm, as torchvision builds FCOS)
    head_convs: int = 0
    # fcos, inference: locations whose objectness is below this are dropped before class scoring
    # and NMS (ZSD-YOLO's test.py --obj-conf-thresh; 0.1 in its README's COCO commands)
    objectness_thresh: float = 0.1
    self_labels: int = 0
    self_label_score: float = 0.5
    self_label_iou: float = 0.3
    backbone: Literal["resnet18_fpn", "resnet34_fpn", "resnet50_fpn", "resnet101_fpn", "mobilenet_v3_large_fpn"] = "resnet18_fpn"
    pretrained_backbone: str = ""  # local path to backbone weights; empty = random init
    # with pretrained_backbone: true = torchvision's recipe for ImageNet weights (frozen BatchNorm,
    # stem and first stage fixed); false = every layer trains, with BatchNorm (for weights from
    # `distill train backbone`, whose statistics come from object crops)
    freeze_backbone: bool = True
    backbone_pretrain: BackbonePretrainConfig = field(default_factory=BackbonePretrainConfig)
    # torchvision's resize of every image, train and eval: shorter side to min_size unless the
    # longer side would pass max_size. With augment lsj, max_size is also the side of the square
    # LSJ canvas and min_size must equal it, so the canvas reaches the model as it is and eval
    # images get their longer side scaled to it (ViLD: 1024x1024 both ways)
    min_size: int = 128
    max_size: int = 128
    # train-time augmentation (data/transforms.py; evaluation never augments): none | flip
    # (horizontal) | flip_zoom (flip + zoom 0.8-1.25 about the centre, size unchanged) | lsj
    # (ViLD: flip + large-scale jitter onto a max_size x max_size canvas)
    augment: Literal["none", "flip", "flip_zoom", "lsj"] = "none"
    lsj_scale: tuple[float, ...] = (0.1, 2.0)  # lsj: longer side = max_size x s, s ~ U(lo, hi)
    masks: bool = False
    temperature: float = 0.01  # ViLD section 3.2 (tau)
    text_weight: float = 1.0  # ViLD-text loss weight
    image_weight: float = 0.5  # ViLD-image loss weight (ViLD section 4, R50: w = 0.5)
    use_text: bool = True
    use_image: bool = True
    # ViLD section 3.4 (ViLD-ensemble): "separate" gives ViLD-image its own box head + projection
    # (the same architecture as the text branch's), so the text loss, which treats unannotated
    # novel objects as background, no longer fights the distillation in one embedding; "shared" =
    # section 3.3's ViLD (one region embedding trained by both losses)
    image_head: Literal["shared", "separate"] = "shared"
    train_on_all: bool = False  # oracle: train on base and novel boxes
    # OADP's distillation pyramid (Wang et al. CVPR 2023, 3.3; detection/pyramid.py), each 0 = off;
    # the paper's weights (configs/dp/models/global_.py, block.py): global 0.5 (MSE, summed, of the
    # student's mean-pooled last FPN level, projected, vs the teacher's image embedding), block 128
    # (L1 of the student's block embeddings vs the teacher's embeddings of the image blocks) and
    # block_relation 8 (MSE of their cosine-relation matrices), each ramped up linearly over
    # pyramid_warmup steps (WarmupScheduler end=200)
    global_weight: float = 0.0
    block_weight: float = 0.0
    block_relation_weight: float = 0.0
    pyramid_warmup: int = 200
    ensemble_alpha: float = 2 / 3  # ViLD section 3.4: base weight on the text branch
    ensemble_beta: float = 2 / 3  # novel weight on the image branch
    # text | image | ensemble (teacher crops at test time, 3.4's first ensemble) |
    # image_head | ensemble_heads (the student's own image-branch embedding, alone or in 3.4's
    # ensemble with the text branch: ViLD-ensemble, no teacher at test time)
    inference: Literal["text", "image", "ensemble", "image_head", "ensemble_heads"] = "ensemble"
    score_thresh: float = 0.001
    nms: float = 0.5
    detections_per_img: int = 100
    num_image_distill: int = 100  # proposals per image distilled (<= regions.max_proposals)
    ensemble_candidates: int = 100  # boxes per image the teacher crops for image / ensemble scores
    anchor_sizes: tuple[int, ...] = ()  # one size per FPN level; empty = torchvision's (32..512)
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    roi_batch_size: int = 512  # RoIs sampled per image for the box head (25% positive)
    # the box head over the 7x7 pooled RoIs: mlp2 = torchvision's TwoMLPHead (2 fc); 4conv1fc =
    # torchvision's FastRCNNConvFCHead as its fasterrcnn_resnet50_fpn_v2 builds it (4 conv 3x3 with
    # BatchNorm + ReLU, 1 fc); 4conv2fc = ViLD's (tensorflow/tpu projects/vild configs/
    # vild_resnet.yaml frcnn_head: num_convs 4, num_fcs 2, use_batch_norm; modeling/vild_head.py:
    # BatchNorm + ReLU after every conv and every fc). A checkpoint of one head fits no other
    box_head: Literal["mlp2", "4conv1fc", "4conv2fc"] = "mlp2"
    box_head_dim: int = 1024  # width of the box head's fc layers (TwoMLPHead's representation size; ViLD fc_dims: 1024)
    box_head_conv_dim: int = 256  # 4conv1fc / 4conv2fc: channels of each conv (ViLD num_filters: 256)
    fpn_channels: int = 256  # FPN width (torchvision: 256)
    returned_layers: tuple[int, ...] = (1, 2, 3, 4)  # ResNet stages feeding the FPN (1 = stride 4)
    checkpoint: str = ""  # --eval-only / labeling: weights to load (default: det/<name>/model_final.pt)
    init: str = ""  # weights to start training from (self-training starts from the detector it improves)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for key in ("global_weight", "block_weight", "block_relation_weight"):
            if getattr(self, key) < 0:
                raise DistillError(f"det.{key}: expected >= 0 (0 = off), got {getattr(self, key)}")
        if self.arch == "fcos" and self.inference != "text":
            raise DistillError(f"det.inference: the one-stage student (det.arch=fcos) scores with its own embedding only; expected text, got {self.inference}")
        if self.arch == "fcos" and (self.masks or self.image_head != "shared" or self.global_weight or self.block_weight or self.block_relation_weight):
            raise DistillError("det.arch=fcos: masks, image_head=separate and OADP's pyramid are two-stage (ViLD) options; leave them at their defaults")
        if self.arch == "fcos" and self.self_labels > 0 and not self.use_image:
            raise DistillError("det.self_labels: self-labels are distilled from the teacher's embeddings of them: they need det.use_image=true (or det.self_labels=0)")
        if not 0 <= self.objectness_thresh < 1:
            raise DistillError(f"det.objectness_thresh: expected in [0, 1), got {self.objectness_thresh}")
        if self.head_convs < 0:
            raise DistillError(f"det.head_convs: expected >= 0, got {self.head_convs}")
        if self.self_labels < 0 or not 0 <= self.self_label_score <= 1 or not 0 < self.self_label_iou <= 1:
            raise DistillError(f"det.self_labels / self_label_score / self_label_iou: expected >= 0, [0, 1], (0, 1], got {self.self_labels}, {self.self_label_score}, {self.self_label_iou}")
        if self.augment == "lsj" and self.min_size != self.max_size:
            raise DistillError(f"det.augment: lsj needs det.min_size == det.max_size (the canvas side, kept as is by the detector), got {self.min_size} and {self.max_size}")
        if len(self.lsj_scale) != 2 or not 0 < self.lsj_scale[0] <= self.lsj_scale[1]:
            raise DistillError(f"det.lsj_scale: expected [lo, hi] with 0 < lo <= hi, got {list(self.lsj_scale)}")
        for key in ("box_head_dim", "box_head_conv_dim"):
            if getattr(self, key) < 1:
                raise DistillError(f"det.{key}: expected a width >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class SegConfig:
    """Segmentation students (segmentation/)."""

    name: str = "lseg"
    arch: Literal["lseg", "clipseg"] = "lseg"
    backbone: Literal["resnet18", "teacher", "dense_tower"] = "resnet18"  # lseg image encoder: resnet18 | teacher | dense_tower (the CLIPSelf tower); clipseg: dense_tower = its frozen ViT is the CLIPSelf tower, else the teacher's own
    embed_dim: int = 0  # 0 = the teacher's text embedding size
    distill_weight: float = 0.0  # pixel distillation weight (0 = off)
    distill_loss: Literal["cosine", "l1"] = "cosine"
    # MaskCLIP+ (MaskCLIP 3.3, zero-shot; segmentation/maskclip_plus.py): train over all classes;
    # pixels whose mask holds an unseen class id are suppressed and pseudo-labelled by MaskCLIP (the
    # first maskclip_plus_clip_fraction of the steps), then by the student itself. The training masks
    # must keep the unseen ids (e.g. seg.train_masks={data.semantic_root}/train). Lseg only.
    maskclip_plus: bool = False
    maskclip_plus_clip_fraction: float = 0.1  # the reference's start_self_train=2000 of 20k iterations
    clipseg_layers: tuple[int, ...] = (3, 7, 9)  # for a 12-layer ViT; scaled to the teacher's depth
    clipseg_reduce_dim: int = 64
    clipseg_heads: int = 4
    clipseg_hidden: int = 2048  # decoder MLP size (transformers' decoder_intermediate_size)
    clipseg_queries: int = 8  # queries per training image (present classes first, then negatives)
    clipseg_complex_head: bool = False
    bg_thresh: float = 0.5  # clipseg: background where no query's probability exceeds this
    pretrained_backbone: str = ""  # lseg resnet18: local state-dict file; empty = random init
    finetune_backbone: bool = True  # lseg backbone=teacher: fine-tune (true) or freeze the tower
    features: int = 64  # DPT decoder width
    # lseg: the scale of the cosine logits. fixed = lang-seg's constant 1/0.07 (never trained);
    # learnable = a parameter initialised to 1/0.07 and clamped at 100 (CLIP's)
    logit_scale: Literal["fixed", "learnable"] = "fixed"
    # lseg: lang-seg's spatial regularisation of the logits (its --arch_option 0 | 1 | 2): none |
    # bottleneck (conv + the max over classes) | depthwise (conv); one 3x3 conv shared by all classes
    head_block: Literal["none", "bottleneck", "depthwise"] = "none"
    head_block_depth: int = 1  # lseg: applications of the one head block (lang-seg --block_depth), the last without activation
    head_block_activation: Literal["lrelu", "tanh", "relu"] = "lrelu"  # lseg: between applications (lang-seg --activation)
    image_size: int = 128  # training crop size
    augment: bool = True  # resize / pad / random crop / horizontal flip (albumentations)
    window: int = 0  # sliding-window size at inference (0 = whole image)
    window_stride: int = 0  # 0 = 2/3 of the window
    train_images: str = ""  # empty = {data.image_root}/train
    train_masks: str = ""  # empty = data.masks, else {data.semantic_root}/train_base
    val_images: str = ""  # empty = {data.image_root}/val
    val_masks: str = ""  # empty = {data.semantic_root}/val
    train_list: str = ""  # optional txt of image stems to train on (e.g. VOC train_aug.txt)
    val_list: str = ""
    eval_batch_size: int = 8
    max_eval_images: int = 0  # 0 = all
    train: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="adamw", lr=1e-3))

    def __post_init__(self) -> None:
        if self.head_block_depth < 1:
            raise DistillError(f"seg.head_block_depth: expected >= 1 (applications of the head block), got {self.head_block_depth}")


@dataclass(frozen=True)
class LabelConfig:
    """Pseudo-labels (labels/pseudo.py)."""

    # what scores the images: vild / seg (a student checkpoint's predictions), teacher (crops of
    # class-agnostic boxes scored by the teacher), vlplm (VL-PLM: boxes of a detector trained on
    # base classes, refined by its RoI head, teacher scores fused with the RPN objectness)
    source: Literal["vild", "seg", "teacher", "vlplm"] = "vild"
    # vild / seg: the student checkpoint (model_final.pt); teacher: "teacher" or, with proposals=rpn,
    # the ViLD checkpoint whose RPN proposes; vlplm: the base detector, a ViLD checkpoint (the
    # pipeline's default: {work_dir}/det/vild_text/model_final.pt)
    model: str = ""
    images: str = ""
    vocab: str = ""
    out: str = "{work_dir}/labels"
    format: tuple[str, ...] = ("coco", "png")
    # score threshold; empty = the source's default: 0.8 for vlplm (VL-PLM's threshold on the
    # fused score), else 0.3 (labels/filtering.py SOURCE_THRESH)
    score_thresh: float | None = None
    class_thresh: tuple[str, ...] = ()  # "red star=0.5"
    top_k: int = 100
    nms: float | None = None  # class-wise NMS IoU (0 = off); empty = the source's: 0.6 for vlplm, else 0.5
    min_area: float = 16.0
    batch_size: int = 8
    num_workers: int = 0
    shard_size: int = 64  # images per output shard (the unit of resume)
    # teacher source: class-agnostic boxes = components (colour connected components: the shapes
    # world's flat-coloured objects) | windows (multi-scale sliding windows: photos) |
    # components+windows | rpn (a ViLD checkpoint's RPN, given as --model) | auto (components for
    # the embedded teacher distill-tiny-vit, windows for any other teacher)
    proposals: Literal["auto", "components", "windows", "components+windows", "rpn"] = "auto"
    max_proposals: int = 100  # teacher / vlplm sources: boxes scored per image (VL-PLM: the RPN's top 100)
    # vlplm source: times the detector's RoI head re-regresses each box (VL-PLM tools/gen_PLs.py --roi_num)
    refine_steps: int = 10
    # vlplm source: score = rpn_weight * RPN objectness + (1 - rpn_weight) * teacher score (VL-PLM --lamda)
    rpn_weight: float = 0.5
    # teacher source: images are decoded with their longer side at most max_side px (0 = full size) for
    # candidates and crops; labels are written in full-image pixels (memory bounded by this size)
    max_side: int = 1024
    background: tuple[str, ...] = ("background",)  # teacher source: extra prompts whose wins are dropped (or a .txt)
    gt: str = ""  # a COCO json with hidden ground truth: write quality metrics to <out>/metrics.json


@dataclass(frozen=True)
class CamConfig:
    """CLIP-ES CAM refinement (distill/cam/)."""

    method: Literal["clip_es", "clims"] = "clip_es"  # where the CAM seeds come from: CLIP-ES (the teacher's Grad-CAM) | CLIMS (a CAM network, the clims section)
    images: str = ""
    labels: str = ""
    out: str = "{work_dir}/cam"
    background: str = "background_shapes.txt"  # CLIP-ES 3.2 background words: a file (one a line) or the words themselves
    logit_scale: float = 100.0  # CLIP-ES section 3.2: 100 x cosine; <= 0: the teacher's learned scale
    # CLIP-ES 3.3 class-aware attention affinity; false = masks from the softmax Grad-CAM (the
    # ablation still measures CAA). The shapes world's 4-block teacher turns it off (see its config).
    caa: bool = True
    caa_layers: int = 8  # CLIP-ES: attention of the last 8 blocks
    caa_box_thresh: float = 0.4
    # the affinity's power: 2 = the repo (``trans_mat @ trans_mat`` once), 1 = the symmetrised
    # Sinkhorn affinity itself (each extra factor is one more hop of propagation)
    caa_power: int = 2
    bg_thresh: float = 0.0  # 0 = background = 1 - max class CAM; else a fixed threshold
    crf: bool = False
    conf_thresh: float = 0.95
    # confidence of a pixel: the CRF posterior when crf=true (CLIP-ES 3.4); without CRF, "prob" =
    # its score normalised over background + classes, "score" = the winning score itself.
    conf_source: Literal["prob", "score"] = "prob"
    image_size: int = 0  # 0 = teacher.dense_image_size
    # square: every image resized to image_size x image_size (batched); patch_multiple: CLIP-ES repo,
    # aspect kept, each side rounded up to a multiple of the patch size (image_size 0 = original
    # scale, else the longer side scaled to image_size).
    resize: Literal["square", "patch_multiple"] = "square"
    pool: Literal["mean", "model"] = "mean"  # image embedding for the CAM: mean (CLIP-ES repo: mean patch token) | model
    # image tower the CAMs read: teacher (its own) | dense_tower (the CLIPSelf tower of teacher.dense_tower,
    # whose patch tokens are trained to match crop embeddings, so the mean patch token reads the objects)
    tower: Literal["teacher", "dense_tower"] = "teacher"
    bg_power: float = 1.0  # background score = (1 - max class CAM) ** bg_power (CLIP-ES eval scripts)
    vocab: str = ""  # class vocabulary; empty = data.vocab, else the categories of data.train_full_json
    templates: str = ""  # prompt templates file, or one template containing {}; empty = teacher.templates
    batch_size: int = 16
    num_panels: int = 8  # PNG panels (image, Grad-CAM, refined CAM, mask) for the first N images


@dataclass(frozen=True)
class ClimsConfig:
    """CLIMS (Xie et al., CVPR 2022; github.com/CVI-SZU/CLIMS; distill/cam/clims.py): a CAM network
    trained from image-level labels with the frozen teacher as the judge (``distill cam --method
    clims``, ``cam.method: clims``). Weights and schedule are the reference's run_sample.py."""

    backbone: Literal["resnet18", "resnet50"] = "resnet18"  # the reference: ResNet-50, output stride 16
    pretrained: str = "{work_dir}/backbone/base_crops.pth"  # ResNet weights to start from ("" = random); the reference: ImageNet
    image_size: int = 256  # square training input (the reference: 512 crops)
    batch_size: int = 16  # cam_batch_size
    # step 1, the baseline CAM it starts from (IRN train_cam: multi-label soft margin, 5 epochs, lr 0.1,
    # poly; 10x on the classifier); step 2, CLIMS (15 epochs, lr 2.5e-4, 10x on the classifier)
    baseline_epochs: float = 5.0
    baseline_lr: float = 0.1
    epochs: float = 15.0
    lr: float = 0.00025
    weight_decay: float = 0.0001
    # the four losses, each 0 = off (hyper 10,24,1,0.2): object-text matching, background-text
    # matching, co-occurring background suppression, area regulariser
    otm_weight: float = 10.0
    btm_weight: float = 24.0
    cbs_weight: float = 1.0
    reg_weight: float = 0.2
    cbs_thresh: float = 0.26  # clip_loss.py BackgroundSuppressionLoss(threshold=0.26)
    template: str = "a photo of {}."  # clip_utils.py prompt_dict
    background: str = ""  # co-occurring background words (a file or the words); "" = cam.background
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)  # CAM inference scales, each with its flip (cam_scales)
    seed: int = 0
    out: str = "{work_dir}/cam/clims.pth"


@dataclass(frozen=True)
class SelftrainConfig:
    """One round of self-training on pseudo-labels (labels/selftrain.py, pipeline stage selftrain)."""

    steps: int = 0  # steps of fine-tuning from the ViLD weights (0 = det.train.max_steps)
    keep: Literal["novel", "base", "all"] = "novel"  # classes taken from the pseudo-labels
    score_thresh: float = 0.0  # pseudo-labels below it are dropped (label.score_thresh applies first)
    repeat: int = 1  # the pseudo-labeled images are drawn this many times per epoch
    train_split: bool = False  # also pseudo-label the training images' novel objects (VL-PLM)


@dataclass(frozen=True)
class PipelineConfig:
    """The stage graph runner (distill/pipeline/)."""

    stages: tuple[str, ...] = ()  # empty = all
    # applied by `distill run --quick` before the command line's own overrides
    quick_overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """The root config: every section, so one file can drive a whole run."""

    work_dir: str = "runs/shapes"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    clipself: ClipSelfConfig = field(default_factory=ClipSelfConfig)
    regions: RegionConfig = field(default_factory=RegionConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    det: DetConfig = field(default_factory=DetConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    selftrain: SelftrainConfig = field(default_factory=SelftrainConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    clims: ClimsConfig = field(default_factory=ClimsConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
