"""The one schema of every training option.

Each option is declared once here, with the same name and meaning as the kohya-ss/sd-scripts flag our users already
pass (`train_network.py`, `sdxl_train_network.py`). Everything else is generated from the list:

- `build_parser()`        the argparse parser of `lorakit train` (`--flag=value` and `--flag value`, store_true booleans)
- `load_config_file()`    `--config_file` TOML of flags (sections flattened like sd-scripts), typed and validated
- `resolve()`             command line > config file > defaults, into one `argparse.Namespace`
- `write_config_file()`   `--output_config`: the resolved, non-default values as TOML
- `ss_metadata()`         the `ss_*` metadata values sd-scripts writes for those options
- `dataset_config_keys()` which keys a `--dataset_config` TOML may hold at [general], [[datasets]], [[datasets.subsets]]
- `normalize()`           the frozen `Options` a run reads (implied flags resolved once; never written during the run)

Scopes (where a key may appear):
- "train":   command line and `--config_file` only.
- "dataset": a dataset-level key of `--dataset_config` ([[datasets]] or [general]); the command line gives its fallback.
- "subset":  a subset-level key ([[datasets.subsets]], inheriting from [[datasets]] and [general]); the command line gives
             its fallback unless `cli=False` (image_dir, is_reg, class_tokens: those only exist inside a dataset config).
- "general": a key the dataset layer reads from the command line only (max_token_length, prior_loss_weight...).
Value types are named by strings so the GUI and docs can read them: str, path, int, float, bool, int_or_ratio
(`lr_warmup_steps`: int steps, float ratio < 1 or "N%"), resolution ("W,H" or one int), float_pair ("a,b"),
number (int or float, kept as given), dict (a TOML table, dataset configs only). `nargs="*"` makes a list of that
type.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from lorakit.errors import UserError

NO_EFFECT = "Accepted for sd-scripts compatibility; no effect here."


@dataclass(frozen=True)
class Option:
    name: str
    type: str  # see module docstring
    default: Any
    help: str
    group: str
    aliases: tuple[str, ...] = ()
    choices: tuple | None = None
    scope: str = "train"
    nargs: str | None = None  # None or "*"
    metadata_key: str | None = None  # ss_* key sd-scripts writes for it (str(value)); None: not written
    cli: bool = True  # a command-line flag (False: only inside a dataset config)
    config_name: str | None = None  # name inside --dataset_config when it differs (train_batch_size -> batch_size)
    effect: bool = True  # False: accepted for compatibility, does nothing here
    distinct: bool = False  # subset-only key that does not inherit from [[datasets]]/[general]
    check: str | None = None  # allowed range as an interval: "[1,)" >= 1, "(0,)" > 0, "[0,1)" 0 <= x < 1

    @property
    def flags(self) -> list[str]:
        return ["--" + self.name] + ["--" + a for a in self.aliases]

    @property
    def is_list(self) -> bool:
        return self.nargs is not None


def _o(name, type, default, help, group, **kw) -> Option:
    if not kw.get("effect", True) and NO_EFFECT not in help:
        help = f"{help} {NO_EFFECT}".strip()
    return Option(name, type, default, help, group, **kw)


G_MODEL, G_DATA, G_CAPTION, G_AUG, G_CACHE = "model", "dataset", "captions", "augmentation", "caching"
G_NET, G_OPT, G_STEPS, G_LOSS, G_NOISE = "network", "optimizer", "steps", "loss", "noise"
G_PREC, G_OUT, G_META, G_LOG, G_SAMPLE, G_MISC = "precision", "output", "metadata", "logging", "sampling", "misc"
G_VAL, G_EMA = "validation", "ema"

OPTIONS: list[Option] = [
    # --- model ---------------------------------------------------------------------------------------------------
    _o("pretrained_model_name_or_path", "path", None,
       "Base model: a single-file checkpoint (.safetensors/.ckpt) or a diffusers folder.", G_MODEL,
       metadata_key="ss_sd_model_name"),
    _o("v2", "bool", False, "The base model is Stable Diffusion 2.x (normally detected from the checkpoint).", G_MODEL,
       metadata_key="ss_v2"),
    _o("v_parameterization", "bool", False, "Train with v-prediction: SD 2.x 768-v models and v-prediction SDXL "
       "fine-tunes (NoobAI-XL v-pred...); normally detected from the checkpoint (its `v_pred` key or ModelSpec).",
       G_MODEL),
    _o("sdxl", "bool", False,
       "The base model is SDXL (what sdxl_train_network.py implies; normally detected from the checkpoint).", G_MODEL),
    _o("vae", "path", None, "Replace the checkpoint's VAE with this file or folder.", G_MODEL, metadata_key="ss_vae_name"),
    _o("clip_l", "path", None, "FLUX.1: the CLIP-L text encoder as its own file (clip_l.safetensors), for model files "
       "that hold only the transformer.", G_MODEL),
    _o("t5xxl", "path", None, "FLUX.1: the T5-XXL text encoder as its own file (t5xxl_fp16.safetensors...).", G_MODEL),
    _o("ae", "path", None, "FLUX.1: the autoencoder as its own file (ae.safetensors).", G_MODEL),
    _o("t5xxl_max_token_length", "int", None, "FLUX.1: T5 tokens per caption (default 512 for dev, 256 for schnell).",
       G_MODEL, check="[1,)"),
    _o("apply_t5_attn_mask", "bool", False, "FLUX.1: T5 and the transformer's attention ignore the caption's padding "
       "tokens.", G_MODEL),
    _o("clip_skip", "int", None, "Use the output of the n-th text-encoder layer from the end (n >= 1; 2 for anime models). "
       "SDXL ignores it.", G_MODEL, metadata_key="ss_clip_skip", check="[1,)"),
    _o("tokenizer_cache_dir", "path", None, "Folder of tokenizer files, as sd-scripts keeps them offline. CLIP's "
       "tokenizers are bundled; FLUX.1's T5 tokenizer is read from DIR/google_t5-v1_1-xxl (sd-scripts' layout) or "
       "DIR itself (tokenizer.json).", G_MODEL),
    _o("disable_mmap_load_safetensors", "bool", False, "Read safetensors without mmap.", G_MODEL, effect=False),
    # --- dataset -------------------------------------------------------------------------------------------------
    _o("train_data_dir", "path", None, "Folder of `N_name` subfolders (N = repeats) of training images, or of images "
       "for --in_json.", G_DATA),
    _o("reg_data_dir", "path", None, "Folder of `N_class` subfolders of regularization images.", G_DATA),
    _o("in_json", "path", None, "Fine-tune metadata JSON {image_key: {caption, tags}}.", G_DATA),
    _o("dataset_repeats", "int", 1, "Repeats of the dataset in fine-tune mode (--in_json).", G_DATA, check="[1,)"),
    _o("dataset_config", "path", None, "TOML dataset config with [general], [[datasets]], [[datasets.subsets]].", G_DATA),
    _o("dataset_class", "str", None, "Custom dataset class.", G_DATA, effect=False),
    _o("resolution", "resolution", None, "Training resolution: 'SIZE' or 'WIDTH,HEIGHT' (e.g. 512 or 1024,1024). "
       "Default: the model family's native resolution.", G_DATA, scope="dataset", metadata_key="ss_resolution"),
    _o("train_batch_size", "int", 1, "Batch size per device.", G_DATA, scope="dataset", config_name="batch_size",
       metadata_key="ss_batch_size_per_device", check="[1,)"),
    _o("enable_bucket", "bool", False, "Aspect-ratio buckets: batches of one resolution each.", G_DATA, scope="dataset",
       metadata_key="ss_enable_bucket"),
    _o("min_bucket_reso", "int", 256, "Smallest bucket side (divisible by bucket_reso_steps).", G_DATA, scope="dataset",
       metadata_key="ss_min_bucket_reso", check="[1,)"),
    _o("max_bucket_reso", "int", 1024, "Largest bucket side (divisible by bucket_reso_steps).", G_DATA, scope="dataset",
       metadata_key="ss_max_bucket_reso", check="[1,)"),
    _o("bucket_reso_steps", "int", 64, "Bucket side step (64 for SD1/2, a multiple of 32 for SDXL).", G_DATA,
       scope="dataset", check="[1,)"),
    _o("bucket_no_upscale", "bool", False, "Never enlarge small images to fill a bucket.", G_DATA, scope="dataset",
       metadata_key="ss_bucket_no_upscale"),
    _o("resize_interpolation", "str", None, "Resize filter of the images and masks (default: lanczos for images; "
       "area for shrinking and bilinear for enlarging masks).", G_DATA, metadata_key="ss_resize_interpolation",
       scope="subset", choices=("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")),
    _o("network_multiplier", "float", 1.0, "LoRA multiplier for this dataset's batches.", G_DATA, scope="dataset",
       cli=False),
    _o("validation_seed", "int", None, "Seed of the validation split and of the validation noise (default: --seed).",
       G_VAL, scope="dataset", metadata_key="ss_validation_seed"),
    _o("validation_split", "float", 0.0, "Fraction of each subset's training images held out for validation "
       "(regularization images are never held out), e.g. 0.1.", G_VAL, scope="dataset",
       metadata_key="ss_validation_split", check="[0,1)"),
    _o("validate_every_n_steps", "int", None, "Also compute the validation loss every N optimizer steps.", G_VAL,
       metadata_key="ss_validate_every_n_steps", check="[1,)"),
    _o("validate_every_n_epochs", "int", None, "Compute the validation loss every N epochs (default: every epoch "
       "when --validation_split holds images out).", G_VAL, metadata_key="ss_validate_every_n_epochs", check="[1,)"),
    _o("max_validation_steps", "int", None, "Validation batches per validation (default: all of them).", G_VAL,
       metadata_key="ss_max_validation_steps", check="[1,)"),
    _o("image_dir", "path", None, "Subset image folder.", G_DATA, scope="subset", cli=False, distinct=True),
    _o("is_reg", "bool", False, "Subset holds regularization images.", G_DATA, scope="subset", cli=False,
       distinct=True),
    _o("num_repeats", "int", 1, "Times each image of the subset is shown per epoch.", G_DATA, scope="subset", cli=False,
       check="[1,)"),
    _o("class_tokens", "str", None, "Caption for images of the subset without a caption file.", G_DATA,
       scope="subset", cli=False),
    _o("metadata_file", "path", None, "Fine-tune metadata JSON of the subset.", G_DATA, scope="subset", cli=False,
       distinct=True),
    _o("conditioning_data_dir", "path", None, "Folder of loss masks for --masked_loss: one image per training image "
       "with the same file stem (or under a subfolder named like the image folder); its red channel is the weight, "
       "white = learn, black = ignore, 127 = half.", G_DATA, scope="subset", distinct=True),
    _o("cache_info", "bool", False, "Cache image sizes and captions for a faster start (always on here: lorakit keeps "
       "a scan cache).", G_DATA, scope="subset", effect=False),
    _o("alpha_mask", "bool", False, "Use the image's alpha channel as the loss mask (transparent = ignore).", G_DATA,
       scope="subset",
       distinct=True),
    _o("custom_attributes", "dict", None, "Free key/value table carried with the subset (sd-scripts' custom_attributes).",
       G_DATA, scope="subset", cli=False, effect=False),
    _o("bucket_log_aspect", "bool", False, "Pick the nearest bucket by |log(aspect)| instead of |aspect| (lorakit "
       "addition).", G_DATA, scope="dataset", cli=False),
    _o("reg_sampling", "str", "round_robin", "Regularization images per epoch: round_robin (sd-scripts) or random (a "
       "fresh draw each epoch; lorakit addition).", G_DATA, scope="dataset", cli=False,
       choices=("round_robin", "random")),
    _o("max_data_loader_n_workers", "int", 8, "Most DataLoader worker processes.", G_DATA, scope="general",
       check="[0,)"),
    _o("persistent_data_loader_workers", "bool", False, "Keep DataLoader workers between epochs.", G_DATA,
       scope="general", effect=False),
    _o("on_bad_image", "str", "error", "What to do with an unreadable image: stop with an error naming it, or skip it "
       "with a warning.", G_DATA, choices=("error", "skip"), scope="general"),
    _o("debug_dataset", "bool", False, "Show the dataset instead of training.", G_DATA, scope="general", effect=False),
    # --- captions ------------------------------------------------------------------------------------------------
    _o("caption_extension", "str", ".txt", "Extension of caption files beside the images. NOTE: sd-scripts defaults "
       "to '.caption' (a known trap: .txt captions were silently ignored); here the default is '.txt'.", G_CAPTION,
       scope="subset", aliases=("caption_extention",)),
    _o("shuffle_caption", "bool", False, "Shuffle the comma-separated tags each step (after the kept ones).", G_CAPTION,
       scope="subset", metadata_key="ss_shuffle_caption"),
    _o("caption_separator", "str", ",", "Tag separator of captions.", G_CAPTION, scope="subset"),
    _o("keep_tokens", "int", 0, "Keep the first N tags fixed when shuffling or dropping tags.", G_CAPTION,
       scope="subset", metadata_key="ss_keep_tokens", check="[0,)"),
    _o("keep_tokens_separator", "str", "", "Text before this separator stays fixed (instead of --keep_tokens).",
       G_CAPTION, scope="subset"),
    _o("secondary_separator", "str", None, "Separator that groups tags into one unit for shuffle/dropout, replaced "
       "by caption_separator afterwards.", G_CAPTION, scope="subset"),
    _o("enable_wildcard", "bool", False, "Expand {a|b|c} in captions to one choice per step.", G_CAPTION,
       scope="subset"),
    _o("caption_prefix", "str", None, "Text added before every caption.", G_CAPTION, scope="subset"),
    _o("caption_suffix", "str", None, "Text added after every caption.", G_CAPTION, scope="subset"),
    _o("caption_dropout_rate", "float", 0.0, "Probability of training a step with an empty caption.", G_CAPTION,
       scope="subset", metadata_key="ss_caption_dropout_rate", check="[0,1]"),
    _o("caption_dropout_every_n_epochs", "int", 0, "Drop all captions every N-th epoch.", G_CAPTION, scope="subset",
       metadata_key="ss_caption_dropout_every_n_epochs", check="[0,)"),
    _o("caption_tag_dropout_rate", "float", 0.0, "Probability of dropping each (non-kept) tag.", G_CAPTION,
       scope="subset", metadata_key="ss_caption_tag_dropout_rate", check="[0,1]"),
    _o("token_warmup_min", "int", 1, "Start with N tags and grow to the full caption.", G_CAPTION, scope="subset",
       check="[1,)"),
    _o("token_warmup_step", "number", 0, "Step at which captions reach full length (N < 1: fraction of the run).",
       G_CAPTION, scope="subset", check="[0,)"),
    _o("weighted_captions", "bool", False, "Read (tag:1.2) weights in captions (not supported yet: refused).",
       G_CAPTION, scope="general"),
    _o("max_token_length", "int", None, "Text-encoder context: 75 (default), 150 or 225 tokens.", G_CAPTION,
       choices=(None, 75, 150, 225), scope="general", metadata_key="ss_max_token_length"),
    # --- augmentation --------------------------------------------------------------------------------------------
    _o("color_aug", "bool", False, "Weak random hue/gamma change (not with cached latents).", G_AUG, scope="subset",
       metadata_key="ss_color_aug"),
    _o("flip_aug", "bool", False, "Random horizontal flips.", G_AUG, scope="subset", metadata_key="ss_flip_aug"),
    _o("random_crop", "bool", False, "Random instead of centre crop (not with cached latents).", G_AUG, scope="subset",
       metadata_key="ss_random_crop"),
    _o("face_crop_aug_range", "float_pair", None, "Face-centred crop scale range, e.g. 2.0,4.0.", G_AUG,
       scope="subset", metadata_key="ss_face_crop_aug_range"),
    # --- caching -------------------------------------------------------------------------------------------------
    _o("cache_latents", "bool", False, "Encode images once and keep the latents in memory (no color_aug/random_crop).",
       G_CACHE, metadata_key="ss_cache_latents"),
    _o("cache_latents_to_disk", "bool", False, "Also keep the latents in <stem>_<W>x<H>_<family>.npz beside the images.",
       G_CACHE),
    _o("vae_batch_size", "int", 1, "Batch size when caching latents.", G_CACHE, check="[1,)"),
    _o("skip_cache_check", "bool", False, "Trust existing cache files without checking their contents.", G_CACHE),
    _o("cache_text_encoder_outputs", "bool", False, "Encode captions once (SDXL; needs UNet-only training and no "
       "caption shuffle/dropout).", G_CACHE),
    _o("cache_text_encoder_outputs_to_disk", "bool", False, "Also keep text-encoder outputs on disk.", G_CACHE),
    # --- network -------------------------------------------------------------------------------------------------
    _o("network_module", "str", "networks.lora", "Adapter family: networks.lora (LoRA/LoCon), lycoris.kohya "
       "(use network_args algo=...), networks.dylora.", G_NET, metadata_key="ss_network_module"),
    _o("network_dim", "int", None, "Rank of the LoRA modules (default 4).", G_NET, metadata_key="ss_network_dim",
       check="[1,)"),
    _o("network_alpha", "float", 1.0, "LoRA alpha; the update is scaled by alpha/dim (sd-scripts default 1).", G_NET,
       metadata_key="ss_network_alpha"),
    _o("network_dropout", "float", None, "Dropout on the LoRA down projection's output.", G_NET,
       metadata_key="ss_network_dropout", check="[0,1)"),
    _o("network_args", "str", None, "Extra adapter arguments as key=value, e.g. conv_dim=64 conv_alpha=32 "
       "dora_wd=True blocks=IN04-IN07,OUT03-OUT06; every key, with an example, is listed under \"network_args "
       "keys\" at the end of `lorakit train --help` and in docs/training-options.md.", G_NET, nargs="*"),
    _o("network_weights", "path", None, "Start from this LoRA file.", G_NET),
    _o("dim_from_weights", "bool", False, "Take the rank from --network_weights.", G_NET),
    _o("network_train_unet_only", "bool", False, "Train only the UNet's LoRA modules.", G_NET),
    _o("train_embedding", "str", None, "Pivotal tuning: these words (usually the trigger, e.g. usu) get their own "
       "text-encoder input vectors, trained with the LoRA and saved inside it as bundled embeddings (bundle_emb.*, "
       "which A1111/Forge load with the LoRA). A new trigger word's token is one the base model never learned to "
       "read; its own vector lets the LoRA tell \"usu bear\" from \"bear\". Starts from the word's current vectors; "
       "trains even with --network_train_unet_only.", G_NET, nargs="*"),
    _o("embedding_lr", "float", None, "Learning rate of --train_embedding's vectors (default --learning_rate; "
       "textual inversion usually runs at 5e-3 to 1e-2).", G_NET, check="[0,)"),
    _o("network_train_text_encoder_only", "bool", False, "Train only the text encoders' LoRA modules.", G_NET),
    _o("unet_lr", "float", None, "UNet learning rate (default --learning_rate).", G_NET, metadata_key="ss_unet_lr",
       check="[0,)"),
    _o("text_encoder_lr", "float", None, "Text-encoder learning rate; two values for SDXL set TE1 and TE2 apart.", G_NET,
       nargs="*", metadata_key="ss_text_encoder_lr", check="[0,)"),
    _o("scale_weight_norms", "float", None, "Scale down any LoRA module whose update norm exceeds this (1 is a good "
       "start).", G_NET, metadata_key="ss_scale_weight_norms", check="(0,)"),
    _o("base_weights", "path", None, "LoRA files merged into the model before training.", G_NET, nargs="*"),
    _o("base_weights_multiplier", "float", None, "Multipliers of --base_weights.", G_NET, nargs="*"),
    _o("loraplus_lr_ratio", "float", None, "LoRA+: the lora_up weights learn this many times faster (also accepted as "
       "network_args loraplus_lr_ratio=...).", G_NET, check="(0,)"),
    _o("loraplus_unet_lr_ratio", "float", None, "LoRA+ ratio for the UNet only.", G_NET, check="(0,)"),
    _o("loraplus_text_encoder_lr_ratio", "float", None, "LoRA+ ratio for the text encoders only.", G_NET, check="(0,)"),
    _o("training_comment", "str", None, "Free text stored in the metadata.", G_NET, metadata_key="ss_training_comment"),
    _o("no_metadata", "bool", False, "Write the LoRA without ss_* metadata.", G_NET),
    # --- optimizer -----------------------------------------------------------------------------------------------
    _o("optimizer_type", "str", "", "AdamW (default), AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, PagedLion8bit, "
       "SGDNesterov, SGDNesterov8bit, DAdaptation, DAdaptAdam, DAdaptLion, DAdaptAdan, DAdaptAdanIP, DAdaptSGD, "
       "DAdaptAdaGrad, Prodigy, AdaFactor, RAdamScheduleFree, AdamWScheduleFree, SGDScheduleFree, or module.Class. "
       "Case-insensitive.", G_OPT),
    _o("use_8bit_adam", "bool", False, "Old spelling of --optimizer_type AdamW8bit.", G_OPT),
    _o("use_lion_optimizer", "bool", False, "Old spelling of --optimizer_type Lion.", G_OPT),
    _o("learning_rate", "float", 1e-4, "Base learning rate (D-Adaptation and Prodigy want 1.0). sd-scripts' default "
       "2e-6 is meant for full fine-tuning; LoRA default here is 1e-4.", G_OPT, metadata_key="ss_learning_rate",
       check="[0,)"),
    _o("optimizer_args", "str", None, "Optimizer keyword arguments as key=value with Python literals, e.g. "
       "weight_decay=0.01 betas=0.9,0.999 d0=1e-6.", G_OPT, nargs="*"),
    _o("max_grad_norm", "float", 1.0, "Clip the gradient norm to this (0: no clipping).", G_OPT,
       metadata_key="ss_max_grad_norm", check="[0,)"),
    _o("gradient_accumulation_steps", "int", 1, "Batches whose gradients add up before one optimizer step.", G_OPT,
       metadata_key="ss_gradient_accumulation_steps", check="[1,)"),
    _o("lr_scheduler", "str", "constant", "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
       "polynomial, adafactor.", G_OPT, metadata_key="ss_lr_scheduler",
       choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                "adafactor", "warmup_stable_decay", "inverse_sqrt", "cosine_with_min_lr")),
    _o("lr_scheduler_type", "str", "", "A custom scheduler class module.Class (with --lr_scheduler_args).", G_OPT),
    _o("lr_scheduler_args", "str", None, "Scheduler keyword arguments as key=value Python literals.", G_OPT, nargs="*"),
    _o("lr_warmup_steps", "int_or_ratio", 0, "Warmup: steps (int), a ratio of the run (< 1), or 'N%'.", G_OPT,
       metadata_key="ss_lr_warmup_steps", check="[0,)"),
    _o("lr_decay_steps", "int_or_ratio", 0, "Decay steps for warmup_stable_decay: steps, ratio (< 1) or 'N%'.", G_OPT,
       check="[0,)"),
    _o("lr_scheduler_num_cycles", "int", 1, "Restarts of cosine_with_restarts.", G_OPT, check="[1,)"),
    _o("lr_scheduler_power", "float", 1.0, "Power of the polynomial schedule.", G_OPT, check="(0,)"),
    _o("lr_scheduler_timescale", "int", None, "Timescale of inverse_sqrt (default: the warmup steps).", G_OPT,
       check="[1,)"),
    _o("lr_scheduler_min_lr_ratio", "float", None, "Final lr as a ratio of the initial one (cosine_with_min_lr, "
       "warmup_stable_decay).", G_OPT, check="[0,1]"),
    _o("fused_backward_pass", "bool", False, "Step the optimizer inside backward (AdaFactor only).", G_OPT, effect=False),
    # --- steps ---------------------------------------------------------------------------------------------------
    _o("max_train_steps", "int", 1600, "Optimizer steps to train (overridden by --max_train_epochs).", G_STEPS,
       metadata_key="ss_max_train_steps", check="[1,)"),
    _o("max_train_epochs", "int", None, "Epochs to train (overrides --max_train_steps).", G_STEPS, check="[1,)"),
    _o("seed", "int", None, "Random seed (a random one is drawn and recorded when unset).", G_STEPS,
       metadata_key="ss_seed", check="[0,)"),
    _o("initial_epoch", "int", None, "Start counting epochs from this number (use --resume to continue a run).",
       G_STEPS, effect=False),
    _o("initial_step", "int", None, "Start counting steps from this number (use --resume to continue a run).",
       G_STEPS, effect=False),
    _o("skip_until_initial_step", "bool", False, "Skip batches until --initial_step.", G_STEPS, effect=False),
    # --- EMA (lorakit addition) ---------------------------------------------------------------------------------
    _o("ema_decay", "float", None, "Keep an exponential moving average (EMA) of the trained weights with this decay "
       "per update, e.g. 0.999 (off when unset): ema = decay * ema + (1 - decay) * weights.", G_EMA, check="(0,1)"),
    _o("ema_warmup", "bool", False, "Ramp the EMA decay up over the first updates: min(ema_decay, (1 + n) / (10 + n)) "
       "at update n, so the average is not dominated by the initial weights.", G_EMA),
    _o("ema_update_every", "int", 1, "Update the EMA every N optimizer steps.", G_EMA, check="[1,)"),
    _o("ema_save_as", "str", "beside", "beside: write the EMA weights as {name}-ema.safetensors next to every saved "
       "LoRA; lora: the saved LoRA files hold the EMA weights (the raw weights stay in --save_state folders).", G_EMA,
       choices=("beside", "lora")),
    _o("ema_samples", "bool", False, "Render the preview images with the EMA weights.", G_EMA),
    # --- loss ----------------------------------------------------------------------------------------------------
    _o("loss_type", "str", "l2", "l2, l1, huber or smooth_l1.", G_LOSS, choices=("l1", "l2", "huber", "smooth_l1"),
       metadata_key="ss_loss_type"),
    _o("huber_schedule", "str", "snr", "How huber_c changes with the timestep: constant, exponential or snr.", G_LOSS,
       choices=("constant", "exponential", "snr"), metadata_key="ss_huber_schedule"),
    _o("huber_c", "float", 0.1, "Huber threshold c.", G_LOSS, metadata_key="ss_huber_c", check="(0,)"),
    _o("huber_scale", "float", 1.0, "Scale of the Huber threshold.", G_LOSS, metadata_key="ss_huber_scale",
       check="(0,)"),
    _o("min_snr_gamma", "float", None, "Min-SNR weighting: weight min(SNR, gamma)/SNR (5 is the paper's value).",
       G_LOSS, metadata_key="ss_min_snr_gamma", check="(0,)"),
    _o("debiased_estimation_loss", "bool", False, "Weight the loss by 1/sqrt(SNR).", G_LOSS,
       metadata_key="ss_debiased_estimation"),
    _o("scale_v_pred_loss_like_noise_pred", "bool", False, "Scale a v-prediction loss like a noise-prediction loss.",
       G_LOSS),
    _o("v_pred_like_loss", "float", None, "Add a v-prediction-like loss times this.", G_LOSS, check="[0,)"),
    _o("masked_loss", "bool", False, "Weight the loss by a mask: mask images in conditioning_data_dir (required for "
       "those), or the alpha channel of subsets with alpha_mask (applied with or without this flag, as in "
       "sd-scripts).", G_LOSS),
    _o("prior_loss_weight", "float", 1.0, "Loss weight of regularization images.", G_LOSS, scope="dataset",
       metadata_key="ss_prior_loss_weight", check="[0,)"),
    # --- noise ---------------------------------------------------------------------------------------------------
    _o("noise_offset", "float", None, "Add per-channel constant noise of this strength (about 0.1).", G_NOISE,
       metadata_key="ss_noise_offset", check="[0,)"),
    _o("noise_offset_random_strength", "bool", False, "Draw the offset strength uniformly in [0, noise_offset].",
       G_NOISE, metadata_key="ss_noise_offset_random_strength"),
    _o("adaptive_noise_scale", "float", None, "Add |latent mean| * this to noise_offset.", G_NOISE,
       metadata_key="ss_adaptive_noise_scale"),
    _o("multires_noise_iterations", "int", None, "Pyramid (multi-resolution) noise levels (6-10).", G_NOISE,
       metadata_key="ss_multires_noise_iterations", check="[1,)"),
    _o("multires_noise_discount", "float", 0.3, "Weight decay per pyramid level.", G_NOISE,
       metadata_key="ss_multires_noise_discount", check="[0,1]"),
    _o("ip_noise_gamma", "float", None, "Input-perturbation noise strength (about 0.1).", G_NOISE,
       metadata_key="ss_ip_noise_gamma", check="[0,)"),
    _o("ip_noise_gamma_random_strength", "bool", False, "Draw the perturbation strength in [0, ip_noise_gamma].",
       G_NOISE, metadata_key="ss_ip_noise_gamma_random_strength"),
    _o("zero_terminal_snr", "bool", False, "Rescale betas so the last timestep has zero SNR (on by itself for "
       "checkpoints with a `ztsnr` key, e.g. NoobAI-XL v-pred).", G_NOISE,
       metadata_key="ss_zero_terminal_snr"),
    _o("timestep_sampling", "str", "sigma", "FLUX.1: how noise levels are drawn: sigma (the shifted training "
       "schedule), uniform, sigmoid, shift (sigmoid then --discrete_flow_shift) or flux_shift (by image size).",
       G_NOISE, choices=("sigma", "uniform", "sigmoid", "shift", "flux_shift")),
    _o("sigmoid_scale", "float", 1.0, "FLUX.1: scale of the normal draw inside sigmoid/shift/flux_shift sampling.",
       G_NOISE, check="(0,)"),
    _o("discrete_flow_shift", "float", 3.0, "FLUX.1: the flow shift k of sigma and shift sampling "
       "(s -> k s / (1 + (k - 1) s)).", G_NOISE, check="(0,)"),
    _o("model_prediction_type", "str", "sigma_scaled", "FLUX.1: how the prediction is compared with the velocity "
       "target: raw (recommended), additive (+ noisy input) or sigma_scaled (noisy input - sigma x prediction, "
       "sd-scripts' default).", G_LOSS, choices=("raw", "additive", "sigma_scaled")),
    _o("guidance_scale", "float", 3.5, "FLUX.1-dev: the distilled-guidance value the transformer is given while "
       "training (sd-scripts' FLUX guide uses 1.0).", G_LOSS),
    _o("weighting_scheme", "str", "uniform", "FLUX.1: SD3's weighting schemes as sd-scripts applies them: "
       "logit_normal or mode shape the draws of --timestep_sampling sigma; sigma_sqrt or cosmap weight the loss of "
       "--model_prediction_type sigma_scaled; uniform/none: neither.", G_NOISE,
       choices=("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")),
    _o("logit_mean", "float", 0.0, "FLUX.1: mean of the normal draw of --weighting_scheme logit_normal.", G_NOISE),
    _o("logit_std", "float", 1.0, "FLUX.1: std of the normal draw of --weighting_scheme logit_normal.", G_NOISE,
       check="(0,)"),
    _o("mode_scale", "float", 1.29, "FLUX.1: scale s of --weighting_scheme mode (u -> 1 - u - s (cos^2(pi u/2) - 1 "
       "+ u)).", G_NOISE),
    _o("min_timestep", "int", None, "Smallest timestep sampled (0-999, default 0).", G_NOISE, check="[0,999]"),
    _o("max_timestep", "int", None, "Largest timestep sampled, exclusive (1-1000, default 1000).", G_NOISE,
       check="[1,1000]"),
    # --- precision and memory ------------------------------------------------------------------------------------
    _o("mixed_precision", "str", "no", "no, fp16 (with loss scaling) or bf16. A CPU without bf16/fp16 instructions "
       "(AVX2-only) computes them tens of times slower than fp32: the run warns before loading.", G_PREC,
       choices=("no", "fp16", "bf16"), metadata_key="ss_mixed_precision"),
    _o("full_fp16", "bool", False, "Keep LoRA weights and gradients in fp16 (refused where it cannot learn).", G_PREC,
       metadata_key="ss_full_fp16"),
    _o("full_bf16", "bool", False, "Keep LoRA weights and gradients in bf16 (refused where it cannot learn).", G_PREC),
    _o("fp8_base", "bool", False, "Store the frozen base model in fp8 (needs a GPU with fp8 support).", G_PREC,
       metadata_key="ss_fp8_base"),
    _o("fp8_base_unet", "bool", False, "fp8 for the UNet only.", G_PREC, metadata_key="ss_fp8_base_unet"),
    _o("blocks_to_swap", "int", None, "FLUX.1: keep N of the transformer's blocks in CPU memory and move them to "
       "the device in turn during forward and backward (sd-scripts' split: N // 2 double and 2 (N - N // 2) single "
       "blocks; at most 35). Each N keeps about 0.58 GiB of bf16 weights (0.29 in fp8) off the device, at the "
       "cost of speed; --fp8_base --blocks_to_swap 18 with cached text-encoder outputs predicts about 10 GiB at 1024 "
       "px.",
       G_PREC, check="[0,)"),
    _o("gradient_checkpointing", "bool", False, "Recompute activations in backward to save memory.", G_PREC,
       metadata_key="ss_gradient_checkpointing"),
    _o("estimate_memory", "bool", False, "Print the predicted peak memory of a training step (weights, network, "
       "gradients, optimizer state, activations, caches) and what each memory option would change, then exit "
       "without loading the model.", G_PREC),
    _o("max_memory", "str", None, "Memory budget of a training step, e.g. 8GB or 7.5GiB (default: the device's free "
       "memory; 'off': no check). A run whose predicted peak exceeds it stops before loading the model and lists "
       "the changes that would fit.", G_PREC),
    _o("auto_fit", "bool", False, "When the predicted peak exceeds --max_memory, apply the smallest set of memory "
       "options that fits (gradient checkpointing, cached latents, bf16, fp8 base, cached text-encoder outputs, "
       "smaller batch with more accumulation, lower resolution) and say which.", G_PREC),
    _o("xformers", "bool", False, "Memory-efficient attention (xformers if installed, else PyTorch SDPA).", G_PREC),
    _o("mem_eff_attn", "bool", False, "Memory-efficient attention (PyTorch SDPA is always used here).", G_PREC,
       effect=False),
    _o("sdpa", "bool", False, "PyTorch scaled-dot-product attention (always used here).", G_PREC, effect=False),
    _o("no_half_vae", "bool", False, "Keep the VAE in fp32 under mixed precision (SDXL's VAE overflows in fp16).",
       G_PREC),
    _o("lowram", "bool", False, "Load models straight to the GPU (models are loaded without a second copy here).",
       G_PREC, metadata_key="ss_lowram", effect=False),
    _o("highvram", "bool", False, "Skip cache clearing between latent batches.", G_PREC, effect=False),
    _o("cpu_offload_checkpointing", "bool", False, "Offload checkpointed activations to CPU.", G_PREC, effect=False),
    _o("torch_compile", "bool", False, "torch.compile the UNet.", G_PREC, effect=False),
    _o("dynamo_backend", "str", "inductor", "torch.compile backend.", G_PREC, effect=False),
    # --- output --------------------------------------------------------------------------------------------------
    _o("output_dir", "path", None, "Folder for LoRA files and states.", G_OUT),
    _o("output_name", "str", None, "File stem of the LoRA (default 'last').", G_OUT, metadata_key="ss_output_name"),
    _o("save_model_as", "str", "safetensors", "safetensors (ckpt/pt accepted: saved as safetensors).", G_OUT,
       choices=("safetensors", "ckpt", "pt")),
    _o("save_precision", "str", None, "Dtype of the saved LoRA: float, fp16 or bf16 (default: as trained).", G_OUT,
       choices=(None, "float", "fp16", "bf16")),
    _o("save_every_n_epochs", "int", None, "Save a LoRA every N epochs ({name}-{epoch:06d}).", G_OUT, check="[1,)"),
    _o("save_every_n_steps", "int", None, "Save a LoRA every N steps ({name}-step{step:08d}).", G_OUT, check="[1,)"),
    _o("save_n_epoch_ratio", "int", None, "Save at least N LoRAs over the run.", G_OUT, check="[1,)"),
    _o("save_last_n_epochs", "int", None, "Keep only the last N epoch saves.", G_OUT, check="[1,)"),
    _o("save_last_n_epochs_state", "int", None, "Keep only the last N epoch states.", G_OUT, check="[1,)"),
    _o("save_last_n_steps", "int", None, "Remove step saves older than N steps.", G_OUT, check="[1,)"),
    _o("save_last_n_steps_state", "int", None, "Remove step states older than N steps.", G_OUT, check="[1,)"),
    _o("save_state", "bool", False, "Save the full training state with each LoRA save (for --resume).", G_OUT),
    _o("save_state_on_train_end", "bool", False, "Save the training state when the run ends.", G_OUT),
    _o("resume", "path", None, "Resume exactly from a saved state folder.", G_OUT),
    _o("use_safetensors", "bool", False, "Save as safetensors (always, here).", G_OUT, effect=False),
    # --- metadata (ModelSpec) ------------------------------------------------------------------------------------
    _o("metadata_title", "str", None, "modelspec.title (default: output_name).", G_META),
    _o("metadata_author", "str", None, "modelspec.author.", G_META),
    _o("metadata_description", "str", None, "modelspec.description.", G_META),
    _o("metadata_license", "str", None, "modelspec.license.", G_META),
    _o("metadata_tags", "str", None, "modelspec.tags (comma separated).", G_META),
    _o("metadata_usage_hint", "str", None, "modelspec.usage_hint.", G_META),
    _o("metadata_thumbnail", "str", None, "modelspec.thumbnail (data URI).", G_META),
    _o("metadata_merged_from", "str", None, "modelspec.merged_from.", G_META),
    _o("metadata_trigger_phrase", "str", None, "modelspec.trigger_phrase.", G_META),
    _o("metadata_preprocessor", "str", None, "modelspec.preprocessor.", G_META),
    _o("metadata_is_negative_embedding", "str", None, "modelspec.is_negative_embedding.", G_META),
    # --- logging -------------------------------------------------------------------------------------------------
    _o("logging_dir", "path", None, "Write TensorBoard logs under this folder.", G_LOG),
    _o("log_with", "str", None, "tensorboard, wandb or all (wandb is not bundled).", G_LOG,
       choices=(None, "tensorboard", "wandb", "all")),
    _o("log_prefix", "str", None, "Prefix of the log folder name.", G_LOG),
    _o("log_tracker_name", "str", None, "Tracker run name.", G_LOG, effect=False),
    _o("log_tracker_config", "path", None, "Tracker config file.", G_LOG, effect=False),
    _o("log_config", "bool", False, "Print the options that differ from the defaults when training starts.", G_LOG),
    _o("wandb_run_name", "str", None, "wandb run name.", G_LOG, effect=False),
    _o("wandb_api_key", "str", None, "wandb key (never written to --output_config).", G_LOG, effect=False),
    _o("console_log_level", "str", None, "Console log level.", G_LOG,
       choices=(None, "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), effect=False),
    _o("console_log_file", "path", None, "Also write the run's log lines to this file.", G_LOG),
    _o("console_log_simple", "bool", False, "Plain console logs.", G_LOG, effect=False),
    # --- sampling ------------------------------------------------------------------------------------------------
    _o("sample_prompts", "path", None, "Prompt file for preview images (one per line; --n --w --h --d --l --s --ss).",
       G_SAMPLE),
    _o("sample_every_n_steps", "int", None, "Preview images every N steps.", G_SAMPLE, check="[1,)"),
    _o("sample_every_n_epochs", "int", None, "Preview images every N epochs (overrides steps).", G_SAMPLE,
       check="[1,)"),
    _o("sample_at_first", "bool", False, "Preview images before training.", G_SAMPLE),
    _o("sample_sampler", "str", "ddim", "Sampler of the previews.", G_SAMPLE,
       choices=("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")),
    # checkpoint evaluation during training (lorakit.eval.training; issue 17)
    _o("eval_every_n_epochs", "int", None, "Score the LoRA saved every N epochs and the final one like `lorakit "
       "eval` (concept recall, prompt adherence, prior drift, memorisation; needs --eval_tagger); results and the "
       "recommended file go to <output_name>_eval.json/.png. Saves a LoRA at those epochs if --save_every_n_epochs "
       "would not.", G_SAMPLE, check="[1,)"),
    _o("eval_every_n_steps", "int", None, "The same every N steps (--eval_every_n_epochs wins when both are given).",
       G_SAMPLE, check="[1,)"),
    _o("eval_tagger", "str", None, "What reads the eval samples: a WD14 tagger folder (model.onnx + "
       "selected_tags.csv), or 'toy' for the toy world's attribute classifier.", G_SAMPLE),
    _o("eval_core_tags", "str", None, "The concept's tags for eval, comma-separated (default: the tags in 75% of "
       "the training images, from captions and the tagger).", G_SAMPLE),
    _o("eval_seeds", "int", 8, "Eval samples per prompt (8 prompts: 64 samples per checkpoint).", G_SAMPLE,
       check="[1,)"),
    # --- misc ----------------------------------------------------------------------------------------------------
    _o("config_file", "path", None, "TOML file of these options (sd-scripts format; sections are flattened).", G_MISC),
    _o("output_config", "bool", False, "Write the resolved options to --config_file and exit.", G_MISC),
    _o("num_cpu_threads_per_process", "int", None, "CPU threads of torch in this run (torch.set_num_threads; "
       "--num_threads is the short name). sd-scripts passes it to `accelerate launch`; here it takes effect. A "
       "state folder records the count and --resume uses it again unless this is given: float sums are split by "
       "thread count, so only the same count resumes bit for bit. Default: torch's (the machine's cores).", G_MISC,
       aliases=("num_threads",), check="[1,)"),
    _o("ddp_timeout", "int", None, "Multi-process timeout in minutes.", G_MISC, check="[1,)"),
    _o("ddp_gradient_as_bucket_view", "bool", False, "DDP gradient_as_bucket_view (gradients are all-reduced "
       "directly here).", G_MISC, effect=False),
    _o("ddp_static_graph", "bool", False, "DDP static_graph.", G_MISC, effect=False),
    _o("deepspeed", "bool", False, "DeepSpeed training.", G_MISC, effect=False),
    _o("huggingface_repo_id", "str", None, "Upload target.", G_MISC, effect=False),
    _o("huggingface_repo_type", "str", None, "Upload repo type.", G_MISC, effect=False),
    _o("huggingface_path_in_repo", "str", None, "Upload path.", G_MISC, effect=False),
    _o("huggingface_token", "str", None, "Upload token.", G_MISC, effect=False),
    _o("huggingface_repo_visibility", "str", None, "Upload visibility.", G_MISC, effect=False),
    _o("save_state_to_huggingface", "bool", False, "Upload states.", G_MISC, effect=False),
    _o("resume_from_huggingface", "bool", False, "Resume from an uploaded state.", G_MISC, effect=False),
    _o("async_upload", "bool", False, "Upload in the background.", G_MISC, effect=False),
]

OPTIONS_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
_FLAG_TO_OPTION: dict[str, Option] = {}
for _opt in OPTIONS:
    for _n in (_opt.name, *_opt.aliases):
        assert _n not in _FLAG_TO_OPTION, _n
        _FLAG_TO_OPTION[_n] = _opt
# keys never written by --output_config
_NOT_WRITTEN = {"config_file", "output_config", "wandb_api_key", "huggingface_token"}


def get_option(name: str) -> Option:
    """The option named `name` (or one of its aliases)."""
    return _FLAG_TO_OPTION[name]


def options_in_group(group: str) -> list[Option]:
    return [o for o in OPTIONS if o.group == group]


def groups() -> list[str]:
    return list(dict.fromkeys(o.group for o in OPTIONS))


def dataset_config_keys(level: str) -> dict[str, Option]:
    """Keys allowed at `level` of a --dataset_config TOML: "general", "dataset" or "subset" -> {toml key: Option}.

    A subset key may also be set at [[datasets]] and [general] (inherited), except distinct ones (image_dir...).
    A dataset key may be set at [[datasets]] and [general].
    """
    if level not in ("general", "dataset", "subset"):
        raise ValueError(level)
    out: dict[str, Option] = {}
    for o in OPTIONS:
        key = o.config_name or o.name
        if o.scope == "subset" and (level == "subset" or not o.distinct):
            out[key] = o
        elif o.scope == "dataset" and level in ("general", "dataset"):
            out[key] = o
    return out


# ---- value parsing --------------------------------------------------------------------------------------------------


def parse_int_or_ratio(value: str | int | float) -> int | float:
    """sd-scripts' warmup value: "N%" -> N/100, a number >= 1 -> int steps, a number < 1 -> float ratio."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of steps, a ratio or a percentage")
    if isinstance(value, (int, float)):
        return int(value) if value >= 1 else float(value)
    text = str(value).strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    number = float(text)
    if number >= 1:
        if number != int(number):
            raise ValueError(f"{value!r}: steps must be a whole number (or a ratio below 1, or 'N%')")
        return int(number)
    return number


