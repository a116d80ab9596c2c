"""`distill teacher ...`: pretrain the tiny teacher, CLIPSelf its dense tower, evaluate a teacher, embed a vocabulary or the proposals."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from distill.cli.common import VOCAB_HELP, ConfigArg, Overrides, load

app = typer.Typer(no_args_is_help=True)


@app.command("pretrain")
def pretrain_cmd(
    config: ConfigArg,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if the inputs did not change.")] = False,
) -> None:
    """Pretrain the tiny teacher on the shapes world -> {work_dir}/teacher/teacher.safetensors.

    Example: distill teacher pretrain configs/shapes/teacher.yaml pretrain.steps=1200
    """
    from distill.teacher.pretrain import pretrain

    cfg = load(config, overrides)
    path = pretrain(cfg, force=force)
    typer.echo(f"teacher checkpoint: {path}")


@app.command("clipself")
def clipself_cmd(
    config: ConfigArg,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if the inputs did not change.")] = False,
) -> None:
    """CLIPSelf: distil the teacher's image tower into a dense tower (no labels).

    A copy of the tower is fine-tuned so that its MaskCLIP map, RoIAligned over random grid cells,
    matches the frozen teacher's embedding of each cell's crop.
    Writes clipself.out ({work_dir}/teacher/dense_tower.safetensors); set
    teacher.dense_tower to that file to use it for the dense paths.
    Example: distill teacher clipself configs/shapes/teacher.yaml clipself.steps=300
    """
    from distill.teacher.clipself import clipself

    cfg = load(config, overrides)
    path = clipself(cfg, force=force)
    typer.echo(f"CLIPSelf dense tower: {path} (use it with teacher.dense_tower={path})")


@app.command("evaluate")
def evaluate_cmd(
    config: ConfigArg,
    overrides: Overrides = None,
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=0, help="Evaluate on the first N val images only.")] = None,
    out: Annotated[str, typer.Option("--out", help="Folder for metrics.json (default {work_dir}/teacher).")] = "",
) -> None:
    """Zero-shot top-1 of val GT boxes (1x, 1.5x, 1x+1.5x crops, dense) and MaskCLIP pixel mIoU.

    With teacher.dense_tower set, the dense rows (dense RoIAlign, MaskCLIP pixels) use that
    CLIPSelf tower. Writes {work_dir}/teacher/metrics.json (or --out/metrics.json).
    Example: distill teacher evaluate configs/shapes/teacher.yaml
    """
    from pathlib import Path

    from distill.teacher.evaluate import evaluate_teacher, format_table

    cfg = load(config, overrides)
    res = evaluate_teacher(cfg, max_images=max_images, out_dir=out or None)
    typer.echo(format_table(res))
    typer.echo(f"wrote {Path(out or Path(cfg.work_dir) / 'teacher') / 'metrics.json'}")


@app.command("embed-text")
def embed_text_cmd(
    config: ConfigArg,
    overrides: Overrides = None,
    vocab: Annotated[str, typer.Option("--vocab", help=VOCAB_HELP)] = "",
    templates: Annotated[str, typer.Option("--templates", help="Prompt template file, or a learned prompt file of `distill train prompts` (default teacher.templates).")] = "",
    out: Annotated[str, typer.Option("--out", help="Cache folder (default {work_dir}/embeddings/text).")] = "",
) -> None:
    """Embed a vocabulary with the teacher's text tower (prompt ensemble x synonyms).

    Example: distill teacher embed-text configs/shapes/teacher.yaml --vocab "red star, crimson star=red star"
    """
    from pathlib import Path

    from distill.vocab import resolve_vocab

    cfg = load(config, overrides)
    voc = resolve_vocab(cfg.data, vocab, key="--vocab")  # config and vocabulary mistakes stop before torch is imported
    from distill.teacher.clip import build_teacher
    from distill.teacher.text import text_embeddings

    teacher = build_teacher(cfg.teacher)
    folder = Path(out) if out else Path(cfg.work_dir) / "embeddings" / "text"
    emb = text_embeddings(teacher, voc, templates or cfg.teacher.templates, cache_dir=folder)
    files = sorted(folder.glob(f"{voc.hash}-*.safetensors"), key=lambda p: p.stat().st_mtime)
    typer.echo(f"{len(voc)} classes x {emb.shape[1]} dims -> {files[-1] if files else folder}")


@app.command("embed-regions")
def embed_regions_cmd(config: ConfigArg, overrides: Overrides = None) -> None:
    """Embed the proposals of every training image with the teacher (the ViLD-image targets).

    Reads the proposals of `distill propose` ({work_dir}/proposals/{proposals.name}/proposals_train.safetensors) and data.train_json.

    Writes {work_dir}/embeddings/regions/<key>/ (shards of regions.shard_size images + index.json), the cache `distill train det` reads. Finished shards are skipped: rerunning a killed command resumes it.

    Under torchrun, rank r of W embeds shards r, r+W, ... and rank 0 writes the index; the cache is byte-identical to a one-process run's.

    Example: torchrun --nproc_per_node 2 -m distill.cli teacher embed-regions configs/shapes/vild.yaml
    """
    from distill.detection.proposals import embed_training_regions
    from distill.engine.distributed import is_main

    cfg = load(config, overrides)
    cache, c = embed_training_regions(cfg)
    if is_main():
        typer.echo(
            f"{c['train_images']} images x {cfg.det.num_image_distill} proposals ({cfg.regions.mode}): embedded {c['images']} images "
            f"in {c['shards'] - c['shards_skipped']} shards, {c['shards_skipped']} finished shards skipped -> {cache.root}"
        )
