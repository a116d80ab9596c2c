"""fp32 against bf16 autocast on this machine, side by side: a 1024 x 1024 matmul and the crop
embedding of a teacher the size of the shapes default (``distill-tiny-vit``: 64 px, 4 layers,
width 128, random weights), and what ``precision: auto`` picks here
(:func:`distill.engine.device.resolve_precision`).

    python bench/precision.py [--device cpu] [--repeats 3]

Runs interleaved (fp32, bf16, fp32, ...), median seconds; the last line is the ratio auto decides
on: crops/s in bf16 over fp32 (> 1: bf16 pays here).
"""

from __future__ import annotations

import argparse
import json

import torch

from _timing import interleaved_medians


def main(device: str = "cpu", repeats: int = 3) -> dict:
    from distill.engine.device import autocast, native_bf16, resolve_precision
    from distill.teacher.clip import create_model_quiet, register_model_configs

    dev = torch.device(device)
    torch.manual_seed(0)
    n = 1024
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    med = interleaved_medians({k: (lambda x=x, y=y: x @ y) for k, (x, y) in pairs.items()}, repeats, dev)
    gflops = {k: 2 * n**3 / v / 1e9 for k, v in med.items()}
    register_model_configs()
    visual = create_model_quiet("distill-tiny-vit").visual.to(dev).eval()
    crops = torch.rand(128, 3, 64, 64, device=dev)

    def embed(p: str) -> None:
        with autocast(dev, p):
            visual(crops)

    with torch.no_grad():
        med = interleaved_medians({"fp32": lambda: embed("fp32"), "bf16": lambda: embed("amp_bf16")}, repeats, dev)
    per_s = {k: len(crops) / v for k, v in med.items()}
    out = {
        "matmul_gflops_fp32": round(gflops["fp32"], 1), "matmul_gflops_bf16": round(gflops["bf16"], 1),
        "crops_per_s_fp32": round(per_s["fp32"], 1), "crops_per_s_bf16": round(per_s["bf16"], 1),
        "native_bf16": native_bf16(dev), "auto": resolve_precision("auto", dev),
        "bf16_over_fp32_crops": round(per_s["bf16"] / per_s["fp32"], 3),
    }
    print(json.dumps(out))
    print(f"auto = {out['auto']} here; bf16 / fp32 crop embedding speed: {out['bf16_over_fp32_crops']:.2f}x")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    main(a.device, a.repeats)
