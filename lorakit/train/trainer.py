"""The training loop of `lorakit train`.

`train(opts)` reads top to bottom: check options, load the model, scan the data, build the LoRA network, optimizer and
schedule, resume if asked, then one loop over epochs and batches; saving, sampling and logging hang off that loop.
Options are the resolved Namespace of `lorakit.options` (sd-scripts' flag names).

Exact resume: batches are a pure function of (seed, epoch, batch index) in the dataset layer, noise comes from
explicit generators, and a state folder holds weights, optimizer, scheduler and every RNG at an optimizer-step
boundary, so stopping and resuming gives the same weights as never stopping.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lorakit import options as O
from lorakit.errors import UserError
from lorakit.train import losses, noise as N
from lorakit.train.lr_schedules import scheduler_from_options
from lorakit.train.optimizers import create_optimizer, effective_lrs, is_adaptive, set_train_mode
from lorakit.train.state import TrainState, capture_rng, load_state, remove_state, restore_rng, save_state

DEFAULT_OUTPUT_NAME = "last"


@dataclass
class TrainResult:
    output_dir: Path
    final_lora: Optional[Path]
    saved: list[Path] = field(default_factory=list)  # LoRA files written (epoch/step/final)
    states: list[Path] = field(default_factory=list)  # state folders written
    samples: list[Path] = field(default_factory=list)
    global_step: int = 0
    epoch: int = 0
    losses: list[float] = field(default_factory=list)  # loss of every optimizer step of this run
    interrupted: bool = False
    metadata: dict = field(default_factory=dict)
    network: Any = None  # the trained Network, still applied to the bundle


# ================================================================================================ option checks ====
def check_options(opts, family) -> list[str]:
    """Refuse combinations that cannot work, with the reason; return notes about accepted-but-changed options."""
    notes = []
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
    if opts.full_fp16 or opts.full_bf16:
        # Updates of lr * grad (~1e-7 of a weight) vanish when added to half-precision weights: sd-scripts' mode
        # "learns nothing" (seed 000). LoRA weights are tiny, so keep fp32 master copies; the base stays half.
        notes.append("--full_fp16/--full_bf16: the LoRA weights and optimizer stay in fp32 (half-precision LoRA "
                     "weights lose updates smaller than their rounding step and stop learning); the frozen model is "
                     f"in {opts.mixed_precision} as with plain --mixed_precision.")
    if opts.cache_text_encoder_outputs_to_disk and not opts.cache_text_encoder_outputs:
        opts.cache_text_encoder_outputs = True
    if opts.cache_text_encoder_outputs and not opts.network_train_unet_only:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only: text-encoder outputs can only "
                        "be cached while the text encoder does not train.")
    if opts.cache_latents_to_disk:
        opts.cache_latents = True
    if opts.save_model_as in ("ckpt", "pt"):
        notes.append(f"--save_model_as {opts.save_model_as}: LoRA files are written as .safetensors (safe to load; "
                     "every UI reads them).")
    if family.size_conditioning and opts.clip_skip not in (None, 2):
        notes.append("--clip_skip has no effect on SDXL (it always uses the penultimate layer), like sd-scripts.")
    if opts.xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            notes.append("--xformers: xformers is not installed; PyTorch's scaled-dot-product attention is used "
                         "(same memory savings).")
    if opts.log_with in ("wandb", "all"):
        notes.append("--log_with wandb: wandb is not bundled; logging to TensorBoard only.")
    for o in O.OPTIONS:
        if not o.effect and o.name in getattr(opts, "_given", ()) and o.name != "num_cpu_threads_per_process":
            notes.append(f"--{o.name}: accepted for sd-scripts compatibility, no effect here.")
    return notes


# ================================================================================================ text & latents ===
def effective_clip_skip(family, clip_skip: Optional[int]) -> int:
    """Layer-from-the-end to read. SD2's converted encoder has 23 layers in sd-scripts (ours keeps 24), so a user's
    N there is N + 1 here; SDXL always reads the penultimate layer."""
    if family.size_conditioning:
        return 2
    if clip_skip is None:
        return family.default_clip_skip
    return int(clip_skip) + family.default_clip_skip - 1


def tokenize(tokenizer, captions: list[str], max_token_length: Optional[int]) -> torch.Tensor:
    """[B, n, 77] token ids: one 77-token window (75 + BOS/EOS) per 75 tokens, sd-scripts' long-prompt layout."""
    total = (max_token_length or 75) + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=total, return_tensors="pt").input_ids
    if total == 77:
        return ids[:, None, :]
    bos, eos = ids[:, :1], ids[:, -1:]
    chunks = []
    for i in range(1, total - 1, 75):
        body = ids[:, i:i + 75]
        chunk = torch.cat([bos, body, eos], dim=1)
        # OpenCLIP pads with id 0: a chunk that ends in padding must end in padding, and one that starts with padding
        # must still see an EOS right after BOS (sd-scripts does the same fix-up)
        pad = tokenizer.pad_token_id
        if pad != tokenizer.eos_token_id:
            for j in range(chunk.shape[0]):
                if chunk[j, -2] != tokenizer.eos_token_id and chunk[j, -2] != pad:
                    continue
                if chunk[j, -2] == pad:
                    chunk[j, -1] = pad
                if chunk[j, 1] == pad:
                    chunk[j, 1] = tokenizer.eos_token_id
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def _hidden(te, ids: torch.Tensor, skip: int, final_norm: bool, want_pooled: bool):
    b, n, l = ids.shape
    out = te(ids.reshape(b * n, l).to(te.device), output_hidden_states=True)
    h = out.hidden_states[-skip]
    if final_norm and skip > 1:
        h = getattr(te, "text_model", te).final_layer_norm(h)
    elif final_norm:
        h = out.last_hidden_state
    h = h.reshape(b, n * l, -1)
    if n > 1:  # keep the first BOS, each window's 75 tokens, and the last EOS
        parts = [h[:, :1]] + [h[:, i * l + 1:i * l + l - 1] for i in range(n)] + [h[:, -1:]]
        h = torch.cat(parts, dim=1)
    pooled = None
    if want_pooled:
        pooled = out.text_embeds.reshape(b, n, -1)[:, 0]  # the first window's pooled output, like sd-scripts
    return h, pooled


