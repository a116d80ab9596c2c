"""The stages of the default run (ARCHITECTURE.md), wired into :class:`distill.pipeline.Pipeline`.

Each stage function takes the resolved :class:`~distill.config.Config` and makes one call into the
package; the runner handles manifests, skipping and timing. Student variants (ViLD-text, ViLD,
the ensemble, LSeg base-only, LSeg + distillation) are derived from the one config with
``dataclasses.replace`` so a single pipeline file drives the whole run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from distill.config import Config, load_config, save_config
from distill.pipeline import Pipeline, Stage, StageResult, resuming


def _teacher(cfg: Config):
    from distill.engine.device import get_device
    from distill.teacher.clip import build_teacher

    return build_teacher(cfg.teacher, device=get_device(cfg.teacher.device))


def plain_teacher(cfg: Config) -> Config:
    """The view of ``cfg`` with ``teacher.dense_pretrained`` blank (a :class:`Stage` ``view``): crops,
    region embeddings and text use the teacher's own tower, stages before ``clipself`` must not
    look for the dense tower it writes, and changing that tower's path reruns none of them (seg and
    cam, which read the tower, read the config as is)."""
    return _with(cfg, "teacher", dense_pretrained="") if cfg.teacher.dense_pretrained else cfg


def _fresh(*dirs: Path) -> bool:
    """``resuming()``; when not resuming, drop the checkpoints of a previous, different run in
    ``dirs`` so a later kill + resume can never continue from another config's weights."""
    import shutil

    if resuming():
        return True
    for d in dirs:
        shutil.rmtree(Path(d) / "checkpoints", ignore_errors=True)
        (Path(d) / "model_final.pt").unlink(missing_ok=True)
    return False


def _with(cfg: Config, section: str, **changes) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


# ------------------------------------------------------------------------------------------- stages
def st_world(cfg: Config):
    from distill.data.world import make_world

    make_world(cfg)


