"""`distill cam CONFIG --images SPLIT_OR_DIR --labels image_labels.json` (the ablation: `distill ablate cam`)"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from distill.cli.common import ConfigArg, Overrides, load


def register(root: typer.Typer) -> None:
    """Add the `cam` command to the root app."""

    @root.command("cam")
    def cam(
        config: ConfigArg,
        overrides: Overrides = None,
        images: Annotated[Optional[str], typer.Option(help="A split name (train, val, ...) under data.image_root, or an image folder.")] = None,
        labels: Annotated[Optional[str], typer.Option(help="Image-level labels json (default: data.image_labels of the split).")] = None,
        ablation: Annotated[bool, typer.Option(hidden=True, help="Moved: distill ablate cam.")] = False,
        max_images: Annotated[int, typer.Option(min=0, help="Only the first N images (0 = all).")] = 0,
        method: Annotated[Optional[str], typer.Option(help="clip_es (default: the teacher's Grad-CAM) | clims (a CAM network judged by the teacher; trained on the train split first when clims.out is missing).")] = None,
    ) -> None:
        """CLIP-ES (or CLIMS, --method clims): CAM seeds (npz), refined masks (PNG, 255 = ignore) and panels from image-level labels.

        Example: distill cam configs/shapes/cam.yaml --images train
        """
        from distill.cam.run import run_cam
        from distill.errors import DistillError

        if ablation:
            raise DistillError("--ablation moved: use `distill ablate cam CONFIG --images SPLIT`")
        cfg = load(config, [*(overrides or []), *([f"cam.method={method}"] if method else [])])
        s = run_cam(cfg, images, labels, max_images=max_images)
        typer.echo(
            f"{s['processed']} images -> {s['masks']} ({s['skipped_no_labels']} skipped without labels, "
            f"{100 * s['ignored_fraction']:.1f}% pixels ignored, {s['images_per_s']} images/s)"
        )
