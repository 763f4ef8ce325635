"""The "usu bear" LoRA recipe on the toy base: seed 001's setup as an sd-scripts command line.

Seed 001 trains Kurokuma-chan from 15 images in `train/20_usu bear` for 10 epochs with dim = alpha, optionally with
class images in `reg/1_bear` (about five per training image). The recipe keeps that structure (folders, repeats,
trigger, epochs) and scales the rest to the tiny toy base on a CPU: batch 4 (75 steps per epoch, 750 in all) and
AdamW at 3e-3, which the toy world's sweeps (docs/quality.md) found to learn the character without diverging
(1e-2 diverged, 1e-3 learned little in the same steps). Regularization images are off by default: on the toy base they
cancel the character (see the reg sweep), because the base model barely tells "usu bear" from "bear".
The demo, the quality benchmark and the CI learning test all start from `usu_bear_argv`, so they train the same thing.
"""

from __future__ import annotations

from pathlib import Path

EPOCHS = 10
STEPS_PER_EPOCH = 75  # 15 images x 20 repeats / batch 4 (twice that with reg images)


def write_dataset(out: Path, reg: bool = False) -> dict:
    """The dataset folders of seed 001 (15 character images x 20 repeats; 75 class images when `reg`)."""
    from lorakit.toyworld.datasets import write_dreambooth_folder

    return write_dreambooth_folder(out, n_train=15, n_reg=75 if reg else 0, train_repeats=20, reg_repeats=1)


def usu_bear_argv(base: str | Path, data: dict, output_dir: str | Path, output_name: str = "usu_bear",
                  epochs: int = EPOCHS, seed: int = 42, steps: int | None = None) -> list[str]:
    """sd-scripts flags of the recipe; add or override flags by appending (argparse keeps the last value).
    `steps` replaces the epoch count with a step count (short runs in tests)."""
    argv = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data["train_dir"]),
            "--output_dir", str(output_dir), "--output_name", output_name, "--resolution", "64",
            "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
            "--optimizer_type", "AdamW", "--learning_rate", "3e-3", "--lr_scheduler", "constant",
            *(["--max_train_steps", str(steps)] if steps else ["--max_train_epochs", str(epochs)]),
            "--train_batch_size", "4",
            "--shuffle_caption", "--keep_tokens", "1", "--caption_extension", ".txt",
            "--cache_latents", "--seed", str(seed), "--max_data_loader_n_workers", "0",
            "--save_model_as", "safetensors"]
    if data.get("reg_dir"):
        argv += ["--reg_data_dir", str(data["reg_dir"])]
    return argv
