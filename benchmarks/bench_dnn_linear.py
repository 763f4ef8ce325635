"""float32 Linear products on this CPU: torch's own matmul (MKL's sgemm) against oneDNN (models.dnn_linear), at the
token counts and widths of a 256 px SD1.5 step (rank-16 LoRA products included), forward (x W^T) and the input
gradient (g W). Run on an idle machine:

    .venv/bin/python benchmarks/bench_dnn_linear.py              # GFLOPS and ms, best of 3 timings each
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/bench_dnn_linear.py   # oneDNN held to AVX2

models.dnn_linear routes every frozen float32 Linear of a CPU training run through oneDNN; this prints what that
buys here (target: oneDNN never slower than torch's matmul).
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (tokens, in, out): SD1.5 attention (q/k/v/out), feed-forward in/out, cross-attention k/v on 77 tokens, LoRA down/up
SHAPES = [(1024, 320, 320), (1024, 320, 2560), (1024, 1280, 320), (256, 640, 640), (256, 640, 5120),
          (256, 2560, 640), (64, 1280, 1280), (64, 1280, 10240), (64, 5120, 1280), (77, 768, 640),
          (1024, 320, 16), (1024, 16, 320), (1024, 16, 2560)]


def best_ms(fn, reps: int = 3) -> float:
    for _ in range(3):
        fn()
    n, best = 20, float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e3)
    return best


def main() -> int:
    import torch
    import torch.nn.functional as F

    from lorakit.models import dnn_linear

    if dnn_linear._LINEAR is None:
        print("oneDNN's linear is not available here (not x86, or torch without mkldnn): torch's matmul is used")
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU kernels "
          f"{torch.backends.cpu.get_cpu_capability()}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}")
    print("| tokens x in -> out | matmul fwd ms | oneDNN fwd ms | matmul g W ms | oneDNN g W ms | speed-up fwd / bwd |")
    print("|---|---|---|---|---|---|")
    slower = 0
    g = torch.Generator().manual_seed(0)
    for n, cin, cout in SHAPES:
        x, w = torch.randn(n, cin, generator=g), torch.randn(cout, cin, generator=g)
        gy = torch.randn(n, cout, generator=g)
        mf, df = best_ms(lambda: F.linear(x, w)), best_ms(lambda: dnn_linear.fp32_linear(x, w))
        mb, db = best_ms(lambda: gy @ w), best_ms(lambda: dnn_linear.fp32_linear(gy, w.t()))
        torch.testing.assert_close(dnn_linear.fp32_linear(gy, w.t()), gy @ w, rtol=1e-4, atol=1e-3)
        slower += (df > mf * 1.05) + (db > mb * 1.05)
        print(f"| {n} x {cin} -> {cout} | {mf:.3f} | {df:.3f} | {mb:.3f} | {db:.3f} | {mf / df:.2f}x / {mb / db:.2f}x |")
    print(f"oneDNN slower than matmul (by > 5%) in {slower} of {2 * len(SHAPES)} products (target: 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
