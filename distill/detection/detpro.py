"""DetPro (Du et al., CVPR 2022; github.com/dyabel/detpro, prompt/): learn the prompt context of
the ViLD student's text classifier from the teacher's region embeddings of proposals.

``distill train prompts CONFIG`` reads what the ``regions`` stage cached (the teacher's 1x + 1.5x
crop embeddings of each training image's proposals; nothing is re-embedded that the cache holds),
the proposals' boxes and the base ground truth, and learns, per IoU group of positive proposals
(context grading, paper 3.3; ``detpro.sh``: [0.5, 0.6) ... [0.9, 1.1)), a CoOp context
(:mod:`distill.teacher.prompt_learning`) with the reference's ``soft`` loss (prompt/trainer.py
``train_epoch``):

- positives: cross-entropy over the base classes at temperature 0.01, each class weighted by the
  inverse of its frequency;
- negatives (IoU in [0.1, 0.5), a random tenth of them): cross-entropy against the uniform
  distribution over the base classes (background interpretation, paper 3.2), weighted by the
  inverse of twice their frequency;
- the sum divided by the batch's summed weights.

SGD at lr 2e-3 for 6 epochs of batches of 512, cosine (run.py). The groups' class embeddings are
ensembled (:func:`~distill.teacher.prompt_learning.ensemble`). The prompt file is then used
wherever templates are: ``teacher.templates=<prompts.out>``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.config import Config, TrainConfig
from distill.errors import DistillError
from distill.files import write_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- data
def base_ground_truth(json_path: str, vocab) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{image_id: (boxes (M, 4) XYXY, labels (M,) index among vocab's base classes)}`` of a COCO
    json, categories matched to the vocabulary by name or synonym (annotations of other classes
    are left out: they are not training labels here)."""
    from distill.data.coco import load_coco
    from distill.vocab import name_key

    data = load_coco(json_path)
    base = vocab.base_indices
    by_name = {name_key(n): i for i, n in enumerate(vocab.names)}
    to_base = {}
    for c in data["categories"]:
        i = by_name.get(name_key(c["name"]))
        if i is None:
            try:
                i = vocab.index(c["name"])
            except DistillError:
                continue
        if i in base:
            to_base[int(c["id"])] = base.index(i)
    out: dict[int, tuple[list, list]] = {int(im["id"]): ([], []) for im in data["images"]}
    for a in data["annotations"]:
        k = to_base.get(int(a["category_id"]))
        if k is None or a.get("iscrowd", 0) or int(a["image_id"]) not in out:
            continue
        x, y, w, h = a["bbox"]
        out[int(a["image_id"])][0].append([x, y, x + w, y + h])
        out[int(a["image_id"])][1].append(k)
    return {iid: (torch.tensor(b, dtype=torch.float32).reshape(-1, 4), torch.tensor(lab, dtype=torch.long)) for iid, (b, lab) in out.items()}


