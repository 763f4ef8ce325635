"""Frozen convolutions of SD's lowest resolutions: oneDNN's convolution beside unfold + one GEMM
(lorakit.models.conv_gemm), forward + input gradient, per layer shape, each with the path lorakit takes.

glibc keeps freed memory as in `lorakit train` (utils.allocator): without it every large temporary is page-faulted
again and both paths are slower (the convolution's per-call weight reorder most).

    python benchmarks/bench_conv_gemm.py [--dtype bf16 fp32] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (input channels, output channels, kernel, stride, latent side, batch): SD1.5's UNet at 256 px (4x4, 8x8) and 512 px
SHAPES = [(2560, 1280, 3, 1, 4, 1), (1280, 1280, 3, 1, 4, 1), (1280, 1280, 3, 1, 8, 1), (2560, 1280, 3, 1, 8, 1),
          (1920, 1280, 3, 1, 8, 1), (1280, 1280, 3, 2, 8, 1), (2560, 1280, 1, 1, 4, 1), (2560, 1280, 1, 1, 8, 1),
          (1280, 1280, 1, 1, 8, 1), (1280, 1280, 3, 1, 4, 2), (1280, 1280, 3, 1, 8, 2), (640, 640, 3, 1, 8, 1),
          (1280, 640, 3, 1, 8, 1), (1280, 1280, 3, 1, 16, 1), (320, 320, 3, 1, 32, 1), (640, 640, 1, 1, 16, 1),
          (320, 320, 1, 1, 32, 1), (1280, 1280, 1, 1, 16, 1)]


def timed(f, repeats: int) -> float:
    for _ in range(3):
        f()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lorakit.models import conv_gemm as G
    from lorakit.utils.allocator import keep_freed_memory

    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU level "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| dtype | layer | positions | convolution ms | GEMM ms | GEMM / convolution | lorakit takes |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtype:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        for cin, cout, k, stride, side, n in SHAPES:
            g = torch.Generator().manual_seed(0)
            conv = nn.Conv2d(cin, cout, k, stride, k // 2).to(dtype).requires_grad_(False)
            x = torch.randn(n, cin, side, side, dtype=dtype, generator=g, requires_grad=True)
            gy = torch.randn(F.conv2d(x, conv.weight, conv.bias, stride, k // 2).shape, dtype=dtype, generator=g)
            a = timed(lambda: F.conv2d(x, conv.weight, conv.bias, stride, k // 2).backward(gy), args.repeats)
            b = timed(lambda: G.conv2d_as_gemm(x, conv.weight, conv.bias, (stride, stride),
                                               (k // 2, k // 2)).backward(gy), args.repeats)
            takes = "GEMM" if G.gemm_pays(conv, x.detach(), conv.weight, conv.bias) else "convolution"
            print(f"| {name} | {cin}->{cout} {k}x{k}/{stride} at {side}x{side}, batch {n} | "
                  f"{n * gy.shape[2] * gy.shape[3]} | {a:.2f} | {b:.2f} | {b / a:.2f} | {takes} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