def parse_resolution(value: Any) -> tuple[int, int] | None:
    """'512' | '768,512' | 512 | [768, 512] -> (width, height)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a resolution")
    if isinstance(value, float) and value.is_integer():  # TOML 512.0
        value = int(value)
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [p.strip() for p in str(value).replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"{value!r} is not 'SIZE' or 'WIDTH,HEIGHT'")
    w, h = (int(p) for p in parts)
    if w <= 0 or h <= 0:
        raise ValueError(f"{value!r}: sides must be positive")
    return (w, h)


def parse_float_pair(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    parts = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    if len(parts) != 2:
        raise ValueError(f"{value!r} is not two numbers 'a,b'")
    return (float(parts[0]), float(parts[1]))


def _interval(spec: str) -> tuple[float | None, bool, float | None, bool]:
    """"[1,)" -> (1, True, None, False): low, low included, high, high included."""
    lo, hi = spec[1:-1].split(",")
    return (float(lo) if lo else None, spec[0] == "[", float(hi) if hi else None, spec[-1] == "]")


def range_problem(o: Option, value: Any) -> str | None:
    """Why `value` is outside the option's allowed range (Option.check), or None; lists check each item."""
    if o.check is None or value is None:
        return None
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        lo, lo_in, hi, hi_in = _interval(o.check)
        if not math.isfinite(v) or (lo is not None and (v < lo or (v == lo and not lo_in))) or \
                (hi is not None and (v > hi or (v == hi and not hi_in))):
            def num(x):
                return f"{x:g}"

            if hi is None:
                want = f"at least {num(lo)}" if lo_in else f"above {num(lo)}"
            elif lo is None:
                want = f"at most {num(hi)}" if hi_in else f"below {num(hi)}"
            else:
                want = (f"between {num(lo)} and {num(hi)}" + ("" if lo_in and hi_in else
                        f" ({' and '.join(x for x, inc in ((num(lo), lo_in), (num(hi), hi_in)) if not inc)} "
                        "excluded)"))
            return f"{v:g} is out of range: {'--' if o.cli else ''}{o.name} must be {want}. {o.help}"
    return None


