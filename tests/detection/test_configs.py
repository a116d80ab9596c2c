"""The real configs' wiring (shapes, OV-COCO 48/17, LVIS rare-as-novel) on a tiny generated
COCO-format fixture with a random tiny teacher: propose -> region cache -> 2 training steps ->
generalized evaluation. Model sizes are overridden to tiny ones; everything else is the config's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.config import load_config
from distill.detection.proposals import load_proposals, proposals_dir, run_proposals
from distill.detection.train import build_training_set, det_dir, train_detector
from distill.vocab import resolve_vocab
from distill.teacher.clip import build_random_teacher

REPO = Path(__file__).resolve().parents[2]
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 210, 30)]

TINY = [
    "det.backbone=resnet18_fpn",
    "det.pretrained_backbone=",
    "det.fpn_channels=16",
    "det.returned_layers=[3,4]",
    "det.anchor_sizes=[16,32,64]",
    "det.box_head_dim=32",
    "det.box_head_conv_dim=16",  # the real configs: ViLD's 4conv2fc head, narrower
    "det.min_size=64",
    "det.max_size=64",
    "det.rpn_pre_nms_train=100",
    "det.rpn_post_nms_train=50",
    "det.rpn_pre_nms_test=100",
    "det.rpn_post_nms_test=30",
    "det.roi_batch_size=32",
    "det.num_image_distill=5",
    "det.ensemble_candidates=5",
    "det.train.max_steps=2",
    "det.train.batch_size=2",
    "det.train.lr=0.0025",  # the real configs' lr is for 256 images a step (linear scaling)
    "det.train.checkpoint_period=0",
    "det.train.log_period=1",
    "proposals.top_k=10",
    "proposals.batch_size=4",
    "proposals.train.max_steps=2",
    "proposals.train.batch_size=2",
    "proposals.train.checkpoint_period=0",
    "data.num_workers=0",
    "teacher.precision=fp32",
    f"teacher.templates={REPO / 'distill/prompts/default.txt'}",
]


def make_fixture(root: Path, categories: list[dict], used: list[int], n_train=4, n_val=2, size=64, seed=0) -> dict:
    """COCO-format train / val jsons (+ PNGs) whose objects are coloured rectangles of ``used``
    category ids; every annotation has a polygon, area and iscrowd."""
    rng = np.random.default_rng(seed)
    out = {}
    iid, aid = 1, 1
    for split, n in (("train", n_train), ("val", n_val)):
        images, anns = [], []
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            img = np.full((size, size, 3), 90, np.uint8)
            for k in range(2):
                cat = used[(iid + k) % len(used)]
                w, h = rng.integers(12, 28, 2)
                x, y = rng.integers(0, size - w), rng.integers(0, size - h)
                img[y : y + h, x : x + w] = COLORS[used.index(cat) % len(COLORS)]
                poly = [float(x), float(y), float(x + w), float(y), float(x + w), float(y + h), float(x), float(y + h)]
                anns.append({"id": aid, "image_id": iid, "category_id": cat, "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0, "segmentation": [poly]})
                aid += 1
            name = f"{split}/{iid:06d}.png"
            Image.fromarray(img).save(root / "images" / name)
            images.append({"id": iid, "file_name": name, "width": size, "height": size})
            iid += 1
        path = root / f"{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
        out[split] = path
    return out


def _run(cfg, teacher, base_only_check: int | None = None) -> dict:
    m_prop = run_proposals(cfg, progress=False)
    props, phash = load_proposals(proposals_dir(cfg) / "proposals_train.safetensors")
    assert len(props) == 4 and all(len(b) <= cfg.proposals.top_k for b, _ in props.values())
    assert 0 <= m_prop[f"recall@{cfg.proposals.top_k}/all"] <= 1
    train_detector(cfg, progress=False, teacher=teacher)
    out = det_dir(cfg)
    assert (out / "model_final.pt").is_file() and (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    for k in ("bbox/AP", "bbox/AP50", "bbox/AP50_base", "bbox/AP50_novel", "bbox/AP_base", "bbox/AP_novel"):
        assert k in saved and 0.0 <= saved[k] <= 1.0, (k, saved.get(k))  # NaN fails
    for k in ("region/top1", "region/top1_base", "region/top1_novel"):  # the student on GT boxes
        assert k in saved and 0.0 <= saved[k] <= 1.0, (k, saved.get(k))  # NaN fails
    assert saved["step"] == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = rows[0]
    assert {"loss_vild_text", "loss_vild_image", "loss_objectness", "loss_rpn_box_reg", "loss_box_reg"} <= set(losses)
    # the region cache holds the teacher's embeddings of the top proposals of every train image
    regions = list((Path(cfg.work_dir) / "embeddings" / "regions").iterdir())
    assert len(regions) == 1 and (regions[0] / "index.json").is_file()
    # evaluation was generalized over the whole vocabulary: results carry base AND novel ids
    res = json.loads((out / "results_val.json").read_text())
    vocab = resolve_vocab(cfg.data, need_base=True)
    cats = {r["category_id"] for r in res}
    assert cats & {vocab.ids[i] for i in vocab.novel_indices}
    # the student only ever trained on base classes: novel boxes were dropped at load time
    if base_only_check is not None:
        ds = build_training_set(cfg, vocab, teacher, vocab.base_indices)
        labels = torch.cat([ds[i][1]["labels"] for i in range(len(ds))])
        assert int(labels.max()) < base_only_check
        assert ds.dropped > 0
    return saved


def test_ovcoco_config_wiring(tmp_path):
    entries = json.loads((REPO / "configs/vocab/coco_48_17.json").read_text())
    cats = [{"id": e["id"], "name": e["name"], "supercategory": ""} for e in entries]  # no split: vocab has it
    used = [1, 3, 5, 6]  # person, car (base); airplane, bus (novel)
    files = make_fixture(tmp_path / "coco", cats, used)
    cfg = load_config(
        REPO / "configs/coco/vild_r50_ovcoco.yaml",
        [
            f"work_dir={tmp_path / 'run'}",
            f"data.image_root={tmp_path / 'coco' / 'images'}",
            f"data.train_json={files['train']}",
            f"data.train_full_json={files['train']}",
            f"data.val_json={files['val']}",
            f"data.vocab={REPO / 'configs/vocab/coco_48_17.json'}",
            *TINY,
        ],
    )
    assert cfg.det.inference == "ensemble" and cfg.det.use_image and cfg.det.image_weight == 0.5
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    torch.manual_seed(0)
    saved = _run(cfg, teacher, base_only_check=48)
    # --eval-only reloads model_final.pt and reproduces the evaluation exactly
    again = train_detector(cfg, eval_only=True, progress=False, teacher=teacher)
    for k in ("bbox/AP", "bbox/AP50_base", "bbox/AP50_novel"):
        assert again[k] == saved[k] or (again[k] != again[k] and saved[k] != saved[k]), k


@pytest.mark.slow
def test_lvis_config_wiring_with_masks(tmp_path):
    cats = [
        {"id": 1, "name": "aerosol can", "frequency": "c", "synonyms": ["aerosol can", "spray can"]},
        {"id": 2, "name": "apple", "frequency": "f", "synonyms": ["apple"]},
        {"id": 3, "name": "armoire", "frequency": "r", "synonyms": ["armoire"]},
        {"id": 4, "name": "banjo", "frequency": "r", "synonyms": ["banjo"]},
    ]
    files = make_fixture(tmp_path / "lvis", cats, [1, 2, 3, 4])
    cfg = load_config(
        REPO / "configs/lvis/vild_r50.yaml",
        [
            f"work_dir={tmp_path / 'run'}",
            f"data.image_root={tmp_path / 'lvis' / 'images'}",
            f"data.train_json={files['train']}",
            f"data.train_full_json={files['train']}",
            f"data.val_json={files['val']}",
            f"data.vocab={files['train']}",
            *TINY,
            # the config's BatchNorm box head (4conv2fc) is covered by the OV-COCO wiring; after 2
            # steps its running statistics are still near their init, so this fixture's eval
            # embeddings are near constant and the background takes every box: no detection to
            # check the generalized evaluation (and the masks) on
            "det.box_head=mlp2",
        ],
    )
    assert cfg.det.masks and cfg.det.detections_per_img == 300
    vocab = resolve_vocab(cfg.data, need_base=True)
    assert [vocab.names[i] for i in vocab.novel_indices] == ["armoire", "banjo"]
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    torch.manual_seed(0)
    saved = _run(cfg, teacher, base_only_check=2)
    rows = [json.loads(l) for l in (det_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert "loss_mask" in rows[0]
    for k in ("segm/AP", "segm/AP50_base", "segm/AP50_novel"):  # det.masks: mask AP is evaluated too
        assert 0.0 <= saved[k] <= 1.0, (k, saved.get(k))
    res = json.loads((det_dir(cfg) / "results_val.json").read_text())
    assert res and all(set(r["segmentation"]) == {"size", "counts"} for r in res)


def test_shapes_config_is_the_default_detector():
    cfg = load_config(REPO / "configs/shapes/vild.yaml")
    assert cfg.det.temperature == 0.01 and cfg.det.image_weight == 0.5
    assert cfg.det.inference == "ensemble" and abs(cfg.det.ensemble_alpha - 2 / 3) < 1e-6
    assert cfg.teacher.model == "distill-tiny-vit" and cfg.regions.scales == (1.0, 1.5)
    assert cfg.det.num_image_distill <= cfg.proposals.top_k


def test_det_init_starts_training_from_given_weights(tmp_path):
    """det.init (self-training starts from the detector it improves): with lr 0 the trained
    parameters are exactly the init file's; without det.init they are the fresh model's."""
    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue square", "split": "novel"}]
    files = make_fixture(tmp_path / "d", cats, [1, 2])
    base = [f"work_dir={tmp_path / 'run'}", f"data.image_root={tmp_path / 'd' / 'images'}", f"data.train_json={files['train']}",
            f"data.train_full_json={files['train']}", f"data.val_json={files['val']}", *TINY,
            "det.use_image=false", "det.inference=text", "det.train.max_steps=1", "det.train.lr=0.0", "det.train.weight_decay=0.0"]
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    torch.manual_seed(0)
    from distill.engine.checkpoint import read as read_ckpt

    train_detector(load_config(REPO / "configs/shapes/vild.yaml", base + ["det.name=a"]), progress=False, teacher=teacher)
    a = read_ckpt(tmp_path / "run" / "det" / "a" / "model_final.pt")["model"]
    torch.manual_seed(1)  # another fresh init, replaced by det.init
    init = str(tmp_path / "run" / "det" / "a" / "model_final.pt")
    train_detector(load_config(REPO / "configs/shapes/vild.yaml", base + ["det.name=b", f"det.init={init}"]), progress=False, teacher=teacher)
    b = read_ckpt(tmp_path / "run" / "det" / "b" / "model_final.pt")["model"]
    torch.manual_seed(1)
    train_detector(load_config(REPO / "configs/shapes/vild.yaml", base + ["det.name=c"]), progress=False, teacher=teacher)
    c = read_ckpt(tmp_path / "run" / "det" / "c" / "model_final.pt")["model"]
    params = [k for k, v in a.items() if v.is_floating_point() and "running_" not in k]
    assert all(torch.equal(a[k], b[k]) for k in params)
    assert not all(torch.equal(a[k], c[k]) for k in params)


def test_vild_ablation_tool_writes_every_row_and_the_deltas(tmp_path):
    """`distill ablate vild`'s logic on the fixture: every variant trains (2 steps) and evaluates,
    the table and metrics.json hold each row's AP50 / AP novel, base, all, and the ViLD - ViLD-text
    differences are computed from their rows."""
    from distill.ablate.vild import VARIANTS, deltas, run_ablation

    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "green square", "split": "base"},
            {"id": 3, "name": "blue square", "split": "novel"}]
    files = make_fixture(tmp_path / "d", cats, [1, 2, 3])
    cfg = load_config(REPO / "configs/shapes/vild.yaml", [
        f"work_dir={tmp_path / 'run'}", f"data.image_root={tmp_path / 'd' / 'images'}", f"data.train_json={files['train']}",
        f"data.train_full_json={files['train']}", f"data.val_json={files['val']}", *TINY,
        # DetPro's rows: 2-step proposals overlap the boxes little, so the groups start low here
        "prompts.iou_edges=[0.05,1.1]", "prompts.neg_iou=[0.0,0.05]", "prompts.epochs=1", "prompts.batch_size=8"])
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    torch.manual_seed(0)
    res = run_ablation(cfg, VARIANTS, progress=False, teacher=teacher)
    # the DetPro rows learned the prompts first and trained ViLD with them as its templates
    assert Path(cfg.prompts.out).is_file()
    import yaml

    dp = yaml.safe_load((tmp_path / "run" / "det" / "ablation_detpro" / "config.yaml").read_text())
    assert dp["teacher"]["templates"] == str(Path(cfg.prompts.out).resolve())
    # OADP's rows: object-aware region embeddings and the pyramid's losses, as the row names say
    oadp = yaml.safe_load((tmp_path / "run" / "det" / "ablation_oadp" / "config.yaml").read_text())
    assert oadp["regions"]["mode"] == "oake" and oadp["det"]["global_weight"] == 0.5 and oadp["det"]["block_weight"] == 128
    losses = json.loads((tmp_path / "run" / "det" / "ablation_oadp" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_global", "loss_block", "loss_block_relation", "loss_vild_image"} <= set(losses)
    only_global = json.loads((tmp_path / "run" / "det" / "ablation_oadp_global" / "metrics.jsonl").read_text().splitlines()[0])
    assert "loss_global" in only_global and "loss_block" not in only_global
    # the one-stage rows: the FCOS student, text only and with image distillation + self-labels
    one = yaml.safe_load((tmp_path / "run" / "det" / "ablation_one_stage" / "config.yaml").read_text())
    assert one["det"]["arch"] == "fcos" and one["det"]["self_labels"] == 10 and one["det"]["use_image"] is True
    text_only = json.loads((tmp_path / "run" / "det" / "ablation_one_stage_text" / "metrics.jsonl").read_text().splitlines()[0])
    distilled = json.loads((tmp_path / "run" / "det" / "ablation_one_stage" / "metrics.jsonl").read_text().splitlines()[0])
    assert "loss_text" in text_only and "loss_image" not in text_only and {"loss_text", "loss_image", "loss_objectness"} <= set(distilled)
    out = tmp_path / "run" / "det" / "ablation"
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved["rows"]) == list(VARIANTS)
    for v in VARIANTS:
        for c in ("bbox/AP50_novel", "bbox/AP50_base", "bbox/AP50", "bbox/AP_novel"):
            x = saved["rows"][v][c]
            assert x is not None and 0.0 <= x <= 1.0, (v, c, x)  # NaN fails
    sup = saved["rows"]["supervised"]["bbox/AP50_novel"]  # a linear classifier never names novel classes
    assert sup == 0.0
    d = saved["deltas"]
    assert d == deltas(res)
    r = saved["rows"]
    assert d["vild_minus_text_AP50_novel"] == round(100 * (r["vild"]["bbox/AP50_novel"] - r["vild_text"]["bbox/AP50_novel"]), 2)
    assert d["vild_minus_text_AP50_base"] == round(100 * (r["vild"]["bbox/AP50_base"] - r["vild_text"]["bbox/AP50_base"]), 2)
    md = (out / "ablation.md").read_text()
    assert "ViLD-ensemble (separate heads, no teacher, 3.4)" in md and "Oracle" in md
    # the separate-head variant trained an image head; the shared ViLD did not
    sep = torch.load(tmp_path / "run" / "det" / "ablation_vild_ensemble_heads" / "model_final.pt", weights_only=True)
    shared = torch.load(tmp_path / "run" / "det" / "ablation_vild" / "model_final.pt", weights_only=True)
    keys = lambda ck: {k for k in (ck.get("model", ck)) if "image_head" in k}  # noqa: E731
    assert keys(sep) and not keys(shared)


def test_vild_ablation_pretrains_the_backbone_the_config_names(tmp_path):
    """Like the pipeline's backbone stage, the ablation writes det.backbone_pretrain.out first
    when the detector starts from it and the file is not there yet."""
    from distill.ablate.vild import run_ablation

    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue square", "split": "novel"}]
    files = make_fixture(tmp_path / "d", cats, [1, 2])
    cfg = load_config(REPO / "configs/shapes/vild.yaml", [
        f"work_dir={tmp_path / 'run'}", f"data.image_root={tmp_path / 'd' / 'images'}", f"data.train_json={files['train']}",
        f"data.train_full_json={files['train']}", f"data.val_json={files['val']}", *TINY,
        "det.pretrained_backbone={work_dir}/backbone/base_crops.pth", "det.freeze_backbone=false",
        "det.backbone_pretrain.steps=2", "det.backbone_pretrain.batch_size=4", "det.backbone_pretrain.crop_size=32"])
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    res = run_ablation(cfg, ("vild_text",), progress=False, teacher=teacher)
    assert (tmp_path / "run" / "backbone" / "base_crops.pth").is_file() and "vild_text" in res


def test_vild_ablation_over_seeds_averages_each_row(tmp_path):
    """--seeds 0,1: each seed trains its own run dir, the table is the mean of the two seeds' rows,
    and metrics.json keeps each seed's rows and targets."""
    from distill.ablate.vild import run_ablation

    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue square", "split": "novel"}]
    files = make_fixture(tmp_path / "d", cats, [1, 2])
    cfg = load_config(REPO / "configs/shapes/vild.yaml", [
        f"work_dir={tmp_path / 'run'}", f"data.image_root={tmp_path / 'd' / 'images'}", f"data.train_json={files['train']}",
        f"data.train_full_json={files['train']}", f"data.val_json={files['val']}", *TINY])
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    res = run_ablation(cfg, ("vild_text",), progress=False, teacher=teacher, seeds=(0, 3))
    det = tmp_path / "run" / "det"
    assert (det / "ablation_vild_text" / "model_final.pt").is_file() and (det / "ablation_vild_text_s3" / "model_final.pt").is_file()
    a = torch.load(det / "ablation_vild_text" / "model_final.pt", weights_only=True)
    b = torch.load(det / "ablation_vild_text_s3" / "model_final.pt", weights_only=True)
    a, b = a.get("model", a), b.get("model", b)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # the seeds differ
    saved = json.loads((det / "ablation" / "metrics.json").read_text())
    assert set(saved["seeds"]) == {"0", "3"} and saved["meta"]["seeds"] == [0, 3]
    for c in ("bbox/AP50_base", "bbox/AP50"):
        xs = [saved["seeds"][s]["rows"]["vild_text"][c] for s in ("0", "3")]
        assert saved["rows"]["vild_text"][c] == pytest.approx(sum(xs) / 2)
        assert res["vild_text"][c] == pytest.approx(sum(xs) / 2)
    assert res["vild_text"]["n_seeds"] == 2 and "Seed 3" in (det / "ablation" / "ablation.md").read_text()


