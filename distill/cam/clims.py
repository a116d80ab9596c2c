"""CLIMS (Xie et al., CVPR 2022; github.com/CVI-SZU/CLIMS): a CAM network trained from image-level
labels with the frozen teacher as the judge.

The network (``net/resnet50_clims.py``): a ResNet at output stride 16 (layer4 not strided), frozen
stem conv and batch norm, batch-norm statistics fixed (IRN's ``FixedBatchNorm``), a bias-free 1x1
classifier whose sigmoid is the CAM. It starts from a baseline CAM (IRN ``train_cam``: global
average pooled logits, multi-label soft margin) and is then trained with four losses
(``step/train_clims.py``, ``clip_loss.py``; weights ``--hyper 10,24,1,0.2``): for every (image,
present class) pair, with the CAM and the image both resized to the teacher's input (bilinear,
``align_corners=True``),

- **OTM** (object-text matching): ``-log s(CAM x image, class text)``;
- **BTM** (background-text matching): ``-log (1 - s((1 - CAM) x image, class text))``;
- **CBS** (co-occurring background suppression): ``-sum log (1 - s(CAM x image, background word))``
  over the background words whose similarity exceeds 0.26;
- **REG**: the mean CAM activation (area regulariser),

``s`` the cosine similarity of the teacher's embeddings, clamped to [1e-4, 0.9999] in OTM / BTM.
CAMs for masks (``step/make_clims.py``): ReLU of the classifier over the features at every scale
of ``clims.scales``, each with its horizontal flip, summed at stride 4 of the image, each present
class divided by its maximum. They go through the same refinement (CRF, confidence ignore) and
evaluation as CLIP-ES's.

The images the reference hands the teacher are its CAM network's (ImageNet-normalised) inputs;
here the [0, 1] image times the CAM is normalised with the teacher's own mean and std.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOSSES = ("otm", "btm", "cbs", "reg")  # the paper's order


class CamNet(nn.Module):
    """``forward(images (B, 3, H, W) in [0, 1]) -> (B, C, H/16, W/16)`` class activation logits."""

    def __init__(self, backbone: str, num_classes: int, weights: str = "", key: str = "clims.pretrained"):
        super().__init__()
        from distill.segmentation.lseg import resnet_with_weights

        net = resnet_with_weights(backbone, weights, key)
        for m in net.layer4[0].modules():  # output stride 16 (resnet50_clims.py: strides (2, 2, 2, 1))
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
        self.features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        channels = net.fc.in_features
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)
        for p in list(net.conv1.parameters()) + list(net.bn1.parameters()):  # _freeze_layers
            p.requires_grad_(False)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "CamNet":
        super().train(mode)
        for m in self.modules():  # IRN's FixedBatchNorm: running statistics are never updated
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((images - self._mean) / self._std))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The reference's two groups: the backbone at ``lr``, the classifier at 10x."""
        backbone = [p for p in self.features.parameters() if p.requires_grad]
        return [{"params": backbone, "lr": lr, "weight_decay": weight_decay},
                {"params": list(self.classifier.parameters()), "lr": 10 * lr, "weight_decay": weight_decay}]


