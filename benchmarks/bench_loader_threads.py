"""What a torch call in a data-loading thread costs the training thread: the frozen full-size SD1.5 UNet's forward +
backward (random weights, 256 px, batch 1) timed while a second thread prepares one image per step, either as
lorakit's loader threads do it now (PIL/numpy only; the tensor is made in the training thread) or as they did
before (the image made a float tensor in the loading thread).

Why it matters: a parallel torch operation in another thread starts a second OpenMP team; once libgomp manages more
threads than there are CPUs it shortens every team's spin-wait, and each of the training thread's thousands of
parallel regions a step then waits for sleeping threads to wake. Each mode runs in its own process (a team, once
started, stays for the process' life).

    python benchmarks/bench_loader_threads.py [--dtype bf16|fp32] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

MODES = {"none": "no loading thread at all",
         "numpy": "the loading thread decodes to a numpy array; the training thread makes the tensor (lorakit now)",
         "tensor": "the loading thread makes the float tensor itself (lorakit before)"}


def run_mode(mode: str, dtype_name: str, steps: int) -> dict:
    import numpy as np
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from bench_train import _random_full_bundle
    from lorakit.data.augment import to_tensor
    from lorakit.models.conditioning import encode_captions
    from lorakit.utils.allocator import keep_freed_memory

    keep_freed_memory()  # as `lorakit train` does
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    bundle = _random_full_bundle("sd1", dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        hidden, _ = encode_captions(bundle, ["a bench bear"], None, None)
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    load = {"numpy": lambda: np.ascontiguousarray(image[:, ::-1]), "tensor": lambda: to_tensor(image[:, ::-1])}.get(mode)
    pool = ThreadPoolExecutor(2)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        if load is not None:
            loaded = pool.submit(load).result()
            if mode == "numpy":
                to_tensor(loaded)
        x = torch.randn(1, 4, 32, 32).to(dtype).requires_grad_(True)
        with autocast:
            out = bundle.unet(x, torch.tensor([500]), hidden).sample
        out.float().square().mean().backward()
        times.append(time.perf_counter() - start)
    return {"mode": mode, "median_s": statistics.median(times[2:]), "steps": times[2:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--one", choices=list(MODES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_mode(a.one, a.dtype, a.steps)))
        return 0
    rows = []
    for mode in ["none", "numpy", "tensor", "numpy", "tensor"]:  # interleaved: a machine that slows slows both
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--dtype", a.dtype, "--steps", str(a.steps)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{mode:7s} {rows[-1]['median_s']:.3f} s/step  ({MODES[mode]})", flush=True)
    best = {m: min(r["median_s"] for r in rows if r["mode"] == m) for m in MODES}
    print(f"\nSD1.5 UNet forward + backward, {a.dtype}, 256 px, median of {a.steps} steps, best process of each mode:")
    for m in MODES:
        print(f"  {m:7s} {best[m]:.3f} s  ({best[m] / best['none']:.2f}x of no thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
