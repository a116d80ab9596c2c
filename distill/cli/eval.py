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


@app.command("labels")
def labels(
    pred: Annotated[str, typer.Option("--pred", help="The labels.json of distill label (made with a low --score-thresh).")],
    gt: Annotated[str, typer.Option("--gt", help="COCO json with ground truth of the labelled images (not val: e.g. the unlabeled split's hidden ground truth).")],
    thresholds: Annotated[str, typer.Option("--thresholds", help="Comma-separated score thresholds to try, e.g. 0.3,0.4,0.5.")] = "0.3,0.4,0.5,0.6,0.7,0.8",
    out: Annotated[Optional[str], typer.Option("--out", help="Folder for sweep.json.")] = None,
) -> None:
    """Pseudo-label box precision / recall / F1 at each score threshold (choose label.score_thresh)."""
    from pathlib import Path

    from distill.files import write_json
    from distill.labels.quality import threshold_sweep
    from distill.report.tables import table

    try:
        ts = [float(x) for x in thresholds.split(",") if x.strip()]
    except ValueError:
        raise DistillError(f"--thresholds: expected comma-separated numbers, got {thresholds!r}") from None
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise DistillError(f"--thresholds: expected scores in [0, 1], got {thresholds!r}")
    rows = threshold_sweep(pred, gt, ts)
    keys = [f"labels/{m}_{s}" for s in ("base", "novel") for m in ("precision", "recall", "f1")]
    typer.echo(table(["score_thresh", *(k.split("/")[1] for k in keys)],
                     [[f"{r['score_thresh']:g}", *(f"{r[k]:.3f}" for k in keys)] for r in rows]))
    if out:
        write_json(Path(out) / "sweep.json", rows)
        typer.echo(f"wrote {out}/sweep.json")
