"""`distill label ...`: pseudo-label any image folder with any vocabulary."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from distill.cli.common import VOCAB_HELP


def _opt(flag: str, help: str):
    return typer.Option(flag, help=help)


def label_command(
    images: Annotated[Optional[str], _opt("--images", "Image folder (recursive) or a list file.")] = None,
    vocab: Annotated[Optional[str], _opt("--vocab", VOCAB_HELP)] = None,
    model: Annotated[Optional[str], _opt("--model", "A student checkpoint model_final.pt (vild / seg), the base detector (vlplm: a ViLD model_final.pt), or 'teacher'.")] = None,
    out: Annotated[Optional[str], _opt("--out", "Output folder.")] = None,
    source: Annotated[Optional[str], _opt("--source", "vild | seg | teacher | vlplm (VL-PLM: --model a ViLD checkpoint trained on base classes; its refined boxes, teacher score fused with the RPN's).")] = None,
    proposals: Annotated[Optional[str], _opt("--proposals", "Teacher source boxes: auto (components for the embedded teacher, windows for any other) | windows (photos) | components (flat-coloured objects) | components+windows | rpn (with --model a ViLD checkpoint).")] = None,
    format: Annotated[Optional[str], _opt("--format", "Comma-separated: coco, yolo, png.")] = None,
    score_thresh: Annotated[Optional[float], _opt("--score-thresh", "Global score threshold (default 0.8 for vlplm, else 0.3).")] = None,
    class_thresh: Annotated[Optional[list[str]], _opt("--class-thresh", "Per-class threshold 'red star=0.5' (repeatable; a comma separates entries only after a threshold, so a class name may hold commas).")] = None,
    top_k: Annotated[Optional[int], _opt("--top-k", "Labels kept per image (0 = all).")] = None,
    nms: Annotated[Optional[float], _opt("--nms", "Class-wise NMS IoU threshold in [0, 1] (0 = off; default 0.6 for vlplm, else 0.5).")] = None,
    min_area: Annotated[Optional[float], _opt("--min-area", "Minimum area in pixels.")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Images per forward.")] = None,
    num_workers: Annotated[Optional[int], _opt("--num-workers", "Decoding workers.")] = None,
    templates: Annotated[Optional[str], _opt("--templates", "Teacher prompts: a template file, or a learned prompt file of `distill train prompts` (= teacher.templates; a student's own come from its checkpoint).")] = None,
    gt: Annotated[Optional[str], _opt("--gt", "COCO json with hidden ground truth: also write metrics.json.")] = None,
    config: Annotated[Optional[str], _opt("--config", "A YAML config (its label: section gives defaults).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides, e.g. teacher.device=cpu")] = None,
) -> None:
    """Label images with boxes, masks and scores: COCO json, YOLO txt, semantic PNGs.

    Sources: a trained student (--model det/vild/model_final.pt: its detections, masks with
    det.masks; --model seg/<name>/model_final.pt: semantic masks), or the frozen teacher itself
    (--model teacher: crops scored against your words; give your CLIP as teacher.pretrained=FILE).
    For photos with the teacher, boxes come from sliding windows (--proposals auto picks them for
    any teacher but the embedded one), or better from a ViLD checkpoint's RPN (--proposals rpn).
    VL-PLM (--source vlplm --model det/vild_text/model_final.pt): that detector's boxes refined by
    its RoI head, the teacher's score averaged with the RPN's, threshold 0.8, NMS 0.6.
    A checkpoint carries its training config and teacher identity: copy model_final.pt alone.

    Example: distill label --images photos/ --vocab "cat, dog, bicycle" --model teacher
    --out labels/ --format coco,yolo,png --class-thresh "cat=0.5" teacher.model= teacher.pretrained=ViT-B-32.pt
    """
    from distill.cli.common import load

    flags = {
        "images": images, "vocab": vocab, "model": model, "out": out, "source": source, "proposals": proposals, "format": format,
        "score_thresh": score_thresh, "top_k": top_k, "nms": nms, "min_area": min_area,
        "batch_size": batch_size, "num_workers": num_workers, "gt": gt,
    }
    ov = [f"label.{k}={_quote(v)}" for k, v in flags.items() if v is not None]
    if templates is not None:
        ov.append(f"teacher.templates={_quote(templates)}")
    if model == "teacher" and source is None:
        ov.append("label.source=teacher")
    if class_thresh:
        ov.append("label.class_thresh=" + json.dumps(list(class_thresh)))  # a list: commas inside an entry stay
    cfg = load(config, ov + list(overrides or []))  # a config mistake stops here, before torch is imported
    from distill.labels.pseudo import label

    summary = label(cfg)
    for k, v in summary.items():
        typer.echo(f"{k:>28}: {v}")
    typer.echo(f"wrote {cfg.label.out}/labels.json")


def _quote(v) -> str:
    """An override value parsed by YAML as the literal string / number given."""
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(str(v))


def register(root: typer.Typer) -> None:
    """Add the `label` command to the root app."""
    root.command("label")(label_command)
