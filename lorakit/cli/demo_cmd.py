"""`lorakit demo`: seed 001's "usu bear" LoRA, trained on the shipped toy base model and measured, in a few minutes.

It writes seed 001's dataset layout from the toy world (`train/20_usu bear`: 15 images of the new character, a black
bear with a white crescent and a red scarf that the base model never saw) and class images the base model draws
(`reg/1_bear` and four other animals), trains the LoRA with an sd-scripts command line through the same code as
`lorakit train` (seed 001's recipe with one documented variant: the trigger word's own vector trains too,
--train_embedding usu; `--plain` trains seed 001's recipe as written), then draws a before/after grid (base vs LoRA,
same prompts and seeds, through the same code as `lorakit generate`) and prints the quality metrics read by the
shipped attribute classifier (fidelity, composability, prior preservation, bleed).
"""

from __future__ import annotations

import shlex
from pathlib import Path

GRID_PROMPTS = ("usu bear", "usu bear, forest", "usu bear, night", "usu bear, hat", "bear", "cat, sky")
GRID_SEEDS = (11, 12, 13, 14)


def register(subparsers) -> None:
    from lorakit.toyworld.recipe import (EPOCHS, PIVOTAL_BATCH, PIVOTAL_EPOCHS, PIVOTAL_STEPS_PER_EPOCH,
                                         STEPS_PER_EPOCH)

    p = subparsers.add_parser("demo", help="train the 'usu bear' LoRA on the built-in toy base model, draw a "
                              "before/after grid and print quality metrics (CPU, a few minutes)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="lorakit-demo", help="folder for the dataset, LoRA, grid and metrics")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {PIVOTAL_EPOCHS}: {PIVOTAL_EPOCHS * PIVOTAL_STEPS_PER_EPOCH} steps "
                        f"at batch {PIVOTAL_BATCH} with the reg images; with --plain {EPOCHS}, as in seed 001: "
                        f"{EPOCHS * STEPS_PER_EPOCH} steps)")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of --epochs")
    p.add_argument("--seed", type=int, default=42,
                   help="training seed (default 42, the README's figures; the README gives the spread over others)")
    p.add_argument("--plain", action="store_true",
                   help="seed 001's recipe as written: no trained trigger vector and no reg images (the trigger "
                        "then leaks into every 'bear'; see the README)")
    p.add_argument("--eval_seeds", type=int, default=8, help="samples per metric prompt (default 8)")
    p.add_argument("--no_eval", action="store_true", help="skip the grid and the metrics")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bar, a step line now and then (the default when the output is not a terminal)")
    p.set_defaults(func=run)


def before_after_grid(bundle, lora_dir: Path, lora_name: str, out_path: Path, prompts=GRID_PROMPTS,
                      seeds=GRID_SEEDS, steps: int = 20, cfg_scale: float = 5.0) -> Path:
    """Rows: prompts; columns: the base model then the LoRA, each on the same seeds. Saved with atomic write."""
    from dataclasses import replace

    from lorakit.generate.grid import draw_grid
    from lorakit.generate.pipeline import GenerationSettings, Generator
    from lorakit.utils.atomic import atomic_path

    size = bundle.configs["vae"].get("sample_size", 64)
    rows = []
    consecutive = list(seeds) == list(range(seeds[0], seeds[0] + len(seeds)))
    with Generator(bundle, lora_dir=lora_dir) as gen:
        for prompt in prompts:
            row = []
            for with_lora in (False, True):
                text = f"{prompt} <lora:{lora_name}:1>" if with_lora else prompt
                s = GenerationSettings(prompt=text, steps=steps, sampler="DDIM", cfg_scale=cfg_scale, seed=seeds[0],
                                       width=size, height=size)
                if consecutive:  # one batch: image i has seed seeds[0] + i, as `lorakit generate --batch_size` does
                    row += gen(replace(s, batch_size=len(seeds))).images
                else:
                    row += [gen(replace(s, seed=seed)).images[0] for seed in seeds]
            rows.append(row)
    cols = [f"base {s}" for s in seeds] + [f"LoRA {s}" for s in seeds]
    img, _ = draw_grid(rows, cols, list(prompts))
    with atomic_path(out_path) as tmp:
        img.save(tmp, format="PNG")
    return out_path


class _BaseSamples:
    """The base model's metric samples, made in a second process while this one writes the dataset and trains: the
    toy model runs on one thread (see run), so on a 2-core machine the minute they take comes off the wall time.
    The child is one-thread too, so the figures are those of a run without it."""

    def __init__(self, base: Path, settings, enabled: bool):
        self.pool = self.job = None
        if enabled:
            import multiprocessing

            from lorakit.toyworld.quality import base_readings

            self.pool = multiprocessing.get_context("spawn").Pool(1)
            self.job = self.pool.apply_async(base_readings, (base, settings))

    def result(self):
        return self.job.get()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:  # also on Ctrl-C: nothing is left running
            self.pool.terminate()
            self.pool.join()


