"""DetPro prompt learning (detection/detpro.py): the reference's soft loss and class weights by
hand, the IoU groups and negatives, and `train_prompts` end to end on a tiny world (an empty IoU
group reported, not a crash; the file usable as templates by any vocabulary)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.detection.detpro import class_weights, detpro_loss, group_split, proposal_targets

REPO = Path(__file__).resolve().parents[2]


def test_soft_loss_equals_the_reference_formula_by_hand():
    """prompt/trainer.py 'soft': (sum_fg w_y * CE + w_bg * sum_bg sum_c -(1/C) log p_c) / sum_batch w_label."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g) * 4
    labels = torch.tensor([0, 2, -1, 1, -1])
    weight = torch.tensor([0.5, 2.0, 1.5, 0.25])  # 3 classes + background
    got = detpro_loss(logits, labels, weight)
    num, den = 0.0, 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        z = sum(math.exp(v) for v in row)
        logp = [v - math.log(z) for v in row]
        if y >= 0:
            num += weight[y].item() * -logp[y]
            den += weight[y].item()
        else:
            num += weight[3].item() * sum(-lp / 3 for lp in logp)
            den += weight[3].item()
    assert abs((got["loss_fg"] + got["loss_bg"]).item() - num / den) < 1e-5
    # a negative's loss is least when its distribution over the classes is uniform
    flat = detpro_loss(torch.zeros(1, 3), torch.tensor([-1]), weight)["loss_bg"]
    peaked = detpro_loss(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([-1]), weight)["loss_bg"]
    assert abs(flat.item() - math.log(3)) < 1e-6 and peaked > flat


def test_class_weights_are_inverse_frequencies_as_run_py():
    labels = torch.tensor([0, 0, 0, 1])  # 4 positives of 3 classes (class 2 absent), 6 negatives
    w = class_weights(labels, 3, 6)
    n = 10
    assert torch.allclose(w[:2], torch.tensor([1 / (3 / n * 3), 1 / (1 / n * 3)]))
    assert w[2] == 0  # never a target
    assert torch.isclose(w[3], torch.tensor(1 / (2 * 6 / n)))


def test_groups_and_negatives_follow_the_iou_edges():
    from distill.config import PromptsConfig

    labels = torch.tensor([0, 1, 0, -1, 2, 1, 0, 0])
    ious = torch.tensor([0.55, 0.65, 0.95, 0.0, 0.3, 0.05, 1.0, 0.49])
    pcfg = PromptsConfig(iou_edges=(0.5, 0.6, 0.9, 1.1), neg_iou=(0.1, 0.5), neg_fraction=1.0)
    groups, neg = group_split(labels, ious, pcfg, seed=0)
    assert [g.tolist() for g in groups] == [[0], [1], [2, 6]]
    assert neg.tolist() == [4, 7]  # IoU in [0.1, 0.5): the -1 row (0.0) and the 0.05 row are out
    half = group_split(labels, ious, PromptsConfig(iou_edges=(0.5, 1.1), neg_fraction=0.5), seed=0)[1]
    assert len(half) == 1 and half.tolist()[0] in (4, 7)


