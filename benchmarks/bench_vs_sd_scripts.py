"""lorakit beside kohya-ss/sd-scripts on one machine, same flags, same file: s/step, start -> first step done, peak
RSS and latent caching, each figure beside its target (../shared/reference/performance-targets.md, issue 14).

The protocol of the targets: a full-size SD1.5 checkpoint with random weights in the single-file layout (fp16, written
here once), 4 images of 256 px in `10_bench bear`, `--network_module networks.lora --network_dim 16 --network_alpha 8
--resolution 256,256 --train_batch_size 1 --optimizer_type AdamW --learning_rate 1e-4 --sdpa --seed 42`, 8 steps;
configurations fp32 (UNet + text encoder), unet (`--network_train_unet_only`), gc (`--gradient_checkpointing`),
bf16 (`--mixed_precision bf16`); runs of the two tools interleaved (sd, lorakit, sd, lorakit) so that a machine
that slows down slows both; the median of steps 3-8 of every run. Caching: 16 images of 512 px, `--cache_latents`,
one step, fp32 and bf16; the time between each tool's "caching latents" line and its last latent. lorakit's cache
folder starts empty: the first run of each configuration traces the memory estimate's step (as a user's first run
with those settings does), later runs reuse it; start -> step 1 is given for both.

sd-scripts is not a dependency: install it in its own virtual environment (its requirements.txt with this torch) and
name its folder and Python. Nothing is downloaded: the CLIP tokenizer sd-scripts asks the hub for is written from
lorakit's own vocabulary into --workdir and passed as --tokenizer_cache_dir.

    python benchmarks/bench_vs_sd_scripts.py --sd_scripts ~/sd-scripts --sd_python ~/sd-scripts/venv/bin/python
    python benchmarks/bench_vs_sd_scripts.py ... --configs bf16 --runs 3 --no_caching
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

COMMON = ["--network_module=networks.lora", "--network_dim=16", "--network_alpha=8", "--train_batch_size=1",
          "--optimizer_type=AdamW", "--learning_rate=1e-4", "--sdpa", "--seed=42", "--save_model_as=safetensors",
          "--caption_extension=.txt"]
CONFIGS = {"fp32": [], "unet": ["--network_train_unet_only"], "gc": ["--gradient_checkpointing"],
           "bf16": ["--mixed_precision=bf16"]}
# lines that mark a finished step: sd-scripts' tqdm bar ("steps: ...| 3/8") and lorakit's step lines ("step 3/8 ")
STEP = re.compile(r"(?:steps:.*?\|\s*(\d+)/\d+|^step (\d+)/\d+ )")
CACHE_START = re.compile(r"caching latents")
CACHE_END = {"sd": re.compile(r"\|\s*16/16 \["), "lk": re.compile(r"cached latents:")}  # after the start


def tokenizer_dir(work: Path) -> Path:
    """sd-scripts' --tokenizer_cache_dir with openai/clip-vit-large-patch14 in it, from lorakit's CLIP vocabulary."""
    from lorakit.models.tokenizer import clip_vocab_and_merges, make_clip_tokenizer

    folder = work / "tokenizers" / "openai_clip-vit-large-patch14"
    if not (folder / "vocab.json").exists():
        make_clip_tokenizer().save_pretrained(str(folder))
        vocab, merges = clip_vocab_and_merges()
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(m for m in merges if m) + "\n")
    return folder.parent


def prepare(work: Path) -> dict:
    from bench_memory import checkpoint, make_dataset

    work.mkdir(parents=True, exist_ok=True)
    data, data512 = work / "data", work / "data512"
    if not data.exists():
        make_dataset(data)
    if not data512.exists():
        make_dataset(data512, n=16, size=512)
    return {"ckpt": checkpoint("sd1", work), "data": data, "data512": data512, "tok": tokenizer_dir(work)}


def command(tool: str, args, paths: dict, out: Path, extra: list[str]) -> tuple[list[str], str | None]:
    """(argv, working folder) of one run."""
    flags = ["--pretrained_model_name_or_path", str(paths["ckpt"]), "--output_dir", str(out)] + COMMON + extra
    if tool == "sd":
        return [args.sd_python, "-u", "train_network.py", "--tokenizer_cache_dir", str(paths["tok"])] + flags, \
            args.sd_scripts
    return [sys.executable, "-m", "lorakit.cli.main", "train", "--no_progress"] + flags, str(ROOT)


def run(argv: list[str], cwd: str | None, log: Path, cache: Path) -> dict:
    """Run one process; every output line (tqdm's \\r redraws split) with its time since the start; peak RSS of
    the process from /proc (VmHWM, read until it exits). `cache`: lorakit's cache folder (LORAKIT_CACHE_DIR)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT), LORAKIT_CACHE_DIR=str(cache))
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[tuple[float, str]] = []

    def read():
        buf = b""
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
            now = time.time() - t0
            lines.extend((now, p.decode("utf-8", "replace").strip()) for p in parts if p.strip())

    reader = threading.Thread(target=read)
    reader.start()
    hwm = 0
    while proc.poll() is None:
        hwm = max(hwm, _vm_hwm_kib(proc.pid))
        time.sleep(0.25)
    reader.join()
    log.write_text("\n".join(f"{t:9.3f} | {s}" for t, s in lines))
    return {"rc": proc.returncode, "lines": lines, "peak_rss_gib": hwm / 2**20}


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def step_times(lines) -> tuple[dict[int, float], float | None]:
    """{step: seconds it took} from the first line that reports each step, and start -> step 1 done."""
    first: dict[int, float] = {}
    for t, s in lines:
        m = STEP.search(s)
        if m:
            first.setdefault(int(m.group(1) or m.group(2)), t)
    steps = sorted(k for k in first if k > 0)
    return {b: first[b] - first[a] for a, b in zip(steps, steps[1:])}, first.get(1)


def caching_s_per_image(tool: str, lines, n: int = 16) -> float | None:
    start = next((t for t, s in lines if CACHE_START.search(s)), None)
    end = next((t for t, s in lines if start is not None and t >= start and CACHE_END[tool].search(s)), None)
    return None if start is None or end is None else (end - start) / n


def s_per_step(rows: list[dict]) -> float | None:
    later = [v for r in rows for k, v in r["steps"].items() if k >= 3]
    return statistics.median(later) if later else None


def measure(args, paths: dict, work: Path) -> dict:
    """Interleaved runs: {(tool, config): [row, ...]}; config "cache_fp32"/"cache_bf16" for the caching runs."""
    plan = [(cfg, ["--train_data_dir", str(paths["data"]), "--resolution=256,256", "--max_train_steps=8"]
             + CONFIGS[cfg]) for cfg in args.configs for _ in range(args.runs)]
    if args.caching:
        for prec in ("fp32", "bf16"):
            plan.append((f"cache_{prec}", ["--train_data_dir", str(paths["data512"]), "--resolution=512,512",
                                            "--max_train_steps=1", "--cache_latents", "--network_train_unet_only"]
                         + CONFIGS["bf16" if prec == "bf16" else "fp32"]))
    results: dict = {}
    # lorakit keeps the memory estimate's traced step between runs (train.memory_cache): an empty cache here, so
    # the first run of each configuration traces (a user's first run with these settings) and the later ones do not
    cache = work / "lorakit-cache"
    shutil.rmtree(cache, ignore_errors=True)
    for i, (cfg, extra) in enumerate(plan):
        for tool in ("sd", "lk"):
            out = work / "runs" / f"{tool}_{cfg}_{i}"
            out.mkdir(parents=True, exist_ok=True)
            r = run(*command(tool, args, paths, out, extra), out / "log.txt", cache)
            if r["rc"] != 0:
                raise SystemExit(f"{tool} {cfg} failed (rc {r['rc']}): see {out / 'log.txt'}")
            steps, first = step_times(r["lines"])
            row = {"steps": steps, "start_to_step1_s": first, "peak_rss_gib": r["peak_rss_gib"],
                   "cache_s_per_image": caching_s_per_image(tool, r["lines"]) if cfg.startswith("cache") else None}
            results.setdefault((tool, cfg), []).append(row)
            print(json.dumps({"tool": tool, "config": cfg, **{k: v for k, v in row.items() if k != "steps"},
                              "steps": [round(v, 2) for _, v in sorted(steps.items())]}), flush=True)
    return results


def report(results: dict, configs: list[str]) -> None:
    print("\n| configuration | sd-scripts s/step | lorakit s/step | ratio (target <= 0.8) | start -> step 1, s "
          "(sd / lorakit; target <= 0.5x) | peak RSS GiB (sd / lorakit; target <= 0.9x) |")
    print("|---|---|---|---|---|---|")
    for cfg in configs:
        sd, lk = results[("sd", cfg)], results[("lk", cfg)]
        a, b = s_per_step(sd), s_per_step(lk)
        s1 = [statistics.median(r["start_to_step1_s"] for r in rows) for rows in (sd, lk)]
        first = lk[0]["start_to_step1_s"]  # the run that traced the memory estimate's step
        rss = [max(r["peak_rss_gib"] for r in rows) for rows in (sd, lk)]
        print(f"| {cfg} | {a:.2f} | {b:.2f} | {b / a:.2f} ({'met' if b <= 0.8 * a else 'not met'}) | "
              f"{s1[0]:.1f} / {s1[1]:.1f} ({s1[1] / s1[0]:.2f}x, {'met' if s1[1] <= 0.5 * s1[0] else 'not met'}; "
              f"lorakit's first run {first:.1f}, {first / s1[0]:.2f}x) | "
              f"{rss[0]:.2f} / {rss[1]:.2f} ({rss[1] / rss[0]:.2f}x, {'met' if rss[1] <= 0.9 * rss[0] else 'not met'}) |")
    if ("sd", "cache_fp32") in results:
        ref = results[("sd", "cache_fp32")][0]["cache_s_per_image"]
        print("\nlatent caching, 16 images of 512 px, s/image (target: >= 3x faster than sd-scripts' fp32 VAE, batch 1)")
        for prec in ("fp32", "bf16"):
            sd, lk = (results[(t, f"cache_{prec}")][0]["cache_s_per_image"] for t in ("sd", "lk"))
            print(f"  {prec}: sd-scripts {sd:.2f}, lorakit {lk:.2f} ({sd / lk:.2f}x faster than sd-scripts {prec}, "
                  f"{ref / lk:.2f}x than its fp32: {'met' if ref / lk >= 3 else 'not met'})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sd_scripts", required=True, help="sd-scripts' folder (the one with train_network.py)")
    ap.add_argument("--sd_python", required=True, help="the Python of sd-scripts' virtual environment")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--runs", type=int, default=2, help="runs per tool and configuration (default 2)")
    ap.add_argument("--no_caching", dest="caching", action="store_false", help="skip the latent-caching runs")
    ap.add_argument("--workdir", default="/tmp/lorakit-vs-sd-scripts")
    args = ap.parse_args()
    if not (Path(args.sd_scripts) / "train_network.py").exists():
        raise SystemExit(f"--sd_scripts {args.sd_scripts}: no train_network.py there; give sd-scripts' folder.")
    work = Path(args.workdir)
    results = measure(args, prepare(work), work)
    report(results, args.configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
