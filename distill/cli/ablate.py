"""`distill ablate {vild,seg,selftrain,cam}`: the ablation tables of docs/experiments.md, each
trained or read by :mod:`distill.ablate` and written beside the run (metrics.json + a markdown table)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from distill.cli.common import ConfigArg, Overrides, load, shipped_config
from distill.errors import DistillError

app = typer.Typer(no_args_is_help=True)


def _names(text: str, valid, what: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in valid]
    if bad or not names:
        raise DistillError(f"--variants: {', '.join(bad) or 'empty'}: expected a comma-separated subset of {', '.join(valid)} ({what})")
    return names


def _config(config: str, overrides: list[str] | None, default: str, who: str) -> tuple[str, list[str]]:
    """The config file and overrides: with no config given (the first argument is an override such
    as ``det.train.max_steps=50``), the repository's ``default``."""
    overrides = list(overrides or [])
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = "", [config, *overrides]
    return config or shipped_config(default, who), overrides


def _seeds(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip()) or None
    except ValueError:
        raise DistillError(f"--seeds {text!r}: expected comma-separated integers such as 0,1") from None


@app.command("vild")
def vild_cmd(
    config: Annotated[str, typer.Argument(help="A detector config (default: configs/shapes/vild_ablation.yaml, 600 steps a row).")] = "",
    overrides: Overrides = None,
    variants: Annotated[str, typer.Option(help="Comma-separated rows: supervised, vild_text, vild_image, vild, vild_ensemble, vild_ensemble_heads, oracle, detpro, detpro_ensemble, oadp_oake, oadp_global, oadp_block, oadp, one_stage_text, one_stage.")] = "",
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds (default: det.train.seed); the table is their mean.")] = "",
    reuse: Annotated[bool, typer.Option(help="Read rows already trained in this work dir with the same settings.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = False,
) -> None:
    """ViLD's ablation (ViLD 4.2): a supervised Faster R-CNN on base boxes, ViLD-text, ViLD-image,
    ViLD, ViLD-ensemble and an oracle on all classes, AP50 / AP over novel, base and all.

    Writes {work_dir}/det/ablation/metrics.json and ablation.md.
    Example: distill ablate vild configs/shapes/vild.yaml --seeds 0,1 --variants vild_text,vild
    """
    from distill.ablate.vild import VARIANTS, deltas, run_ablation, table_markdown

    cfg = load(*_config(config, overrides, "configs/shapes/vild_ablation.yaml", "distill ablate vild"))
    rows = _names(variants, VARIANTS, "rows of the ablation") if variants else VARIANTS
    res = run_ablation(cfg, rows, progress=progress, seeds=_seeds(seeds), reuse=reuse)
    typer.echo(table_markdown(res))
    typer.echo("ViLD vs ViLD-text: " + ", ".join(f"{k}: {v}" for k, v in deltas(res).items()))


@app.command("seg")
def seg_cmd(
    overrides: Overrides = None,
    lseg: Annotated[str, typer.Option(help="Config of the base-only LSeg student (default configs/shapes/lseg.yaml).")] = "",
    distill: Annotated[str, typer.Option(help="Config of LSeg + pixel distillation (default configs/shapes/lseg_distill.yaml).")] = "",
    clipseg: Annotated[str, typer.Option(help="Config of the CLIPSeg student (default configs/shapes/clipseg.yaml).")] = "",
    out: Annotated[Optional[str], typer.Option(help="Output folder (default {work_dir}/seg/ablation).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = False,
) -> None:
    """LSeg base only, LSeg + MaskCLIP pixel distillation and CLIPSeg, with the MaskCLIP teacher:
    mIoU base / novel / all and hIoU on val. The overrides apply to all three configs.

    Writes metrics.json and table.md.
    Example: distill ablate seg seg.train.max_steps=50 --out runs/shapes/seg/ablation_quick
    """
    from distill.ablate.seg import ablate_seg

    given = {"lseg": lseg, "lseg_distill": distill, "clipseg": clipseg}
    cfgs = [load(p or shipped_config(f"configs/shapes/{name}.yaml", "distill ablate seg"), overrides) for name, p in given.items()]
    ablate_seg(*cfgs, out_dir=out, progress=progress)


@app.command("selftrain")
def selftrain_cmd(
    config: Annotated[str, typer.Argument(help="The pipeline config of a run finished up to its selftrain stage (default: the demo's).")] = "",
    overrides: Overrides = None,
    variants: Annotated[str, typer.Option(help="Comma-separated: control, unlabeled, unlabeled_x5, unlabeled+train, unlabeled_x5+train.")] = "",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = False,
) -> None:
    """Self-training's ablation: ViLD's weights fine-tuned for selftrain.steps on base ground truth
    alone (the control), + novel pseudo-labels of the unlabeled split (1x or 5x), + those of the
    training images (VL-PLM); AP50 novel / base on val.

    Writes {work_dir}/selftrain/ablation/metrics.json and table.md.
    Example: distill ablate selftrain configs/shapes/pipeline.yaml --variants control,unlabeled+train
    """
    from distill.ablate.selftrain import ABLATION, ablation_table, selftrain_ablation
    from distill.pipeline.stages import selftrain_inputs

    cfg = load(*_config(config, overrides, "configs/shapes/pipeline.yaml", "distill ablate selftrain"))
    names = _names(variants, tuple(ABLATION), "fine-tuning data") if variants else tuple(ABLATION)
    vild, pseudo, train_pseudo = selftrain_inputs(cfg)
    rows = selftrain_ablation(vild, pseudo, train_pseudo, variants=names, keep=cfg.selftrain.keep,
                              score_thresh=cfg.selftrain.score_thresh, progress=progress)
    typer.echo(ablation_table(rows))


@app.command("cam")
def cam_cmd(
    config: ConfigArg,
    overrides: Overrides = None,
    images: Annotated[str, typer.Option(help="The split whose semantic PNGs score each step.")] = "val",
    max_images: Annotated[int, typer.Option(min=0, help="Only the first N images (0 = all).")] = 0,
    clims: Annotated[bool, typer.Option("--clims", help="Also the CLIMS rows: its baseline CAM, + OTM, + BTM, + CBS, + REG, + CRF, and the baseline + CRF (trains 4 CAM networks on the train split).")] = False,
) -> None:
    """CLIP-ES's chain step by step (Grad-CAM, softmax Grad-CAM, + CAA, + CRF, + confidence
    ignore), each scored as mIoU against the split's ground-truth masks from image-level labels.

    Writes {cam.out}/metrics.json.
    Example: distill ablate cam configs/shapes/cam.yaml --images val
    """
    from distill.ablate.cam import cam_ablation

    cfg = load(config, overrides)
    m = cam_ablation(cfg, images, max_images=max_images)
    typer.echo(m["table"])
    typer.echo(f"{m['images']} images ({m['wall_s']} s); wrote {cfg.cam.out}/metrics.json")
    if clims:
        from distill.ablate.cam import clims_ablation

        k = clims_ablation(cfg, images, max_images=max_images)
        typer.echo(k["table"])
        typer.echo(f"{k['images']} images ({k['wall_s']} s); wrote {cfg.cam.out}/clims_ablation/metrics.json")
