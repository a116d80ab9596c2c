"""LSeg-style student (Li et al., "Language-driven Semantic Segmentation", ICLR 2022).

An image encoder and a DPT decoder (Ranftl et al., ICCV 2021: reassemble multi-scale features,
fusion blocks of residual conv units, progressive upsampling) predict an L2-normalised embedding of
the teacher's text dimension for every pixel. Logits are a scale times the cosine with the text
embeddings of the current vocabulary, which is an input (:meth:`LSeg.set_vocabulary` or the
``text`` argument), never a persistent buffer, so a trained student takes any vocabulary at
inference. The scale (``logit_scale``): ``fixed`` = lang-seg's constant 1/0.07 (LSeg section 3,
CLIP's temperature; isl-org/lang-seg modules/models/lseg_net.py, ``LSeg.__init__``:
``self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07)).exp()``, the ``.exp()`` of a
Parameter is a plain tensor, not registered, so nothing trains it), or ``learnable`` = initialised to
1/0.07, trained and clamped at 100 as CLIP's.

Optional spatial regularisation of the logits (lang-seg ``--arch_option`` 1 / 2, ``head_block``
here): one small block shared by every class, applied ``head_block_depth`` times to the logits
before they are upsampled (:class:`LogitBlock`).

Background: channel 0 of the logits is a *learned* background embedding (a parameter, normalised
at use), as Detic's zero-shot classifier does, rather than the text embedding of a "background"
prompt: in the shapes world "background" is textured clutter that no caption names, so the teacher
has no good text for it; LSeg itself uses an "other" label whose text is embedded. The semantic
mask values are 0 = background, c = category id, 255 = ignore; channel ``1 + i`` is the class
whose semantic id is ``class_ids[i]``.

Training: cross entropy over background + the training vocabulary (base classes; novel pixels are
already 255 in ``train_base`` masks, and any id not in the training vocabulary is ignored), plus the
optional pixel distillation toward the teacher's MaskCLIP pixel embeddings over all pixels.

Encoders: ``resnet18`` (torchvision, random init or local weights; DPT's hybrid uses a ResNet) or
``teacher`` (the teacher's open_clip ViT, fine-tuned or frozen; DPT's ViT reassemble with readout
"ignore").
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.segmentation.clipseg import _check_image, _check_queries, _target_masks
from distill.segmentation.losses import pixel_distill_loss, remap_masks, seg_ce_loss
from distill.teacher.vit import block_outputs

LOGIT_SCALE_INIT = 1 / 0.07  # LSeg section 3 (temperature as in CLIP)
LOGIT_SCALE_MAX = 100.0  # CLIP clamps its learnable scale at 100
LOGIT_SCALES = ("fixed", "learnable")
HEAD_BLOCKS = ("none", "bottleneck", "depthwise")  # lang-seg --arch_option 0, 1, 2
ACTIVATIONS = {"lrelu": nn.LeakyReLU, "tanh": nn.Tanh, "relu": nn.ReLU}  # lang-seg's block activations


# ----------------------------------------------------------------------------------------------
# Encoders: images in [0, 1] -> 4 feature maps, shallow (high resolution) to deep
# ----------------------------------------------------------------------------------------------


def resnet_with_weights(arch: str, weights: str = "", key: str = "seg.pretrained_backbone", **kw) -> nn.Module:
    """A torchvision ResNet (``resnet18`` / ``resnet50``) with a local state dict (its ``fc`` is
    ignored: `distill train backbone` saves none), or random init for ``""`` (no downloads); a
    missing or mismatched file is a one-line error naming ``key``."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, **kw)
    if weights:
        from distill.engine.checkpoint import load_file, state_dict_mismatch

        sd = load_file(weights, key, f"a {arch} state dict, e.g. the one `distill train backbone` writes")
        own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
        bad = state_dict_mismatch(own, {k: v for k, v in sd.items() if not k.startswith("fc.")}) if isinstance(sd, dict) else "not a state dict"
        if bad:
            raise DistillError(f"{key}: {weights}: not a {arch} state dict: {bad}")
        net.load_state_dict(sd, strict=False)
    return net


