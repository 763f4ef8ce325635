"""Per-step sampling time with 3 merged LoRAs vs no LoRA (issue 6: must be within 2%).

Two models: the tiny SD1 model, and full-size SD1.5 with random weights (built on the meta device, then
materialised) at 256 px. LoRA files are made with the adapter layer (kohya layout, random non-zero weights) and go
through the normal `<lora:NAME:W>` path. Runs alternate (none, loras, none, loras, ...) so drifting machine load
hits both sides alike; the per-step time is the median step interval.

    python benchmarks/bench_generate.py [--skip_full] [--steps 6] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def materialised_sd15(seed: int = 0):
    import torch

    from lorakit.models.meta import meta_bundle

    bundle = meta_bundle("sd1")
    g = torch.Generator().manual_seed(seed)
    for module in bundle.components().values():
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name and p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            for mod in module.modules():  # non-persistent buffers come out of to_empty uninitialised
                if "position_ids" in getattr(mod, "_buffers", {}):
                    n = mod.position_ids.shape[-1]
                    mod.position_ids.copy_(torch.arange(n).expand(mod.position_ids.shape))
    return bundle


def write_loras(bundle, folder: Path, n: int = 3, dim: int = 16) -> list[str]:
    import torch

    from lorakit.adapters.network import create_network

    names = []
    for i in range(n):
        torch.manual_seed(100 + i)
        net = create_network(bundle, "networks.lora", dim, dim / 2)
        with torch.no_grad():
            for a in net.adapters:
                torch.nn.init.normal_(a.lora_up.weight, std=0.01)
        name = f"bench_lora_{i}"
        net.save_weights(folder / f"{name}.safetensors", precision="fp16")
        names.append(name)
        del net
    return names


def per_step_times(gen, settings) -> list[float]:
    stamps = []
    gen(settings, progress=lambda i, n: stamps.append(time.perf_counter()), decode=False)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def compare(bundle, label: str, size: int, steps: int, rounds: int) -> dict:
    from lorakit.generate.pipeline import GenerationSettings, Generator

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        names = write_loras(bundle, Path(tmp))
        t_write = time.perf_counter() - t0
        tags = "".join(f"<lora:{n}:{w}>" for n, w in zip(names, (0.8, 0.6, 1.0)))
        base = dict(negative_prompt="lowres", steps=steps, width=size, height=size, seed=1, sampler="Euler a")
        plain = GenerationSettings(prompt="a photo of a bear", **base)
        lora = GenerationSettings(prompt="a photo of a bear " + tags, **base)
        times = {"none": [], "3 loras": []}
        gen = Generator(bundle, lora_dir=tmp)
        try:
            gen(GenerationSettings(**{**base, "steps": 2}, prompt="warm up"), decode=False)
            t0 = time.perf_counter()
            gen(lora, decode=False)  # first LoRA call merges; later ones with the same tags reuse the merge
            t_first_lora = time.perf_counter() - t0
            # merged means no forward hook anywhere: the UNet runs exactly the modules it runs without LoRA
            hooked = sum("_lorakit_host" in m.__dict__ for c in bundle.components().values() for m in c.modules())
            for _ in range(rounds):
                # switching LoRAs on and off each round: merge and restore are outside the timed steps
                times["none"] += per_step_times(gen, plain)
                times["3 loras"] += per_step_times(gen, lora)
        finally:
            gen.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {"model": label, "size": size, "steps_timed": {k: len(v) for k, v in times.items()},
            "step_s_none": round(med["none"], 4), "step_s_3_loras": round(med["3 loras"], 4),
            "ratio": round(med["3 loras"] / med["none"], 4),
            "min_step_s_none": round(low["none"], 4), "min_step_s_3_loras": round(low["3 loras"], 4),
            "ratio_of_min": round(low["3 loras"] / low["none"], 4), "hooked_layers_with_loras": hooked,
            "lora_files_write_s": round(t_write, 2), "first_lora_call_s (merge + sampling)": round(t_first_lora, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip_full", action="store_true", help="only the tiny model")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for the full-size model "
                                                              "(default: torch's choice; the tiny model uses 1)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lorakit.models.tiny import tiny_bundle

    # the tiny model's steps last milliseconds: more than one thread only measures thread contention
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = [compare(tiny_bundle("sd1", 0), "tiny sd1 (1 thread)", 64, max(args.steps, 8), args.rounds * 3)]
    torch.set_num_threads(threads)
    print(json.dumps(results[-1]), flush=True)
    if not args.skip_full:
        t0 = time.perf_counter()
        bundle = materialised_sd15()
        build = time.perf_counter() - t0
        r = compare(bundle, "SD1.5 full size, random weights", 256, args.steps, args.rounds)
        r["build_s"] = round(build, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\nper-step time, 3 merged LoRAs vs none:")
    for r in results:
        print(f"  {r['model']:<34} {r['size']}px  median: none {r['step_s_none'] * 1000:8.1f} ms, "
              f"3 LoRAs {r['step_s_3_loras'] * 1000:8.1f} ms, ratio {r['ratio']:.3f};  "
              f"min: ratio {r['ratio_of_min']:.3f};  hooked layers {r['hooked_layers_with_loras']}")


if __name__ == "__main__":
    main()
