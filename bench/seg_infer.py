"""Segmentation inference speed: images/s of LSeg and CLIPSeg, and our CLIPSeg against
transformers' ``CLIPSegForImageSegmentation`` with the same weights on the same input, in one run.

    python bench/seg_infer.py [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _rate(fn, n_images: int, warmup: int = 1, iters: int = 3, device: str = "cpu") -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return n_images * iters / (time.perf_counter() - t0)


def main(device: str = "cpu", batch: int = 8, size: int = 224, num_classes: int = 8) -> dict:
    """Random models (ViT-B/16-shaped CLIPSeg decoder over a 12-layer ViT-S-sized tower, LSeg
    ResNet-18 + DPT), ``batch`` images of ``size`` x ``size``, ``num_classes`` queries."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    from distill.segmentation.clipseg import convert_hf_clipseg
    from distill.segmentation.lseg import build_lseg

    torch.manual_seed(0)
    proj = 256
    hf_cfg = CLIPSegConfig(
        text_config=dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(image_size=size, patch_size=16, hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
        projection_dim=proj,
        reduce_dim=64,
        extract_layers=[3, 7, 9],
    )
    hf = CLIPSegForImageSegmentation(hf_cfg).eval().to(device)
    ours = convert_hf_clipseg(hf).eval().to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    q = torch.nn.functional.normalize(torch.randn(num_classes, proj, device=device), dim=-1)
    # transformers pairs one image with one query: repeat the images per query (what it needs
    # to segment num_classes classes); ours reads each image once and fans out after the backbone.
    xr = x.repeat_interleave(num_classes, 0)
    qr = q.repeat(batch, 1)
    with torch.inference_mode():
        a = hf(pixel_values=xr, conditional_embeddings=qr).logits.reshape(batch, num_classes, size, size)
        b = ours.mask_logits(x, q, resize=False)
    max_diff = float((a - b).abs().max())
    hf_ips = _rate(lambda: hf(pixel_values=xr, conditional_embeddings=qr), batch, device=device)
    ours_ips = _rate(lambda: ours.mask_logits(x, q, resize=False), batch, device=device)

    lseg = build_lseg(proj, "resnet18", features=64).eval().to(device)
    lseg_ips = _rate(lambda: lseg.classify(lseg.pixel_embeddings(x), q), batch, device=device)
    res = {
        "device": device,
        "batch": batch,
        "size": size,
        "num_classes": num_classes,
        "lseg_images_per_s": round(lseg_ips, 2),
        "clipseg_images_per_s": round(ours_ips, 2),
        "hf_clipseg_images_per_s": round(hf_ips, 2),
        "clipseg_speedup_vs_hf": round(ours_ips / hf_ips, 2),
        "clipseg_max_abs_diff_vs_hf": max_diff,
    }
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    for k, v in main(a.device, a.batch, a.size).items():
        print(f"{k}: {v}")