def check_ranges(ns: argparse.Namespace | dict) -> None:
    """UserError for the first option value outside its range (values set in code bypass the parsers' checks)."""
    for o in OPTIONS:
        problem = range_problem(o, ns.get(o.name) if isinstance(ns, dict) else getattr(ns, o.name, None))
        if problem:
            raise UserError(problem)


def _cli_converter(o: Option):
    def bad(text, exc):
        raise argparse.ArgumentTypeError(f"--{o.name}: {text!r} is not a valid {o.type} ({exc})")

    def conv(text: str):
        value = _convert_text(text)
        problem = range_problem(o, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    def _convert_text(text: str):
        try:
            if o.type in ("str", "path"):
                return text
            if o.type == "int":
                return int(text)
            if o.type == "float":
                return float(text)
            if o.type == "number":
                f = float(text)
                return int(f) if f.is_integer() and "." not in text and "e" not in text.lower() else f
            if o.type == "int_or_ratio":
                return parse_int_or_ratio(text)
            if o.type == "resolution":
                parse_resolution(text)  # validate; keep the user's text like sd-scripts does
                return text
            if o.type == "float_pair":
                parse_float_pair(text)
                return text
        except (ValueError, TypeError) as exc:
            bad(text, exc)
        raise AssertionError(o.type)

    conv.__name__ = o.type
    return conv


def coerce_value(o: Option, value: Any, source: str) -> Any:
    """Check and convert a value read from a TOML file (`source` names the file) for option `o`.

    TOML keeps types, so a wrong one (a string for an int, a number for a flag) is a UserError naming key and file.
    List options take a list or one scalar (sd-scripts configs write both).
    """
    where = f"'{o.config_name or o.name}' in {source}"

    def fail(expect: str):
        raise UserError(f"{where} is {value!r} ({type(value).__name__}); expected {expect}. "
                        f"Help: {o.help}")

    def one(v):
        t = o.type
        if v is None:
            return None
        if t in ("str", "path"):
            if isinstance(v, str):
                return v
            if t == "str" and isinstance(v, (int, float)) and not isinstance(v, bool) and o.is_list:
                return str(v)
            fail("a string")
        if t == "bool":
            if isinstance(v, bool):
                return v
            fail("true or false")
        if t == "dict":
            if isinstance(v, dict):
                return v
            fail("a table")
        if t == "int":
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, float) and v.is_integer():
                return int(v)
            fail("a whole number")
        if t in ("float", "number"):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v) if t == "float" else v
            if isinstance(v, str):
                try:
                    return float(v)
                except ValueError:
                    pass
            fail("a number")
        try:
            if t == "int_or_ratio":
                return parse_int_or_ratio(v)
            if t == "resolution":
                parse_resolution(v)
                return v if not isinstance(v, list) else ",".join(str(x) for x in v)
            if t == "float_pair":
                parse_float_pair(v)
                return v if not isinstance(v, list) else ",".join(str(x) for x in v)
        except (ValueError, TypeError) as exc:
            raise UserError(f"{where}: {exc}. Help: {o.help}") from None
        raise AssertionError(t)

    def ranged(v):
        problem = range_problem(o, v)
        if problem:
            raise UserError(f"{where}: {problem}")
        return v

    if o.is_list:
        items = value if isinstance(value, list) else [value]
        return ranged([one(v) for v in items])
    if isinstance(value, list) and o.type not in ("resolution", "float_pair"):
        fail(f"one {o.type}, not a list")
    if o.choices is not None:
        v = one(value)
        if v not in o.choices:
            raise UserError(f"{where} is {value!r}; choose one of {', '.join(str(c) for c in o.choices if c)}.")
        return v
    return ranged(one(value))