def encode_text(bundle, captions: list[str], clip_skip: Optional[int], max_token_length: Optional[int]):
    """Captions -> (encoder_hidden_states [B, L, D], pooled [B, P] or None). SDXL concatenates both encoders'
    penultimate layers and pools the second; SD1/2 read layer -skip with the final layer norm."""
    fam = bundle.family
    skip = effective_clip_skip(fam, clip_skip)
    states, pooled = [], None
    for spec, te, tok in zip(fam.text_encoders, bundle.text_encoders, bundle.tokenizers):
        ids = tokenize(tok, captions, max_token_length)
        h, p = _hidden(te, ids, skip, spec.final_norm_on_skip, spec.with_projection)
        states.append(h)
        pooled = p if p is not None else pooled
    return torch.cat(states, dim=-1), pooled


def sdxl_time_ids(batch, device, dtype) -> torch.Tensor:
    """[B, 6]: original size (h, w), crop top-left (top, left), target size (h, w)."""
    return torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1).to(
        device, dtype)


def vae_encoder(bundle, generator: torch.Generator, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    scale = bundle.latent_scale
    vae = bundle.vae

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(pixels.to(vae.device, dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device)
        return ((dist.mean.float() + dist.std.float() * eps) * scale).float()

    return encode


# ================================================================================================ outputs ==========
def lora_name(base: str, epoch: Optional[int] = None, step: Optional[int] = None) -> str:
    if epoch is not None:
        return f"{base}-{epoch:06d}"
    if step is not None:
        return f"{base}-step{step:08d}"
    return base


def dataset_metadata(group, opts) -> dict[str, str]:
    """ss_* keys about the data, as sd-scripts writes them (per-dataset keys without --dataset_config,
    ss_datasets with it)."""
    tag_freq_all: dict[str, dict[str, int]] = {}
    dirs_all: dict[str, dict[str, int]] = {}
    datasets_md = []
    md: dict[str, str] = {}
    for ds in group.datasets:
        tag_freq: dict[str, dict[str, int]] = {}
        dirs: dict[str, dict[str, int]] = {}
        reg_dirs: dict[str, dict[str, int]] = {}
        counts = Counter(e.subset_index for e in ds.entries)
        for si, sub in enumerate(ds.config.subsets):
            name = os.path.basename(str(sub.metadata_file or sub.image_dir or "").rstrip("/\\"))
            (reg_dirs if sub.is_reg else dirs)[name] = {"n_repeats": int(sub.num_repeats), "img_count": counts[si]}
            freq: Counter = Counter()
            for e in ds.entries:
                if e.subset_index == si:
                    freq.update(t.strip() for t in e.caption.split(",") if t.strip())
            tag_freq[name] = dict(freq)
        buckets = {i: {"resolution": list(r), "count": c} for i, (r, c) in enumerate(ds.bucket_counts().items())}
        ar = [abs(e.bucket.ar_error) for e in ds.entries]
        bucket_info = {"buckets": buckets, "mean_img_ar_error": (sum(ar) / len(ar)) if ar else 0.0}
        cfg = ds.config
        tag_freq_all.update(tag_freq)
        dirs_all.update(dirs)
        datasets_md.append({
            "is_dreambooth": not any(s.is_finetune for s in cfg.subsets), "batch_size_per_device": cfg.batch_size,
            "num_train_images": ds.num_train_images, "num_reg_images": ds.num_reg_images,
            "resolution": list(cfg.resolution), "enable_bucket": cfg.enable_bucket,
            "min_bucket_reso": cfg.min_bucket_reso, "max_bucket_reso": cfg.max_bucket_reso,
            "tag_frequency": tag_freq, "bucket_info": bucket_info,
            "subsets": [{"img_count": counts[i], "num_repeats": s.num_repeats, "color_aug": s.color_aug,
                         "flip_aug": s.flip_aug, "random_crop": s.random_crop, "shuffle_caption": s.shuffle_caption,
                         "keep_tokens": s.keep_tokens, "keep_tokens_separator": s.keep_tokens_separator or "",
                         "secondary_separator": s.secondary_separator, "enable_wildcard": s.enable_wildcard,
                         "caption_prefix": s.caption_prefix, "caption_suffix": s.caption_suffix,
                         "image_dir": os.path.basename(str(s.image_dir or "")), "class_tokens": s.class_tokens,
                         "is_reg": s.is_reg} for i, s in enumerate(cfg.subsets)],
        })
        if not opts.dataset_config and len(group.datasets) == 1:
            md.update({
                "ss_batch_size_per_device": str(cfg.batch_size), "ss_resolution": str(tuple(cfg.resolution)),
                "ss_enable_bucket": str(bool(cfg.enable_bucket)), "ss_bucket_no_upscale": str(bool(cfg.bucket_no_upscale)),
                "ss_min_bucket_reso": str(cfg.min_bucket_reso), "ss_max_bucket_reso": str(cfg.max_bucket_reso),
                "ss_dataset_dirs": json.dumps(dirs), "ss_reg_dataset_dirs": json.dumps(reg_dirs),
                "ss_tag_frequency": json.dumps(tag_freq), "ss_bucket_info": json.dumps(bucket_info),
            })
    if opts.dataset_config or len(group.datasets) > 1:
        md["ss_datasets"] = json.dumps(datasets_md)
        md["ss_tag_frequency"] = json.dumps(tag_freq_all)
        md["ss_dataset_dirs"] = json.dumps(dirs_all)
        for k in ("ss_resolution", "ss_batch_size_per_device", "ss_enable_bucket", "ss_bucket_no_upscale",
                  "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_color_aug", "ss_flip_aug", "ss_random_crop",
                  "ss_shuffle_caption", "ss_keep_tokens"):
            md[k] = None  # sd-scripts writes these only for a command-line dataset
    md["ss_num_train_images"] = str(group.num_train_images)
    md["ss_num_reg_images"] = str(sum(d.num_reg_images for d in group.datasets))
    return md


# ================================================================================================ sampling =========
def load_prompts(path):
    """sd-scripts' prompt file (.txt with --n --w --h --d --l --s --ss, or .toml/.json), read by the generation layer."""
    from lorakit.generate.sample_prompts import load_sample_prompts

    return load_sample_prompts(path)


def render_samples(bundle, prompts, out_dir: Path, name: str, opts, *, epoch=None, step=0, device="cpu") -> list[Path]:
    """Preview images through the generation layer (A1111-style prompts, <lora:...>, infotext)."""
    from lorakit.generate.pipeline import generate_samples

    suffix = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    skip = None if bundle.family.size_conditioning else effective_clip_skip(bundle.family, opts.clip_skip)
    out_dir.mkdir(parents=True, exist_ok=True)
    return generate_samples(bundle, prompts, out_dir, prefix=f"{name}_{suffix}_", sampler=opts.sample_sampler,
                            clip_skip=skip, device=device)


# ================================================================================================ helpers ==========
def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _device(opts) -> torch.device:
    env = os.environ.get("LORAKIT_DEVICE")
    if env:
        return torch.device(env)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _to_fp8(module: torch.nn.Module) -> None:
    """Store Linear/Conv weights of a frozen module in float8 (upcast by autocast in each op)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)


@torch.no_grad()
def apply_max_norm(network, max_norm: float) -> tuple[int, float, float]:
    """scale_weight_norms: shrink every LoRA whose delta-weight norm exceeds max_norm (both factors by sqrt of the
    ratio). Returns (modules scaled, mean norm, max norm) like sd-scripts."""
    scaled, norms = 0, []
    for a in network.adapters:
        if not (hasattr(a, "lora_down") and hasattr(a, "lora_up")):
            continue
        norm = a.delta_weight().float().norm()
        ratio = (norm.clamp(min=max_norm / 2) / max_norm).item()
        if ratio > 1:
            s = (1 / ratio) ** 0.5
            a.lora_down.weight.mul_(s)
            a.lora_up.weight.mul_(s)
            scaled += 1
            norm = norm / ratio
        norms.append(float(norm))
    if not norms:
        return 0, 0.0, 0.0
    return scaled, sum(norms) / len(norms), max(norms)


class _Interrupt:
    """SIGINT/SIGTERM set a flag; the loop saves state and a LoRA at the next step boundary, then stops."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print("\nlorakit: stopping after this step (saving state and LoRA); press Ctrl-C again to quit now.",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ================================================================================================ the run ==========
def train(opts, *, bundle=None, progress: bool = True, log: Callable[[str], None] = print,
          stop_after_step: Optional[int] = None, on_event: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """Train a LoRA with resolved options. `bundle` skips model loading (tests, demo); `stop_after_step` acts like
    Ctrl-C after that many optimizer steps (tests). `on_event(dict)` (the GUI's progress) gets {"event": "start",
    "max_steps", "num_epochs"}, {"event": "step", "step", "max_steps", "epoch", "loss", "loss_avg", "lr": {group: lr},
    "effective_lr": {group: d*lr} (adaptive optimizers only)}, {"event": "saved", "path"} and
    {"event": "sample", "paths"}."""

    def emit(event: str, **kw) -> None:
        if on_event is not None and is_main:
            on_event({"event": event, **kw})

    from lorakit.adapters.network import create_network
    from lorakit.data import DatasetGroup, build_dataset_configs, cache_latents, group_static_captions
    from lorakit.data.latents import TextEncoderCache

    started_at = time.time()
    if opts.console_log_file:
        log = _tee(log, opts.console_log_file)
    resume_state = load_state(opts.resume) if opts.resume else None
    if resume_state is not None:
        saved_seed = int(resume_state.counters.get("seed", opts.seed if opts.seed is not None else 0))
        if opts.seed is not None and opts.seed != saved_seed:
            log(f"note: the state was trained with --seed {saved_seed}; using it so batches continue in order.")
        opts.seed = saved_seed
    opts.seed = opts.seed if opts.seed is not None else random.SystemRandom().randint(0, 2**31 - 1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            import datetime

            timeout = datetime.timedelta(minutes=opts.ddp_timeout) if opts.ddp_timeout else None
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                    **({"timeout": timeout} if timeout else {}))
    is_main = rank == 0
    if not is_main:
        log = lambda *_a, **_k: None  # noqa: E731
        progress = False
    device = _device(opts)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opts.mixed_precision, torch.float32)
    if opts.output_dir is None:
        raise UserError("--output_dir is required: the folder for the LoRA files.")
    out_dir = Path(opts.output_dir)
    name = opts.output_name or DEFAULT_OUTPUT_NAME
    result = TrainResult(out_dir, None)

    # ---- model ------------------------------------------------------------------------------------------------
    if bundle is None:
        from lorakit.models.loading import load_bundle

        if not opts.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required (a .safetensors/.ckpt file or a diffusers "
                            "folder).")
        log(f"loading {opts.pretrained_model_name_or_path}")
        # load straight into the training dtype: no full-precision copy of the frozen model is ever held
        bundle = load_bundle(opts.pretrained_model_name_or_path, vae=opts.vae, v2=opts.v2,
                             v_parameterization=opts.v_parameterization, sdxl=opts.sdxl,
                             dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(opts.mixed_precision))
    fam = bundle.family
    for note in check_options(opts, fam):
        log("note: " + note)
    if opts.log_config:
        log("options: " + json.dumps({k: v for k, v in O.given_values(opts).items()}, default=str))
    for i, path in enumerate(opts.base_weights or []):
        from lorakit.adapters.network import load_network

        mult = opts.base_weights_multiplier[i] if opts.base_weights_multiplier else 1.0
        load_network(bundle, path, multiplier=mult, merge=True)
        log(f"merged {path} x {mult} into the model before training")
    prediction = "v_prediction" if (opts.v_parameterization or fam.prediction_type == "v_prediction") else "epsilon"
    betas = bundle.noise_scheduler.betas.double()
    if opts.zero_terminal_snr:
        betas = N.zero_terminal_snr_betas(betas)
        if prediction != "v_prediction":
            log("note: --zero_terminal_snr without v-prediction: the last timestep's input is pure noise; sd-scripts "
                "allows it, but it is meant for --v_parameterization.")
    alphas_cumprod = N.alphas_cumprod_from_betas(betas).float()
    vae_dtype = torch.float32 if (opts.no_half_vae or (fam.size_conditioning and weight_dtype == torch.float16)) \
        else weight_dtype
    for module, dt in [(bundle.unet, weight_dtype), (bundle.vae, vae_dtype)] + [(te, weight_dtype)
                                                                               for te in bundle.text_encoders]:
        if module is None:
            continue
        module.to(device)
        if next(module.parameters()).dtype != dt:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module.to(dtype=dt)

    # ---- data -------------------------------------------------------------------------------------------------
    if opts.resolution is None and not opts.dataset_config:
        opts.resolution = str(fam.resolution)
    notes: list[str] = []
    configs = build_dataset_configs(opts, notes=notes)
    for cfg in configs:
        if cfg.resolution is None:
            cfg.resolution = (fam.resolution, fam.resolution)
    for n in notes:
        log("note: " + n)
    group = DatasetGroup.build(configs, seed=opts.seed, on_bad_image=opts.on_bad_image)
    log(group.summary_text())
    batches_per_epoch = group.num_batches(1)
    accum = max(1, opts.gradient_accumulation_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / (accum * world))
    max_steps = opts.max_train_epochs * steps_per_epoch if opts.max_train_epochs else opts.max_train_steps
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    if opts.save_n_epoch_ratio:
        opts.save_every_n_epochs = max(1, num_epochs // opts.save_n_epoch_ratio)
    group.max_train_steps = max_steps

    # ---- network ----------------------------------------------------------------------------------------------
    net_args = O.network_args_dict(opts.network_args)
    for flag in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if getattr(opts, flag) is not None:
            net_args.setdefault(flag, str(getattr(opts, flag)))
    if opts.dim_from_weights:
        from lorakit.adapters.file import read_lora_file

        downs = [v for k, v in read_lora_file(opts.network_weights).tensors.items() if k.endswith("lora_down.weight")]
        if not downs:
            raise UserError(f"--dim_from_weights: {opts.network_weights} has no lora_down weights to read a rank from.")
        opts.network_dim = int(downs[0].shape[0])
        log(f"--dim_from_weights: network_dim {opts.network_dim}")
    torch.manual_seed(opts.seed)  # adapter initialisation
    network = create_network(bundle, opts.network_module, opts.network_dim, opts.network_alpha, net_args,
                             train_unet=not opts.network_train_text_encoder_only,
                             train_text_encoder=not opts.network_train_unet_only, neuron_dropout=opts.network_dropout)
    if opts.network_weights:
        network.load_weights(opts.network_weights)
        log(f"loaded network weights from {opts.network_weights}")
    network.apply_to(bundle)
    network.to(device=device, dtype=torch.float32)
    train_te = bool(network.te_adapters)
    log(f"{fam.title}: {len(network.unet_adapters)} UNet + {len(network.te_adapters)} text-encoder modules "
        f"({sum(p.numel() for p in network.parameters())} parameters)")

    if opts.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        bundle.unet.train()  # diffusers checkpoints only in training mode (the UNet has no dropout)
        if train_te:
            for te in bundle.text_encoders:
                getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
                te.train()
    if opts.xformers:
        with contextlib.suppress(Exception):
            bundle.unet.enable_xformers_memory_efficient_attention()
    if opts.fp8_base or opts.fp8_base_unet:
        _to_fp8(bundle.unet)
    if opts.fp8_base:
        if not train_te:
            for te in bundle.text_encoders:
                _to_fp8(te)

    # ---- caches -----------------------------------------------------------------------------------------------
    latent_gen = torch.Generator().manual_seed(opts.seed + 1)
    encode_latents = vae_encoder(bundle, latent_gen, vae_dtype)
    if opts.cache_latents:
        log("caching latents" + (" to disk" if opts.cache_latents_to_disk else ""))
        cache_latents(group, encode_latents, suffix="sdxl" if fam.size_conditioning else "sd",
                      to_disk=opts.cache_latents_to_disk, batch_size=opts.vae_batch_size,
                      vae_id=f"{fam.name}:{os.path.basename(str(opts.vae or opts.pretrained_model_name_or_path))}")
    te_cache = None
    if opts.cache_text_encoder_outputs:
        cache_dir = (out_dir / ".te_cache") if opts.cache_text_encoder_outputs_to_disk else None
        def encode_for_cache(caps):
            h, p = encode_text(bundle, caps, opts.clip_skip, opts.max_token_length)
            return h if p is None else (h, p)

        te_cache = TextEncoderCache(encode_for_cache, cache_dir, key_prefix=f"{fam.name}:{opts.clip_skip}:{opts.max_token_length}:"
                                    f"{opts.pretrained_model_name_or_path}")
        with torch.no_grad(), _autocast(device, weight_dtype):
            te_cache.precompute(group_static_captions(group))

    # ---- optimizer and schedule -------------------------------------------------------------------------------
    te_lr = opts.text_encoder_lr
    te_lr = None if not te_lr else (te_lr[0] if len(te_lr) == 1 else list(te_lr))
    groups = network.trainable_param_groups(opts.unet_lr, te_lr, opts.learning_rate)
    if not groups:
        raise UserError("nothing to train: every parameter group has learning rate 0.")
    optimizer_type = "AdamW8bit" if opts.use_8bit_adam else ("Lion" if opts.use_lion_optimizer else opts.optimizer_type)
    opt_info = create_optimizer(optimizer_type or "AdamW", groups, opts.learning_rate, opts.optimizer_args)
    optimizer = opt_info.optimizer
    if is_adaptive(opt_info.name) and opts.learning_rate <= 0.1:
        log(f"note: {opt_info.name} estimates the step size itself; --learning_rate is a multiplier and 1.0 is usual "
            f"(got {opts.learning_rate}).")
    scheduler = scheduler_from_options(optimizer, opts, max_steps, schedule_free=opt_info.is_schedule_free,
                                       relative_step_adafactor=opt_info.relative_step_adafactor)
    scaler = torch.amp.GradScaler(device.type) if weight_dtype == torch.float16 else None
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    # ---- resume -----------------------------------------------------------------------------------------------
    noise_gen = torch.Generator().manual_seed(opts.seed + 1000003 * rank)
    epoch, start_batch, global_step = 1, 0, 0
    if resume_state is not None:
        st = resume_state
        network.load_state_dict({k: v.to(device) for k, v in st.network.items()}, strict=True)
        optimizer.load_state_dict(st.optimizer)
        scheduler.load_state_dict(st.scheduler)
        if scaler is not None and st.scaler:
            scaler.load_state_dict(st.scaler)
        gens, rng_state = st.generators, st.rng
        if "per_rank" in gens:
            if len(gens["per_rank"]) != world:
                log(f"note: the state was saved by {len(gens['per_rank'])} processes, this run has {world}; "
                    "training continues but is not bit-identical to an uninterrupted run.")
            gens = gens["per_rank"][min(rank, len(gens["per_rank"]) - 1)]
            rng_state = rng_state["per_rank"][min(rank, len(rng_state["per_rank"]) - 1)]
        restore_rng(rng_state)
        noise_gen.set_state(gens["noise"])
        latent_gen.set_state(gens["latent"])
        epoch, start_batch, global_step = int(st.counters["epoch"]), int(st.counters["batch"]), \
            int(st.counters["global_step"])
        log(f"resumed from {opts.resume}: epoch {epoch}, batch {start_batch}, step {global_step}")

    # ---- metadata known before the loop ------------------------------------------------------------------------
    session_id = random.SystemRandom().randint(0, 2**32 - 1)
    base_md = O.ss_metadata(opts, max_train_steps=max_steps, optimizer=opt_info.metadata_string)
    base_md.update({k: v for k, v in dataset_metadata(group, opts).items()})
    base_md = {k: v for k, v in base_md.items() if v is not None}
    base_md.update({
        "ss_session_id": str(session_id), "ss_training_started_at": str(started_at),
        "ss_num_batches_per_epoch": str(batches_per_epoch), "ss_num_epochs": str(num_epochs),
        "ss_total_batch_size": str(opts.train_batch_size * accum * world),
        "ss_network_dim": str(network.config.dim), "ss_network_alpha": str(float(network.config.alpha)),
        "ss_text_encoder_lr": str(te_lr),
    })
    if not opts.network_args:
        base_md.pop("ss_network_args", None)
    for key, path in (("sd_model", opts.pretrained_model_name_or_path), ("vae", opts.vae)):
        if path and os.path.isfile(path):  # sd-scripts' legacy 8-digit hash and the full sha256 of the file
            base_md[f"ss_{key}_hash"], base_md[f"ss_new_{key}_hash"] = _file_hashes(path)
    md_kw = dict(resolution=configs[0].resolution, clip_skip=opts.clip_skip, title=opts.metadata_title,
                 trigger_phrase=opts.metadata_trigger_phrase, description=opts.metadata_description,
                 author=opts.metadata_author)
    save_precision = {"float": "fp32", None: "fp32"}.get(opts.save_precision, opts.save_precision)

    def save_lora(stem: str, epoch_no: int) -> Path:
        path = out_dir / f"{stem}.safetensors"
        if not is_main:
            return path
        set_train_mode(optimizer, False)  # schedule-free: save the averaged weights
        if opts.no_metadata:
            from lorakit.adapters.file import save_lora as raw_save

            raw_save(path, network.state_dict(), {}, save_precision)
        else:
            md = dict(base_md, ss_steps=str(global_step), ss_epoch=str(epoch_no),
                      ss_training_finished_at=str(time.time()))
            if opts.metadata_license:
                md["modelspec.license"] = opts.metadata_license
            if opts.metadata_tags:
                md["modelspec.tags"] = opts.metadata_tags
            network.save_weights(path, precision=save_precision, metadata=md, **md_kw)
        set_train_mode(optimizer, True)
        result.saved.append(path)
        log(f"saved {path}")
        emit("saved", path=str(path))
        return path

    def save_training_state(folder: Path, next_epoch: int, next_batch: int) -> Path:
        gens = {"noise": noise_gen.get_state(), "latent": latent_gen.get_state()}
        rng = capture_rng()
        if world > 1:  # every process draws its own noise: keep all their RNG states for an exact resume
            import torch.distributed as dist

            everyone = [None] * world
            dist.all_gather_object(everyone, (gens, rng))
            gens = dict(gens, per_rank=[g for g, _ in everyone])
            rng = dict(rng, per_rank=[r for _, r in everyone])
        if not is_main:
            return folder
        st = TrainState(network={k: v.detach().float().cpu() for k, v in network.state_dict().items()},
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else None, rng=rng,
                        generators=gens,
                        counters={"epoch": next_epoch, "batch": next_batch, "global_step": global_step,
                                  "seed": opts.seed, "max_train_steps": max_steps},
                        options={k: getattr(opts, k) for k in O.given_values(opts)})
        save_state(folder, st)
        result.states.append(folder)
        log(f"saved state {folder}")
        return folder

    def prune(kind: str, current: int) -> None:
        """--save_last_n_epochs/_steps (+ _state): remove older saves of this run."""
        if not is_main:
            return
        if kind == "epoch" and opts.save_every_n_epochs:
            for n, is_state in ((opts.save_last_n_epochs, False), (opts.save_last_n_epochs_state
                                                                   or opts.save_last_n_epochs, True)):
                if n:
                    old = current - opts.save_every_n_epochs * n
                    if old >= 1:
                        stem = lora_name(name, epoch=old)
                        if is_state:
                            remove_state(out_dir / f"{stem}-state")
                        else:
                            (out_dir / f"{stem}.safetensors").unlink(missing_ok=True)
        if kind == "step" and opts.save_every_n_steps:
            for n, is_state in ((opts.save_last_n_steps, False), (opts.save_last_n_steps_state
                                                                  or opts.save_last_n_steps, True)):
                if n:
                    for s in range(opts.save_every_n_steps, current - n, opts.save_every_n_steps):
                        stem = lora_name(name, step=s)
                        if is_state:
                            remove_state(out_dir / f"{stem}-state")
                        else:
                            (out_dir / f"{stem}.safetensors").unlink(missing_ok=True)

    prompts = load_prompts(opts.sample_prompts) if opts.sample_prompts else None

    def maybe_sample(at_epoch: Optional[int], first: bool = False) -> None:
        if not prompts or not is_main:
            return
        if not first:
            if at_epoch is not None:
                if not opts.sample_every_n_epochs or at_epoch % opts.sample_every_n_epochs:
                    return
            elif opts.sample_every_n_epochs or not opts.sample_every_n_steps or \
                    global_step % opts.sample_every_n_steps:
                return
        set_train_mode(optimizer, False)
        network.eval()
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):  # previews never shift the training RNG streams
                new = render_samples(bundle, prompts, out_dir / "sample", name, opts, epoch=at_epoch,
                                     step=global_step, device=device)
            result.samples += new
            emit("sample", paths=[str(x) for x in new], step=global_step)
        except UserError:
            raise
        except Exception as exc:  # a preview must never end a run
            log(f"warning: sample images failed ({type(exc).__name__}: {exc}); training continues.")
        finally:
            random.setstate(py_state)
        network.train()
        set_train_mode(optimizer, True)

    writer = None
    if opts.logging_dir and is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(opts.logging_dir) / f"{opts.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
                                   / "network_train"))

    # ---- the loop ---------------------------------------------------------------------------------------------
    log(f"training: {group.num_train_images} images (with repeats), {batches_per_epoch} batches per epoch, "
        f"{num_epochs} epochs, {max_steps} steps, batch {opts.train_batch_size} x accumulation {accum}, seed {opts.seed}")
    bar = None
    emit("start", max_steps=max_steps, num_epochs=num_epochs, step=global_step)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=global_step, desc="steps", smoothing=0, dynamic_ncols=True)
    if opts.sample_at_first and global_step == 0:
        maybe_sample(None, first=True)
    network.train()
    recent: list[float] = []
    multipliers = [c.network_multiplier for c in configs] if any(c.network_multiplier != 1.0 for c in configs) else None
    unet_dtype_ctx = _autocast(device, weight_dtype)
    stop_reason = None
    with _Interrupt() as interrupt:
        while epoch <= num_epochs and global_step < max_steps and stop_reason is None:
            n_batches = group.num_batches(epoch)
            k = start_batch
            prefetch = group.iter_batches(epoch, start_batch, num_workers=opts.max_data_loader_n_workers) \
                if world == 1 else None
            while k < n_batches and global_step < max_steps:
                chunk = list(range(k, min(n_batches, k + accum * world)))
                mine = chunk[rank::world]
                step_loss = 0.0
                for bk in mine:
                    if prefetch is not None:
                        got, batch = next(prefetch)
                        assert got == bk, (got, bk)
                    else:
                        batch = group.get_batch(epoch, bk, global_step=global_step)
                    if multipliers:
                        network.set_multiplier(multipliers[batch["dataset_index"]])
                    with unet_dtype_ctx:
                        loss = _batch_loss(bundle, batch, opts, alphas_cumprod, noise_gen, encode_latents, te_cache,
                                           train_te, prediction, device, weight_dtype)
                    if not torch.isfinite(loss):
                        stop_reason = "nan"
                        break
                    scaled = loss / len(chunk)
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    step_loss += loss.item() / len(chunk)
                if world > 1:  # a NaN on any process stops every process
                    import torch.distributed as dist

                    flag = torch.tensor([1.0 if stop_reason else 0.0], device=device)
                    dist.all_reduce(flag)
                    stop_reason = "nan" if flag.item() > 0 else None
                if stop_reason:
                    break
                if world > 1:
                    _all_reduce_grads(trainable)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if opts.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, opts.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                k = chunk[-1] + 1
                logs = {"loss/current": step_loss}
                if opts.scale_weight_norms:
                    n_scaled, mean_norm, max_norm = apply_max_norm(network, opts.scale_weight_norms)
                    logs.update({"keys_scaled": n_scaled, "average_key_norm": mean_norm, "max_key_norm": max_norm})
                result.losses.append(step_loss)
                recent = (recent + [step_loss])[-100:]
                logs["loss/average"] = sum(recent) / len(recent)
                names = [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]
                for nm, lr, elr in zip(names, scheduler.get_last_lr(), effective_lrs(optimizer)):
                    logs[f"lr/{nm}"] = lr
                    if is_adaptive(opt_info.name):
                        logs[f"lr/d*lr/{nm}"] = elr
                if writer is not None:
                    for key, v in logs.items():
                        writer.add_scalar(key, v, global_step)
                emit("step", step=global_step, max_steps=max_steps, epoch=epoch, loss=step_loss,
                     loss_avg=logs["loss/average"], lr={k[3:]: v for k, v in logs.items()
                                                        if k.startswith("lr/") and not k.startswith("lr/d*lr/")},
                     effective_lr={k[8:]: v for k, v in logs.items() if k.startswith("lr/d*lr/")})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{logs['loss/average']:.4f}")
                next_epoch, next_batch = (epoch, k) if k < n_batches else (epoch + 1, 0)
                if opts.save_every_n_steps and global_step % opts.save_every_n_steps == 0 and global_step < max_steps:
                    save_lora(lora_name(name, step=global_step), epoch)
                    if opts.save_state:
                        save_training_state(out_dir / f"{lora_name(name, step=global_step)}-state", next_epoch,
                                            next_batch)
                    prune("step", global_step)
                maybe_sample(None)
                stop_now = interrupt.requested or (stop_after_step is not None and global_step >= stop_after_step)
                if world > 1:  # stop together, or the others would wait forever in the next all-reduce
                    import torch.distributed as dist

                    flag = torch.tensor([1.0 if stop_now else 0.0], device=device)
                    dist.all_reduce(flag)
                    stop_now = bool(flag.item() > 0)
                if stop_now:
                    stop_reason = "interrupt"
                    stem = lora_name(name, step=global_step)
                    save_lora(stem, epoch)
                    save_training_state(out_dir / f"{stem}-state", next_epoch, next_batch)
                    break
            if prefetch is not None:
                prefetch.close()
            if stop_reason:
                break
            # end of an epoch
            if k >= n_batches or global_step >= max_steps:
                if opts.save_every_n_epochs and epoch % opts.save_every_n_epochs == 0 and epoch < num_epochs:
                    save_lora(lora_name(name, epoch=epoch), epoch)
                    if opts.save_state:
                        save_training_state(out_dir / f"{lora_name(name, epoch=epoch)}-state", epoch + 1, 0)
                    prune("epoch", epoch)
                maybe_sample(epoch)
                epoch += 1
                start_batch = 0
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    result.global_step, result.epoch = global_step, min(epoch, num_epochs)
    result.network = network
    if stop_reason == "nan":
        last = result.saved[-1] if result.saved else None
        stem = lora_name(name, step=global_step)
        kept = save_lora(stem, epoch) if global_step > 0 else None
        raise UserError(
            f"the loss became NaN/inf at step {global_step + 1} (epoch {epoch}); training stopped before the weights "
            f"were touched. Last good LoRA: {kept or last or 'none (no step completed)'}. Usual causes: fp16 overflow "
            f"(use --mixed_precision bf16, or --no_half_vae for SDXL), a learning rate too high, or a broken image.")
    if stop_reason == "interrupt":
        result.interrupted = True
        result.final_lora = result.saved[-1]
        log(f"stopped at step {global_step}; continue with --resume {result.states[-1]}")
        return result
    # ---- final save ---------------------------------------------------------------------------------------------
    result.final_lora = save_lora(name, result.epoch)
    if opts.save_state or opts.save_state_on_train_end:
        save_training_state(out_dir / f"{name}-state", epoch, 0)
    result.metadata = _read_metadata(result.final_lora) if is_main else {}
    return result


