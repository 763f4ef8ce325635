"""LoRA quality on the toy world (issue 9): train the "usu bear" LoRA on the shipped toy base and score it.

    python benchmarks/bench_quality.py                              # the recipe (seed 001's setup, scaled)
    python benchmarks/bench_quality.py --reg generated              # ... with the base model's 'bear' samples as reg
    python benchmarks/bench_quality.py -- --network_dim 4           # the recipe with flags added/overridden
    python benchmarks/bench_quality.py --sweep all --table docs/quality.md

Scores (lorakit/toyworld/quality.py): fidelity (trigger samples read as the character), composability (character and
the other tag), prior preservation (the class prompt "bear" keeps the base model's labels; leak = class samples read
as the character) and bleed (unrelated prompts keep their labels; mean pixel change). Sweeps reproduce seed 000's
comparisons in miniature: dim, blocks, regularization images, optimizer, epochs.

Every run lives in --work_dir/<name> and is skipped when its LoRA and scores exist, so an interrupted sweep resumes.
One thread per process by default: the models are tiny and a second thread mostly adds contention; use --jobs to
train several configurations at once instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorakit.toyworld.recipe import NETWORK_ARGS, STEPS_PER_EPOCH  # noqa: E402  (light: no torch import)

# seed 000's layer-selective character LoRA: IN04-IN07 and OUT03-OUT06 (--network_args replaces the whole list, so
# the blocks row repeats the recipe's items)
_SELECTED_BLOCKS = "IN04-IN07,OUT03-OUT06"
_D_ARGS = ["--learning_rate", "1", "--optimizer_args", "betas=0.9,0.999", "weight_decay=0", "d0=1e-06"]


def sweeps(epochs: int) -> dict[str, list[tuple]]:
    """{sweep: [(run name, extra flags, with reg images[, checkpoint epoch])]}; the recipe is dim 16, all blocks, no
    reg, AdamW. The epochs sweep reads the recipe run's own checkpoints (constant LR, so the checkpoint after epoch N
    is what a run of N epochs gives)."""
    spe = STEPS_PER_EPOCH
    return {
        # seed 000's rule: alpha = dim / 4 (the recipe keeps seed 001's alpha = dim)
        "dim": [(f"dim {d} (alpha {d // 4})", ["--network_dim", str(d), "--network_alpha", str(d // 4)], False)
                for d in (4, 8, 16, 32, 64)] + [("dim 16 (alpha 16, the recipe)", [], False)],
        "blocks": [("all blocks", [], False),
                   ("IN04-07 + OUT03-06 only", ["--network_args", *NETWORK_ARGS, f"blocks={_SELECTED_BLOCKS}"],
                    False)],
        "reg": [("no reg images", [], False),
                ("reg/1_bear: 75 toy-world bears with captions", [], True),
                ("reg/1_bear: 75 base-model samples of 'bear' (seed 001's way)", [], "generated")],
        "optimizer": [("AdamW lr 3e-3", [], False),
                      ("DAdaptLion (lr 1, d0 1e-6)", ["--optimizer_type", "DAdaptLion", *_D_ARGS], False),
                      ("Prodigy (lr 1, d0 1e-6)", ["--optimizer_type", "Prodigy", *_D_ARGS], False)],
        "epochs": [(f"{e} epochs ({e * spe} steps)", [], False, e) for e in range(2, epochs, 2)]
        + [(f"{epochs} epochs ({epochs * spe} steps)", [], False)],
    }


def run_dir(work: Path, extra: list[str], reg: bool) -> Path:
    import hashlib

    return work / f"run-{hashlib.sha1(json.dumps([extra, reg]).encode()).hexdigest()[:10]}"


def run_argv(work: Path, extra: list[str], reg: bool, epochs: int, base: Path) -> list[str]:
    from lorakit.toyworld.recipe import usu_bear_argv, write_dataset

    folder = {False: "dataset_noreg", True: "dataset_reg", "generated": "dataset_reg_generated",
              "classes": "dataset_reg_classes"}[reg]
    data = write_dataset(work / folder, reg=reg, base=base)
    return usu_bear_argv(base, data, run_dir(work, extra, reg), epochs=epochs) + [
        "--save_every_n_epochs", "2"] + extra


def train_config(extra: list[str], reg: bool, work: Path, epochs: int, base: Path, threads: int = 1) -> float | None:
    """Train one configuration unless its LoRA exists (a process-pool task); returns the seconds it took."""
    import torch

    from lorakit import options as O
    from lorakit.train.trainer import train

    torch.set_num_threads(threads)
    run = run_dir(work, extra, reg)
    lora, timing = run / "usu_bear.safetensors", run / "train_seconds.txt"
    if lora.exists():
        return float(timing.read_text()) if timing.exists() else None
    t0 = time.time()
    res = train(O.resolve(run_argv(work, extra, reg, epochs, base)), progress=False, log=lambda *a, **k: None)
    if res.interrupted or not lora.exists():
        raise SystemExit(f"training {run} stopped early; rerun to resume the sweep")
    seconds = time.time() - t0
    timing.write_text(f"{seconds:.1f}\n")
    return seconds


def score_config(name: str, extra: list[str], reg: bool, work: Path, epochs: int, base: Path, evaluator,
                 checkpoint: int | None = None, log=print) -> dict:
    """Score a trained configuration (or its checkpoint after epoch `checkpoint`); cached in
    <run>/quality[-epochN].json."""
    run = run_dir(work, extra, reg)
    result_path = run / (f"quality-epoch{checkpoint}.json" if checkpoint else "quality.json")
    target = run / (f"usu_bear-{checkpoint:06d}.safetensors" if checkpoint else "usu_bear.safetensors")
    size = {"file_kib": target.stat().st_size / 1024}
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "name": name, **size}
    timing = run / "train_seconds.txt"
    seconds = float(timing.read_text()) if timing.exists() and not checkpoint else None
    report = evaluator.evaluate(target)
    out = {"name": name, "flags": extra, "reg": reg, "train_seconds": seconds, **size, **report.as_dict(),
           "command": "lorakit train " + " ".join(shlex.quote(a) for a in run_argv(work, extra, reg, epochs, base))}
    out.pop("details", None)
    write_report_json_dict(out, result_path)
    log(f"{name}: {report.summary()}" + (f" (trained in {seconds:.0f}s)" if seconds else ""))
    return out


def train_all(entries: list[tuple], work: Path, epochs: int, base: Path, jobs: int, threads: int) -> None:
    """Train every distinct configuration, `jobs` at a time in separate processes."""
    distinct = {}
    for e in entries:
        distinct.setdefault(str(run_dir(work, e[1], e[2])), (e[1], e[2]))
    todo = [v for k, v in distinct.items() if not (Path(k) / "usu_bear.safetensors").exists()]
    if not todo:
        return
    print(f"training {len(todo)} configurations, {jobs} at a time")
    if jobs <= 1:
        for extra, reg in todo:
            train_config(extra, reg, work, epochs, base, threads)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        for f in [pool.submit(train_config, extra, reg, work, epochs, base, threads) for extra, reg in todo]:
            f.result()


def write_report_json_dict(d: dict, path: Path) -> None:
    from lorakit.utils.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(d, indent=1, sort_keys=True) + "\n")


COLUMNS = [("fidelity", "fidelity ↑"), ("composability", "composability ↑"), ("prior_agreement", "prior kept ↑"),
           ("prior_leak", "prior leak ↓"), ("bleed_agreement", "unrelated kept ↑"),
           ("bleed_pixel_change", "unrelated pixel change ↓")]


def table(results: dict[str, list[dict]]) -> str:
    lines = []
    for sweep, rows in results.items():
        lines += [f"### {sweep}", "", "| run | " + " | ".join(c[1] for c in COLUMNS) + " | file KiB | train s |",
                  "|---" * (len(COLUMNS) + 3) + "|"]
        for r in rows:
            cells = [f"{r[k]:.3f}" if k == "bleed_pixel_change" else f"{r[k]:.2f}" for k, _ in COLUMNS]
            secs = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "-"
            kib = f"{r['file_kib']:.0f}" if r.get("file_kib") else "-"
            lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {kib} | {secs} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="/tmp/lorakit-bench-quality")
    p.add_argument("--base", default=None, help="toy base model file (default: the shipped one); give each base its "
                   "own --work_dir, finished runs are reused")
    p.add_argument("--sweep", default=None, help="dim, blocks, reg, optimizer, epochs (comma-separated), or all "
                   "(default: one run of the recipe)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the recipe (default: the recipe's)")
    p.add_argument("--seeds", type=int, default=16, help="samples per prompt (16: 112 trigger samples)")
    p.add_argument("--jobs", type=int, default=1, help="configurations trained at the same time (processes)")
    p.add_argument("--reg", nargs="?", const="real", default=None, choices=("real", "generated", "classes"),
                   help="single run with class reg images: toy-world bears with captions (real, the default), the "
                   "base model's samples of 'bear' (generated, seed 001's way), or its samples of 'bear' and four "
                   "other animals (classes, the demo's variant)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", default=None, help="write the markdown table here (between the sweep markers)")
    p.add_argument("--json", default=None, help="write all results as JSON here")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lorakit.models.loading import load_bundle
    from lorakit.toyworld.pretrain import default_base_path
    from lorakit.toyworld.quality import QualityEvaluator, QualitySettings
    from lorakit.toyworld.recipe import EPOCHS

    torch.set_num_threads(a.threads)
    epochs = a.epochs or EPOCHS
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if a.sweep:
        all_sweeps = sweeps(epochs)
        names = list(all_sweeps) if a.sweep == "all" else a.sweep.split(",")
        unknown = [n for n in names if n not in all_sweeps]
        if unknown:
            p.error(f"unknown sweep {unknown}; choose from {', '.join(all_sweeps)} or all")
        selected = {n: all_sweeps[n] for n in names}
    else:
        reg = {None: False, "real": True, "generated": "generated", "classes": "classes"}[a.reg]
        selected = {"run": [("recipe" + (" " + " ".join(extra) if extra else ""), extra, reg)]}
    base = Path(a.base).resolve() if a.base else default_base_path()
    train_all([e for entries in selected.values() for e in entries], work, epochs, base, a.jobs, a.threads)
    torch.set_num_threads(max(a.threads, a.jobs))  # sampling (forward only) gains from the cores training used
    t0 = time.time()
    evaluator = QualityEvaluator(settings=QualitySettings(seeds=a.seeds),
                                 bundle=load_bundle(base, family="sd1", dtype="fp32"))
    print(f"base model sampled ({len(evaluator.prompts)} images) in {time.time() - t0:.0f}s")
    results = {n: [score_config(*e[:3], work, epochs, base, evaluator, *e[3:]) for e in entries]
               for n, entries in selected.items()}
    text = table(results)
    print(text)
    first = results[next(iter(results))][0]
    print(f"base model: fidelity {first['base_fidelity']:.2f}, prior leak {first['base_prior_leak']:.2f}; "
          f"{len(evaluator.prompts)} images per model")
    if a.table:
        cmd = "python benchmarks/bench_quality.py " + " ".join(shlex.quote(x) for x in argv)
        write_table(Path(a.table), text, cmd)
    if a.json:
        write_report_json_dict(results, Path(a.json))
    return 0


BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"


def write_table(path: Path, text: str, command: str) -> None:
    """Replace the block between the markers (or append it), keeping the rest of the document."""
    from lorakit.utils.atomic import write_text_atomic

    block = f"{BEGIN}\nMade by `{command}` on {time.strftime('%Y-%m-%d')}.\n\n{text}\n{END}"
    doc = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = (doc.rstrip() + "\n\n" if doc else "") + block + "\n"
    write_text_atomic(path, doc)


if __name__ == "__main__":
    raise SystemExit(main())
