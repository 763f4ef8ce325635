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
    notes = _family_option_notes(opts, family)
    if opts.full_fp16 or opts.full_bf16:
        # Updates of lr * grad (~1e-7 of a weight) vanish when added to half-precision weights: sd-scripts' mode
        # "learns nothing" (seed 000). LoRA weights are tiny, so keep fp32 master copies; the base stays half.
        notes.append("--full_fp16/--full_bf16: the LoRA weights and optimizer stay in fp32 (half-precision LoRA "
                     "weights lose updates smaller than their rounding step and stop learning); the frozen model is "
                     f"in {opts.mixed_precision} as with plain --mixed_precision.")
    if opts.cache_text_encoder_outputs and opts.train_embedding:
        raise UserError("--cache_text_encoder_outputs cannot be used with --train_embedding: the trained vectors change "
                        "the text encoder's outputs every step. Remove one of them.")
    if opts.cache_text_encoder_outputs and not opts.network_train_unet_only:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only: text-encoder outputs can only "
                        "be cached while the text encoder does not train.")
    if opts.save_model_as in ("ckpt", "pt"):
        notes.append(f"--save_model_as {opts.save_model_as}: LoRA files are written as .safetensors (safe to load; "
                     "every UI reads them).")
    fixed_layer = family.clip_skip_fixed and family.conditioning == "clip"  # FLUX refuses --clip_skip instead
    if fixed_layer and opts.clip_skip not in (None, family.default_clip_skip):
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


# options of one kind of model only, and why the others cannot honour them
FLOW_ONLY = ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type", "guidance_scale",
             "t5xxl_max_token_length", "apply_t5_attn_mask", "clip_l", "t5xxl", "ae", "weighting_scheme", "logit_mean",
             "logit_std", "mode_scale")
DDPM_ONLY = {
    "v_parameterization": "FLUX predicts a velocity by construction",
    "zero_terminal_snr": "a flow model has no beta schedule (sigma = 1 is pure noise already)",
    "min_snr_gamma": "SNR weighting needs a DDPM schedule", "debiased_estimation_loss": "SNR weighting needs a DDPM "
    "schedule", "scale_v_pred_loss_like_noise_pred": "it rescales v-prediction losses",
    "v_pred_like_loss": "it adds a v-prediction term", "noise_offset": "sd-scripts' FLUX training draws plain noise",
    "adaptive_noise_scale": "it scales --noise_offset", "multires_noise_iterations": "sd-scripts' FLUX training "
    "draws plain noise", "min_timestep": "noise levels come from --timestep_sampling",
    "max_timestep": "noise levels come from --timestep_sampling", "clip_skip": "FLUX reads CLIP-L's pooled output",
    "max_token_length": "CLIP-L reads 77 tokens; T5's length is --t5xxl_max_token_length",
    "sample_sampler": "FLUX previews use the flow-matching Euler sampler",
}


def _family_option_notes(opts, family) -> list[str]:
    """Refuse options the family cannot honour (given on the command line or in a config file); notes on FLUX."""
    given = set(getattr(opts, "_given", ()))
    flow = family.objective == "flow"
    if not flow:
        wrong = [n for n in FLOW_ONLY if n in given]
        if wrong:
            raise UserError(f"--{', --'.join(wrong)}: FLUX.1 options, and the model is {family.title}; remove them.")
        if "tokenizer_cache_dir" in given:  # an sd-scripts habit for offline runs: harmless, say so
            return [f"--tokenizer_cache_dir: {family.short_title}'s CLIP tokenizers are bundled; it is read only for "
                    "FLUX's T5."]
        return []
    wrong = [n for n in DDPM_ONLY if n in given and getattr(opts, n) not in (None, False, 0)]
    if wrong:
        raise UserError(f"--{wrong[0]} has no meaning for {family.title} ({DDPM_ONLY[wrong[0]]})"
                        + (f"; also --{', --'.join(wrong[1:])}" if wrong[1:] else "") + ". Remove it.")
    if opts.loss_type in ("huber", "smooth_l1") and opts.huber_schedule != "constant":
        raise UserError(f"--loss_type {opts.loss_type} on {family.title} needs --huber_schedule constant: the "
                        f"{opts.huber_schedule} schedule reads a DDPM noise schedule, which a flow model has not.")
    _check_weighting(opts, given)
    notes = []
    if opts.model_prediction_type == "sigma_scaled":
        notes.append("--model_prediction_type sigma_scaled (sd-scripts' default) compares noisy - sigma x prediction "
                     "with the velocity target; sd-scripts' FLUX guide recommends --model_prediction_type raw.")
    return notes


def _check_weighting(opts, given: set) -> None:
    """--weighting_scheme and its parameters act only where sd-scripts applies them: refuse the combinations where
    they would change nothing."""
    scheme = opts.weighting_scheme
    if scheme in ("logit_normal", "mode") and opts.timestep_sampling != "sigma":
        raise UserError(f"--weighting_scheme {scheme} shapes the draws of --timestep_sampling sigma (as in sd-scripts); "
                        f"with --timestep_sampling {opts.timestep_sampling} it would change nothing. Use "
                        "--timestep_sampling sigma or drop --weighting_scheme.")
    if scheme in ("sigma_sqrt", "cosmap") and opts.model_prediction_type != "sigma_scaled":
        raise UserError(f"--weighting_scheme {scheme} weights the loss of --model_prediction_type sigma_scaled (as in "
                        f"sd-scripts); with {opts.model_prediction_type} it would change nothing. Use sigma_scaled "
                        "or drop --weighting_scheme.")
    needs = {"logit_mean": "logit_normal", "logit_std": "logit_normal", "mode_scale": "mode"}
    stray = [n for n, s in needs.items() if n in given and scheme != s]
    if stray:
        raise UserError(f"--{stray[0]} is a parameter of --weighting_scheme {needs[stray[0]]}, and the scheme is "
                        f"{scheme}: add --weighting_scheme {needs[stray[0]]} or remove --{stray[0]}.")