def _batch_loss(bundle, batch, opts, alphas_cumprod, noise_gen, encode_latents, te_cache, train_te, prediction,
                device, weight_dtype) -> torch.Tensor:
    """One batch: latents -> noise -> UNet prediction -> weighted loss (a scalar)."""
    if batch["latents"] is not None:
        latents = batch["latents"].to(device, torch.float32)
    else:
        latents = encode_latents(batch["images"]).to(device)
    if te_cache is not None:
        cond = te_cache.get(batch["captions"])
        hidden, pooled = (cond if isinstance(cond, tuple) else (cond, None))
    else:
        with torch.set_grad_enabled(train_te):
            hidden, pooled = encode_text(bundle, batch["captions"], opts.clip_skip, opts.max_token_length)
    hidden = hidden.to(device)
    noise, noisy, timesteps = N.noisy_latents_from_options(latents, alphas_cumprod, noise_gen, opts)
    kwargs = {}
    if bundle.family.size_conditioning:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(device),
                                       "time_ids": sdxl_time_ids(batch, device, hidden.dtype)}
    unet = bundle.unet
    pred = unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype), **kwargs).sample
    target = N.training_target(latents, noise, timesteps, alphas_cumprod, prediction)
    mask = batch.get("alpha_masks")  # None unless alpha_mask / conditioning masks gave one (sd-scripts does the same)
    return losses.loss_from_options(pred.float(), target.float(), timesteps, alphas_cumprod, opts,
                                    v_prediction=prediction == "v_prediction", mask=mask,
                                    sample_weights=batch["loss_weights"].to(device))


def _file_hashes(path) -> tuple[str, str]:
    import hashlib

    with open(path, "rb") as fh:
        fh.seek(0x100000)
        legacy = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
        fh.seek(0)
        full = hashlib.sha256()
        for block in iter(lambda: fh.read(1 << 20), b""):
            full.update(block)
    return legacy, full.hexdigest()


def _tee(log, path):
    fh = open(path, "a", encoding="utf-8")

    def both(msg, *a, **k):
        log(msg, *a, **k)
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        fh.flush()

    return both


def _all_reduce_grads(params) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def _read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})
