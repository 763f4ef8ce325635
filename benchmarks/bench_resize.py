"""Benchmark `lora resize` on a full-size SDXL LoRA: dim 64 (random factors, the real sd-scripts module names: 722
UNet + 264 text-encoder modules), resized to dim 16 on the CPU. Prints seconds and the resize process's peak RSS.

    .venv/bin/python benchmarks/bench_resize.py [--workdir /tmp/bench_resize] [--threads 1] [--new_rank 16]

The input file is generated once in --workdir (about 0.9 GB in fp16) and reused; the resize runs in a child process so
its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generate(path: Path, dim: int = 64, alpha: float = 32.0) -> int:
    """Write a random SDXL LoRA with every networks.lora module (shapes from a weightless SDXL build)."""
    import torch

    from lorakit.adapters.file import build_metadata, save_lora
    from lorakit.adapters.targets import UNET_TRANSFORMER, te_targets, unet_targets
    from lorakit.models.bundle import build_bundle
    from lorakit.models.families import get_family

    fam = get_family("sdxl")
    bundle = build_bundle(fam, device="meta", components=("unet", "text_encoders"))
    targets = te_targets(bundle.text_encoders, fam) + unet_targets(bundle.unet, fam, UNET_TRANSFORMER)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for t in targets:
        shape = tuple(t.module.weight.shape)
        down_shape = (dim, *shape[1:])
        up_shape = (shape[0], dim, *([1] * (len(shape) - 2)))
        sd[f"{t.lora_name}.lora_down.weight"] = (torch.randn(down_shape, generator=g) * 0.02).half()
        sd[f"{t.lora_name}.lora_up.weight"] = (torch.randn(up_shape, generator=g) * 0.01).half()
        sd[f"{t.lora_name}.alpha"] = torch.tensor(alpha)
    md = build_metadata(fam, path.stem)
    md.update({"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": f"{alpha:g}"})
    save_lora(path, sd, md, precision="fp16")
    return len(targets)


def run_resize(src: str, dst: str, new_rank: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from lorakit.tools.lora_resize import resize_lora

    t0 = time.perf_counter()
    rep = resize_lora(src, dst, new_rank, log=None)
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": round(dt, 2), "modules": len(rep.modules),
                      "total_fro_retained": round(rep.total_fro_retained, 4),
                      "mean_fro_retained": round(rep.mean_fro_retained, 4)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/bench_resize")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--new_rank", type=int, default=16)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        run_resize(args._child[0], args._child[1], args.new_rank, args.threads)
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "sdxl_dim64.safetensors"
    if not src.exists():
        t0 = time.perf_counter()
        n = generate(src)
        print(f"generated {src} ({n} modules, {src.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s")
    dst = work / f"sdxl_dim{args.new_rank}.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--_child", str(src), str(dst), "--threads", str(args.threads),
                           "--new_rank", str(args.new_rank)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return proc.returncode
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(f"resize SDXL dim 64 -> {args.new_rank} on CPU ({args.threads} thread(s)): {res['seconds']} s in "
          f"resize_lora (read, SVDs, save), {wall:.1f} s with interpreter start; peak RSS {peak:.0f} MiB; "
          f"{res['modules']} modules; Frobenius retained total {res['total_fro_retained']:.2%}, mean "
          f"{res['mean_fro_retained']:.2%}; input {src.stat().st_size / 2**20:.0f} MiB, output "
          f"{dst.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
