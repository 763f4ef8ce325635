"""`lorakit demo`: the whole training job on a built-in tiny model, in a minute or two on a CPU.

It writes a tiny Stable Diffusion 1.x checkpoint (random weights, real layer names) and a generated DreamBooth dataset
("usu bear": 8 images in `train/10_usu bear`), then runs the same code path as `lorakit train` with an sd-scripts
command line, and prints where the LoRA, the sample images and the equivalent command are.
"""

from __future__ import annotations

import shlex
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a LoRA on a built-in tiny model and sample dataset (CPU, ~1-2 min)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="lorakit-demo", help="folder for the model, dataset and outputs")
    p.add_argument("--steps", type=int, default=80, help="training steps (default 80)")
    p.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"], help="tiny model family")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def prepare(out: Path, family: str = "sd1") -> dict:
    """Write the tiny checkpoint, the dataset and a prompt file (reused when present)."""
    from lorakit.models.saving import save_single_file
    from lorakit.models.tiny import tiny_bundle
    from lorakit.toyworld.datasets import write_dreambooth_folder

    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "model" / f"tiny-{family}.safetensors"
    if not ckpt.exists():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        save_single_file(tiny_bundle(family, seed=0), ckpt)
    data = write_dreambooth_folder(out / "dataset", n_train=8, n_reg=0, train_repeats=10, size=64, overwrite=True)
    prompts = out / "prompts.txt"
    prompts.write_text("usu bear, forest, center, small, standing --w 64 --h 64 --s 12 --d 1 --l 5\n"
                       "usu bear, beach, left, large, waving --w 64 --h 64 --s 12 --d 2 --l 5\n", encoding="utf-8")
    return {"checkpoint": ckpt, "train_data_dir": data["train_dir"], "prompts": prompts}


def demo_argv(paths: dict, out: Path, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(paths["checkpoint"]), "--train_data_dir", str(paths["train_data_dir"]),
            "--output_dir", str(out / "output"), "--output_name", "usu_bear", "--resolution", "64",
            "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4",
            "--optimizer_type", "AdamW", "--learning_rate", "2e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.1",
            "--max_train_steps", str(steps), "--train_batch_size", "2", "--shuffle_caption", "--keep_tokens", "1",
            "--caption_extension", ".txt", "--seed", "42", "--save_every_n_steps", str(max(1, steps // 2)),
            "--sample_prompts", str(paths["prompts"]), "--sample_every_n_steps", str(steps),
            "--sample_sampler", "euler_a", "--max_data_loader_n_workers", "1"]


def run(args) -> int:
    import torch

    from lorakit import options as O
    from lorakit.train.trainer import train

    # a tiny model is dominated by per-op overhead; one thread avoids contention on small machines
    torch.set_num_threads(1)
    out = Path(args.output_dir).resolve()
    print(f"preparing a tiny {args.family} model and a sample dataset in {out}")
    paths = prepare(out, args.family)
    argv = demo_argv(paths, out, args.steps)
    opts = O.resolve(argv)
    result = train(opts, progress=not args.no_progress)
    if result.interrupted:
        print(f"interrupted at step {result.global_step}: LoRA {result.final_lora}")
        print("continue with: lorakit train " + " ".join(shlex.quote(a) for a in argv)
              + f" --resume {shlex.quote(str(result.states[-1]))}")
        return 130
    first = sum(result.losses[:10]) / max(1, len(result.losses[:10]))
    last = sum(result.losses[-10:]) / max(1, len(result.losses[-10:]))
    print()
    print(f"loss: {first:.4f} (first 10 steps) -> {last:.4f} (last 10 steps)")
    print(f"LoRA: {result.final_lora}")
    for p in result.saved[:-1]:
        print(f"checkpoint: {p}")
    for s in result.samples:
        print(f"sample image: {s}")
    print(f"base model: {paths['checkpoint']}")
    print(f"dataset: {paths['train_data_dir']}")
    print("the same run as a command line:")
    print("  lorakit train " + " ".join(shlex.quote(a) for a in argv))
    return 0
