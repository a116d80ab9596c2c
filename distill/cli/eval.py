"""`distill eval ...`: evaluate a COCO results json (det) or a folder of label PNGs (seg)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from distill.errors import DistillError

app = typer.Typer(no_args_is_help=True)


@app.command("det")
def det(
    gt: Annotated[str, typer.Option("--gt", help="COCO instances json (categories carry split base/novel).")],
    pred: Annotated[str, typer.Option("--pred", help="COCO results json [{image_id, category_id, bbox, score, segmentation?}], or the labels.json of distill label (its images and categories are matched to the ground truth's by file_name and name; metrics.json counts the matches).")],
    out: Annotated[Optional[str], typer.Option("--out", help="Folder for metrics.json.")] = None,
    iou: Annotated[str, typer.Option("--iou", help="Comma-separated: bbox, segm.")] = "bbox",
    vocab: Annotated[Optional[str], typer.Option("--vocab", help="Vocabulary file giving the base/novel split of the GT's categories, matched by name; every GT category must be in it.")] = None,
    max_dets: Annotated[Optional[int], typer.Option("--max-dets", help="Detections kept per image (default: 100 for COCO, 300 for LVIS).")] = None,
    backend: Annotated[str, typer.Option("--backend", help="auto (boxes: stream, masks: faster), stream (flat memory), faster (faster-coco-eval) or pycocotools.")] = "auto",
) -> None:
    """Box (and mask) AP, AP50, AP75 over all, base and novel categories."""
    from distill.eval.detection import evaluate_detection, format_table
    from distill.vocab import load_vocab

    iou_types = tuple(t.strip() for t in iou.split(",") if t.strip())
    metrics = evaluate_detection(
        gt, pred, out_dir=out, iou_types=iou_types, vocab=load_vocab(vocab) if vocab else None,
        max_dets=max_dets, backend=backend,
    )
    typer.echo(format_table(metrics))
    if out:
        typer.echo(f"wrote {out}/metrics.json")


@app.command("seg")
def seg(
    gt: Annotated[str, typer.Option("--gt", help="Folder of ground-truth label PNGs, sub-folders too (0 = background, 255 = ignore; 16-bit PNGs: 65535).")],
    pred: Annotated[str, typer.Option("--pred", help="Folder of predicted label PNGs, same relative names (the semantic/ folder of distill label as it is: its legend.json is followed).")],
    gt_json: Annotated[Optional[str], typer.Option("--gt-json", help="COCO json giving class names and the base/novel split.")] = None,
    vocab: Annotated[Optional[str], typer.Option("--vocab", help="Vocabulary file instead of --gt-json.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Folder for metrics.json and confusion.npy.")] = None,
) -> None:
    """mIoU over base, novel and all classes, hIoU and pixel accuracy."""
    from distill.eval.detection import format_table
    from distill.eval.segmentation import evaluate_semseg_dirs

    if gt_json is not None and vocab is not None:
        raise DistillError("eval seg: give --gt-json or --vocab, not both (each names the classes of the label values)")
    if gt_json is None and vocab is None:
        raise DistillError("eval seg: give --gt-json (or --vocab) for class names and the base/novel split")
    metrics = evaluate_semseg_dirs(gt, pred, vocab=vocab, gt_json=gt_json, out_dir=out)
    typer.echo(format_table(metrics))
    if out:
        typer.echo(f"wrote {out}/metrics.json")
