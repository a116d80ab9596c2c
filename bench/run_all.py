"""`make bench`: run every bench/*.py script's ``main(device)``, collect figures, write results.

Each script measures its own side-by-side ratio in one run and returns a dict of figures; this
runner writes ``bench/results.json`` and ``bench/results.md``. A script that fails is reported
and the others still run; the exit code is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
import traceback
from pathlib import Path

from distill.files import write_json, write_text

HERE = Path(__file__).resolve().parent


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="script stems to run")
    args = ap.parse_args()
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_"))
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    results: dict = {"machine": {"python": platform.python_version(), "platform": platform.platform(), "device": args.device}}
    failed = []
    for p in scripts:
        print(f"== {p.stem}", flush=True)
        t0 = time.perf_counter()
        try:
            out = _load(p).main(device=args.device)
            results[p.stem] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **(out or {})}
        except Exception as e:  # report and go on with the next benchmark
            traceback.print_exc()
            results[p.stem] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            failed.append(p.stem)
    if args.device != "cpu":
        import torch

        if torch.cuda.is_available():
            results["machine"]["gpu"] = torch.cuda.get_device_name(0)
    write_json(HERE / "results.json", results)
    lines = ["| benchmark | ok | figures |", "|---|---|---|"]
    for k, v in results.items():
        if k == "machine":
            continue
        figs = ", ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items() if a not in ("ok",) and not isinstance(b, (dict, list)))
        lines.append(f"| {k} | {'yes' if v.get('ok') else 'NO'} | {figs} |")
    write_text(HERE / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