class ResNetEncoder(nn.Module):
    """torchvision ResNet-18 stages 1..4 (strides 4, 8, 16, 32). ``weights``: a local state-dict
    file or ``""`` for random init (no downloads)."""

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, weights: str = ""):
        super().__init__()
        net = resnet_with_weights("resnet18", weights, "seg.pretrained_backbone")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = (64, 128, 256, 512)
        self.patch = 32  # the coarsest stride: smaller images are refused
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem((images - self._mean) / self._std)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]


def _resample(ch: int, patch: int, stride: int) -> nn.Module:
    """Tokens at stride ``patch`` -> a map at ``stride`` (DPT's reassemble resampling)."""
    if patch > stride:
        f = patch // stride
        return nn.ConvTranspose2d(ch, ch, f, stride=f)
    if patch == stride:
        return nn.Identity()
    f = stride // patch
    return nn.Conv2d(ch, ch, 3, stride=2, padding=1) if f == 2 else nn.Conv2d(ch, ch, f, stride=f)


class ViTEncoder(nn.Module):
    """An open_clip ViT (the teacher's tower) read at 4 evenly spaced blocks, reassembled as in DPT
    (section 3: tokens -> image-like grid, 1x1 projection, resample to strides 4, 8, 16, 32)."""

    def __init__(self, visual: nn.Module, mean: Sequence[float], std: Sequence[float], finetune: bool = True, channels=(48, 96, 192, 384)):
        super().__init__()
        self.visual = visual
        depth = len(visual.transformer.resblocks)
        # DPT reads ViT-B (12 blocks) at blocks 3, 6, 9, 12: evenly spaced, the last one included.
        self.layers = tuple(sorted({max(0, round(depth * k / 4) - 1) for k in (1, 2, 3, 4)}))
        if len(self.layers) != 4:
            raise DistillError(f"seg.backbone=teacher: the ViT needs at least 4 blocks, it has {depth}")
        self.patch = int(visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size)
        width = int(visual.conv1.out_channels)
        self.finetune = finetune
        for p in visual.parameters():
            p.requires_grad_(finetune)
        self.channels = tuple(channels)
        c = self.channels
        self.project = nn.ModuleList([nn.Conv2d(width, ci, 1) for ci in c])
        # DPT reassembles ViT-B/16 tokens (stride 16) to strides 4, 8, 16, 32 (transposed convs x4,
        # x2, identity, 3x3 stride-2 conv); for another patch size the same output strides are kept.
        self.resample = nn.ModuleList([_resample(ci, self.patch, target) for ci, target in zip(c, (4, 8, 16, 32))])
        self.register_buffer("_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.finetune:
            self.visual.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        v = self.visual
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune):
            toks, (gh, gw) = block_outputs(v, ((images - self._mean) / self._std).to(v.conv1.weight.dtype), self.layers)
        feats = []
        for t, proj, res in zip(toks, self.project, self.resample):
            g = t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, gh, gw).float()  # readout "ignore"
            feats.append(res(proj(g)))
        return feats


# ----------------------------------------------------------------------------------------------
# DPT decoder
# ----------------------------------------------------------------------------------------------