def test_proposal_targets_take_the_best_overlapping_ground_truth():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]])
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 35]])
    lab, iou = proposal_targets(boxes, gt, torch.tensor([4, 7]))
    assert lab.tolist()[:2] == [4, 7] and iou[0] == 1 and abs(iou[1].item() - 100 / 150) < 1e-6 and iou[2] == 0
    lab, iou = proposal_targets(boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert lab.tolist() == [-1, -1, -1] and iou.tolist() == [0, 0, 0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny world, a random teacher and proposals made from the base boxes with known IoUs: each
    box itself (IoU 1), shifted by 20% of its width (IoU 2/3), by 40% (IoU 3/7), and a 4 px corner box."""
    from reliability._fixtures import make_tiny_world, world_overrides

    from detection.test_configs import TINY
    from distill.config import load_config
    from distill.detection.proposals import proposals_dir, save_proposals
    from distill.teacher.clip import build_random_teacher

    work = tmp_path_factory.mktemp("detpro")
    make_tiny_world(work)
    over = world_overrides(work) + [o for o in TINY if not o.startswith("teacher.templates")] + [
        "det.num_image_distill=20", "prompts.epochs=2", "prompts.batch_size=8", "prompts.ctx_len=4",
        "prompts.iou_edges=[0.3,0.6,1.1,5.0]", "prompts.neg_iou=[0.0,0.3]", "prompts.neg_fraction=1.0",
    ]
    cfg = load_config(str(REPO / "configs/shapes/vild.yaml"), over)
    data = json.loads(Path(cfg.data.train_json).read_text())
    ids, boxes = [], []
    for im in data["images"]:
        b = []
        for a in data["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                b += [[x, y, x + w, y + h], [x + 0.2 * w, y, x + 1.2 * w, y + h], [x + 0.4 * w, y, x + 1.4 * w, y + h]]
        b.append([0.0, 0.0, 4.0, 4.0])
        ids.append(int(im["id"]))
        boxes.append(torch.tensor(b, dtype=torch.float32))
    save_proposals(proposals_dir(cfg) / "proposals_train.safetensors", ids, boxes, [torch.ones(len(b)) for b in boxes])
    return cfg, build_random_teacher(context_length=24, seed=0)


def test_train_prompts_end_to_end(tiny_run):
    from distill.detection.detpro import train_prompts
    from distill.teacher.prompt_learning import load_prompts
    from distill.teacher.text import text_embeddings
    from distill.vocab import Vocabulary, resolve_vocab

    cfg, teacher = tiny_run
    m = train_prompts(cfg, teacher=teacher, progress=False)
    groups = m["prompts/groups"]
    assert [g["group"] for g in groups] == [[0.3, 0.6], [0.6, 1.1], [1.1, 5.0]]
    assert groups[2]["positives"] == 0 and "no base proposals" in groups[2]["skipped"]  # reported, not a crash
    assert groups[1]["positives"] > 0 and groups[1]["negatives"] > 0
    lp = load_prompts(cfg.prompts.out, teacher, ctx_len=4)
    learned = [g["group"] for g in groups if "skipped" not in g]
    assert lp.groups == learned and lp.context.shape[:2] == (len(learned), 4)
    vocab = resolve_vocab(cfg.data, need_base=True)
    assert lp.classes == [vocab.names[i] for i in vocab.base_indices]
    # trained: the context moved away from its N(0, 0.02) start (whose norm is ~0.02 sqrt(width))
    init = torch.randn(4, 32, generator=torch.Generator().manual_seed(cfg.prompts.seed)) * cfg.prompts.init_std
    assert not torch.allclose(lp.context[0], init, atol=1e-6)
    for k in ("top1_templates_base", "top1_learned_base"):
        assert 0.0 <= m[f"prompts/{k}"] <= 1.0, k
    has_novel = any(c.get("split") == "novel" and any(a["category_id"] == c["id"] for a in json.loads(Path(cfg.data.val_json).read_text())["annotations"])
                    for c in json.loads(Path(cfg.data.val_json).read_text())["categories"])
    for k in ("top1_templates_novel", "top1_learned_novel"):  # NaN only when val holds no novel object
        assert (0.0 <= m[f"prompts/{k}"] <= 1.0) if has_novel else math.isnan(m[f"prompts/{k}"]), k
    saved = json.loads(Path(cfg.prompts.out).with_name("detpro_metrics.json").read_text())
    assert saved["prompts/groups"] == groups
    # any vocabulary, novel words included, through the templates setting
    emb = text_embeddings(teacher, Vocabulary(("purple hexagon", "red circle")), cfg.prompts.out)
    assert emb.shape == (2, teacher.embed_dim) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_context_initialised_from_words_starts_as_that_template(tiny_run):
    """prompts.ctx_init (CoOp's ctx_init): with lr 0 the learned prompts stay the words' token
    embeddings, so the class embeddings are encode_text("a photo of a {name}.")."""
    import dataclasses

    import torch.nn.functional as F

    from distill.detection.detpro import train_prompts
    from distill.teacher.prompt_learning import load_prompts
    from distill.teacher.text import text_embeddings
    from distill.vocab import Vocabulary

    cfg, teacher = tiny_run
    c = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, ctx_init="a photo of a", lr=0.0, epochs=1,
                                                              out=str(Path(cfg.work_dir) / "init.safetensors")))
    m = train_prompts(c, teacher=teacher, progress=False)
    assert m["prompts/ctx_len"] == 4
    lp = load_prompts(c.prompts.out, teacher, ctx_len=4)
    vocab = Vocabulary(("red star", "blue circle"))
    got = text_embeddings(teacher, vocab, c.prompts.out)
    want = F.normalize(teacher.encode_text(["a photo of a red star.", "a photo of a blue circle."]), dim=-1)
    assert lp.context.shape[0] == 2 and (got - want).abs().max() < 1e-5  # two learned groups, both the template


def test_no_group_with_positives_is_one_line(tiny_run):
    import dataclasses

    from distill.detection.detpro import train_prompts
    from distill.errors import DistillError

    cfg, teacher = tiny_run
    none = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, iou_edges=(2.0, 3.0), neg_iou=(0.0, 0.3),
                                                                  out=str(Path(cfg.work_dir) / "none.safetensors")))
    with pytest.raises(DistillError, match="no IoU group has positive proposals"):
        train_prompts(none, teacher=teacher, progress=False)
    assert not Path(none.prompts.out).exists()


def test_bad_prompt_settings_and_files_are_one_line_exit_2(tmp_path):
    """Through the installed command, from another folder: a prompt file of another teacher; a
    group edge list that does not increase."""
    import sys

    from reliability._fixtures import env, make_teacher_dir, teacher_overrides

    from distill.teacher.prompt_learning import LearnedPrompts, save_prompts

    exe = str(Path(sys.executable).with_name("distill"))
    teacher = teacher_overrides(make_teacher_dir(tmp_path / "teacher"))
    save_prompts(tmp_path / "other.safetensors", LearnedPrompts(torch.zeros(1, 8, 32), "0123456789abcdef", [[0.5, 1.1]]))
    cfg = str(REPO / "configs/shapes/teacher.yaml")
    cases = [
        (["teacher", "embed-text", cfg, *teacher, "--vocab", "cat", "--out", "emb", "--templates", "other.safetensors"],
         "other.safetensors: learned on teacher 0123456789ab, but this teacher is"),
        (["train", "prompts", cfg, *teacher, "work_dir=w", "prompts.iou_edges=[0.5,0.5]"],
         "prompts.iou_edges: expected at least 2 increasing IoU edges"),
        (["train", "prompts", cfg, *teacher, "work_dir=w", "data.vocab=red circle,blue square"], "proposals not found (run `distill propose CONFIG` first)"),
    ]
    for args, msg in cases:
        before = set(tmp_path.rglob("*"))
        r = subprocess.run([exe, *args], cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=300)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and msg in lines[0], (args, r.stderr)
        assert set(tmp_path.rglob("*")) == before, args  # nothing written


def test_prompt_file_through_embed_text_and_label(tmp_path):
    """A user's path: prompts learned for this teacher embed any vocabulary through
    `distill teacher embed-text --templates` and label photos through `distill label --templates`."""
    import sys

    from PIL import Image
    from reliability._fixtures import env, make_teacher_dir, teacher_overrides

    from distill.config import load_config
    from distill.teacher.clip import build_teacher
    from distill.teacher.prompt_learning import LearnedPrompts, learned_text_embeddings, save_prompts
    from distill.vocab import Vocabulary

    exe = str(Path(sys.executable).with_name("distill"))
    # without teacher_overrides' `teacher.templates=`: an override after --templates would win over it
    over = [o for o in teacher_overrides(make_teacher_dir(tmp_path / "teacher")) if not o.startswith("teacher.templates")]
    cfg = str(REPO / "configs/shapes/teacher.yaml")
    teacher = build_teacher(load_config(cfg, over).teacher)
    ctx = torch.randn(2, 4, teacher.model.token_embedding.weight.shape[1], generator=torch.Generator().manual_seed(0)) * 0.02
    save_prompts(tmp_path / "p.safetensors", LearnedPrompts(ctx, teacher.fingerprint, [[0.5, 0.7], [0.7, 1.1]]))
    r = subprocess.run([exe, "teacher", "embed-text", cfg, *over, "--vocab", "cat, dog", "--out", "emb", "--templates", "p.safetensors"],
                       cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    (f,) = list((tmp_path / "emb").glob("*.safetensors"))
    want = learned_text_embeddings(teacher, Vocabulary(("cat", "dog")), tmp_path / "p.safetensors")
    assert torch.allclose(load_file(str(f))["embeddings"], want, atol=1e-6)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    r = subprocess.run([exe, "label", "--images", "imgs", "--vocab", "cat, dog", "--model", "teacher", "--out", "lab",
                        "--templates", "p.safetensors", "--proposals", "windows", *over], cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "lab" / "labels.json").is_file()
    # the label command really reads the file: another teacher's prompts are refused there too
    save_prompts(tmp_path / "other.safetensors", LearnedPrompts(ctx, "0123456789abcdef"))
    r = subprocess.run([exe, "label", "--images", "imgs", "--vocab", "cat, dog", "--model", "teacher", "--out", "lab2",
                        "--templates", "other.safetensors", "--proposals", "windows", *over], cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 2 and "learned on teacher 0123456789ab" in r.stderr and not (tmp_path / "lab2").exists(), r.stderr