def test_vild_ablation_reuse_reads_finished_rows_and_retrains_changed_ones(tmp_path, monkeypatch):
    """--reuse: a row whose run dir holds metrics of the same settings is read, not trained; the
    same row under other settings (more steps) trains again."""
    from distill.ablate import vild as A

    cats = [{"id": 1, "name": "red square", "split": "base"}, {"id": 2, "name": "blue square", "split": "novel"}]
    files = make_fixture(tmp_path / "d", cats, [1, 2])
    args = [f"work_dir={tmp_path / 'run'}", f"data.image_root={tmp_path / 'd' / 'images'}", f"data.train_json={files['train']}",
            f"data.train_full_json={files['train']}", f"data.val_json={files['val']}", *TINY]
    cfg = load_config(REPO / "configs/shapes/vild.yaml", args)
    teacher = build_random_teacher(embed_dim=16, image_size=32, patch=8, width=32, layers=1, text_layers=1)
    first = A.run_ablation(cfg, ("supervised", "vild_text"), progress=False, teacher=teacher)
    trained = []
    real = A._run_variant
    monkeypatch.setattr(A, "_run_variant", lambda c, v, *a, **k: trained.append(v) or real(c, v, *a, **k))
    again = A.run_ablation(cfg, ("supervised", "vild_text"), progress=False, teacher=teacher, reuse=True)
    assert trained == []
    for v in ("supervised", "vild_text"):
        assert again[v]["reused"] and again[v]["bbox/AP50"] == first[v]["bbox/AP50"]
    longer = load_config(REPO / "configs/shapes/vild.yaml", [*args, f"det.train.max_steps={cfg.det.train.max_steps + 1}"])
    A.run_ablation(longer, ("vild_text",), progress=False, teacher=teacher, reuse=True)
    assert trained == ["vild_text"]


def test_vild_ablation_config_is_vild_yaml_at_600_steps():
    """`distill ablate vild`'s default config differs from the pipeline detector's only in the
    training length, so its rows are the default detector trained longer."""
    import dataclasses

    from distill.config import to_dict

    base = load_config(REPO / "configs/shapes/vild.yaml")
    abl = load_config(REPO / "configs/shapes/vild_ablation.yaml")
    assert abl.det.train.max_steps == 600 and base.det.train.max_steps == 300
    same = dataclasses.replace(abl, det=dataclasses.replace(abl.det, train=base.det.train))
    assert to_dict(same) == to_dict(base)