class BaselineCamLoss(nn.Module):
    """IRN ``train_cam``: multi-label soft margin on the average-pooled class logits."""

    def __init__(self, net: CamNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss_cls": F.multilabel_soft_margin_loss(self.net(images).mean(dim=(2, 3)), labels)}


class ClimsLoss(nn.Module):
    """The four CLIMS losses (module docstring), each weighted; a weight of 0 drops its term."""

    def __init__(self, net: CamNet, teacher, text: torch.Tensor, background: torch.Tensor | None, weights: dict[str, float], cbs_thresh: float):
        super().__init__()
        self.net = net
        self._teacher = (teacher,)  # frozen, not part of the state
        self.register_buffer("text", F.normalize(text.float(), dim=-1), persistent=False)
        self.register_buffer("background", F.normalize(background.float(), dim=-1) if background is not None else torch.zeros(0, text.shape[1]), persistent=False)
        self.weights = dict(weights)
        self.cbs_thresh = float(cbs_thresh)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's unit image embeddings of [0, 1] images at its input size (gradients reach ``x``)."""
        t = self._teacher[0]
        return F.normalize(t.model.encode_image(t.normalize(x)).float(), dim=-1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cams = torch.sigmoid(self.net(images))
        S = self._teacher[0].image_size
        b, c = torch.nonzero(labels > 0, as_tuple=True)
        w = self.weights
        losses: dict[str, torch.Tensor] = {}
        if len(b) == 0:  # no labelled image in the batch: every term 0, still in the graph
            zero = cams.sum() * 0.0
            return {f"loss_{k}": zero for k in LOSSES if w.get(k, 0) > 0}
        cam = F.interpolate(cams, (S, S), mode="bilinear", align_corners=True)[b, c][:, None]
        img = F.interpolate(images, (S, S), mode="bilinear", align_corners=True)[b]
        fg = self.encode(cam * img)
        sim_fg = (fg * self.text[c]).sum(-1)
        if w.get("otm", 0) > 0:
            losses["loss_otm"] = w["otm"] * -torch.log(sim_fg.clamp(1e-4, 0.9999)).mean()
        if w.get("btm", 0) > 0:
            bg = self.encode((1 - cam) * img)
            sim_bg = (bg * self.text[c]).sum(-1)
            losses["loss_btm"] = w["btm"] * -torch.log(1 - sim_bg.clamp(1e-4, 0.9999)).mean()
        if w.get("cbs", 0) > 0:
            if len(self.background):
                s = fg @ self.background.t()
                mask = (s > self.cbs_thresh).float()
                losses["loss_cbs"] = w["cbs"] * -(torch.log(1 - s.clamp(max=0.9999)) * mask).sum()
            else:
                losses["loss_cbs"] = fg.sum() * 0.0
        if w.get("reg", 0) > 0:
            losses["loss_reg"] = w["reg"] * cams.mean()
        return losses


# ------------------------------------------------------------------------------------------ data
class LabelledImages(torch.utils.data.Dataset):
    """(image (3, S, S) in [0, 1], multi-hot labels (C,)) of the image-level label entries; a
    random horizontal flip when ``flip`` (the reference's ``hor_flip``)."""

    def __init__(self, root: Path, entries, num_classes: int, size: int, flip: bool = True):
        self.root, self.entries, self.C, self.size, self.flip = root, list(entries), num_classes, size, flip

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        from distill.cam.run import _image_path
        from distill.data.images import load_image

        e = self.entries[i]
        im = torch.from_numpy(np.ascontiguousarray(load_image(_image_path(self.root, e.file_name)))).permute(2, 0, 1).float().div_(255.0)
        x = F.interpolate(im[None], (self.size, self.size), mode="bilinear", align_corners=False, antialias=True)[0]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        y = torch.zeros(self.C)
        y[e.labels] = 1.0
        return x, y


# ------------------------------------------------------------------------------------------ train
def _train_phase(model: nn.Module, net: CamNet, ds, ccfg, lr: float, epochs: float, out_dir: Path, progress: bool,
                 num_workers: int = 0) -> dict:
    from distill.config import TrainConfig
    from distill.engine.optim import build_scheduler
    from distill.engine.train import make_loader, train

    bs = min(ccfg.batch_size, len(ds))
    steps = max(1, math.ceil(epochs * len(ds) / bs))
    # misc/torchutils.py PolyOptimizer: SGD with the groups' weight decay and poly decay (power 0.9);
    # its momentum argument lands in SGD's momentum slot as 1e-4, i.e. none to speak of: 0 here
    tcfg = TrainConfig(max_steps=steps, batch_size=bs, lr=lr, weight_decay=ccfg.weight_decay, momentum=0.0, optimizer="sgd",
                       warmup=0, schedule="poly", checkpoint_period=10**9, log_period=max(1, steps // 20), seed=ccfg.seed)
    opt = torch.optim.SGD(net.param_groups(lr, ccfg.weight_decay), lr=lr, momentum=0.0)
    loader = make_loader(ds, tcfg, num_workers=num_workers)
    return train(model, loader, tcfg, out_dir, optimizer=opt, scheduler=build_scheduler(opt, tcfg), progress=progress, final_checkpoint=False)


def clims_text(teacher, cfg, vocab) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class texts with ``clims.template`` and the background words (``clims.background``, else
    ``cam.background``) with it."""
    from distill.cam.run import read_word_list
    from distill.teacher.text import text_embeddings
    from distill.vocab import Vocabulary

    text = text_embeddings(teacher, vocab, [cfg.clims.template])
    words = read_word_list(cfg.clims.background or cfg.cam.background, "clims.background" if cfg.clims.background else "cam.background")
    bg = text_embeddings(teacher, Vocabulary(tuple(dict.fromkeys(words)), source="clims.background"), [cfg.clims.template]) if words else None
    return text, bg


def train_clims(cfg, teacher=None, split: str = "train", weights: dict[str, float] | None = None, out: str | None = None,
                baseline: str | None = None, progress: bool = True) -> dict:
    """Train the baseline CAM (unless ``baseline`` names a finished one) and then CLIMS on the
    image-level labels of ``split``; writes ``out`` (default ``clims.out``; its baseline beside it as
    ``*_baseline.pth``) and returns the training summary. ``weights`` overrides the four loss weights
    (the ablation adds them one at a time)."""
    from distill.cam.run import _resolve_inputs, read_image_labels
    from distill.engine.train import run_dir
    from distill.vocab import resolve_vocab

    t0 = time.time()
    ccfg = cfg.clims
    root, labels_path, _ = _resolve_inputs(cfg, split, None)
    vocab = resolve_vocab(cfg.data, cfg.cam.vocab, key="cam.vocab")
    entries = [e for e in read_image_labels(labels_path, vocab) if e.labels]
    if not entries:
        raise DistillError(f"{labels_path}: no image with a label to train CLIMS on")
    teacher = teacher or judge(cfg)
    out_path = Path(out or ccfg.out)
    base_path = Path(baseline) if baseline else out_path.with_name(out_path.stem + "_baseline.pth")
    ds = LabelledImages(root, entries, len(vocab), ccfg.image_size)
    torch.manual_seed(ccfg.seed)
    # a finished baseline replaces every weight: the ResNet it started from is not read again
    net = CamNet(ccfg.backbone, len(vocab), "" if base_path.is_file() else ccfg.pretrained)
    summary: dict = {"images": len(entries), "classes": len(vocab)}
    if base_path.is_file():
        net.load_state_dict(load_clims(base_path, ccfg.backbone, len(vocab)).state_dict())
        summary["baseline"] = f"read {base_path}"
    else:
        m = _train_phase(BaselineCamLoss(net), net, ds, ccfg, ccfg.baseline_lr, ccfg.baseline_epochs, run_dir(base_path), progress,
                         cfg.data.num_workers)
        _save(base_path, net, vocab, clims_settings(cfg, split))
        summary["baseline"] = {"steps": m.get("step"), "loss_cls": m.get("loss_cls")}
    w = dict(weights) if weights is not None else {k: getattr(ccfg, f"{k}_weight") for k in LOSSES}
    text, bg = clims_text(teacher, cfg, vocab)
    m = _train_phase(ClimsLoss(net, teacher, text, bg, w, ccfg.cbs_thresh), net, ds, ccfg, ccfg.lr, ccfg.epochs, run_dir(out_path), progress,
                     cfg.data.num_workers)
    _save(out_path, net, vocab, clims_settings(cfg, split, w))
    summary.update({"clims": {k: v for k, v in m.items() if k.startswith("loss") or k == "step"}, "weights": w, "out": str(out_path),
                    "wall_s": round(time.time() - t0, 1)})
    return summary


def judge(cfg):
    """The teacher CLIMS trains against: the CLIP itself (its image embedding; no dense tower)."""
    import dataclasses

    from distill.teacher.clip import build_teacher

    return build_teacher(dataclasses.replace(cfg.teacher, dense_tower=""))


def clims_network(cfg, vocab, teacher=None, progress: bool = True) -> CamNet:
    """The trained CAM network of ``clims.out``; trained first on the train split's image-level
    labels when the file is not there (logged)."""
    if not Path(cfg.clims.out).is_file():
        log.warning("clims.out: %s not found: training CLIMS on the train split first", cfg.clims.out)
        train_clims(cfg, teacher=teacher, progress=progress)
    from distill.engine.device import get_device

    return load_clims(cfg.clims.out, cfg.clims.backbone, len(vocab)).to(get_device(cfg.teacher.device))


def clims_settings(cfg, split: str = "train", weights: dict[str, float] | None = None) -> dict:
    """What a saved network was trained with: the baseline CAM's schedule, and for a CLIMS network
    (``weights`` given) its losses, schedule, texts and, where CBS is on, its threshold. Saved with
    the network; the ablation reuses a cached network only when they match."""
    c = cfg.clims
    s = {"split": split, "backbone": c.backbone, "pretrained": c.pretrained, "image_size": c.image_size, "batch_size": c.batch_size,
         "seed": c.seed, "weight_decay": c.weight_decay, "baseline_epochs": c.baseline_epochs, "baseline_lr": c.baseline_lr}
    if weights is not None:
        s.update(weights={k: float(weights.get(k, 0.0)) for k in LOSSES}, epochs=c.epochs, lr=c.lr, template=c.template,
                 background=c.background or cfg.cam.background)
        if weights.get("cbs", 0) > 0:
            s["cbs_thresh"] = c.cbs_thresh
    return s


def saved_settings(path: str | Path) -> dict | None:
    """The :func:`clims_settings` a network file was saved with (None for a file without them)."""
    from distill.engine.checkpoint import load_file

    state = load_file(Path(path), "clims.out", "a CAM network")
    return state.get("settings") if isinstance(state, dict) else None


def _save(path: Path, net: CamNet, vocab, settings: dict) -> None:
    from distill.files import atomic_path

    state = {"model": net.state_dict(), "backbone": settings["backbone"], "classes": list(vocab.names),
             "weights": settings.get("weights", {}), "settings": settings}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_clims(path: str | Path, backbone: str, num_classes: int) -> CamNet:
    """A trained CAM network (one line when the file is missing or of another backbone / vocabulary)."""
    from distill.engine.checkpoint import load_file

    p = Path(path)
    state = load_file(p, "clims.out", "a CAM network: train it with `distill cam CONFIG --method clims --images train`")
    if not isinstance(state, dict) or "model" not in state:
        raise DistillError(f"clims.out: {p}: not a CLIMS checkpoint (no 'model')")
    if state.get("backbone") != backbone or len(state.get("classes", [])) != num_classes:
        raise DistillError(f"clims.out: {p}: a {state.get('backbone')} over {len(state.get('classes', []))} classes; this config wants {backbone} over {num_classes}")
    net = CamNet(backbone, num_classes)
    net.load_state_dict(state["model"])
    return net.eval()


# ------------------------------------------------------------------------------------------ CAMs
@torch.no_grad()
def clims_cams(net: CamNet, image: np.ndarray, labels: list[int], scales=(1.0, 0.5, 1.5, 2.0)) -> torch.Tensor:
    """(H, W, 3) uint8 -> (K, ceil(H/4), ceil(W/4)) CAMs of the present ``labels`` in [0, 1]
    (make_clims.py: ReLU, each scale with its flip, summed at stride 4, divided by each class's max)."""
    dev = next(net.parameters()).device
    H, W = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)[None].to(dev)
    strided = (math.ceil(H / 4), math.ceil(W / 4))  # imutils.get_strided_size(size, 4)
    total = torch.zeros(len(labels), *strided, device=dev)
    if not labels:
        return total.cpu()
    for s in scales:
        xs = F.interpolate(x, (max(16, round(H * s)), max(16, round(W * s))), mode="bilinear", align_corners=False)
        cams = F.relu(net(torch.cat([xs, xs.flip(-1)])))[:, labels]
        cam = cams[0] + cams[1].flip(-1)
        total += F.interpolate(cam[None], strided, mode="bilinear", align_corners=False)[0]
    return (total / (total.amax(dim=(1, 2), keepdim=True) + 1e-5)).cpu()
