"""The "usu bear" LoRA recipe on the toy base: seed 001's setup as an sd-scripts command line.

Seed 001 trains Kurokuma-chan from 15 images in `train/20_usu bear` for 10 epochs with dim = alpha, optionally with
class images in `reg/1_bear` (about five per training image). The recipe keeps that structure (folders, repeats,
trigger, epochs) and scales the rest to the tiny toy base on a CPU: batch 4 (75 steps per epoch, 750 in all) and
AdamW at 3e-3, the highest rate that learns without wrecking the base (on the v2 base 6e-3, and 1e-2 for the UNet,
ruined unrelated prompts: pixel change 0.26-0.31). One documented variant: the 3x3 convs train too (`conv_dim=8`,
as seed 000's `networks.lora` runs do with conv_dim 64). Regularization images are off by default: on the toy base
they cancel the character (see the reg sweep in docs/quality.md): the base never saw the word "usu", so the only
thing that tells "usu bear" from "bear" is what the LoRA itself learns.
The demo, the quality benchmark and the CI learning test all start from `usu_bear_argv`, so they train the same thing.
"""

from __future__ import annotations

from pathlib import Path

EPOCHS = 10
STEPS_PER_EPOCH = 75  # 15 images x 20 repeats / batch 4 (twice that with reg images)
# LoCon: the 3x3 convs of the ResNet blocks train too (rank 8). On the v2 base the crescent, a small detail, is what a
# linear-only LoRA learns last: after 750 steps it drew the marking on 54% of trigger samples (the character 43%);
# with the convs 84% (77%). See docs/quality.md.
NETWORK_ARGS = ("conv_dim=8", "conv_alpha=8")


def write_dataset(out: Path, reg: bool | str = False, base: str | Path | None = None) -> dict:
    """The dataset folders of seed 001: 15 character images x 20 repeats, and with `reg` 75 class images in
    `reg/1_bear`: toy-world pictures of bears with full captions (`reg=True`), or, as seed 001 makes them, images the
    base model draws for the class prompt "bear", without captions (`reg="generated"`, needs `base`)."""
    from lorakit.toyworld.datasets import write_dreambooth_folder

    data = write_dreambooth_folder(out, n_train=15, n_reg=75 if reg is True else 0, train_repeats=20, reg_repeats=1)
    if reg == "generated":
        reg_sub = Path(out) / "reg" / "1_bear"
        generate_class_images(base, reg_sub, 75)
        data.update(reg_dir=reg_sub.parent, reg_subdir=reg_sub)
    return data


def generate_class_images(base: str | Path, outdir: Path, count: int) -> None:
    """Seed 001's regularization images: the base model's own samples of the class prompt, through the same code as
    `lorakit generate --prompt bear --count N --outdir reg/1_bear` (resumable, skips what exists)."""
    from lorakit.generate.pipeline import GenerationSettings, Generator
    from lorakit.generate.reg_images import generate_reg_images
    from lorakit.models.loading import load_bundle

    if outdir.is_dir() and len(list(outdir.glob("*.png"))) >= count:
        return
    bundle = load_bundle(base, family="sd1", dtype="fp32")
    with Generator(bundle) as gen:
        generate_reg_images(gen, GenerationSettings(prompt="bear", steps=20, sampler="DDIM", cfg_scale=5.0, seed=1000,
                                                    width=64, height=64), count, outdir)


def usu_bear_argv(base: str | Path, data: dict, output_dir: str | Path, output_name: str = "usu_bear",
                  epochs: int = EPOCHS, seed: int = 42, steps: int | None = None) -> list[str]:
    """sd-scripts flags of the recipe; add or override flags by appending (argparse keeps the last value).
    `steps` replaces the epoch count with a step count (short runs in tests)."""
    argv = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data["train_dir"]),
            "--output_dir", str(output_dir), "--output_name", output_name, "--resolution", "64",
            "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
            "--network_args", *NETWORK_ARGS,
            "--optimizer_type", "AdamW", "--learning_rate", "3e-3", "--lr_scheduler", "constant",
            *(["--max_train_steps", str(steps)] if steps else ["--max_train_epochs", str(epochs)]),
            "--train_batch_size", "4",
            "--shuffle_caption", "--keep_tokens", "1", "--caption_extension", ".txt",
            "--cache_latents", "--seed", str(seed), "--max_data_loader_n_workers", "0",
            "--save_model_as", "safetensors"]
    if data.get("reg_dir"):
        argv += ["--reg_data_dir", str(data["reg_dir"])]
    return argv
