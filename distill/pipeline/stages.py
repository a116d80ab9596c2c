"""The stages of the default run (docs/architecture.md) and the table that wires them into the
runner.

Each stage function takes the resolved :class:`~distill.config.Config` and makes one call into the
package; the runner (:mod:`distill.pipeline.runner`) handles manifests, skipping, resuming and
timing. Student variants (ViLD-text, ViLD, the ensemble, LSeg base-only, LSeg + distillation) are
derived from the one config with ``dataclasses.replace`` so a single pipeline file drives the whole
run. :data:`STAGES` is the graph: what each stage reads, depends on and writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distill.config import Config
from distill.errors import DistillError
from distill.pipeline.runner import Pipeline, Stage, resuming, section_value, unknown_stage


def _teacher(cfg: Config):
    from distill.engine.device import get_device
    from distill.teacher.clip import build_teacher

    return build_teacher(cfg.teacher, device=get_device(cfg.teacher.device))


def _with(cfg: Config, section: str, **changes) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def plain_teacher(cfg: Config) -> Config:
    """The view of ``cfg`` with ``teacher.dense_tower`` blank (a :class:`Stage` ``view``): crops,
    region embeddings and text use the teacher's own tower, stages before ``clipself`` must not
    look for the dense tower it writes, and changing that tower's path reruns none of them (seg and
    cam, which read the tower, read the config as is)."""
    return _with(cfg, "teacher", dense_tower="") if cfg.teacher.dense_tower else cfg


def label_cfg(cfg: Config) -> Config:
    """Label the unlabeled split with ``label.source`` (teacher zero-shot by default in the shapes
    pipeline; ``vild`` uses the trained ViLD student; ``vlplm`` the ViLD-text student, trained on
    base ground truth alone, as VL-PLM's base detector), measured against its hidden ground truth."""
    default = {"vild": "vild", "vlplm": "vild_text"}.get(cfg.label.source)
    model = cfg.label.model or (str(Path(cfg.work_dir) / "det" / default / "model_final.pt") if default else "")
    return _with(
        cfg,
        "label",
        model=model,
        images=cfg.label.images or str(Path(cfg.data.image_root) / "unlabeled"),
        out=str(Path(cfg.work_dir) / "labels" / "unlabeled"),
        gt=cfg.label.gt or cfg.data.unlabeled_json,
    )


def selftrain_inputs(cfg: Config, label_train: bool = True) -> tuple[Config, Path, Path | None]:
    """The selftrain stage's fine-tuning config (ViLD's weights as ``det.init``, ``selftrain.steps``
    without warm-up), the unlabeled split's pseudo-labels, and the training images' (labeled here
    when ``selftrain.train_split`` and ``label_train``; labeling resumes, so a rerun is cheap)."""
    from distill.detection.train import det_dir, with_det
    from distill.labels.pseudo import label

    st = cfg.selftrain
    pseudo = Path(label_cfg(cfg).label.out) / "labels.json"
    train_pseudo = None
    if st.train_split:  # VL-PLM: the base split's images get novel pseudo-labels too
        lc = _with(label_cfg(cfg), "label", images=str(Path(cfg.data.image_root) / "train"),
                   out=str(Path(cfg.work_dir) / "labels" / "train"), gt=cfg.data.train_full_json)
        if label_train:
            label(lc)
        train_pseudo = Path(lc.label.out) / "labels.json"
    steps = st.steps or cfg.det.train.max_steps
    vild = with_det(cfg, name="vild", inference="text", init=str(det_dir(with_det(cfg, name="vild")) / "model_final.pt"), train={"max_steps": steps, "warmup": 0})
    return vild, pseudo, train_pseudo


def _pct(m: dict, key: str) -> float:
    return 100 * m.get(key, float("nan"))


def _det_note(m: dict) -> str:
    return f"AP50 novel {_pct(m, 'bbox/AP50_novel'):.1f} / base {_pct(m, 'bbox/AP50_base'):.1f}"


# ------------------------------------------------------------------------------------------- stages
def _run_dirs(output: str):
    """``Stage.checkpoints`` of a trainer whose product is one file: the training folder beside it
    (engine/train.run_dir). ``output`` is a path under work_dir or a dotted config key naming it."""

    def folders(cfg: Config) -> tuple[Path, ...]:
        from distill.engine.train import run_dir

        path = section_value(cfg, output) if "/" not in output else Path(cfg.work_dir) / output
        return (run_dir(path),)

    return folders


def st_world(cfg: Config):
    from distill.data.world import make_world

    make_world(cfg)


def st_teacher(cfg: Config):
    """Pretrain the tiny teacher, then evaluate it; ``pretrain.steps=0`` means the teacher is
    external (``teacher.model`` / ``teacher.pretrained``, e.g. CLIP ViT-B/32): evaluate only."""
    from distill.teacher.evaluate import evaluate_teacher
    from distill.teacher.pretrain import pretrain

    if cfg.pretrain.steps != 0:
        pretrain(cfg, resume=resuming())
    m = evaluate_teacher(cfg)
    return f"zero-shot top-1 (1x+1.5x) {m.get('zeroshot/top1_ens', float('nan')):.3f}"


def st_text(cfg: Config):
    from distill.detection.train import check_text_embeddings
    from distill.vocab import resolve_vocab
    from distill.teacher.text import text_embeddings

    vocab = resolve_vocab(cfg.data, need_base=True)
    emb = text_embeddings(_teacher(cfg), vocab, cfg.teacher.templates, cache_dir=Path(cfg.work_dir) / "embeddings" / "text")
    check_text_embeddings(emb, vocab)
    return f"{tuple(emb.shape)} for {len(vocab)} classes"


def st_clipself(cfg: Config):
    """The CLIPSelf dense tower (the MaskCLIP teacher of the segmentation students), then MaskCLIP
    on it into ``teacher/dense_tower/metrics.json``; runs only when ``teacher.dense_tower`` is
    ``clipself.out``."""
    from distill.teacher.clipself import clipself, uses_clipself
    from distill.teacher.evaluate import evaluate_teacher

    if not uses_clipself(cfg):
        return "skipped: teacher.dense_tower is not clipself.out"
    clipself(cfg, resume=resuming())  # builds the teacher without its dense tower, on teacher.device
    m = evaluate_teacher(cfg, out_dir=Path(cfg.work_dir) / "teacher" / "dense_tower")
    return f"MaskCLIP on the dense tower: mIoU base {_pct(m, 'maskclip/miou_base'):.1f} / novel {_pct(m, 'maskclip/miou_novel'):.1f}"


def st_backbone(cfg: Config):
    """The students' ResNet pretrained on crops of base boxes (the stand-in for the ImageNet weights
    ViLD's detector and LSeg's image encoder start from); runs only when ``det.pretrained_backbone``
    or ``seg.pretrained_backbone`` is ``det.backbone_pretrain.out``."""
    from distill.detection.backbone import backbone_readers, pretrain_backbone

    if not backbone_readers(cfg):
        return "skipped: neither det.pretrained_backbone nor seg.pretrained_backbone is det.backbone_pretrain.out"
    m = pretrain_backbone(cfg, resume=resuming())
    return f"{m['steps']} steps, training accuracy {100 * m['train_acc_last100']:.1f}% -> {m['out']}"


def st_propose(cfg: Config):
    from distill.detection.proposals import run_proposals

    m = run_proposals(cfg, resume=resuming(), progress=True)
    keys = [k for k in m if k.startswith("recall@")]
    return ", ".join(f"{k} {m[k]:.2f}" for k in keys[:3])


def st_regions(cfg: Config):
    from distill.detection.proposals import embed_training_regions

    _, counts = embed_training_regions(cfg, _teacher(cfg))
    return f"{counts['train_images']} images x {cfg.det.num_image_distill} proposals ({cfg.regions.mode})"


def st_det_text(cfg: Config):
    """ViLD-text (section 3.2): the baseline the image distillation must beat on novel classes."""
    from distill.detection.train import train_detector, with_det

    tcfg = with_det(cfg, name="vild_text", use_image=False, inference="text")
    return _det_note(train_detector(tcfg, resume=resuming()))


def st_det(cfg: Config):
    """ViLD (text + image distillation), evaluated with text inference and with the 3.4 ensemble."""
    from distill.detection.train import det_dir, train_detector, with_det

    vild = with_det(cfg, name="vild", use_text=True, use_image=True, inference="text")
    m = train_detector(vild, resume=resuming())
    ens = with_det(cfg, name="vild_ensemble", inference="ensemble", checkpoint=str(det_dir(vild) / "model_final.pt"))
    e = train_detector(ens, eval_only=True)
    return f"ViLD {_det_note(m)}; ensemble {_det_note(e)}"


def st_detpro(cfg: Config):
    """DetPro (in the graph when ``prompts.enabled``): learn the prompts on the cached region embeddings,
    then ViLD with them (``det/vild_detpro``, text inference and the 3.4 ensemble)."""
    from distill.detection.detpro import train_prompts, with_prompts
    from distill.detection.train import det_dir, train_detector, with_det

    p = train_prompts(cfg, teacher=_teacher(cfg), progress=True)
    pc = with_prompts(cfg)
    vild = with_det(pc, name="vild_detpro", use_text=True, use_image=True, inference="text")
    m = train_detector(vild, resume=resuming())
    ens = with_det(pc, name="vild_detpro_ensemble", inference="ensemble", checkpoint=str(det_dir(vild) / "model_final.pt"))
    e = train_detector(ens, eval_only=True)
    top1 = p.get("prompts/top1_learned_novel", float("nan"))
    return f"learned prompts: GT-crop top-1 novel {100 * top1:.1f}; ViLD {_det_note(m)}; ensemble {_det_note(e)}"


def st_seg(cfg: Config):
    """LSeg on base masks, with and without MaskCLIP pixel distillation (the ViLD-image analogue)."""
    from distill.files import write_text
    from distill.segmentation.infer import segment_folder
    from distill.segmentation.build import load_segmenter
    from distill.segmentation.train import text_for, train_seg
    from distill.vocab import resolve_vocab

    teacher = _teacher(cfg)
    vocab = resolve_vocab(cfg.data)
    val_images = sorted((Path(cfg.data.image_root) / "val").glob("*.png"))[:6]
    notes = []
    for name, w in (("lseg", 0.0), ("lseg_distill", cfg.seg.distill_weight or 1.0)):
        scfg = _with(cfg, "seg", name=name, distill_weight=w)
        m = train_seg(scfg, teacher=teacher, resume=resuming())
        notes.append(f"{name} hIoU {_pct(m, 'miou/hiou'):.1f}")
        # a few val predictions for the report's overlays
        out = Path(cfg.work_dir) / "seg" / name
        write_text(out / "vis_list.txt", "\n".join(str(p.resolve()) for p in val_images) + "\n")
        model = load_segmenter(scfg.seg, teacher, out / "model_final.pt")
        segment_folder(model, out / "vis_list.txt", text_for(teacher, vocab, scfg), list(vocab.ids), out / "pred_val", window=scfg.seg.window)
    return "; ".join(notes)


def st_label(cfg: Config):
    from distill.labels.pseudo import label

    lc = label_cfg(cfg)
    label(lc)
    return str(Path(lc.label.out) / "labels.json")


def st_cam(cfg: Config):
    """CLIP-ES: the ablation and panels on val; then what the masks are for (CLIP-ES 3.4): masks of
    the training images from their image-level labels train an LSeg student (``seg/lseg_cam``, base
    classes as ``seg/lseg``, whose masks are the ground truth), evaluated on val."""
    from distill.ablate.cam import cam_ablation
    from distill.cam.run import run_cam
    from distill.segmentation.train import train_seg

    teacher = _teacher(cfg)  # with its dense tower: cam.tower=dense_tower CAMs and the LSeg student read it
    m = cam_ablation(cfg, "val", teacher=teacher)
    run_cam(cfg, "val", teacher=teacher)
    run_cam(_with(cfg, "cam", num_panels=0), "train", teacher=teacher)
    out = Path(cfg.work_dir) / "seg" / "lseg_cam"
    scfg = _with(_with(cfg, "data", masks=str(Path(cfg.cam.out) / "masks" / "train")), "seg", name="lseg_cam", distill_weight=0.0)
    s = train_seg(scfg, teacher=teacher, resume=resuming(), out_dir=out)
    return (f"CLIP-ES final masks {100 * (m.get('cam/miou_final') or 0):.1f} mIoU on val; "
            f"LSeg on CAM masks: base mIoU {_pct(s, 'miou/base'):.1f}")


def st_selftrain(cfg: Config):
    """One round: the ViLD student fine-tuned on base GT + novel pseudo-labels."""
    from distill.labels.selftrain import self_train

    st = cfg.selftrain
    vild, pseudo, train_pseudo = selftrain_inputs(cfg)
    m = self_train(vild, pseudo, keep=st.keep, score_thresh=st.score_thresh, repeat=st.repeat, train_pseudo_json=train_pseudo)
    d = m.get("selftrain/AP50_novel_delta")
    return f"novel AP50 delta {100 * d:+.1f}" if d is not None else ""


def st_report(cfg: Config):
    from distill.pipeline.runner import stage_timings
    from distill.report.report import write_report

    return str(write_report(cfg, timings=stage_timings(cfg)))


# ------------------------------------------------------------------------------------- the graph
# Per stage: its function, the stages it depends on (deps), the config it is keyed on (sections),
# the files it must leave (outputs), the config the stage reads when not the pipeline's as is
# (view), the external files named by config keys that must exist before anything runs (inputs),
# and the training folders whose checkpoints go when it starts afresh (checkpoints).
_DET_INPUTS = ("data.train_json", "data.val_json", "data.image_root", "data.vocab", "data.extra", "det.pretrained_backbone")
_TEACHER = ("teacher.model", "teacher.pretrained")

STAGES: tuple[Stage, ...] = (
    Stage(
        "world", st_world,
        sections=("world", "work_dir"),
        outputs=("data/instances_val.json", "data/instances_train_base.json"),
        description="procedural shapes world",
    ),
    Stage(
        "teacher", st_teacher, deps=("world",),
        sections=("teacher", "pretrain"),
        outputs=("teacher/teacher.safetensors", "teacher/metrics.json"),
        description="pretrain + evaluate the tiny CLIP teacher",
        view=plain_teacher,
        inputs=("data.val_json", "data.image_root", "data.vocab", *_TEACHER),
        checkpoints=_run_dirs("teacher/teacher.safetensors"),
    ),
    Stage(
        "text", st_text, deps=("teacher",),
        sections=("teacher", "data"),
        description="text embeddings of the vocabulary",
        view=plain_teacher,
        inputs=("data.vocab", *_TEACHER),
    ),
    Stage(
        "clipself", st_clipself, deps=("teacher",),
        sections=("clipself", "teacher"),
        description="CLIPSelf dense tower of the teacher (MaskCLIP for segmentation)",
        checkpoints=_run_dirs("clipself.out"),
    ),
    Stage(
        "backbone", st_backbone, deps=("world",),
        sections=("det.backbone", "det.pretrained_backbone", "seg.pretrained_backbone", "det.backbone_pretrain", "data"),
        description="ResNet-18 pretrained on base-box crops (where the detector and LSeg start)",
        inputs=("data.train_json", "data.image_root", "data.vocab"),
        checkpoints=_run_dirs("det.backbone_pretrain.out"),
    ),
    Stage(
        "propose", st_propose, deps=("world", "backbone"),
        sections=("proposals", "data", "det"),
        outputs=("proposals/rpn/proposals_train.safetensors",),
        description="class-agnostic RPN proposals",
        inputs=("data.train_json", "data.val_json", "data.image_root", "det.pretrained_backbone"),
    ),
    Stage(
        "regions", st_regions, deps=("teacher", "propose"),
        sections=("regions", "teacher", "det"),
        description="teacher embeddings of the proposals",
        view=plain_teacher,
        inputs=("data.train_json", "data.image_root", "data.vocab", *_TEACHER),
    ),
    Stage(
        "det_text", st_det_text, deps=("text", "backbone"),
        sections=("det", "data", "teacher"),
        outputs=("det/vild_text/metrics.json",),
        description="ViLD-text student",
        view=plain_teacher,
        inputs=_DET_INPUTS,
        checkpoints=("det/vild_text",),
    ),
    Stage(
        "det", st_det, deps=("text", "regions", "backbone"),
        sections=("det", "data", "teacher", "regions"),
        outputs=("det/vild/model_final.pt", "det/vild/metrics.json", "det/vild_ensemble/metrics.json"),
        description="ViLD student + ensemble",
        view=plain_teacher,
        inputs=_DET_INPUTS,
        checkpoints=("det/vild",),
    ),
    Stage(
        "detpro", st_detpro, deps=("text", "regions", "backbone"),
        sections=("prompts", "det", "data", "teacher", "regions"),
        description="DetPro prompts + ViLD with them",
        view=plain_teacher,
        inputs=_DET_INPUTS,
        checkpoints=("det/vild_detpro",),
    ),
    Stage(
        "seg", st_seg, deps=("teacher", "clipself"),
        sections=("seg", "data", "teacher"),
        outputs=("seg/lseg/metrics.json", "seg/lseg_distill/metrics.json"),
        description="LSeg students (base only, + pixel distillation)",
        inputs=("seg.train_images", "seg.train_masks", "seg.val_images", "seg.val_masks", "seg.pretrained_backbone"),
        checkpoints=("seg/lseg", "seg/lseg_distill"),
    ),
    Stage(
        "label", st_label, deps=("det",),
        sections=("label", "data"),
        outputs=("labels/unlabeled/labels.json",),
        description="pseudo-labels on the unlabeled split",
        view=plain_teacher,
        inputs=("label.images", "label.gt", "label.model", "label.vocab"),  # read on label_cfg(cfg)
    ),
    Stage(
        "cam", st_cam, deps=("teacher", "clipself"),
        sections=("cam", "data", "teacher", "seg"),
        outputs=("cam/metrics.json", "seg/lseg_cam/metrics.json"),
        description="CLIP-ES ablation; LSeg trained on CAM masks",
        inputs=("cam.images", "cam.labels"),
        checkpoints=("seg/lseg_cam",),
    ),
    Stage(
        "selftrain", st_selftrain, deps=("label",),
        sections=("det", "data", "label", "selftrain"),
        outputs=("selftrain/metrics.json",),
        description="one round of self-training on novel pseudo-labels",
        view=plain_teacher,
    ),
    Stage(
        "report", st_report, deps=("det_text", "det", "seg", "label", "cam", "selftrain"),
        sections=("work_dir",),
        outputs=("report.md",),
        description="report.md + figures",
    ),
)
# (Templates and background words are not among the inputs: the config holds their words, read
# when it is loaded -- see distill/config/load.py -- so a stage's key follows the words themselves.)


def check_stage_name(name: str, where: str, pipe: Pipeline | None = None) -> str:
    """``name`` if it is a stage of the default graph (and of ``pipe``, when given); else a
    one-line :class:`DistillError` naming ``where`` (``pipeline.stages``, ``--force``, ``--until``)
    with the closest stage name."""
    valid = [s.name for s in STAGES]
    if name not in valid:
        raise unknown_stage(name, valid, where)
    if pipe is not None and name not in pipe.stages:
        raise DistillError(f"{where}: stage {name!r} is not among pipeline.stages ({', '.join(pipe.order)})")
    return name


def _subset(stages: list[Stage], names: tuple[str, ...]) -> list[Stage]:
    """The stages named in ``pipeline.stages``; dependencies on removed stages are dropped, and a
    stage that depended on ``world`` then keys on the ``data`` section (the data are external)."""
    for name in names:
        check_stage_name(name, "pipeline.stages")
    kept = [s for s in stages if s.name in set(names)]
    left = {s.name for s in kept}
    out = []
    for s in kept:
        sections = s.sections
        if "world" in s.deps and "world" not in left and "data" not in sections:
            sections = sections + ("data",)
        out.append(dataclasses.replace(s, deps=tuple(d for d in s.deps if d in left), sections=sections))
    return out


def build_pipeline(cfg: Config) -> Pipeline:
    """The stage graph of ``cfg``: ``pipeline.stages`` keeps a subset (:func:`_subset`).
    ``pretrain.steps=0`` (an external teacher): the teacher stage only evaluates, so its one output
    is ``teacher/metrics.json``. The backbone and clipself weights are their stages' outputs when
    later stages read them (downstream keys then carry their digest)."""
    from distill.detection.backbone import backbone_readers
    from distill.teacher.clipself import uses_clipself

    stages = _subset(list(STAGES), cfg.pipeline.stages) if cfg.pipeline.stages else list(STAGES)
    if not cfg.prompts.enabled:  # DetPro is optional: in the graph only when prompts.enabled
        if "detpro" in cfg.pipeline.stages:
            raise DistillError("pipeline.stages: the detpro stage runs only with prompts.enabled=true")
        stages = [s for s in stages if s.name != "detpro"]
    by_name = {s.name: s for s in stages}

    def change(name: str, **kw) -> None:
        if name in by_name:
            by_name[name] = dataclasses.replace(by_name[name], **kw)

    if cfg.pretrain.steps == 0:
        change("teacher", outputs=("teacher/metrics.json",), description="evaluate the external teacher (no pretraining)")
    if cfg.prompts.enabled:
        out = Path(cfg.prompts.out).resolve()
        work = Path(cfg.work_dir).resolve()
        extra = (str(out.relative_to(work)),) if work in out.parents else ()
        change("detpro", outputs=(*extra, "det/vild_detpro/metrics.json", "det/vild_detpro_ensemble/metrics.json"))
    if cfg.label.source == "vlplm" and not cfg.label.model and "det_text" in by_name and "label" in by_name:
        change("label", deps=(*by_name["label"].deps, "det_text"))  # its base detector: det/vild_text/model_final.pt
    readers = backbone_readers(cfg)
    for name in ("seg", "cam"):  # LSeg's encoder starts from it (the cam stage trains LSeg on CAM masks)
        if "seg" in readers and "backbone" in by_name and name in by_name:
            change(name, deps=(*by_name[name].deps, "backbone"))
    work = Path(cfg.work_dir).resolve()
    for name, used, path in (("backbone", bool(readers), cfg.det.backbone_pretrain.out),
                             ("clipself", uses_clipself(cfg), cfg.clipself.out)):
        out = Path(path).resolve()
        if used and work in out.parents:
            extra = ("teacher/dense_tower/metrics.json",) if name == "clipself" else ()
            change(name, outputs=(str(out.relative_to(work)), *extra))
    return Pipeline(list(by_name.values()))


_FILE_SUFFIXES = (".json", ".txt", ".safetensors", ".pt", ".pth", ".bin", ".yaml")


def _external_paths(cfg: Config, key: str) -> list[str]:
    """The local paths named by ``key`` (a dotted config key) outside the work dir: values that
    look like paths (``local-dir:`` stripped); tags, inline vocabularies and empty values are not."""
    obj: object = section_value(label_cfg(cfg) if key.startswith("label.") else cfg, key)
    values = obj if isinstance(obj, tuple) else (obj,)
    work = Path(cfg.work_dir).resolve()
    out = []
    for v in values:
        v = str(v).strip()
        if v.startswith("local-dir:"):
            v = v[len("local-dir:") :]
        if not v or not ("/" in v or v.lower().endswith(_FILE_SUFFIXES)):
            continue
        p = Path(v).resolve()
        if p != work and work not in p.parents:  # files under work_dir are made by earlier stages
            out.append(v)
    return out


def check_inputs(cfg: Config, pipe: Pipeline, names: list[str]) -> None:
    """A one-line :class:`DistillError` naming the first missing input of stages ``names``."""
    for name in names:
        for key in pipe.stages[name].inputs:
            for v in _external_paths(cfg, key):
                if not Path(v).exists():
                    raise DistillError(f"{key}: {v} not found (needed by stage {name!r}; nothing is downloaded)")
