"""`distill train ...`"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


def register_propose(root: typer.Typer) -> None:
    """``distill propose CONFIG``: class-agnostic proposals (filled in by the ViLD work)."""

    @root.command("propose")
    def propose(
        config: str = typer.Argument(..., help="A YAML config file (configs/shapes/vild.yaml ...)."),
        overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. proposals.train.max_steps=100"),
        resume: bool = typer.Option(False, "--resume", help="Continue training the proposal network from its newest checkpoint."),
    ) -> None:
        """Train a class-agnostic detector on base boxes; write the top-k proposals of every training
        image to {work_dir}/proposals/{proposals.name}/ with their recall on val."""
        from distill.cli.common import load
        from distill.detection.proposals import run_proposals

        m = run_proposals(load(config, overrides), resume=resume)
        typer.echo("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))


def _relaunch_distributed(num_gpus: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``num_gpus`` processes (one per GPU)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_gpus}", "-m", "distill.cli", *argv]
    return subprocess.call(cmd, env=dict(os.environ))


@app.command("det")
def det(
    config: str = typer.Argument(..., help="A YAML config file (configs/shapes/vild.yaml ...)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. det.train.max_steps=100"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output folder."),
    eval_only: bool = typer.Option(False, "--eval-only", help="Only evaluate det.checkpoint (default det/<name>/model_final.pt)."),
    num_gpus: int = typer.Option(1, "--num-gpus", min=1, help="Processes under torchrun (DDP); 1 = this process."),
) -> None:
    """Train the ViLD student on base classes and evaluate it over base + novel classes;
    writes {work_dir}/det/{det.name}/ (model_final.pt, metrics.jsonl, metrics.json)."""
    import os

    from distill.cli.common import load
    from distill.detection.train import train_detector

    cfg = load(config, overrides)  # validate before launching anything
    if num_gpus > 1 and "WORLD_SIZE" not in os.environ:
        argv = ["train", "det", config, *(overrides or [])] + (["--resume"] if resume else []) + (["--eval-only"] if eval_only else [])
        rc = _relaunch_distributed(num_gpus, argv)
        if rc:
            raise typer.Exit(rc)
        return
    metrics = train_detector(cfg, resume=resume, eval_only=eval_only)
    keys = ("bbox/AP50_novel", "bbox/AP50_base", "bbox/AP50", "bbox/AP_novel", "bbox/AP_base", "bbox/AP")
    typer.echo("  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics))


@app.command("backbone")
def backbone(
    config: str = typer.Argument(..., help="A YAML config file (configs/shapes/vild.yaml ...)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. det.backbone_pretrain.steps=300"),
) -> None:
    """Pretrain det.backbone (a ResNet) on crops of the training split's base-class boxes, the
    stand-in for ImageNet weights; writes det.backbone_pretrain.out. Then train the detector with
    det.pretrained_backbone=<that file> det.freeze_backbone=false."""
    from distill.cli.common import load
    from distill.detection.backbone import pretrain_backbone

    m = pretrain_backbone(load(config, overrides))
    typer.echo(f"{m['out']}  train_acc_last100={m['train_acc_last100']:.4f}  boxes={m['boxes']}  classes={m['classes']}  wall_s={m['wall_s']}")


@app.command("prompts")
def prompts(
    config: str = typer.Argument(..., help="A YAML config file (configs/shapes/vild.yaml ...)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. prompts.epochs=3"),
) -> None:
    """DetPro: learn the prompt context of the text classifier on the cached region embeddings of
    the training proposals (base classes only; one context per IoU group, ensembled). Needs the
    proposals and region embeddings (`distill propose`, `distill teacher embed-regions`); writes
    prompts.out (default {work_dir}/prompts/detpro.safetensors) and its _metrics.json. Use it as
    templates anywhere: teacher.templates=<that file>."""
    from distill.cli.common import load
    from distill.detection.detpro import train_prompts

    m = train_prompts(load(config, overrides))
    for g in m["prompts/groups"]:
        typer.echo(f"IoU [{g['group'][0]:.2f}, {g['group'][1]:.2f}): {g['positives']} positives, {g['negatives']} negatives"
                   + (f" -- skipped: {g['skipped']}" if "skipped" in g else f", loss {g.get('loss_last', float('nan')):.4f}"))
    keys = [k for k in m if k.startswith("prompts/top1_")]
    typer.echo("  ".join(f"{k}={m[k]:.4f}" for k in keys))
    typer.echo(m["prompts/file"])


@app.command("seg")
def seg(
    config: str = typer.Argument(..., help="A YAML config file (configs/shapes/lseg.yaml ...)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. seg.train.max_steps=100"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output folder."),
) -> None:
    """Train a segmentation student (LSeg / CLIPSeg) on base classes; writes {work_dir}/seg/{seg.name}/."""
    from distill.cli.common import load
    from distill.segmentation.train import train_seg

    metrics = train_seg(load(config, overrides), resume=resume)
    keys = ("miou/base", "miou/novel", "miou/all", "miou/hiou", "pixel_acc")
    typer.echo("  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics))
