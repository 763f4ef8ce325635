"""Peak memory and step time of real `lorakit train` runs per adapter algorithm, on a full-size checkpoint with random
weights (the LDM single-file layout users have), each run in a fresh process so its peak RSS is its own.

The issue's measurement: full-size SD1.5, 4 images, --resolution 256, batch 1, 2 steps, fp32, with and without
--gradient_checkpointing. Target: every algorithm within 1.15x of plain LoRA's peak at the same flags.

    .venv/bin/python benchmarks/bench_memory.py                          # SD1.5, all algorithms, GC off and on
    .venv/bin/python benchmarks/bench_memory.py --algos lora loha --gc 0 # a subset
    .venv/bin/python benchmarks/bench_memory.py --family sdxl --precision bf16 -- --cache_text_encoder_outputs
Extra `lorakit train` flags go after `--`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ALGOS = {
    "lora": ["--network_module", "networks.lora"],
    "locon": ["--network_module", "lycoris.kohya", "--network_args", "algo=locon", "conv_dim=4", "conv_alpha=1"],
    "loha": ["--network_module", "lycoris.kohya", "--network_args", "algo=loha"],
    "lokr": ["--network_module", "lycoris.kohya", "--network_args", "algo=lokr"],
    "dora": ["--network_module", "lycoris.kohya", "--network_args", "algo=locon", "dora_wd=True"],
    "dora_detached": ["--network_module", "lycoris.kohya", "--network_args", "algo=locon", "dora_wd=True",
                      "dora_detach_norm=True"],
}


def make_dataset(folder: Path, n: int = 4, size: int = 256) -> Path:
    import numpy as np
    from PIL import Image

    sub = folder / "10_bench bear"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text("bench bear, forest, standing")
    return folder


def checkpoint(family: str, work: Path) -> Path:
    from bench_load import write_random_checkpoint

    path = work / f"random_{family}_fp16.safetensors"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        write_random_checkpoint(family, path)
    return path


def child(argv: list[str]) -> None:
    """One training run in this process; prints a JSON line with step times and the process' peak RSS."""
    import resource

    from lorakit import options as O
    from lorakit.train.trainer import train

    t0 = time.perf_counter()
    times: list[float] = []
    opts = O.resolve(argv)
    result = train(opts, progress=False, log=lambda *a, **k: print(*a, file=sys.stderr),
                   on_event=lambda e: times.append(time.perf_counter()) if e["event"] in ("start", "step") else None)
    steps = [b - a for a, b in zip(times, times[1:])]
    m = result.memory
    parts = {k: getattr(m, k) / 2**30 for k in ("weights", "trainable", "gradients", "optimizer", "activations",
                                                 "caches", "runtime")} if m else {}
    import torch

    # on CUDA the prediction is of GPU memory: checked against max_memory_allocated, without the host's runtime term
    gpu = torch.cuda.is_available()
    predicted = (m.peak - (m.runtime if gpu else 0)) / 2**30 if m else None
    print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
                      "predicted_gib": predicted, "parts": parts,
                      "step_s": steps, "start_to_step1_s": (times[1] - t0) if len(times) > 1 else None}))


def run(ckpt: Path, data: Path, out: Path, algo: str, gc: bool, precision: str, batch: int, steps: int,
        extra: list[str], resolution: int = 256, dim: int = 8) -> dict:
    argv = ["--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", f"{algo}_gc{int(gc)}", "--resolution", str(resolution), "--train_batch_size", str(batch),
            "--max_train_steps", str(steps), "--network_dim", str(dim), "--network_alpha", str(max(1, dim // 2)),
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--seed", "42", "--sdpa",
            "--mixed_precision", precision] + (["--gradient_checkpointing"] if gc else []) + ALGOS[algo] + extra
    cmd = [sys.executable, __file__, "--child", "--"] + argv
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    row = {"algo": algo, "gc": gc, "precision": precision, "batch": batch}
    if proc.returncode != 0:
        return {**row, "error": (stderr or stdout)[-600:].strip()}
    r = json.loads(stdout.strip().splitlines()[-1])
    later = r["step_s"][1:] or r["step_s"]
    if r.get("gpu_peak_gib") is not None:  # what is measured on CUDA is the GPU's peak
        row["peak_rss_host_gib"] = round(r["peak_rss_gib"], 2)
        r["peak_rss_gib"] = r["gpu_peak_gib"]
    return {**row, "peak_rss_gib": round(r["peak_rss_gib"], 2),
            "predicted_gib": round(r["predicted_gib"], 2) if r["predicted_gib"] else None,
            "parts": {k: round(v, 3) for k, v in r["parts"].items()},
            "s_per_step": round(statistics.median(later), 2) if later else None}


def main() -> int:
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--") + 1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    ap.add_argument("--gc", nargs="+", default=["0", "1"], choices=["0", "1"])
    ap.add_argument("--precision", nargs="+", default=["no"], choices=["no", "bf16", "fp16"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/lorakit-bench")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(args.family, work)
    data = make_dataset(work / f"data{args.resolution}", size=args.resolution)
    rows = []
    for precision in args.precision:
        for batch in args.batch:
            for gc in args.gc:
                for algo in args.algos:
                    r = run(ckpt, data, work / "out", algo, gc == "1", precision, batch, args.steps, extra,
                            args.resolution, args.dim)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    where = "GPU memory (max_memory_allocated)" if any("peak_rss_host_gib" in r for r in rows) else "peak RSS"
    print(f"\n{args.family}, {args.resolution} px, dim {args.dim}, {args.steps} steps, measured: {where}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
          f"; targets: each algorithm <= 1.15x LoRA's peak; prediction within 15% of the measured peak RSS")
    print(f"{'algorithm':<14} {'prec':>5} {'batch':>5} {'GC':>3} {'peak GiB':>12} {'x LoRA':>7} "
          f"{'predicted':>9} {'error':>6} {'s/step':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['algo']:<14} {r['precision']:>5} {r['batch']:>5} {int(r['gc']):>3} error: {r['error'][-200:]}")
            continue
        base = next((b for b in rows if b["algo"] == "lora" and "peak_rss_gib" in b and
                     all(b[k] == r[k] for k in ("gc", "precision", "batch"))), None)
        ratio = f"{r['peak_rss_gib'] / base['peak_rss_gib']:.2f}" if base else "-"
        pred = r.get("predicted_gib")
        err = f"{100 * (pred - r['peak_rss_gib']) / r['peak_rss_gib']:+.0f}%" if pred else "-"
        print(f"{r['algo']:<14} {r['precision']:>5} {r['batch']:>5} {int(r['gc']):>3} {r['peak_rss_gib']:>12.2f} "
              f"{ratio:>7} {pred or 0:>9.2f} {err:>6} {r['s_per_step'] or 0:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