# ---- argparse -------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UserErrors (the CLI prints them; tests can catch them)."""

    def error(self, message):  # noqa: D401
        raise UserError(f"{message} (see `{self.prog} --help`)")


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option] | None = None) -> None:
    """Add every command-line option of the schema to `parser`, grouped, with defaults SUPPRESSed.

    Suppressed defaults let `resolve()` tell what the user typed from what a config file or the default gave.
    """
    grp_objs: dict[str, Any] = {}
    for o in options if options is not None else OPTIONS:
        if not o.cli:
            continue
        grp = grp_objs.get(o.group)
        if grp is None:
            grp = grp_objs[o.group] = parser.add_argument_group(o.group)
        default_txt = "" if o.default in (None, "", False) else f" (default: {o.default})"
        kw: dict[str, Any] = {"dest": o.name, "default": argparse.SUPPRESS,
                              "help": (o.help + default_txt).replace("%", "%%")}
        if o.type == "bool":
            grp.add_argument(*o.flags, action="store_true", **kw)
            continue
        kw["type"] = _cli_converter(o)
        kw["metavar"] = o.type.upper()
        if o.nargs:
            kw["nargs"] = o.nargs
        if o.choices is not None:
            kw["choices"] = [c for c in o.choices if c is not None]
            kw.pop("metavar")
        grp.add_argument(*o.flags, **kw)
    if "network" in grp_objs:  # every --network_args key with an example (lorakit.option_docs)
        from lorakit.option_docs import network_args_help

        parser.add_argument_group("network_args keys", network_args_help().replace("%", "%%"))
        if parser.formatter_class is argparse.HelpFormatter:
            parser.formatter_class = _LineHelpFormatter


