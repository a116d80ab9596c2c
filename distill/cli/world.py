"""`distill world ...`"""

from __future__ import annotations

import typer

from distill.cli.common import ConfigArg, Overrides, load

app = typer.Typer(no_args_is_help=True)


@app.command("make")
def make(config: ConfigArg, overrides: Overrides = None) -> None:
    """Build the shapes world into {work_dir}/data (deterministic from world.seed).

    Example: distill world make configs/shapes/world.yaml world.seed=3 "world.novel=[red star,blue circle]"
    """
    from distill.data.world import make_world, summary

    cfg = load(config, overrides)
    out = make_world(cfg)
    m = summary(out)
    for split, c in m["counts"].items():
        typer.echo(f"{split:>10}: {c['images']:5d} images, {c['annotations']:6d} annotations")
    typer.echo(f"base  ({len(m['base'])}): {', '.join(m['base'])}")
    typer.echo(f"novel ({len(m['novel'])}): {', '.join(m['novel'])}")
    typer.echo(f"wrote {out} in {m['wall_time_s']:.1f} s (world {m['world_hash']})")
