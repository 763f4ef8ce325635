"""Load time and peak RSS for full-size single-file checkpoints with random weights.

The script writes the checkpoints itself (fp16, the real LDM/SAI key layout), then loads each in a fresh process
so peak RSS is that of loading alone.

    python benchmarks/bench_load.py [--families sd1 sdxl] [--dtypes fp32 bf16] [--workdir /tmp/lorakit-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def write_random_checkpoint(family: str, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from lorakit.models.meta import meta_bundle
    from lorakit.models.saving import checkpoint_metadata, ldm_state_dict

    bundle = meta_bundle(family)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=gen) * 0.02).half() for k, v in ldm_state_dict(bundle).items()}
    meta = checkpoint_metadata(bundle, path.stem)
    meta.pop("modelspec.prediction_type", None)
    save_file(tensors, str(path), metadata=meta)


def measure_child(path: str, dtype: str) -> None:
    import resource

    t0 = time.perf_counter()
    from lorakit.models.loading import load_bundle

    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    bundle = load_bundle(path, dtype=dtype)
    t_load = time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024  # KiB -> GiB
    print(json.dumps({"family": bundle.family.name, "dtype": dtype, "import_s": round(t_import, 2),
                      "load_s": round(t_load, 2), "peak_rss_gib": round(rss, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["sd1", "sdxl"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--workdir", default="/tmp/lorakit-bench")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        measure_child(*args.child)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'family':<6} {'load dtype':<10} {'file GiB':>8} {'import s':>8} {'load s':>7} {'peak RSS GiB':>12}")
    for family in args.families:
        path = work / f"random_{family}_fp16.safetensors"
        if not path.exists():
            t = time.perf_counter()
            write_random_checkpoint(family, path)
            print(f"(wrote {path} in {time.perf_counter() - t:.0f} s)")
        for dtype in args.dtypes:
            out = subprocess.run([sys.executable, __file__, "--child", str(path), dtype], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{family:<6} {dtype:<10} {path.stat().st_size / 2**30:>8.2f} {r['import_s']:>8.2f} "
                  f"{r['load_s']:>7.2f} {r['peak_rss_gib']:>12.2f}")


if __name__ == "__main__":
    main()