def st_teacher(cfg: Config):
    """Pretrain the tiny teacher, then evaluate it; ``pretrain.steps=0`` means the teacher is
    external (``teacher.model`` / ``teacher.pretrained``, e.g. CLIP ViT-B/32): evaluate only."""
    from distill.teacher.evaluate import evaluate_teacher
    from distill.teacher.pretrain import pretrain

    if cfg.pretrain.steps != 0:
        pretrain(cfg)
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
    on it into ``teacher/dense/metrics.json``; runs only when ``teacher.dense_pretrained`` is
    ``clipself.out``."""
    from distill.teacher.clipself import clipself, uses_clipself
    from distill.teacher.evaluate import evaluate_teacher

    if not uses_clipself(cfg):
        return "skipped: teacher.dense_pretrained is not clipself.out"
    clipself(cfg)  # builds the teacher without its dense tower, on teacher.device
    m = evaluate_teacher(cfg, out_dir=Path(cfg.work_dir) / "teacher" / "dense")
    return f"MaskCLIP on the dense tower: mIoU seen {100 * m.get('maskclip/miou_seen', float('nan')):.1f} / unseen {100 * m.get('maskclip/miou_unseen', float('nan')):.1f}"


def st_backbone(cfg: Config):
    """The students' ResNet pretrained on crops of base boxes (the stand-in for the ImageNet weights
    ViLD's detector and LSeg's image encoder start from); runs only when ``det.pretrained_backbone``
    or ``seg.pretrained_backbone`` is ``det.backbone_pretrain.out``."""
    from distill.detection.backbone import backbone_readers, pretrain_backbone

    if not backbone_readers(cfg):
        return "skipped: neither det.pretrained_backbone nor seg.pretrained_backbone is det.backbone_pretrain.out"
    m = pretrain_backbone(cfg)
    return f"{m['steps']} steps, training accuracy {100 * m['train_acc_last100']:.1f}% -> {m['out']}"


def st_propose(cfg: Config):
    from distill.detection.proposals import run_proposals

    # run_proposals itself reuses RPN weights only when they were trained with this config
    m = run_proposals(cfg, resume=resuming(), progress=True)
    keys = [k for k in m if k.startswith("recall@")]
    return ", ".join(f"{k} {m[k]:.2f}" for k in keys[:3])


def st_regions(cfg: Config):
    from distill.detection.proposals import embed_training_regions

    _, counts = embed_training_regions(cfg, _teacher(cfg))
    return f"{counts['train_images']} images x {cfg.det.num_image_distill} proposals ({cfg.regions.mode})"


def _det_note(m: dict) -> str:
    return f"AP50 novel {100 * m.get('bbox/AP50_novel', float('nan')):.1f} / base {100 * m.get('bbox/AP50_base', float('nan')):.1f}"


def st_det_text(cfg: Config):
    """ViLD-text (section 3.2): the baseline the image distillation must beat on novel classes."""
    from distill.detection.train import train_detector, with_det

    from distill.detection.train import det_dir

    tcfg = with_det(cfg, name="vild_text", use_image=False, inference="text")
    return _det_note(train_detector(tcfg, resume=_fresh(det_dir(tcfg))))


def st_det(cfg: Config):
    """ViLD (text + image distillation), evaluated with text inference and with the 3.4 ensemble."""
    from distill.detection.train import det_dir, train_detector, with_det

    vild = with_det(cfg, name="vild", use_text=True, use_image=True, inference="text")
    m = train_detector(vild, resume=_fresh(det_dir(vild)))
    ens = with_det(cfg, name="vild_ensemble", inference="ensemble", checkpoint=str(det_dir(vild) / "model_final.pt"))
    e = train_detector(ens, eval_only=True)
    return f"ViLD {_det_note(m)}; ensemble {_det_note(e)}"


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
        m = train_seg(scfg, teacher=teacher, resume=_fresh(Path(cfg.work_dir) / "seg" / name))
        notes.append(f"{name} hIoU {100 * m.get('miou/hiou', float('nan')):.1f}")
        # a few val predictions for the report's overlays
        out = Path(cfg.work_dir) / "seg" / name
        write_text(out / "vis_list.txt", "\n".join(str(p.resolve()) for p in val_images) + "\n")
        model = load_segmenter(scfg.seg, teacher, out / "model_final.pt")
        segment_folder(model, out / "vis_list.txt", text_for(teacher, vocab, scfg), list(vocab.ids), out / "pred_val", window=scfg.seg.window)
    return "; ".join(notes)


def _label_cfg(cfg: Config) -> Config:
    """Label the unlabeled split with ``label.source`` (teacher zero-shot by default in the shapes
    pipeline; ``vild`` uses the trained ViLD student), measured against its hidden ground truth."""
    model = cfg.label.model or (str(Path(cfg.work_dir) / "det" / "vild" / "model_final.pt") if cfg.label.source == "vild" else "")
    return _with(
        cfg,
        "label",
        model=model,
        images=cfg.label.images or str(Path(cfg.data.image_root) / "unlabeled"),
        out=str(Path(cfg.work_dir) / "labels" / "unlabeled"),
        gt=cfg.label.gt or cfg.data.unlabeled_json,
    )


def st_label(cfg: Config):
    from distill.labels.pseudo import label

    lc = _label_cfg(cfg)
    label(lc)
    return str(Path(lc.label.out) / "labels.json")


def st_cam(cfg: Config):
    """CLIP-ES: the ablation and panels on val; then what the masks are for (CLIP-ES 3.4): masks of
    the training images from their image-level labels train an LSeg student (``seg/lseg_cam``, base
    classes as ``seg/lseg``, whose masks are the ground truth), evaluated on val."""
    from distill.ablate.cam import cam_ablation
    from distill.cam.run import run_cam
    from distill.segmentation.train import train_seg

    teacher = _teacher(cfg)  # with its dense tower: cam.tower=dense CAMs and the LSeg student read it
    m = cam_ablation(cfg, "val", teacher=teacher)
    run_cam(cfg, "val", teacher=teacher)
    run_cam(_with(cfg, "cam", num_panels=0), "train", teacher=teacher)
    out = Path(cfg.work_dir) / "seg" / "lseg_cam"
    scfg = _with(_with(cfg, "data", masks=str(Path(cfg.cam.out) / "masks" / "train")), "seg", name="lseg_cam", distill_weight=0.0)
    s = train_seg(scfg, teacher=teacher, resume=_fresh(out), out_dir=out)
    return (f"CLIP-ES final masks {100 * (m.get('cam/miou_final') or 0):.1f} mIoU on val; "
            f"LSeg on CAM masks: seen mIoU {100 * s.get('miou/seen', float('nan')):.1f}")


def selftrain_inputs(cfg: Config, label_train: bool = True) -> tuple[Config, Path, Path | None]:
    """The selftrain stage's fine-tuning config (ViLD's weights as ``det.init``, ``selftrain.steps``
    without warm-up), the unlabeled split's pseudo-labels, and the training images' (labeled here
    when ``selftrain.train_split`` and ``label_train``; labeling resumes, so a rerun is cheap)."""
    from distill.detection.train import det_dir, with_det
    from distill.labels.pseudo import label

    st = cfg.selftrain
    pseudo = Path(_label_cfg(cfg).label.out) / "labels.json"
    train_pseudo = None
    if st.train_split:  # VL-PLM: the base split's images get novel pseudo-labels too
        lc = _with(_label_cfg(cfg), "label", images=str(Path(cfg.data.image_root) / "train"),
                   out=str(Path(cfg.work_dir) / "labels" / "train"), gt=cfg.data.train_full_json)
        if label_train:
            label(lc)
        train_pseudo = Path(lc.label.out) / "labels.json"
    steps = st.steps or cfg.det.train.max_steps
    vild = with_det(cfg, name="vild", inference="text", init=str(det_dir(with_det(cfg, name="vild")) / "model_final.pt"), train={"max_steps": steps, "warmup": 0})
    return vild, pseudo, train_pseudo


def st_selftrain(cfg: Config):
    from distill.labels.selftrain import self_train

    st = cfg.selftrain
    # one round: the ViLD student fine-tuned on base GT + novel pseudo-labels
    # (trained from scratch on them instead, 300 steps, novel AP50 fell 11.8 -> 4.1 in the demo)
    vild, pseudo, train_pseudo = selftrain_inputs(cfg)
    m = self_train(vild, pseudo, keep=st.keep, score_thresh=st.score_thresh, repeat=st.repeat, train_pseudo_json=train_pseudo)
    d = m.get("selftrain/AP50_novel_delta")
    return f"novel AP50 delta {100 * d:+.1f}" if d is not None else ""


def st_report(cfg: Config):
    from distill.report import write_report

    return str(write_report(cfg))


STAGES = (
    Stage("world", st_world, (), ("world", "work_dir"), ("data/instances_val.json", "data/instances_train_base.json"), "procedural shapes world"),
    Stage("teacher", st_teacher, ("world",), ("teacher", "pretrain"), ("teacher/teacher.safetensors", "teacher/metrics.json"), "pretrain + evaluate the tiny CLIP teacher", view=plain_teacher),
    Stage("text", st_text, ("teacher",), ("teacher", "data"), (), "text embeddings of the vocabulary", view=plain_teacher),
    Stage("clipself", st_clipself, ("teacher",), ("clipself", "teacher"), (), "CLIPSelf dense tower of the teacher (MaskCLIP for segmentation)"),
    Stage("backbone", st_backbone, ("world",), ("det.backbone", "det.pretrained_backbone", "seg.pretrained_backbone", "det.backbone_pretrain", "data"), (), "ResNet-18 pretrained on base-box crops (where the detector and LSeg start)"),
    Stage("propose", st_propose, ("world", "backbone"), ("proposals", "data", "det"), ("proposals/rpn/proposals_train.safetensors",), "class-agnostic RPN proposals"),
    Stage("regions", st_regions, ("teacher", "propose"), ("regions", "teacher", "det"), (), "teacher embeddings of the proposals", view=plain_teacher),
    Stage("det_text", st_det_text, ("text", "backbone"), ("det", "data", "teacher"), ("det/vild_text/metrics.json",), "ViLD-text student", view=plain_teacher),
    Stage("det", st_det, ("text", "regions", "backbone"), ("det", "data", "teacher", "regions"), ("det/vild/model_final.pt", "det/vild/metrics.json", "det/vild_ensemble/metrics.json"), "ViLD student + ensemble", view=plain_teacher),
    Stage("seg", st_seg, ("teacher", "clipself"), ("seg", "data", "teacher"), ("seg/lseg/metrics.json", "seg/lseg_distill/metrics.json"), "LSeg students (base only, + pixel distillation)"),
    Stage("label", st_label, ("det",), ("label", "data"), ("labels/unlabeled/labels.json",), "pseudo-labels on the unlabeled split", view=plain_teacher),
    Stage("cam", st_cam, ("teacher", "clipself"), ("cam", "data", "teacher", "seg"), ("cam/metrics.json", "seg/lseg_cam/metrics.json"), "CLIP-ES ablation; LSeg trained on CAM masks"),
    Stage("selftrain", st_selftrain, ("label",), ("det", "data", "label", "selftrain"), ("selftrain/metrics.json",), "one round of self-training on novel pseudo-labels", view=plain_teacher),
    Stage("report", st_report, ("det_text", "det", "seg", "label", "cam", "selftrain"), ("work_dir",), ("report.md",), "report.md + figures"),
)


def check_stage_name(name: str, where: str, pipe: Pipeline | None = None) -> str:
    """``name`` if it is a stage of the default graph (and of ``pipe``, when given); else a
    one-line :class:`DistillError` naming ``where`` (``pipeline.stages``, ``--force``, ``--until``)
    with the closest stage name."""
    import difflib

    from distill.errors import DistillError

    valid = [s.name for s in STAGES]
    if name not in valid:
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DistillError(f"{where}: unknown stage {name!r}; valid stages: {', '.join(valid)}{hint}")
    if pipe is not None and name not in pipe.stages:
        raise DistillError(f"{where}: stage {name!r} is not among pipeline.stages ({', '.join(pipe.order)})")
    return name


def build_pipeline(cfg: Config) -> Pipeline:
    """The stage graph of ``cfg``: ``pipeline.stages`` keeps a subset (dependencies on removed
    stages are dropped; a stage that depended on ``world`` then keys on the ``data`` section, since
    the data are external files). ``pretrain.steps=0`` (an external teacher): the teacher stage only
    evaluates, so its one output is ``teacher/metrics.json``."""
    stages = list(STAGES)
    if cfg.pipeline.stages:
        for name in cfg.pipeline.stages:
            check_stage_name(name, "pipeline.stages")
        keep = set(cfg.pipeline.stages)
        stages = [s for s in stages if s.name in keep]
        names = {s.name for s in stages}
        out = []
        for s in stages:
            sections = s.sections
            if "world" in s.deps and "world" not in names and "data" not in sections:
                sections = sections + ("data",)
            out.append(dataclasses.replace(s, deps=tuple(d for d in s.deps if d in names), sections=sections))
        stages = out
    if cfg.pretrain.steps == 0:
        stages = [
            dataclasses.replace(s, outputs=("teacher/metrics.json",), description="evaluate the external teacher (no pretraining)") if s.name == "teacher" else s
            for s in stages
        ]
    from distill.detection.backbone import backbone_readers
    from distill.teacher.clipself import uses_clipself

    work = Path(cfg.work_dir).resolve()
    # a stage's weights are its output when later stages use them: downstream keys carry their digest
    readers = backbone_readers(cfg)
    if "seg" in readers and any(s.name == "backbone" for s in stages):  # LSeg's encoder starts from it
        stages = [dataclasses.replace(s, deps=(*s.deps, "backbone")) if s.name == "seg" else s for s in stages]
    for name, used, path in (("backbone", bool(readers), cfg.det.backbone_pretrain.out),
                             ("clipself", uses_clipself(cfg), cfg.clipself.out)):
        out = Path(path).resolve()
        if used and work in out.parents:
            rel = str(out.relative_to(work))
            extra = ("teacher/dense/metrics.json",) if name == "clipself" else ()
            stages = [dataclasses.replace(s, outputs=(rel, *extra)) if s.name == name else s for s in stages]
    return Pipeline(stages)


# Config values each stage reads from outside the run (files and folders). Checked before anything
# runs, so a missing COCO folder stops the run at once, not after days of training.
STAGE_INPUTS = {
    "teacher": ("data.val_json", "data.image_root", "data.vocab", "teacher.model", "teacher.pretrained"),
    "text": ("data.vocab", "teacher.model", "teacher.pretrained"),
    "backbone": ("data.train_json", "data.image_root", "data.vocab"),
    "propose": ("data.train_json", "data.val_json", "data.image_root", "det.pretrained_backbone"),
    "regions": ("data.train_json", "data.image_root", "data.vocab", "teacher.model", "teacher.pretrained"),
    "det_text": ("data.train_json", "data.val_json", "data.image_root", "data.vocab", "data.extra", "det.pretrained_backbone"),
    "det": ("data.train_json", "data.val_json", "data.image_root", "data.vocab", "data.extra", "det.pretrained_backbone"),
    "label": ("label.images", "label.gt", "label.model", "label.vocab"),
    "seg": ("seg.train_images", "seg.train_masks", "seg.val_images", "seg.val_masks", "seg.pretrained_backbone"),
    "cam": ("cam.images", "cam.labels"),
}
# (Templates and background words are not among them: the config holds their words, read when it
# is loaded -- see distill/config.py -- so a stage's key follows the words themselves.)

_FILE_SUFFIXES = (".json", ".txt", ".safetensors", ".pt", ".pth", ".bin", ".yaml")


def _external_paths(cfg: Config, key: str) -> list[str]:
    """The local paths named by ``key`` (a dotted config key) outside the work dir: values that
    look like paths (``local-dir:`` stripped); tags, inline vocabularies and empty values are not."""
    obj: object = _label_cfg(cfg) if key.startswith("label.") else cfg
    for part in key.split("."):
        obj = getattr(obj, part)
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
    from distill.errors import DistillError

    for name in names:
        for key in STAGE_INPUTS.get(name, ()):
            for v in _external_paths(cfg, key):
                if not Path(v).exists():
                    raise DistillError(f"{key}: {v} not found (needed by stage {name!r}; nothing is downloaded)")


def _to_run(cfg: Config, pipe: Pipeline, force=(), until=None) -> list[str]:
    """Stages that this run will execute: forced, stale, or downstream of one that is."""
    forced: set[str] = set()
    for f in force:
        forced |= pipe.downstream(check_stage_name(f, "--force", pipe))
    order = list(pipe.order)
    if until:
        check_stage_name(until, "--until", pipe)
        order = order[: order.index(until) + 1]
    stale: set[str] = set()
    for n in order:
        if n in forced or any(d in stale for d in pipe.stages[n].deps) or not pipe.is_fresh(cfg, n):
            stale.add(n)
    return [n for n in order if n in stale]


# ------------------------------------------------------------------------------------------- runner
def run_pipeline(config: str, overrides: list[str], *, force=(), until=None, quick=False, list_only=False) -> list[StageResult]:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    for f in force:  # stage names checked before anything is imported or read
        check_stage_name(f, "--force")
    if until:
        check_stage_name(until, "--until")
    cfg = load_config(config, overrides)
    if quick:
        cfg = load_config(config, list(cfg.pipeline.quick_overrides) + ["pipeline.quick=true"] + list(overrides))
    pipe = build_pipeline(cfg)
    to_run = _to_run(cfg, pipe, force=force, until=until)  # --force / --until checked, --list or not
    if list_only:
        shown = pipe.order[: pipe.order.index(until) + 1] if until else pipe.order
        for name in shown:
            console.print(f"{name:12s} {'to run' if name in to_run else 'up to date'}  {pipe.stages[name].description}")
        return []
    check_inputs(cfg, pipe, to_run)
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.work_dir) / "config.yaml")
    t0 = time.perf_counter()
    n = len(pipe.order)

    def on_event(r: StageResult) -> None:
        i = pipe.order.index(r.name) + 1
        if r.status == "running":
            console.rule(f"[bold]stage {i}/{n}: {r.name}[/] — {pipe.stages[r.name].description}")
        elif r.status == "skipped":
            console.print(f"[dim]stage {i}/{n}: {r.name} up to date, skipped[/]")
        elif r.status == "ran":
            console.print(f"[green]stage {i}/{n}: {r.name} done in {r.seconds:.1f} s[/] {r.note}")
        elif r.status == "failed":
            console.print(f"[red]stage {i}/{n}: {r.name} failed after {r.seconds:.1f} s[/]")

    results = pipe.run(cfg, force=force, until=until, on_event=on_event)
    table = Table(title=f"distill run: {cfg.work_dir} ({time.perf_counter() - t0:.1f} s)")
    for col in ("stage", "status", "seconds", "note"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", r.note)
    console.print(table)
    report = Path(cfg.work_dir) / "report.md"
    if report.is_file():
        console.print(f"Report: {report}")
    return results