def run(args) -> int:
    import torch

    from lorakit.toyworld.pretrain import default_base_path
    from lorakit.toyworld.quality import QualitySettings

    torch.set_num_threads(1)  # the grid and metrics too (training sets it from --num_threads below)
    out = Path(args.output_dir).resolve()
    base = default_base_path()
    print(f"toy base model: {base} (shipped; SD1 layout, 64 px)")
    settings = QualitySettings(seeds=args.eval_seeds)
    with _BaseSamples(base, settings, enabled=not args.no_eval) as base_samples:
        lora = _train(args, out, base)
        if lora is None:
            return 130
        if not args.no_eval:
            _grid_and_metrics(args, out, base, lora, settings, base_samples)
    return 0


def _train(args, out: Path, base: Path) -> Path | None:
    """Dataset, then the LoRA; prints the equivalent command line. None when interrupted (state saved)."""
    from lorakit import options as O
    from lorakit.toyworld.recipe import (EPOCHS, PIVOTAL_EPOCHS, PIVOTAL_REG, REG_CLASSES, usu_bear_argv,
                                         write_dataset)
    from lorakit.train.trainer import train
    from lorakit.utils.terminal import want_bar

    pivotal = not args.plain
    if pivotal:
        print("regularization images: the base model draws 'bear' and four other animals ...", flush=True)
    data = write_dataset(out / "dataset", reg=PIVOTAL_REG if pivotal else False, base=base)
    print(f"dataset: {data['train_subdir']} (15 images)" + (f", {data['reg_dir']} (75 class images: "
                                                             + ", ".join(f"1_{c} {n}" for c, n in REG_CLASSES) + ")"
                                                             if data.get("reg_dir") else ""))
    epochs = args.epochs or (PIVOTAL_EPOCHS if pivotal else EPOCHS)
    argv = usu_bear_argv(base, data, out / "output", epochs=epochs, seed=args.seed, steps=args.steps,
                         pivotal=pivotal)
    half = max(1, epochs // 2)
    argv += ["--save_every_n_steps", str(max(1, args.steps // 2))] if args.steps else ["--save_every_n_epochs", str(half)]
    # The toy model is dominated by per-op overhead: one thread is fastest on small machines. It is a flag of the
    # command (not a setting of this process) because float sums depend on the thread count: the printed command
    # then trains the same LoRA bit for bit.
    argv += ["--num_threads", "1"]
    result = train(O.resolve(argv), progress=want_bar(args.no_progress))
    if result.interrupted:
        print(f"interrupted at step {result.global_step}: LoRA {result.final_lora}")
        if result.states:
            print("continue with: lorakit train " + " ".join(shlex.quote(a) for a in argv)
                  + f" --resume {shlex.quote(str(result.states[-1]))}")
        return None
    n = max(1, min(20, len(result.losses) // 5))
    first = sum(result.losses[:n]) / n
    last = sum(result.losses[-n:]) / n
    print()
    print(f"loss: {first:.4f} (first {n} steps) -> {last:.4f} (last {n} steps)")
    print(f"LoRA: {result.final_lora}")
    for p in result.saved[:-1]:
        print(f"checkpoint: {p}")
    print("the same training as a command line (the same LoRA bit for bit, on this machine and torch build; give "
          "another --output_dir to keep the demo's files):")
    print("  lorakit train " + " ".join(shlex.quote(a) for a in argv))
    return Path(result.final_lora)


def _grid_and_metrics(args, out: Path, base: Path, lora: Path, settings, base_samples: _BaseSamples) -> None:
    from lorakit.models.loading import load_bundle
    from lorakit.toyworld.quality import QualityEvaluator, write_report_json

    bundle = load_bundle(base, family="sd1", dtype="fp32")
    print("\ndrawing the before/after grid ...", flush=True)  # a minute or two of silence otherwise
    grid = before_after_grid(bundle, lora.parent, lora.stem, out / "before_after.png")
    print(f"before/after grid: {grid}  (rows: prompts; left: base model, right: with the LoRA; same seeds)")
    print("the LoRA cells of one row as a command line:")
    print(f"  lorakit generate --model {shlex.quote(str(base))} --lora_dir {shlex.quote(str(lora.parent))} "
          f"--prompt {shlex.quote(f'usu bear, forest <lora:{lora.stem}:1>')} --sampler DDIM --steps 20 "
          f"--cfg_scale 5 --width 64 --height 64 --seed {GRID_SEEDS[0]} --batch_size {len(GRID_SEEDS)}")
    print(f"\nmeasuring quality: samples of the metric prompts ({args.eval_seeds} seeds each) with and without the "
          "LoRA, read by the toy-world classifier ...", flush=True)
    evaluator = QualityEvaluator(settings=settings, bundle=bundle, base_readings=base_samples.result())
    report = evaluator.evaluate(lora)
    write_report_json(report, out / "quality.json")
    print(f"quality ({report.n_images} samples read by the toy-world classifier; {out / 'quality.json'}):")
    print(f"  fidelity       {report.fidelity:.2f}  (base model {report.base_fidelity:.2f}): 'usu bear' prompts "
          "drawn as the new character")
    print(f"  composability  {report.composability:.2f}  'usu bear, forest' etc. show the character and the tag")
    print(f"  prior kept     {report.prior_agreement:.2f}  'bear' samples keep the base model's species/colour/"
          f"background; leak {report.prior_leak:.2f} (base {report.base_prior_leak:.2f}) read as the character")
    print(f"  unrelated kept {report.bleed_agreement:.2f}  'cat, sky' etc. keep their labels; mean pixel change "
          f"{report.bleed_pixel_change:.3f}")