class ResidualConvUnit(nn.Module):
    """DPT / RefineNet residual conv unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """DPT fusion: ``out = RCU2(x + RCU1(skip))``, upsampled (bilinear, align_corners as DPT) to the
    next level's size, then a 1x1 projection."""

    def __init__(self, ch: int, with_skip: bool = True):
        super().__init__()
        self.rcu1 = ResidualConvUnit(ch) if with_skip else None  # the deepest block has no skip
        self.rcu2 = ResidualConvUnit(ch)
        self.out_conv = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if skip is not None and self.rcu1 is not None:
            x = x + self.rcu1(skip)
        x = self.rcu2(x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTDecoder(nn.Module):
    """Four feature maps -> (B, out_dim, H1 * 2, W1 * 2) where (H1, W1) is the finest map's size."""

    def __init__(self, in_channels: Sequence[int], features: int, out_dim: int):
        super().__init__()
        self.layer_rn = nn.ModuleList([nn.Conv2d(c, features, 3, padding=1, bias=False) for c in in_channels])
        self.refine = nn.ModuleList([FeatureFusionBlock(features, with_skip=i < len(in_channels) - 1) for i in range(len(in_channels))])
        # LSeg's head: a 1x1 conv from the decoder features to the embedding dimension.
        self.head = nn.Conv2d(features, out_dim, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        rn = [conv(f) for conv, f in zip(self.layer_rn, feats)]
        sizes = [r.shape[-2:] for r in rn]
        last = (sizes[0][0] * 2, sizes[0][1] * 2)
        path = self.refine[3](rn[3], None, sizes[2])
        path = self.refine[2](path, rn[2], sizes[1])
        path = self.refine[1](path, rn[1], sizes[0])
        path = self.refine[0](path, rn[0], last)
        return self.head(path)


# ----------------------------------------------------------------------------------------------
# lang-seg's spatial regularisation blocks (modules/models/lseg_net.py)
# ----------------------------------------------------------------------------------------------


class LogitBlock(nn.Module):
    """One 3x3 conv with a single input and output channel, run on every class channel alike (so it
    takes any vocabulary), then an activation unless ``act=False``. (B, K, H, W) -> (B, K, H, W).

    isl-org/lang-seg modules/models/lseg_net.py: ``depthwise_conv`` (``x.reshape(-1, 1, H, W)``,
    ``nn.Conv2d(1, 1, 3, padding=1)``, reshaped back); ``depthwise_block`` (``--arch_option 2``,
    ``kind="depthwise"``): ``act(conv(x))``; ``bottleneck_block`` (``--arch_option 1``,
    ``kind="bottleneck"``): ``act(conv(x) + max_k x)``, the max over the class channels of the
    block's input added back to every channel."""

    def __init__(self, kind: str, activation: str = "lrelu"):
        super().__init__()
        if kind not in HEAD_BLOCKS[1:]:
            raise DistillError(f"seg.head_block: {kind!r} is not one of {', '.join(HEAD_BLOCKS)}")
        if activation not in ACTIVATIONS:
            raise DistillError(f"seg.head_block_activation: {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.kind = kind
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor, act: bool = True) -> torch.Tensor:
        b, k, h, w = x.shape
        out = self.conv(x.reshape(b * k, 1, h, w)).view(b, k, h, w)
        if self.kind == "bottleneck":
            out = out + x.max(dim=1, keepdim=True)[0]
        return self.activation(out) if act else out


# ----------------------------------------------------------------------------------------------
# LSeg
# ----------------------------------------------------------------------------------------------


class LSeg(nn.Module):
    """Per-pixel embeddings + cosine classifier against an input vocabulary.

    ``forward(images (B, 3, H, W) in [0, 1], targets=None, text=None)``:
      - train mode: ``targets`` = {"masks": (B, H, W) int64 semantic ids} (optionally
        "teacher_pixels": (B, D, h, w)); returns {"loss_ce"} (+ {"loss_distill"} when
        ``distill_weight > 0``), each already weighted;
      - eval mode: (B, 1 + C, H, W) logits, channel 0 background, 1 + i = ``class_ids[i]``.

    ``logit_scale``: ``fixed`` (lang-seg: 1/0.07, a non-persistent buffer, never trained) or
    ``learnable`` (a parameter initialised to 1/0.07, clamped at 100); either way the attribute
    holds the log of the scale. ``head_block``: ``none`` or a :class:`LogitBlock` kind, applied
    ``head_block_depth`` times (:meth:`regularise`).
    """

    def __init__(self, encoder: nn.Module, embed_dim: int, features: int = 64, distill_weight: float = 0.0, distill_loss: str = "cosine",
                 logit_scale: str = "fixed", head_block: str = "none", head_block_depth: int = 1, head_block_activation: str = "lrelu"):
        super().__init__()
        self.encoder = encoder
        self.decoder = DPTDecoder(encoder.channels, features, embed_dim)
        self.embed_dim = embed_dim
        if logit_scale not in LOGIT_SCALES:
            raise DistillError(f"seg.logit_scale: {logit_scale!r} is not one of {', '.join(LOGIT_SCALES)}")
        log_scale = torch.tensor(math.log(LOGIT_SCALE_INIT))
        if logit_scale == "learnable":
            self.logit_scale = nn.Parameter(log_scale)
        else:  # kept out of the state dict: a fixed scale is the constant, never a value read from a file
            self.register_buffer("logit_scale", log_scale, persistent=False)
        if head_block not in HEAD_BLOCKS:
            raise DistillError(f"seg.head_block: {head_block!r} is not one of {', '.join(HEAD_BLOCKS)}")
        if head_block != "none" and head_block_depth < 1:
            raise DistillError(f"seg.head_block_depth: expected >= 1 (applications of the head block), got {head_block_depth}")
        # no module at all for "none": the same parameters and state dict as without the option
        self.head_block = LogitBlock(head_block, head_block_activation) if head_block != "none" else None
        self.head_block_depth = int(head_block_depth)
        self.bg_embed = nn.Parameter(torch.randn(embed_dim) * embed_dim**-0.5)
        self.distill_weight = float(distill_weight)
        if distill_loss not in ("cosine", "l1"):
            raise DistillError(f"seg.distill_loss: {distill_loss!r} is not one of cosine, l1")
        self.distill_loss = distill_loss
        self.register_buffer("text", torch.zeros(0), persistent=False)
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        object.__setattr__(self, "_teacher_pixels", None)  # a callable, not a submodule
        object.__setattr__(self, "_pseudo_labels", None)

    @property
    def patch(self) -> int:
        return int(self.encoder.patch)

    def set_vocabulary(self, text: torch.Tensor, class_ids: Sequence[int] | torch.Tensor | None = None) -> None:
        """``text`` (C, D) text embeddings; ``class_ids`` (C,) their semantic ids (default 1..C)."""
        _check_queries(text)
        if text.ndim != 2 or text.shape[1] != self.embed_dim:
            raise DistillError(f"text embeddings: expected (C, {self.embed_dim}), got {tuple(text.shape)}")
        ids = torch.arange(1, text.shape[0] + 1) if class_ids is None else torch.as_tensor(class_ids, dtype=torch.long)
        if ids.numel() != text.shape[0]:
            raise DistillError(f"class_ids: {ids.numel()} ids for {text.shape[0]} text embeddings")
        self.text = text.detach().to(self.logit_scale.device, torch.float32)
        self.class_ids = ids.to(self.logit_scale.device)

    def set_distill_teacher(self, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """``fn(images (B, 3, H, W)) -> (B, D, h, w)`` teacher pixel embeddings (MaskCLIP), called
        under ``torch.no_grad`` during training. Kept out of the state dict and of ``.to()``."""
        object.__setattr__(self, "_teacher_pixels", fn)

    def set_pseudo_labeler(self, fn: Callable[..., torch.Tensor] | None) -> None:
        """``fn(images, masks, target, logits) -> target``: fills the training target's suppressed
        pixels (MaskCLIP+, :class:`~distill.segmentation.maskclip_plus.MaskClipPlusLabels`), called
        under ``torch.no_grad`` with the detached logits. Kept out of the state dict."""
        object.__setattr__(self, "_pseudo_labels", fn)

    def pixel_embeddings(self, images: torch.Tensor, full_res: bool = True) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D, H, W) L2-normalised along D (``full_res=False``: at the
        decoder's resolution, half the finest feature map's stride)."""
        _check_image(images, self.patch)
        emb = self.decoder(self.encoder(images.float()))
        if full_res and emb.shape[-2:] != images.shape[-2:]:
            emb = F.interpolate(emb, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return F.normalize(emb, dim=1)

    def logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), text (C, D) -> (B, 1 + C, H, W): logits at the decoder's resolution,
        upsampled bilinearly to the image (LSeg's head upsamples after the dot product)."""
        return self._upsample(self.classify(self.pixel_embeddings(images, full_res=False), text), images)

    @staticmethod
    def _upsample(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def classify(self, emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """emb (B, D, H, W) normalised, text (C, D) -> (B, 1 + C, H, W) scaled cosine logits."""
        _check_queries(text)
        if text.ndim != 2 or text.shape[1] != emb.shape[1]:
            raise DistillError(f"text embeddings: expected (C, {emb.shape[1]}), got {tuple(text.shape)}")
        cls = torch.cat([self.bg_embed[None], text.to(emb.device, emb.dtype)], 0)
        cls = F.normalize(cls, dim=1)
        scale = self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)
        return self.regularise(scale * torch.einsum("bdhw,cd->bchw", emb, cls))

    def regularise(self, logits: torch.Tensor) -> torch.Tensor:
        """lang-seg's spatial regularisation of the logits (B, K, H, W), before the upsampling
        (isl-org/lang-seg modules/models/lseg_net.py ``LSeg.forward``: for ``arch_option`` 1 / 2,
        ``block_depth - 1`` applications of the one shared ``head_block`` with the activation, then
        one without, then ``output_conv``, the x2 upsampling). Identity for ``head_block=none``.
        (lang-seg's ``block_depth`` 0 also applies the block once; here that is depth 1.)"""
        if self.head_block is None:
            return logits
        for _ in range(self.head_block_depth - 1):
            logits = self.head_block(logits)
        return self.head_block(logits, act=False)

    def forward(self, images, targets=None, text: torch.Tensor | None = None):
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images))
        t = self.text if text is None else text
        if t.numel() == 0:
            raise DistillError("lseg: no vocabulary (set_vocabulary was not called and no text was given)")
        emb = self.pixel_embeddings(images, full_res=False)
        logits = self._upsample(self.classify(emb, t), images)
        if not self.training:
            return logits
        masks = _target_masks(targets, images)
        ids = self.class_ids if text is None else torch.arange(1, t.shape[0] + 1, device=images.device)
        target = remap_masks(masks, ids)
        if self._pseudo_labels is not None:
            with torch.no_grad():
                target = self._pseudo_labels(images, masks, target, logits.detach())
        losses = {"loss_ce": seg_ce_loss(logits, target)}
        if self.distill_weight > 0:
            tp = None
            if isinstance(targets, dict):
                tp = targets.get("teacher_pixels")
            if tp is None:
                if self._teacher_pixels is None:
                    raise DistillError("seg.distill_weight > 0 but no teacher pixel embeddings (set_distill_teacher)")
                with torch.no_grad():
                    tp = self._teacher_pixels(images)
            losses["loss_distill"] = self.distill_weight * pixel_distill_loss(emb, tp.to(emb.device), self.distill_loss)
        return losses


def build_lseg(
    embed_dim: int,
    backbone: str = "resnet18",
    *,
    visual: nn.Module | None = None,
    mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
    std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
    finetune: bool = True,
    features: int = 64,
    pretrained_backbone: str = "",
    distill_weight: float = 0.0,
    distill_loss: str = "cosine",
    logit_scale: str = "fixed",
    head_block: str = "none",
    head_block_depth: int = 1,
    head_block_activation: str = "lrelu",
) -> LSeg:
    """LSeg with a ``resnet18`` encoder (random init unless ``pretrained_backbone``) or a ViT
    tower of the teacher (``visual``, with the teacher's ``mean``/``std``; deep-copied so the
    teacher itself stays frozen): ``teacher`` = its image tower, ``dense_tower`` = its dense
    tower (the CLIPSelf weights of ``teacher.dense_tower``; the caller passes that tower).
    ``logit_scale`` and ``head_block*``: the head's options (:class:`LSeg`)."""
    if backbone == "resnet18":
        enc: nn.Module = ResNetEncoder(pretrained_backbone)
    elif backbone in ("teacher", "dense_tower"):
        if visual is None:
            raise DistillError(f"seg.backbone={backbone} needs the teacher's visual tower")
        import copy

        enc = ViTEncoder(copy.deepcopy(visual).float(), mean, std, finetune=finetune)
    else:
        raise DistillError(f"seg.backbone: {backbone!r} is not one of resnet18, teacher, dense_tower")
    return LSeg(enc, embed_dim, features, distill_weight, distill_loss, logit_scale=logit_scale, head_block=head_block,
                head_block_depth=head_block_depth, head_block_activation=head_block_activation)
