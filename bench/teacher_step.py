"""Time the tiny teacher's contrastive training step (the demo's slowest stage) three ways:

- ``before``: PyTorch's default attention kernel and ``model.encode_text`` over the full context;
- ``math``: the math attention kernel that ``distill.engine.device.attention_backend`` selects on
  CPU (the default flash kernel's backward is slow for 65- and 32-token sequences);
- ``trimmed``: math kernel + every prompt encoded up to the batch's longest (exact under the
  causal mask);
- ``ours``: math kernel + ``distill.teacher.text.encode_text_trimmed`` (short prompts and long
  captions as two groups, each up to its own longest): what ``distill teacher pretrain`` runs.

    python bench/teacher_step.py [--device cpu] [--repeats 8] [--precision fp32]

Same model, same batches (random images; prompts of the shapes world's 36 classes with ~5% long
captions, as pretraining draws them: ``pretrain.whole_image_fraction``), steps interleaved
(before, math, trimmed, ours, before, ...) so machine load hits all alike; prints the median seconds
per step and the speed-ups, all at ``--precision`` (default fp32, ``pretrain.precision`` in
configs/shapes/teacher.yaml; bench/precision.py compares precisions). On CUDA the attention
kernel is PyTorch's choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def main(device: str = "cpu", repeats: int = 8, precision: str = "fp32", batch_size: int = 128) -> dict:
    import contextlib

    import open_clip
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from distill.engine.device import attention_backend, autocast, resolve_precision
    from distill.engine.optim import param_groups
    from distill.teacher.clip import create_model_quiet, register_model_configs
    from distill.teacher.pretrain import MODEL_NAME, multi_positive_loss
    from distill.teacher.text import encode_text_trimmed

    register_model_configs()
    dev = torch.device(device)
    precision = resolve_precision(precision, dev)
    torch.manual_seed(0)
    model = create_model_quiet(MODEL_NAME).to(dev).train()
    tok = open_clip.get_tokenizer(MODEL_NAME)
    size = int(model.visual.image_size[0])
    names = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange") for s in ("circle", "square", "triangle", "star", "cross", "ring")]
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        cls = torch.randint(len(names), (batch_size,), generator=g)
        x = torch.rand(batch_size, 3, size, size, generator=g)
        prompts = [f"a photo of a {names[c]}." for c in cls]
        for j in range(0, batch_size, 20):  # ~5% captions of ~25 tokens (the world's captions)
            a, b, c = (names[int(k)] for k in torch.randint(len(names), (3,), generator=g))
            prompts[j] = f"a {a} to the left of a {b} and a small {c} on a dotted background."
        batches.append((x.to(dev), tok(prompts).to(dev), cls.to(dev)))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    default = (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])) if dev.type == "cpu" else contextlib.nullcontext
    ctx = {"before": default, "math": lambda: attention_backend(dev), "trimmed": lambda: attention_backend(dev),
           "ours": lambda: attention_backend(dev)}
    from distill.teacher.text import _encode_prefix

    one_group = lambda t: _encode_prefix(model, t, int((t.argmax(-1) + 1).max()))  # noqa: E731
    grouped = lambda t: encode_text_trimmed(model, t)  # noqa: E731
    encode = {"before": model.encode_text, "math": model.encode_text, "trimmed": one_group, "ours": grouped}
    prec = dict.fromkeys(("before", "math", "trimmed", "ours"), precision)

    def step(name: str, i: int) -> float:
        x, t, k = batches[i % len(batches)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx[name]():
            with autocast(dev, prec[name]):
                img, txt = model.encode_image(x), encode[name](t)
            loss = multi_positive_loss(F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1), k, 50.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name in ctx:  # warm-up
        step(name, 0)
    times: dict[str, list[float]] = {name: [] for name in ctx}
    for i in range(repeats):
        for name in times:
            times[name].append(step(name, i))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": str(dev),
        "precision": precision,
        "batch_size": batch_size,
        "repeats": repeats,
        "before_step_s": round(med["before"], 4),
        "math_step_s": round(med["math"], 4),
        "trimmed_step_s": round(med["trimmed"], 4),
        "ours_step_s": round(med["ours"], 4),
        "speedup_math": round(med["before"] / med["math"], 3),
        "speedup_trimmed": round(med["before"] / med["trimmed"], 3),
        "speedup_grouped": round(med["trimmed"] / med["ours"], 3),
        "speedup": round(med["before"] / med["ours"], 3),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--precision", default="fp32")
    a = ap.parse_args()
    r = main(a.device, a.repeats, a.precision)
    print(f"teacher step (batch {r['batch_size']}; {r['precision']}): before {r['before_step_s']:.3f} s   math attention {r['math_step_s']:.3f} s   "
          f"+ trimmed text {r['trimmed_step_s']:.3f} s   + two prompt groups (ours) {r['ours_step_s']:.3f} s")
    print(json.dumps(r))
    print(f"speed-up trimmed / ours (two prompt groups): {r['speedup_grouped']:.2f}x")
    print(f"speed-up before / ours: {r['speedup']:.2f}x")
    sys.exit(0)