def proposal_targets(boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per proposal: the base label of its best-overlapping ground truth and that IoU (label -1 and
    IoU 0 where the image has no base ground truth)."""
    from torchvision.ops import box_iou

    if len(gt_boxes) == 0 or len(boxes) == 0:
        return torch.full((len(boxes),), -1, dtype=torch.long), torch.zeros(len(boxes))
    iou, j = box_iou(boxes.float(), gt_boxes.float()).max(dim=1)
    return gt_labels[j], iou


def region_training_set(cfg: Config, cache, proposals: dict, gt: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All cached region embeddings with their label and IoU: (N, D) float32, (N,), (N,).
    Cache row i of an image is its proposal i (``embed_proposals``: the top ``num`` proposals);
    rows of skipped boxes (all zero) are dropped."""
    feats, labels, ious = [], [], []
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    for shard in cache.iter_shards():
        for iid, emb in shard.items():
            boxes = proposals.get(int(iid), (torch.zeros(0, 4), None))[0][: len(emb)]
            if len(boxes) != len(emb):
                raise DistillError(f"{cache.root}: image {iid} has {len(emb)} region embeddings but {len(boxes)} proposals (a stale cache: rerun the regions stage)")
            keep = emb.abs().sum(dim=1) > 0
            lab, iou = proposal_targets(boxes, *gt.get(int(iid), empty))
            feats.append(F.normalize(emb[keep].float(), dim=-1))
            labels.append(lab[keep])
            ious.append(iou[keep])
    if not feats:
        raise DistillError(f"{cache.root}: the region-embedding cache is empty (run the regions stage first)")
    return torch.cat(feats), torch.cat(labels), torch.cat(ious)


def group_split(labels: torch.Tensor, ious: torch.Tensor, pcfg, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Row indices of each IoU group's positives (base label, ``edges[g] <= IoU < edges[g+1]``) and
    of the negatives (``neg_iou[0] <= IoU < neg_iou[1]``, a random ``neg_fraction`` of them, the
    same for every group as run.py draws them once)."""
    e = pcfg.iou_edges
    groups = [torch.nonzero((labels >= 0) & (ious >= lo) & (ious < hi)).flatten() for lo, hi in zip(e, e[1:])]
    neg = torch.nonzero((ious >= pcfg.neg_iou[0]) & (ious < pcfg.neg_iou[1])).flatten()
    g = torch.Generator().manual_seed(seed)
    k = int(len(neg) * pcfg.neg_fraction)  # run.py: sample(train_neg, len // neg_split)
    neg = neg[torch.randperm(len(neg), generator=g)[:k]].sort().values
    return groups, neg


def class_weights(labels: torch.Tensor, num_classes: int, num_neg: int) -> torch.Tensor:
    """(C + 1,) loss weights, the last for negatives (run.py: ``freq[c] = count_c / N * C``,
    ``freq[bg] = 2 * N_neg / N``, weight = 1 / freq; N = positives + negatives). A class without
    positives gets weight 0 (it never occurs as a target)."""
    n = len(labels) + num_neg
    counts = torch.bincount(labels, minlength=num_classes).float()
    freq = torch.cat([counts / n * num_classes, torch.tensor([2.0 * num_neg / n])])
    return torch.where(freq > 0, 1.0 / freq.clamp_min(1e-12), torch.zeros_like(freq))


# ---------------------------------------------------------------------------------------- model
def detpro_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference's ``soft`` loss (prompt/trainer.py): ``logits`` (B, C) over base classes,
    ``labels`` (B,) a base index or -1 for a negative, ``weight`` (C + 1,). Returns the two named
    parts, each already divided by the batch's summed weights."""
    C = logits.shape[1]
    fg = labels >= 0
    bg = ~fg
    logp = F.log_softmax(logits, dim=-1)
    loss_fg = -(logp[fg].gather(1, labels[fg, None]).squeeze(1) * weight[labels[fg]]).sum()
    loss_bg = -(logp[bg].sum(dim=1) / C).sum() * weight[C]  # soft target 1 / C on every class
    norm = weight[labels[fg]].sum() + weight[C] * bg.sum()
    norm = norm.clamp_min(1e-12)
    return {"loss_fg": loss_fg / norm, "loss_bg": loss_bg / norm}


class PromptLearner(torch.nn.Module):
    """One learnable context (n_ctx, width) in front of every base class name; ``forward(feats,
    labels)`` returns DetPro's losses. The teacher stays outside the module's parameters and state."""

    def __init__(self, teacher, prompts, n_ctx: int, weight: torch.Tensor, temperature: float, init_std: float, seed: int,
                 init: torch.Tensor | None = None) -> None:
        super().__init__()
        from distill.teacher.prompt_learning import check_text_tower, prompt_tokens

        check_text_tower(teacher)
        width = teacher.model.token_embedding.weight.shape[1]
        g = torch.Generator().manual_seed(seed)
        start = init.detach().clone().float() if init is not None else torch.randn(n_ctx, width, generator=g) * init_std
        self.ctx = torch.nn.Parameter(start)
        self._teacher = (teacher,)  # a tuple: not a submodule (frozen, not checkpointed)
        self.prompts = [list(p) for p in prompts]
        # tokenised once (a name too long: one line now), not at every step
        self.register_buffer("tokens", prompt_tokens(teacher, [n for p in prompts for n in p], n_ctx), persistent=False)
        self.register_buffer("weight", weight.float(), persistent=False)
        self.temperature = float(temperature)

    def class_embeddings(self) -> torch.Tensor:
        from distill.teacher.prompt_learning import class_embeddings

        return class_embeddings(self._teacher[0], self.prompts, self.ctx, tokens=self.tokens)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.class_embeddings()
        logits = F.normalize(feats.float(), dim=-1) @ emb.t() / self.temperature
        return detpro_loss(logits, labels, self.weight)


def context_init(teacher, words: str) -> torch.Tensor:
    """(n, width) token embeddings of ``words`` (start-of-text and end-of-text left out): CoOp's
    ``ctx_init`` (coop_mini.py ``PromptLearner``'s non-random branch, DetPro's ``ctx_init``), the
    context starting as that hand-written prefix; its length is the words' token count."""
    tok = teacher.tokenize([words])[0]
    n = int(tok.argmax()) - 1
    if n < 1:
        raise DistillError(f"prompts.ctx_init: {words!r} has no tokens")
    with torch.no_grad():
        return teacher.model.token_embedding(tok[1 : 1 + n].to(teacher.device)).float().cpu()


# ---------------------------------------------------------------------------------------- train
def train_prompts(cfg: Config, teacher=None, progress: bool = True) -> dict:
    """``distill train prompts``: learn one context per IoU group, write ``prompts.out``, the class
    embeddings it makes for the vocabulary (``{work_dir}/embeddings/text``) and ``<out>_metrics.json`` beside it (per group: positives, negatives, final loss; zero-shot top-1 of
    the teacher on val ground-truth crops with the hand-written templates and with the learned
    prompts, base and novel). A group without positives is reported and left out."""
    from torch.utils.data import TensorDataset

    from distill.detection.proposals import embed_training_regions, load_proposals, proposals_dir
    from distill.engine.train import make_loader, run_dir, train
    from distill.teacher.prompt_learning import LearnedPrompts, load_prompts, save_prompts
    from distill.vocab import resolve_vocab

    t0 = time.time()
    pcfg = cfg.prompts
    vocab = resolve_vocab(cfg.data, need_base=True)
    base = vocab.subset(vocab.base_indices)
    proposals, _ = load_proposals(proposals_dir(cfg) / "proposals_train.safetensors")  # missing: one line before the teacher loads
    if teacher is None:
        from distill.engine.device import get_device
        from distill.teacher.clip import build_teacher

        teacher = build_teacher(cfg.teacher, device=get_device(cfg.teacher.device))
    cache, _ = embed_training_regions(cfg, teacher)  # the regions stage's cache (embeds only what it lacks)
    feats, labels, ious = region_training_set(cfg, cache, proposals, base_ground_truth(cfg.data.train_json, vocab))
    groups, neg = group_split(labels, ious, pcfg, pcfg.seed)
    init = context_init(teacher, pcfg.ctx_init) if pcfg.ctx_init else None
    n_ctx = len(init) if init is not None else pcfg.ctx_len
    out = Path(pcfg.out)
    work = run_dir(out)
    contexts, kept, counts = [], [], []
    for gi, (pos, (lo, hi)) in enumerate(zip(groups, zip(pcfg.iou_edges, pcfg.iou_edges[1:]))):
        entry = {"group": [lo, hi], "positives": int(len(pos)), "negatives": int(len(neg))}
        counts.append(entry)
        if len(pos) == 0:
            entry["skipped"] = "no base proposals in this IoU range"
            log.warning("prompts: IoU group [%.2f, %.2f) has no positive proposals: left out of the ensemble", lo, hi)
            continue
        idx = torch.cat([pos, neg])
        y = torch.cat([labels[pos], torch.full((len(neg),), -1, dtype=torch.long)])
        weight = class_weights(labels[pos], len(base), len(neg))
        model = PromptLearner(teacher, base.prompts, n_ctx, weight, pcfg.temperature, pcfg.init_std, pcfg.seed + gi, init=init).to(teacher.device)
        bs = min(pcfg.batch_size, len(idx))
        steps = max(1, pcfg.epochs * (len(idx) // bs))
        # run.py: SGD (no momentum, no weight decay), lr 2e-3, cosine over the epochs
        tcfg = TrainConfig(max_steps=steps, batch_size=bs, lr=pcfg.lr, weight_decay=0.0, momentum=0.0, optimizer="sgd",
                           warmup=0, schedule="cosine", checkpoint_period=10**9, log_period=max(1, steps // 20), seed=pcfg.seed + gi)
        loader = make_loader(TensorDataset(feats[idx], y), tcfg)
        m = train(model, loader, tcfg, work / f"group{gi}", device=teacher.device, progress=progress, final_checkpoint=False)
        entry.update({"steps": steps, "loss_last": m.get("loss")})
        contexts.append(model.ctx.detach().cpu())
        kept.append([lo, hi])
    if not contexts:
        raise DistillError(f"prompts.iou_edges: no IoU group has positive proposals ({len(labels)} proposals, {int((labels >= 0).sum())} overlap base ground truth)")
    lp = LearnedPrompts(torch.stack(contexts), teacher.fingerprint, kept, counts, list(base.names))
    save_prompts(out, lp)
    lp = load_prompts(out, teacher, n_ctx)
    # the class embeddings the prompts make for the run's vocabulary (base and novel), in the text cache
    from distill.teacher.text import text_embeddings

    text_dir = Path(cfg.work_dir) / "embeddings" / "text"
    text_embeddings(teacher, vocab, str(out), cache_dir=text_dir)
    metrics = {"prompts/file": str(out), "prompts/embeddings": str(text_dir), "prompts/ctx_len": n_ctx, "prompts/ctx_init": pcfg.ctx_init, "prompts/groups": counts,
               "prompts/proposals": int(len(labels)), **zero_shot_crops(cfg, teacher, vocab, lp),
               "prompts/wall_s": round(time.time() - t0, 1)}
    write_json(out.with_name(out.stem + "_metrics.json"), metrics)
    return metrics


@torch.no_grad()
def zero_shot_crops(cfg: Config, teacher, vocab, lp, max_images: int | None = None) -> dict:
    """The teacher's top-1 on val ground-truth boxes (1x + 1.5x crops, ViLD 3.2) over all classes
    of ``vocab``, with the hand-written templates (``teacher.templates``) and with the learned
    prompts ``lp``: ``prompts/top1_{templates,learned}_{base,novel}``."""
    from distill.teacher.evaluate import _split_index, iter_split
    from distill.teacher.prompt_learning import is_prompt_file, learned_text_embeddings
    from distill.teacher.regions import region_embeddings
    from distill.teacher.text import text_embeddings

    vocab, index = _split_index(cfg, cfg.data.val_json, max_images)
    is_novel = torch.tensor(vocab.is_novel, dtype=torch.bool)
    hand = None if is_prompt_file(cfg.teacher.templates) else text_embeddings(teacher, vocab, cfg.teacher.templates)
    learned = learned_text_embeddings(teacher, vocab, lp)
    hits: dict[str, list] = {"templates": [], "learned": []}
    novel = []
    for batch in iter_split(cfg, index):
        images, boxes, labels = [b[1] for b in batch], [b[2] for b in batch], [b[3] for b in batch]
        emb = torch.cat(region_embeddings(teacher, images, boxes, scales=(1.0, 1.5)))
        lab = torch.cat(list(labels))
        novel.append(is_novel[lab])
        for name, text in (("templates", hand), ("learned", learned)):
            if text is not None:
                hits[name].append((emb @ text.to(emb.device).t()).argmax(1).cpu() == lab)
    res: dict = {}
    nov = torch.cat(novel) if novel else torch.zeros(0, dtype=torch.bool)
    for name, h in hits.items():
        if h:
            ok = torch.cat(h).float()
            for split, sel in (("base", ~nov), ("novel", nov)):
                res[f"prompts/top1_{name}_{split}"] = float(ok[sel].mean()) if sel.any() else float("nan")
    return res


def with_prompts(cfg: Config) -> Config:
    """``cfg`` whose text embeddings come from the learned prompts (``teacher.templates=prompts.out``)."""
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, templates=str(Path(cfg.prompts.out).resolve())))