class _LineHelpFormatter(argparse.HelpFormatter):
    """Keeps the line breaks of a group description (the network_args list); each line is wrapped on its own."""

    def _fill_text(self, text, width, indent):
        import textwrap

        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        out = []
        for line in text.splitlines():
            lead = line[:len(line) - len(line.lstrip())]
            out.append(textwrap.fill(line.strip(), width, initial_indent=indent + lead,
                                     subsequent_indent=indent + lead + "    ") if line.strip() else "")
        return "\n".join(out)


def build_parser(prog: str = "lorakit train", description: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    add_options(parser)
    return parser


def suggest(name: str, candidates: Iterable[str] | None = None) -> str | None:
    """The nearest known option name to `name` (difflib), or None."""
    pool = list(candidates) if candidates is not None else list(_FLAG_TO_OPTION)
    found = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    return found[0] if found else None


def _unknown_flag_error(tokens: Sequence[str]) -> UserError:
    msgs = []
    for tok in tokens:
        if tok.startswith("-"):
            name = tok.lstrip("-").split("=", 1)[0]
            hint = suggest(name)
            msgs.append(f"unknown option '--{name}'" + (f"; did you mean '--{hint}'?" if hint else "."))
    if not msgs:
        msgs.append(f"unexpected argument(s) {' '.join(tokens)!r} (every value follows its --flag)")
    return UserError("; ".join(msgs))


def strip_launcher(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Drop a leading `accelerate launch [opts] train_network.py` so seed command lines run as written.

    Launcher options that are also options here (--num_cpu_threads_per_process, --mixed_precision) are kept in
    front of the script's own flags (which win). Returns the flags and what the prefix implies
    (`sdxl_train_network.py` -> {"sdxl": True}).
    """
    argv = list(argv)
    implied: dict[str, Any] = {}
    script = next((i for i, tok in enumerate(argv) if tok.endswith(".py") and not tok.startswith("-")
                   and (i == 0 or not argv[i - 1].startswith("--") or "=" in argv[i - 1]
                        or argv[i - 1] in ("--num_cpu_threads_per_process",))), None)
    if script is None:
        return argv, implied
    start = next((i for i, tok in enumerate(argv[:script]) if tok in ("accelerate", "python", "python3")), script)
    head, argv = argv[:start], argv[start:]
    script -= start
    if os.path.basename(argv[script]).startswith("sdxl_"):
        implied["sdxl"] = True
    kept: list[str] = []
    prefix = argv[:script]
    i = 0
    while i < len(prefix):
        tok = prefix[i]
        i += 1
        if not tok.startswith("--"):
            continue
        name, eq, value = tok[2:].partition("=")
        if not eq and i < len(prefix) and not prefix[i].startswith("-"):
            value, eq = prefix[i], "="
            i += 1
        o = _FLAG_TO_OPTION.get(name)
        if o is not None and o.cli:
            kept.append(f"--{name}" if o.type == "bool" else f"--{name}={value}")
    return head + kept + argv[script + 1:], implied


# ---- config files ---------------------------------------------------------------------------------------------------


def _config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.suffix == ".toml" else p.with_name(p.name + ".toml")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a `--config_file` TOML of flags: sections are flattened (sd-scripts does the same), values validated.

    Returns {option name: value}. Unknown keys and wrong types raise UserError naming the key and the file.
    """
    from lorakit.train.config_files import read_toml

    p = _config_path(path)
    if not p.exists():
        raise UserError(f"Config file {p} does not exist (--config_file).")
    data = read_toml(p)
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for k2, v2 in value.items():
                flat[k2] = (v2, f"{p} [{key}]")
        else:
            flat[key] = (value, str(p))
    out: dict[str, Any] = {}
    for key, (value, where) in flat.items():
        o = _FLAG_TO_OPTION.get(key)
        if o is None:
            hint = suggest(key)
            raise UserError(f"Unknown option '{key}' in {where}" + (f"; did you mean '{hint}'?" if hint else ".")
                            + " A --config_file holds command-line option names (dataset folders belong in "
                              "--dataset_config).")
        if not o.cli:
            raise UserError(f"'{key}' in {where} only exists inside a --dataset_config subset, not in --config_file.")
        out[o.name] = coerce_value(o, value, where)
    return out


def defaults() -> dict[str, Any]:
    return {o.name: (list(o.default) if isinstance(o.default, list) else o.default) for o in OPTIONS if o.cli}


def resolve(argv: Sequence[str] | None = None, *, parser: argparse.ArgumentParser | None = None,
            config: dict[str, Any] | None = None) -> argparse.Namespace:
    """Parse `argv` into one Namespace with every option: command line > --config_file > defaults.

    The Namespace also carries `_given` (names set on the command line or in the config file) and `_sources`
    ({name: "cli"|"config"}) so metadata and --output_config can tell chosen values from defaults.
    """
    argv, implied = strip_launcher(list(argv) if argv is not None else [])
    parser = parser or build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise _unknown_flag_error(unknown)
    cli = {k: v for k, v in vars(ns).items() if k in OPTIONS_BY_NAME}
    return resolve_given({**implied, **cli}, config=config)


def resolve_given(cli: dict[str, Any], *, config: dict[str, Any] | None = None) -> argparse.Namespace:
    """Merge values typed on the command line (`cli`, already converted) over --config_file and defaults."""
    cfg: dict[str, Any] = dict(config or {})
    if cli.get("config_file") and not cli.get("output_config"):
        cfg.update(load_config_file(cli["config_file"]))
    values = defaults()
    sources: dict[str, str] = {}
    for k, v in cfg.items():
        values[k] = v
        sources[k] = "config"
    for k, v in cli.items():
        values[k] = v
        sources[k] = "cli"
    out = argparse.Namespace(**values)
    out._sources = sources
    out._given = set(sources)
    return out


class SuggestingParser(argparse.ArgumentParser):
    """A (sub)parser for these options that strips an `accelerate launch ... train_network.py` prefix and answers an
    unknown flag with the nearest known one (printed like argparse's own errors, exit status 2)."""

    def parse_known_args(self, args=None, namespace=None):
        import sys

        argv, implied = strip_launcher(list(sys.argv[1:] if args is None else args))
        ns, extras = super().parse_known_args(argv, namespace)
        if extras:
            self.error(str(_unknown_flag_error(extras)))
        for k, v in implied.items():
            if not hasattr(ns, k):
                setattr(ns, k, v)
        return ns, []

    def error(self, message):
        import sys

        # the full usage of ~200 options buries the message: print the message and where help is
        print(f"{self.prog}: error: {message}\n(see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def given_from_namespace(ns: argparse.Namespace) -> dict[str, Any]:
    """The option values present in a Namespace parsed with SUPPRESSed defaults (what the user typed)."""
    return {k: v for k, v in vars(ns).items() if k in OPTIONS_BY_NAME}


def given_values(ns: argparse.Namespace) -> dict[str, Any]:
    """Options whose value differs from the default (what sd-scripts' --output_config writes)."""
    d = defaults()
    return {k: getattr(ns, k) for k in d if k not in _NOT_WRITTEN and getattr(ns, k, d[k]) != d[k]}


def write_config_file(ns: argparse.Namespace, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """--output_config: write the non-default options as a flat TOML (refuses to overwrite, like sd-scripts)."""
    from lorakit.train.config_files import write_toml

    p = _config_path(path)
    if p.exists() and not overwrite:
        raise UserError(f"{p} already exists; --output_config will not overwrite it. Choose another --config_file.")
    write_toml(p, given_values(ns))
    return p


# ---- the options of a run ------------------------------------------------------------------------------------------


_ANNOTATIONS = {"str": "str | None", "path": "str | None", "int": "int | None", "float": "float | None",
                "bool": "bool", "int_or_ratio": "int | float", "resolution": "str | tuple[int, int] | None",
                "float_pair": "str | tuple[float, float] | None", "number": "int | float", "dict": "dict | None"}


def annotation(o: Option) -> str:
    """The Python type of an option's values, as a string (for classes generated from the schema)."""
    return "list | None" if o.is_list else _ANNOTATIONS[o.type]


def _options_class():
    fields = [(o.name, annotation(o), dataclasses.field(default=None)) for o in OPTIONS if o.cli]
    fields += [("_given", "frozenset[str]", dataclasses.field(default=frozenset())),
               ("_sources", "dict[str, str]", dataclasses.field(default_factory=dict))]
    return dataclasses.make_dataclass("Options", fields, frozen=True, eq=False, namespace={
        "__module__": __name__,
        "__doc__": "Every command-line option of the schema, resolved and frozen: the values one run reads."})


Options = _options_class()


def normalize(ns: Any) -> Any:
    """The frozen `Options` of a run, from a resolved Namespace (or anything with the option attributes; missing ones
    take their defaults). Flags implied by others are set here, once: *_to_disk caches imply the cache. Values the
    run derives later (a drawn seed, the family's resolution, a rank read from weights) live in the run's own
    values, never in the options."""
    if isinstance(ns, Options):
        return ns
    fallback = defaults()
    values = {o.name: getattr(ns, o.name, fallback[o.name]) for o in OPTIONS if o.cli}
    values["cache_latents"] = values["cache_latents"] or values["cache_latents_to_disk"]
    values["cache_text_encoder_outputs"] = (values["cache_text_encoder_outputs"]
                                            or values["cache_text_encoder_outputs_to_disk"])
    return Options(**values, _given=frozenset(getattr(ns, "_given", ())), _sources=dict(getattr(ns, "_sources", {})))


# ---- metadata -------------------------------------------------------------------------------------------------------


def _ss_str(value: Any) -> str:
    return str(value)


def ss_metadata(ns: argparse.Namespace, **computed: Any) -> dict[str, str]:
    """The ss_* values sd-scripts writes for these options, as strings (str(value), so None -> "None").

    `computed` overrides values known only at run time: max_train_steps (after --max_train_epochs),
    optimizer (the "module.Class(k=v,...)" string), resolution (the (w, h) tuple), text_encoder_lr...
    Keys about the dataset and the run (ss_num_train_images, ss_tag_frequency, timestamps...) come from the trainer.
    """
    md: dict[str, Any] = {}
    for o in OPTIONS:
        if o.metadata_key is None:
            continue
        v = getattr(ns, o.name, o.default)
        if o.name == "resolution":
            v = parse_resolution(v)
        elif o.name == "text_encoder_lr":
            # sd-scripts: one value -> that float, none -> None, several -> the list
            v = None if not v else (v[0] if len(v) == 1 else list(v))
        elif o.name in ("pretrained_model_name_or_path", "vae"):
            if v is None:
                continue
            v = os.path.basename(str(v).rstrip("/\\")) if os.path.exists(str(v)) else v
        elif o.name == "face_crop_aug_range" and v is not None:
            v = parse_float_pair(v)
        elif o.type == "bool":
            v = bool(v)
        elif o.name == "training_comment" and v is None:
            v = None
        md[o.metadata_key] = v
    if getattr(ns, "network_args", None):
        md["ss_network_args"] = json.dumps(network_args_dict(ns.network_args))
    md["ss_optimizer"] = getattr(ns, "optimizer_type", "") or "AdamW"
    for k, v in computed.items():
        key = k if k.startswith("ss_") else "ss_" + k
        md[key] = v
    return {k: _ss_str(v) for k, v in md.items()}


def network_args_dict(items: Sequence[str] | None) -> dict[str, str]:
    """["conv_dim=64", "algo=lora"] -> {"conv_dim": "64", "algo": "lora"} (values stay strings, like sd-scripts)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--network_args item {item!r} is not key=value (e.g. conv_dim=64).")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def effective_max_train_steps(ns: argparse.Namespace, batches_per_epoch: int) -> int:
    """sd-scripts: --max_train_epochs overrides --max_train_steps (epochs * ceil(batches / accumulation))."""
    per_epoch = math.ceil(batches_per_epoch / max(1, ns.gradient_accumulation_steps))
    if ns.max_train_epochs:
        return ns.max_train_epochs * per_epoch
    return ns.max_train_steps


def option_table_markdown() -> str:
    """The docs' option table, generated from the schema."""
    lines = ["| option | type | default | scope | help |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        t = o.type + ("[]" if o.is_list else "")
        name = "--" + o.name if o.cli else o.name
        lines.append(f"| `{name}` | {t} | {o.default!r} | {o.scope} | {o.help.replace('|', '/')} |")
    return "\n".join(lines)


__all__ = [
    "Option", "OPTIONS", "OPTIONS_BY_NAME", "NO_EFFECT", "get_option", "options_in_group", "groups",
    "dataset_config_keys", "parse_int_or_ratio", "parse_resolution", "parse_float_pair", "coerce_value",
    "range_problem", "check_ranges", "Options", "normalize",
    "add_options", "build_parser", "suggest", "strip_launcher", "load_config_file", "defaults", "resolve",
    "resolve_given", "SuggestingParser", "given_from_namespace",
    "given_values", "write_config_file", "ss_metadata", "network_args_dict", "effective_max_train_steps",
    "option_table_markdown",
]
