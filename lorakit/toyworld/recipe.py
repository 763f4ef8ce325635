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

from lorakit.toyworld.world import CLASS_TOKEN, INSTANCE_TOKEN

EPOCHS = 10
TRAIN_IMAGES, TRAIN_REPEATS, BATCH = 15, 20, 4  # train/20_usu bear holds 15 images
STEPS_PER_EPOCH = TRAIN_IMAGES * TRAIN_REPEATS // BATCH  # 75 (reg images double an epoch)
# LoCon: the 3x3 convs of the ResNet blocks train too (rank 8). On the v2 base the crescent, a small detail, is what a
# linear-only LoRA learns last: after 750 steps it drew the marking on 54% of trigger samples (the character 43%);
# with the convs 84% (77%). See docs/quality.md.
NETWORK_ARGS = ("conv_dim=8", "conv_alpha=8")

# The demo's documented variant (docs/quality.md, "Pivotal tuning"): the trigger word "usu" gets its own text-encoder
# vector, trained with the LoRA (--train_embedding), and the base model's own images of "bear" and four other animals
# are regularization images (REG_CLASSES). The toy base never learned to read "usu", so without its own vector
# "usu bear" and "bear" are one condition and the character leaks into every bear (leak 0.62); with it the reg
# images can hold "bear" and the other animals in place while the LoRA learns the character. The LoRA learns at about
# a quarter of the plain recipe's 3e-3 (the vector carries the identity; faster rates move unrelated prompts more).
# Batch 8 rather than 4: twice the images per step for 1.4x the step time, which on four training seeds drew the
# character in 0.78-0.86 of 224 samples instead of 0.67-0.78, unrelated prompts kept as well (0.80). With reg images
# an epoch is 2 x 300 images: 75 steps at batch 8, so 4 epochs are 300 steps.
PIVOTAL_REG = "classes"
PIVOTAL_BATCH = 8
PIVOTAL_STEPS_PER_EPOCH = 2 * TRAIN_IMAGES * TRAIN_REPEATS // PIVOTAL_BATCH
PIVOTAL_EPOCHS = 4
PIVOTAL_ARGS = ("--train_embedding", INSTANCE_TOKEN, "--embedding_lr", "3e-2", "--learning_rate", "8e-4",
                "--train_batch_size", str(PIVOTAL_BATCH))


# reg="classes": the base model's own samples of the class and of four other animals, 75 in all (folder -> count)
REG_CLASSES = ((CLASS_TOKEN, 30), ("cat", 12), ("rabbit", 11), ("frog", 11), ("bird", 11))


def write_dataset(out: Path, reg: bool | str = False, base: str | Path | None = None) -> dict:
    """The dataset folders of seed 001: 15 character images x 20 repeats, and with `reg` 75 class images:
    toy-world pictures of bears with full captions (`reg=True`, `reg/1_bear`); as seed 001 makes them, images the
    base model draws for the class prompt "bear", without captions (`reg="generated"`, `reg/1_bear`, needs `base`);
    or the base model's images of "bear" and of four other animals (`reg="classes"`: `reg/1_bear`, `reg/1_cat`, ...;
    the demo's default, see REG_CLASSES)."""
    from lorakit.toyworld.datasets import write_dreambooth_folder

    data = write_dreambooth_folder(out, n_train=TRAIN_IMAGES, n_reg=75 if reg is True else 0,
                                   train_repeats=TRAIN_REPEATS, reg_repeats=1)
    classes = {"generated": ((CLASS_TOKEN, 75),), "classes": REG_CLASSES}.get(reg) if isinstance(reg, str) else None
    if isinstance(reg, str) and classes is None:
        raise ValueError(f"reg must be False, True, 'generated' or 'classes' (got {reg!r})")
    if classes:
        reg_dir = Path(out) / "reg"
        generate_class_images(base, reg_dir, classes, seed=1000 if reg == "generated" else 2000)
        data.update(reg_dir=reg_dir, reg_subdir=reg_dir / f"1_{CLASS_TOKEN}")
    return data


def generate_class_images(base: str | Path, reg_dir: Path, classes, seed: int = 1000) -> None:
    """Seed 001's regularization images: the base model's own samples of each class prompt into
    `reg_dir/1_<prompt>`, through the same code as `lorakit generate --prompt bear --count N --batch_size N
    --outdir reg/1_bear` (resumable, skips what exists). `classes`: (prompt, count) pairs; the model is loaded once
    for all of them. Each class is drawn in one batch (up to 16): 2.3x faster than one image at a time on a CPU; the
    pixels differ from one-at-a-time draws by at most 1/255 (batched kernels sum in another order)."""
    from lorakit.generate.pipeline import GenerationSettings, Generator
    from lorakit.generate.reg_images import generate_reg_images
    from lorakit.models.loading import load_bundle

    todo = [(p, n) for p, n in classes if len(list((reg_dir / f"1_{p}").glob("*.png"))) < n]
    if not todo:
        return
    with Generator(load_bundle(base, family="sd1", dtype="fp32")) as gen:
        for prompt, count in todo:
            generate_reg_images(gen, GenerationSettings(prompt=prompt, steps=20, sampler="DDIM", cfg_scale=5.0,
                                                        seed=seed, width=64, height=64, batch_size=min(count, 16)),
                                count, reg_dir / f"1_{prompt}")


def usu_bear_argv(base: str | Path, data: dict, output_dir: str | Path, output_name: str = "usu_bear",
                  epochs: int = EPOCHS, seed: int = 42, steps: int | None = None, pivotal: bool = False) -> list[str]:
    """sd-scripts flags of the recipe; add or override flags by appending (argparse keeps the last value).
    `steps` replaces the epoch count with a step count (short runs in tests). `pivotal` adds PIVOTAL_ARGS (the
    demo's variant; its dataset comes from write_dataset(reg=PIVOTAL_REG))."""
    argv = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data["train_dir"]),
            "--output_dir", str(output_dir), "--output_name", output_name, "--resolution", "64",
            "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
            "--network_args", *NETWORK_ARGS,
            "--optimizer_type", "AdamW", "--learning_rate", "3e-3", "--lr_scheduler", "constant",
            *(["--max_train_steps", str(steps)] if steps else ["--max_train_epochs", str(epochs)]),
            "--train_batch_size", str(BATCH),
            "--shuffle_caption", "--keep_tokens", "1", "--caption_extension", ".txt",
            "--cache_latents", "--seed", str(seed), "--max_data_loader_n_workers", "0",
            "--save_model_as", "safetensors"]
    if data.get("reg_dir"):
        argv += ["--reg_data_dir", str(data["reg_dir"])]
    if pivotal:  # the variant's values replace the recipe's, so the printed command names each flag once
        for flag in PIVOTAL_ARGS[::2]:  # (flag, value) pairs
            if flag in argv:
                del argv[argv.index(flag):argv.index(flag) + 2]
        argv += list(PIVOTAL_ARGS)
    return argv
