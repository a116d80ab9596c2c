"""PNG panels for the report: image | Grad-CAM | refined CAM (CAA) | final mask, with class names."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours; index 0 (background) black."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    cols = [(0, 0, 0)] + [tuple(int(255 * v) for v in cmap(i % 20)[:3]) for i in range(max(n - 1, 0))]
    return np.asarray(cols, np.uint8)


def colorize_mask(mask: np.ndarray, category_ids: Sequence[int]) -> np.ndarray:
    """(H, W) uint8 mask (category ids, 0 bg, 255 ignore) -> (H, W, 3) uint8; ignore is white,
    each present category gets its own colour in ``category_ids`` order."""
    pal = _palette(len(category_ids) + 1)
    out = np.zeros(mask.shape + (3,), np.uint8)
    for i, c in enumerate(category_ids):
        out[mask == c] = pal[i + 1]
    out[mask == 255] = 255
    return out


def save_panel(
    path: str | Path,
    image: np.ndarray,
    gradcam: np.ndarray,
    refined: np.ndarray | None,
    mask: np.ndarray,
    class_names: Sequence[str],
    category_ids: Sequence[int],
    title: str = "",
    seed_mask: np.ndarray | None = None,
    caa_used: bool = True,
    crf: bool = False,
    bg_rule: str = "1 - max CAM",
    cam_label: str = "softmax Grad-CAM",
) -> None:
    """Write one panel. image (H, W, 3) uint8; gradcam, refined (K, H, W) in [0, 1] (shown as the
    max over the present classes, overlaid on the image; ``refined`` None: no CAA column, as for
    CLIMS's CAMs); cam_label names the first CAM column; mask (H, W) uint8; seed_mask: the argmax
    before the confidence ignore (an extra panel when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from distill.files import atomic_path

    import textwrap

    names = "\n".join(textwrap.wrap(", ".join(class_names), 40))
    columns = [(gradcam, cam_label)]
    if refined is not None:
        columns.append((refined, "refined (CAA)" if caa_used else "CAA (not used: cam.caa=false)"))
    n = 2 + len(columns) + (seed_mask is not None)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.4))
    axes[0].imshow(image)
    axes[0].set_title(f"{title or 'image'}\n{names}", fontsize=8)
    for ax, (cams, label) in zip(axes[1:], columns):
        ax.imshow(image)
        heat = cams.max(0) if len(cams) else np.zeros(image.shape[:2], np.float32)
        ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(f"{label}\nmax over {len(cams)} class(es)", fontsize=8)
    if seed_mask is not None:
        used = "refined" if caa_used and refined is not None else cam_label
        axes[-2].imshow(colorize_mask(seed_mask, category_ids))
        axes[-2].set_title(f"argmax of the {used} maps\n(bg = {bg_rule})", fontsize=8)
    ign = float((mask == 255).mean())
    axes[-1].imshow(colorize_mask(mask, category_ids))
    axes[-1].set_title(f"final mask{' (CRF)' if crf else ''}\nwhite = ignore, {100 * ign:.0f}%", fontsize=8)
    pal = _palette(len(category_ids) + 1)
    handles = [Patch(color=pal[0] / 255, label="background")] + [
        Patch(color=pal[i + 1] / 255, label=f"{n} ({c})") for i, (n, c) in enumerate(zip(class_names, category_ids))
    ]
    axes[-1].legend(handles=handles, fontsize=6, loc="lower right", framealpha=0.8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
