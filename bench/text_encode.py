"""Time ``Teacher.encode_text`` (the text tower cut at the batch's last end-of-text token,
:func:`distill.teacher.text.encode_text_trimmed`) against open_clip's ``encode_text`` over the full
77-token context, on a random ViT-B/32-size text tower (width 512, 12 layers), with prompts of
ViLD's template shape ("a photo of a {}.", ~8-12 tokens) for LVIS-like names.

    python bench/text_encode.py [--device cpu] [--prompts 400] [--repeats 3]

Same model and prompts, runs interleaved (full, cut, full, ...), median seconds; prints prompts/s
of each, the speed-up, and the largest difference between the two embeddings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(device: str = "cpu", prompts: int = 400, repeats: int = 3) -> dict:
    import open_clip

    from distill.teacher.clip import _wrap

    torch.manual_seed(0)
    model = open_clip.CLIP(512, vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=1), text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12), quick_gelu=True)
    teacher = _wrap(model, "bench-b32-text", torch.device(device), "fp32", tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=77), arch={"bench": 1})
    words = ["cat", "traffic light", "hot dog", "pin (non jewelry)", "roller skate", "bottle cap", "person", "trench coat"]
    texts = [f"a photo of a {words[i % len(words)]}." for i in range(prompts)]
    tokens = teacher.tokenize(texts)
    full_t, cut_t = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            full = torch.nn.functional.normalize(teacher.model.encode_text(tokens), dim=-1)
            t1 = time.perf_counter()
            cut = teacher.encode_text(texts)
            t2 = time.perf_counter()
            full_t.append(t1 - t0)
            cut_t.append(t2 - t1)
    f, c = statistics.median(full_t), statistics.median(cut_t)
    res = {"prompts_per_s_full": prompts / f, "prompts_per_s_cut": prompts / c, "speedup": f / c, "max_abs_diff": float((full - cut).abs().max())}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    main(a.device, a.prompts, a.repeats)
