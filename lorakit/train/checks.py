"""Option combinations a run refuses, and notes about accepted-but-changed ones (also used by the GUI's form check)."""

from __future__ import annotations

from lorakit import options as O
from lorakit.errors import UserError


def check_options(opts, family) -> list[str]:
    """Refuse combinations that cannot work, with the reason; return notes about accepted-but-changed options.
    Reads the options only (normalized first: a Namespace from the GUI works too)."""
    opts = O.normalize(opts)
    if opts.network_train_unet_only and opts.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other; "
                        "pick one (or neither to train both).")
    if opts.weighted_captions:
        raise UserError("--weighted_captions ((tag:1.2) weights in captions) is not supported by lorakit's trainer yet; "
                        "remove it (captions are then read as plain text).")
    if opts.dim_from_weights and not opts.network_weights:
        raise UserError("--dim_from_weights takes the rank from --network_weights; add --network_weights FILE.")
    if opts.base_weights_multiplier and len(opts.base_weights_multiplier) != len(opts.base_weights or []):
        raise UserError(f"--base_weights_multiplier has {len(opts.base_weights_multiplier)} values for "
                        f"{len(opts.base_weights or [])} --base_weights files; give one per file.")
    if (opts.fp8_base or opts.fp8_base_unet) and opts.mixed_precision == "no":
        raise UserError("--fp8_base stores the frozen model in fp8 and computes in fp16/bf16: add "
                        "--mixed_precision bf16 (or fp16).")
    if opts.full_fp16 and opts.mixed_precision != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision fp16.")
    if opts.full_bf16 and opts.mixed_precision != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision bf16.")
    ema_asks = [f"--{n}" for n, default in (("ema_warmup", False), ("ema_update_every", 1), ("ema_save_as", "beside"),
                                            ("ema_samples", False)) if getattr(opts, n) != default]
    if ema_asks and opts.ema_decay is None:
        raise UserError(f"{', '.join(ema_asks)} set without --ema_decay: no EMA is kept, so they would do nothing. Add "
                        "--ema_decay (e.g. 0.999) or remove them.")
    notes = []
    if opts.full_fp16 or opts.full_bf16:
        # Updates of lr * grad (~1e-7 of a weight) vanish when added to half-precision weights: sd-scripts' mode
        # "learns nothing" (seed 000). LoRA weights are tiny, so keep fp32 master copies; the base stays half.
        notes.append("--full_fp16/--full_bf16: the LoRA weights and optimizer stay in fp32 (half-precision LoRA "
                     "weights lose updates smaller than their rounding step and stop learning); the frozen model is "
                     f"in {opts.mixed_precision} as with plain --mixed_precision.")
    if opts.cache_text_encoder_outputs and not opts.network_train_unet_only:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only: text-encoder outputs can only "
                        "be cached while the text encoder does not train.")
    if opts.save_model_as in ("ckpt", "pt"):
        notes.append(f"--save_model_as {opts.save_model_as}: LoRA files are written as .safetensors (safe to load; "
                     "every UI reads them).")
    if family.clip_skip_fixed and opts.clip_skip not in (None, family.default_clip_skip):
        notes.append(f"--clip_skip has no effect on {family.short_title} (it always uses the penultimate layer), "
                     "like sd-scripts.")
    if opts.xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            notes.append("--xformers: xformers is not installed; PyTorch's scaled-dot-product attention is used "
                         "(same memory savings).")
    if opts.log_with in ("wandb", "all"):
        notes.append("--log_with wandb: wandb is not bundled; logging to TensorBoard only.")
    for o in O.OPTIONS:
        if not o.effect and o.name in opts._given and o.name != "num_cpu_threads_per_process":
            notes.append(f"--{o.name}: accepted for sd-scripts compatibility, no effect here.")
    return notes
