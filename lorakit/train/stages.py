"""The stages of a training run, in order; each reads the few options it declares and returns a small value.

    set_up_run -> Run        process, device, seed, output names, a state to resume (nothing loaded yet)
    load_base_model          the ModelBundle (skipped when the caller passes one)
    report_options           refusals and notes for this family, --log_config
    prepare_model -> Model   base weights merged, noise schedule, modules on the device in the training dtypes
    load_data -> Data        datasets, batches per epoch, steps and epochs
    build_network -> Net     the adapter network applied to the model (and the model's memory settings)
    prepare_inputs -> Inputs how batches become latents and text conditioning (caches filled here)
    place_denoiser           FLUX: cached text encoders leave the device, the transformer comes (--blocks_to_swap)
    build_optimizer -> Optim optimizer, learning-rate schedule, loss scaler
    restore -> Start         where the loop starts (a resumed state's weights, optimizer and RNG streams)

Each stage declares the options it reads as a small frozen dataclass (`RunOptions`, ...), filled by `picked`.
Checks that need no model (preflight, memory estimates) belong between set_up_run and load_base_model; checks of the
weights after every optimizer step belong in loop._after_optimizer_step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lorakit import options as O
from lorakit.errors import UserError
from lorakit.models.conv_gemm import use_gemm_convs
from lorakit.models.dnn_linear import use_dnn_linears
from lorakit.models.dtypes import dtype_named
from lorakit.train import noise as N
from lorakit.train.flow import FlowOptions

DEFAULT_OUTPUT_NAME = "last"


def picked(cls, opts):
    """The options a stage declares (the fields of `cls`, named like the options), read from the run's options; a
    field with metadata {"options": OtherOptions} holds that group, picked the same way."""
    return cls(**{f.name: picked(f.metadata["options"], opts) if "options" in f.metadata else getattr(opts, f.name)
                  for f in dataclasses.fields(cls)})


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# ================================================================================================ run ==============
@dataclass(frozen=True)
class RunOptions:
    seed: Optional[int]
    resume: Optional[str]
    output_dir: Optional[str]
    output_name: Optional[str]
    mixed_precision: str
    console_log_file: Optional[str]
    ddp_timeout: Optional[int]


@dataclass(frozen=True)
class Streams:
    """The run's own random streams (noise draws, VAE sampling); a state folder saves and restores them."""

    noise: torch.Generator
    latent: torch.Generator


@dataclass(frozen=True)
class Run:
    """This process's part of the run, known before anything is loaded."""

    seed: int
    rank: int
    world: int
    device: torch.device
    weight_dtype: torch.dtype  # the frozen model's compute dtype (--mixed_precision)
    out_dir: Path
    name: str  # LoRA file stem
    started_at: float
    log: Callable[[str], None]
    progress: bool
    streams: Streams
    resume: Any = None  # the TrainState to continue from
    resume_from: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def set_up_run(o: RunOptions, log: Callable[[str], None], progress: bool) -> Run:
    """Log file, the state to resume, the seed (the state's, the option's or a drawn one), processes and device."""
    from lorakit.train.state import load_state

    started_at = time.time()
    if o.console_log_file:
        log = _tee(log, o.console_log_file)
    resume = load_state(o.resume) if o.resume else None
    seed = o.seed
    if resume is not None:
        saved_seed = int(resume.counters.get("seed", seed if seed is not None else 0))
        if seed is not None and seed != saved_seed:
            log(f"note: the state was trained with --seed {saved_seed}; using it so batches continue in order.")
        seed = saved_seed
    seed = seed if seed is not None else random.SystemRandom().randint(0, 2**31 - 1)
    rank, world = _join_processes(o.ddp_timeout)
    if rank != 0:
        log, progress = (lambda *_a, **_k: None), False
    if o.output_dir is None:
        raise UserError("--output_dir is required: the folder for the LoRA files.")
    streams = Streams(noise=torch.Generator().manual_seed(seed + 1000003 * rank),
                      latent=torch.Generator().manual_seed(seed + 1))
    return Run(seed=seed, rank=rank, world=world, device=_device(), started_at=started_at,
               weight_dtype=dtype_named(o.mixed_precision, torch.float32), out_dir=Path(o.output_dir),
               name=o.output_name or DEFAULT_OUTPUT_NAME, log=log, progress=progress, streams=streams, resume=resume,
               resume_from=o.resume)


def _join_processes(ddp_timeout: Optional[int]) -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            timeout = datetime.timedelta(minutes=ddp_timeout) if ddp_timeout else None
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                    **({"timeout": timeout} if timeout else {}))
    return rank, world


def _device() -> torch.device:
    env = os.environ.get("LORAKIT_DEVICE")
    if env:
        return torch.device(env)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _tee(log, path):
    fh = open(path, "a", encoding="utf-8")

    def both(msg, *a, **k):
        log(msg, *a, **k)
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        fh.flush()

    return both


# ================================================================================================ model ============
@dataclass(frozen=True)
class LoadOptions:
    pretrained_model_name_or_path: Optional[str]
    vae: Optional[str]
    v2: bool
    v_parameterization: bool
    sdxl: bool
    mixed_precision: str
    clip_l: Optional[str]  # FLUX's parts as files of their own
    t5xxl: Optional[str]
    ae: Optional[str]


def plan_base_model(o: LoadOptions):
    """The model's family and module configs from the checkpoint's header (no weights read), so the data, the
    options and the memory can be checked before the minute a real checkpoint takes to load."""
    from lorakit.models.loading import plan_model

    if not o.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (a .safetensors/.ckpt file or a diffusers "
                        "folder).")
    return plan_model(o.pretrained_model_name_or_path, v2=o.v2, v_parameterization=o.v_parameterization,
                      sdxl=o.sdxl)


def load_base_model(o: LoadOptions, log: Callable[[str], None]):
    """The ModelBundle, loaded straight into the training dtype (no full-precision copy of the frozen model)."""
    from lorakit.models.component_files import check_complete
    from lorakit.models.loading import load_bundle

    if not o.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (a .safetensors/.ckpt file or a diffusers "
                        "folder).")
    log(f"loading {o.pretrained_model_name_or_path}")
    bundle = load_bundle(o.pretrained_model_name_or_path, vae=o.vae, v2=o.v2, v_parameterization=o.v_parameterization,
                         sdxl=o.sdxl, dtype=dtype_named(o.mixed_precision), clip_l=o.clip_l, t5xxl=o.t5xxl, ae=o.ae)
    check_complete(bundle, o.pretrained_model_name_or_path)
    return bundle


def report_options(opts, family, run: Run) -> None:
    """Refuse impossible combinations for this family; log the notes and (--log_config) the options."""
    import json

    from lorakit.train.checks import check_options
    from lorakit.utils.cpu import slow_half_warning

    for note in check_options(opts, family):
        run.log("note: " + note)
    slow = slow_half_warning(run.device, run.weight_dtype)  # before loading: the first step would take minutes
    if slow:
        run.log("warning: " + slow)
    if opts.log_config:
        run.log("options: " + json.dumps(O.given_values(dataclasses.replace(opts, seed=run.seed)), default=str))


@dataclass(frozen=True)
class ModelOptions:
    v_parameterization: bool
    zero_terminal_snr: bool
    no_half_vae: bool
    base_weights: Optional[list]
    base_weights_multiplier: Optional[list]
    # flow-matching families (FLUX.1): the objective's own options, read by picked() like the rest
    flow: FlowOptions = dataclasses.field(metadata={"options": FlowOptions})


@dataclass(frozen=True)
class Model:
    bundle: Any  # ModelBundle
    prediction: str  # "epsilon", "v_prediction" or "flow"
    alphas_cumprod: Optional[torch.Tensor]  # the DDPM schedule (None for a flow model)
    vae_dtype: torch.dtype
    objective: Any = None  # train.flow.FlowObjective for flow models; None: the DDPM loss of train.loop

    @property
    def family(self):
        return self.bundle.family


def prepare_model(o: ModelOptions, run: Run, bundle) -> Model:
    """Merge --base_weights, build the noise schedule, move the modules to the device in their training dtypes."""
    from lorakit.adapters.network import load_network

    fam = bundle.family
    for i, path in enumerate(o.base_weights or []):
        mult = o.base_weights_multiplier[i] if o.base_weights_multiplier else 1.0
        load_network(bundle, path, multiplier=mult, merge=True)
        run.log(f"merged {path} x {mult} into the model before training")
    if fam.objective == "flow":
        return _flow_model(o, run, bundle)
    declared = bool(bundle.noise_scheduler.config.get("rescale_betas_zero_snr"))  # a `ztsnr` checkpoint
    if (o.v_parameterization and fam.prediction_type != "v_prediction") or (o.zero_terminal_snr and not declared):
        # the family's v sibling (SDXL -> SDXL v-pred: its LoRAs say v) and the schedule previews sample with
        from lorakit.models.loading import with_schedule

        bundle = with_schedule(bundle, v_prediction=o.v_parameterization, zero_terminal_snr=o.zero_terminal_snr)
        fam = bundle.family
    prediction = "v_prediction" if (o.v_parameterization or fam.prediction_type == "v_prediction") else "epsilon"
    betas = bundle.noise_scheduler.betas.double()
    if o.zero_terminal_snr or declared:
        if declared and not o.zero_terminal_snr:
            run.log("note: the model declares a zero-terminal-SNR schedule (its `ztsnr` key): training uses it, as "
                    "with --zero_terminal_snr.")
        betas = N.zero_terminal_snr_betas(betas)
        if prediction != "v_prediction":
            run.log("note: --zero_terminal_snr without v-prediction: the last timestep's input is pure noise; "
                    "sd-scripts allows it, but it is meant for --v_parameterization.")
    alphas_cumprod = N.alphas_cumprod_from_betas(betas).float()
    dtypes = component_dtypes(o.no_half_vae, run.weight_dtype, fam)
    for name, module in bundle.components().items():
        place(module, run.device, dtypes[name])
    if run.device.type == "cpu":  # the lowest resolutions' frozen convolutions as GEMMs (models.conv_gemm)
        use_gemm_convs(bundle.unet)
        for module in [bundle.unet, *filter(None, bundle.text_encoders)]:  # float32 Linears through oneDNN
            use_dnn_linears(module)
    return Model(bundle, prediction, alphas_cumprod, dtypes["vae"])


def _flow_model(o: ModelOptions, run: Run, bundle) -> Model:
    """A rectified-flow model (FLUX.1): no noise schedule; the objective draws sigmas as --timestep_sampling says."""
    from lorakit.train.flow import FlowObjective

    objective = FlowObjective(o.flow, bundle.family)
    if objective.t5_tokenizer is not None:  # --tokenizer_cache_dir: previews tokenize like training
        from lorakit.models.component_files import set_t5_tokenizer

        set_t5_tokenizer(bundle, objective.t5_tokenizer)
    dtypes = component_dtypes(o.no_half_vae, run.weight_dtype, bundle.family)
    for name, module in bundle.components().items():
        waits = name == "unet" and bundle.family.denoiser_after_caching  # place_denoiser moves it, after caching
        place(module, next(module.parameters()).device if waits else run.device, dtypes[name])
    return Model(bundle, "flow", None, dtypes["vae"], objective)


def check_blocks_to_swap(n: Optional[int], family, configs: Optional[dict]) -> Optional[tuple[int, ...]]:
    """Blocks of each list --blocks_to_swap n moves (None: not given), or a UserError where it cannot apply."""
    from lorakit.models.block_swap import swap_counts

    if n is None:
        return None
    if not family.block_lists:
        raise UserError(f"--blocks_to_swap: {family.title}'s UNet has no transformer block lists to swap (sd-scripts "
                        "offers it for FLUX.1 and SD3); remove it, and use --gradient_checkpointing, --fp8_base or "
                        "--cache_text_encoder_outputs to save memory.")
    unet = (configs or {}).get("unet") or family.config("unet")
    return swap_counts(n, [int(unet[key]) for _name, key in family.block_lists])


def component_dtypes(no_half_vae: bool, weight_dtype: torch.dtype, family) -> dict[str, torch.dtype]:
    """The training dtype of each model component: the frozen model's, except a VAE that overflows in fp16 (or
    --no_half_vae) in float32."""
    half_unsafe = not family.vae_fp16_safe and weight_dtype == torch.float16
    vae = torch.float32 if (no_half_vae or half_unsafe) else weight_dtype
    return {"unet": weight_dtype, "vae": vae, **{s.config_name: weight_dtype for s in family.text_encoders}}


def place(module: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None) -> None:
    """module.to(device, dtype), skipped when nothing would change (a moved module is rebuilt tensor by tensor, and
    the memory estimate's fake tensors cannot be moved at all)."""
    first = next(module.parameters(), None)
    if first is None:
        return
    if first.device != torch.device(device) or any(p.device != first.device for p in module.parameters()):
        module.to(device)
    if dtype is not None and any(p.dtype != dtype and p.is_floating_point() for p in module.parameters()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module.to(dtype=dtype)


# ================================================================================================ data =============
def dataset_configs(opts, family, log: Callable[[str], None]) -> list:
    """The datasets the options describe (command-line datasets default to the family's resolution)."""
    from lorakit.data import build_dataset_configs

    notes: list[str] = []
    configs = build_dataset_configs(opts, notes=notes, default_resolution=family.resolution)
    for n in notes:
        log("note: " + n)
    return configs


@dataclass(frozen=True)
class DataOptions:
    on_bad_image: str
    gradient_accumulation_steps: int
    max_train_steps: int
    max_train_epochs: Optional[int]
    save_every_n_epochs: Optional[int]
    save_n_epoch_ratio: Optional[int]
    masked_loss: bool  # conditioning_data_dir masks are read only with it (as sd-scripts)


@dataclass(frozen=True)
class Data:
    configs: list
    group: Any  # DatasetGroup
    batches_per_epoch: int
    accum: int  # batches per optimizer step and process
    max_steps: int
    num_epochs: int
    save_every_n_epochs: Optional[int]  # --save_n_epoch_ratio resolved
    multipliers: Optional[list]  # network multiplier per dataset (None: all 1)
    validation: Any = None  # DatasetGroup of the images validation_split held out (None: no validation)


def check_embedding_words(words: Optional[list], data: Data) -> None:
    """A --train_embedding word that no caption (or folder class token) holds never gets a gradient: say so now, not
    after the run. CLIP lowercases text, so the match ignores case; a word must stand on its own in the caption."""
    import re

    from lorakit.adapters.embeddings import check_words

    if not words:
        return
    words = check_words(words)
    captions = [e.caption.lower() for ds in data.group.datasets for e in ds.entries]
    absent = [w for w in words if not any(re.search(rf"(?<!\w){re.escape(w.lower())}(?!\w)", c)
                                          for c in captions)]
    if absent:
        raise UserError(f"--train_embedding {' '.join(absent)}: no caption or folder name of the training images "
                        f"contains {'this word' if len(absent) == 1 else 'these words'}, so the vectors would never "
                        f"train. Use the trigger word your captions start with (e.g. the 'usu' of 20_usu bear).")


def load_data(configs: list, o: DataOptions, run: Run) -> Data:
    """Scan the datasets; count batches, steps and epochs (--max_train_epochs wins over --max_train_steps)."""
    from lorakit.data import DatasetGroup

    group = DatasetGroup.build(configs, seed=run.seed, on_bad_image=o.on_bad_image, masked_loss=o.masked_loss)
    run.log(group.summary_text())
    batches_per_epoch = group.num_batches(1)
    accum = max(1, o.gradient_accumulation_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / (accum * run.world))
    max_steps = o.max_train_epochs * steps_per_epoch if o.max_train_epochs else o.max_train_steps
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    every = max(1, num_epochs // o.save_n_epoch_ratio) if o.save_n_epoch_ratio else o.save_every_n_epochs
    group.max_train_steps = max_steps  # fractional token warmup counts in steps of this run
    multipliers = [c.network_multiplier for c in configs]
    validation = group.validation_group()
    if validation is not None:
        run.log(f"validation: {validation.num_train_images} held-out images in {validation.num_batches(1)} batches")
    return Data(configs, group, batches_per_epoch, accum, max_steps, num_epochs, every,
                multipliers if any(m != 1.0 for m in multipliers) else None, validation)


# ================================================================================================ network ==========
@dataclass(frozen=True)
class NetworkOptions:
    network_module: str
    network_dim: Optional[int]
    network_alpha: float
    network_dropout: Optional[float]
    network_args: Optional[list]
    network_weights: Optional[str]
    dim_from_weights: bool
    network_train_unet_only: bool
    network_train_text_encoder_only: bool
    train_embedding: Optional[list]
    loraplus_lr_ratio: Optional[float]
    loraplus_unet_lr_ratio: Optional[float]
    loraplus_text_encoder_lr_ratio: Optional[float]
    gradient_checkpointing: bool
    xformers: bool
    fp8_base: bool
    fp8_base_unet: bool


@dataclass(frozen=True)
class Net:
    network: Any  # adapters.network.Network, applied to the bundle
    train_te: bool  # text-encoder adapters or token embeddings train (so text must be encoded with gradients)
    dim: Optional[int]  # the rank asked for (--network_dim or read from --network_weights)


def build_network(o: NetworkOptions, run: Run, model: Model) -> Net:
    """Create the adapters (seeded), load --network_weights, apply them, then the model's memory settings."""
    from lorakit.adapters.embeddings import TokenEmbeddings
    from lorakit.adapters.network import create_network

    bundle = model.bundle
    net_args = _network_args(o)
    dim = _dim_from_weights(o.network_weights, run.log) if o.dim_from_weights else o.network_dim
    torch.manual_seed(run.seed)  # adapter initialisation
    network = create_network(bundle, o.network_module, dim, o.network_alpha, net_args,
                             train_unet=not o.network_train_text_encoder_only,
                             train_text_encoder=not o.network_train_unet_only, neuron_dropout=o.network_dropout)
    if o.train_embedding:
        network.set_embeddings(TokenEmbeddings.for_words(bundle, o.train_embedding))
    if o.network_weights:
        network.load_weights(o.network_weights)
        run.log(f"loaded network weights from {o.network_weights}")
    network.apply_to(bundle)
    place(network, run.device, torch.float32)
    train_te = bool(network.te_adapters) or network.embeddings is not None
    emb = network.embeddings
    run.log(f"{bundle.family.title}: {len(network.unet_adapters)} UNet + {len(network.te_adapters)} text-encoder "
            f"modules" + (f" + trained embeddings for {', '.join(emb.words)}" if emb is not None else "")
            + f" ({sum(p.numel() for p in network.parameters())} parameters)")
    _memory_settings(o, bundle, train_te)
    if run.device.type == "cpu" and not any(a.full_size_change for a in network.adapters):
        from lorakit.utils.allocator import keep_freed_memory

        keep_freed_memory()  # a quarter off each CPU step; not with full-size temporaries (see the module)
    return Net(network, train_te, dim)


def _network_args(o: NetworkOptions) -> dict:
    net_args = O.network_args_dict(o.network_args)
    for flag in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if getattr(o, flag) is not None:
            net_args.setdefault(flag, str(getattr(o, flag)))
    return net_args


def check_network_args(o: NetworkOptions, family) -> None:
    """--network_module/--network_args checked against the planned family before the model loads (the same parser
    build_network uses: an unknown key or a block list of the wrong length fails in seconds, not after a minute)."""
    from lorakit.adapters.network import parse_network_args

    dim = _dim_from_weights(o.network_weights, lambda *_a: None) if o.dim_from_weights else o.network_dim
    parse_network_args(family, o.network_module, dim, o.network_alpha, _network_args(o), o.network_dropout)


def _dim_from_weights(path, log) -> int:
    from lorakit.adapters.file import read_lora_file

    downs = [v for k, v in read_lora_file(path).tensors.items() if k.endswith("lora_down.weight")]
    if not downs:
        raise UserError(f"--dim_from_weights: {path} has no lora_down weights to read a rank from.")
    dim = int(downs[0].shape[0])
    log(f"--dim_from_weights: network_dim {dim}")
    return dim


def _memory_settings(o: NetworkOptions, bundle, train_te: bool) -> None:
    if o.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        bundle.unet.train()  # diffusers checkpoints only in training mode (the UNet has no dropout)
        if train_te:
            for te in bundle.text_encoders:
                getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
                te.train()
    if o.xformers:
        with contextlib.suppress(Exception):
            bundle.unet.enable_xformers_memory_efficient_attention()
    if o.fp8_base or o.fp8_base_unet:
        _to_fp8(bundle.unet)
    if o.fp8_base and not train_te:
        for te in bundle.text_encoders:
            _to_fp8(te)


def _to_fp8(module: torch.nn.Module) -> None:
    """Store Linear/Conv weights of a frozen module in float8 (upcast by autocast in each op)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)


# ================================================================================================ inputs ===========
@dataclass(frozen=True)
class InputOptions:
    pretrained_model_name_or_path: Optional[str]
    vae: Optional[str]
    cache_latents: bool
    cache_latents_to_disk: bool
    vae_batch_size: int
    cache_text_encoder_outputs: bool
    cache_text_encoder_outputs_to_disk: bool
    clip_skip: Optional[int]
    max_token_length: Optional[int]
    skip_cache_check: bool


@dataclass(frozen=True)
class Inputs:
    encode_latents: Callable  # pixels [B,3,H,W] -> scaled latents (for batches without cached latents)
    te_cache: Any  # data.latents.TextEncoderCache, or None: encode captions each step
    text_memo: bool = False  # te_cache is the frozen encoder's memo, not --cache_text_encoder_outputs

    def reuse_lines(self) -> list[str]:
        """What the memos saved, for the end of the run's log."""
        lines = []
        memo = getattr(self.encode_latents, "memo", None)
        if memo is not None and memo.hits + memo.misses:
            lines.append(f"VAE encoder: {memo.misses} images encoded, their posteriors reused {memo.hits} times (a "
                         f"fresh latent drawn each step; --cache_latents would skip the first encodes too but "
                         f"freeze one draw)")
        if self.text_memo and self.te_cache.hits + self.te_cache.misses:
            lines.append(f"text encoder (frozen): {self.te_cache.misses} captions encoded, {self.te_cache.hits} "
                         f"reused")
        return lines


def prepare_inputs(o: InputOptions, run: Run, model: Model, data: Data, train_te: bool) -> Inputs:
    """The VAE encoder of the run (latent stream of the run) and the caches the options ask for, filled now. A
    frozen text encoder without --cache_text_encoder_outputs gets a memo instead: its outputs are a function of the
    caption text alone, so a caption seen before (every repeat and epoch when captions are not shuffled) is not
    encoded again; each caption is encoded alone so that a remembered output equals a fresh one bitwise."""
    from lorakit.data import TextEncoderCache, cache_latents, group_static_captions
    from lorakit.data.latents import memo_budget_bytes
    from lorakit.models.conditioning import caption_outputs

    bundle, fam = model.bundle, model.family
    # the whole dataset is encoded once when cached (batched, no memo); else each step encodes what it draws
    encode_latents = vae_encoder(bundle, run.streams.latent, model.vae_dtype,
                                 memo_bytes=0 if o.cache_latents else memo_budget_bytes())
    if o.cache_latents:  # minutes on a large dataset: say what happens and what it took
        n = sum(len(ds.entries) for ds in data.group.datasets)
        run.log(f"caching latents of {n} images" + (" to disk" if o.cache_latents_to_disk else "") + " ...")
        t0 = time.time()
        done = cache_latents(data.group, encode_latents, suffix=fam.latent_cache_suffix,
                             to_disk=o.cache_latents_to_disk, batch_size=o.vae_batch_size,
                             skip_check=o.skip_cache_check, progress=ProgressLines(run.log, "latents"),
                             latent_factor=bundle.latent_factor,
                             vae_id=f"{fam.name}:{os.path.basename(str(o.vae or o.pretrained_model_name_or_path))}")
        run.log(f"cached latents: {done.get('encoded', 0)} encoded, {done.get('reused', 0)} reused from disk, "
                f"{done.get('skipped', 0)} skipped ({time.time() - t0:.1f} s)")
    def encode_for_cache(caps):
        if model.objective is not None:  # FLUX: T5 features and CLIP-L's pooled vector, at T5's length
            return model.objective.encode_text(bundle, caps)
        return caption_outputs(bundle, caps, o.clip_skip, o.max_token_length)

    te_cache = None
    text_memo = not o.cache_text_encoder_outputs and not train_te
    if text_memo:
        te_cache = TextEncoderCache(encode_for_cache, batch_size=1, max_bytes=memo_budget_bytes())
    if o.cache_text_encoder_outputs:
        cache_dir = (run.out_dir / ".te_cache") if o.cache_text_encoder_outputs_to_disk else None
        text_length = model.objective.t5_length if model.objective is not None else o.max_token_length
        te_cache = TextEncoderCache(encode_for_cache, cache_dir, key_prefix=f"{fam.name}:{o.clip_skip}:"
                                    f"{text_length}:{o.pretrained_model_name_or_path}")
        captions = group_static_captions(data.group)
        run.log(f"caching text-encoder outputs of {len(captions)} captions ...")
        with torch.no_grad(), autocast(run.device, run.weight_dtype):
            te_cache.precompute(captions, progress=ProgressLines(run.log, "captions"))
    return Inputs(encode_latents, te_cache, text_memo)


# ================================================================================================ denoiser =========
@dataclass(frozen=True)
class DenoiserOptions:
    blocks_to_swap: Optional[int]
    cache_text_encoder_outputs: bool


def place_denoiser(o: DenoiserOptions, run: Run, model: Model) -> Optional[tuple[int, ...]]:
    """sd-scripts' order for FLUX (family.denoiser_after_caching): once the caches are filled, text encoders whose
    outputs are cached leave the device (T5-XXL: 9 GiB in bf16), then the transformer comes, its --blocks_to_swap
    blocks staying in CPU memory (they take turns on the device). Returns the blocks swapped per list, or None."""
    bundle = model.bundle
    if model.family.denoiser_after_caching and o.cache_text_encoder_outputs:
        for te in bundle.text_encoders:
            place(te, torch.device("cpu"))
        if run.device.type != "cpu":
            run.log("text encoders moved to CPU memory: their outputs are cached")
    if not o.blocks_to_swap:
        place(bundle.unet, run.device)
        return None
    counts = bundle.unet.enable_block_swap(o.blocks_to_swap, run.device)  # weights in their training dtype by now
    run.log(f"--blocks_to_swap {o.blocks_to_swap}: {counts[0]} double and {counts[1]} single blocks stay in CPU "
            f"memory and take turns on {run.device}")
    if run.device.type == "cpu":
        run.log("note: --blocks_to_swap saves memory on a GPU; training runs on the CPU here, so the blocks take turns "
                "as they would there but nothing is saved (each visit copies a block's weights).")
    return counts


class ProgressLines:
    """Progress of a cache being filled, as a log line every `every` seconds (and at the end): caching a large
    dataset takes minutes, and a silent minute reads as a hang."""

    def __init__(self, log: Callable[[str], None], what: str, every: float = 10.0):
        self.log, self.what, self.every = log, what, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and (done < total or now - self.start < self.every):
            return  # quick caches stay quiet; the caller logs the totals
        self.last = now
        each = (now - self.start) / max(done, 1)
        left = f", about {each * (total - done):.0f} s left" if done < total else ""
        self.log(f"  {self.what}: {done}/{total} done ({each:.2f} s each{left})")


def vae_layout(vae: torch.nn.Module, dtype: torch.dtype) -> torch.memory_format:
    """The memory layout the VAE encodes in (its weights are set to it here). Half precision: channels-last, which
    oneDNN's bf16 convolutions run faster (measured, SD VAE encoder, bf16, 2 avx512_bf16 cores: 512 px 1.62 -> 1.41
    s/image; tensor cores prefer it too). Float32 keeps its layout, so fp32 latents stay bitwise what they were
    (channels-last fp32 was 10 % faster but rounds otherwise). The memory estimate's fake weights stay as they are."""
    from torch._subclasses.fake_tensor import is_fake

    first = next(vae.parameters(), None)
    if dtype not in (torch.bfloat16, torch.float16) or first is None or first.is_meta or is_fake(first):
        return torch.contiguous_format
    vae.to(memory_format=torch.channels_last)
    return torch.channels_last


def vae_encoder(bundle, generator: torch.Generator, dtype: torch.dtype, memo_bytes: int = 0,
                per_image: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """pixels [B,3,H,W] -> scaled latents, one draw from the VAE posterior per image from `generator`. With
    `memo_bytes`, posteriors are remembered per image (data.latents.PosteriorMemo) and each image is encoded alone,
    so that a remembered posterior and a fresh encode are bitwise equal whatever the batch (a batched conv may
    round differently) and a resumed run draws what the uninterrupted one did. `per_image` without a memo: the
    same shapes (the memory estimate's traced step)."""
    from lorakit.data.latents import PosteriorMemo

    scale, shift = bundle.latent_scale, bundle.latent_shift  # FLUX's AE: (z - 0.1159) * 0.3611
    vae = bundle.vae
    memo = PosteriorMemo(memo_bytes) if memo_bytes else None
    layout = vae_layout(vae, dtype)

    def posterior(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels.to(vae.device, dtype).contiguous(memory_format=layout)).latent_dist
        # contiguous again: a channels-last latent would carry its layout into the UNet, which is faster as it is
        return dist.mean.float().contiguous(), dist.std.float().contiguous()

    def one_by_one(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for image in pixels.split(1):
            key = memo.key(image) if memo is not None else None
            found = memo.get(key) if memo is not None else None
            if found is None:
                found = posterior(image)
                if memo is not None:
                    found = tuple(t.cpu() for t in found)  # kept in host memory, never on the GPU
                    memo.put(key, *found)
            means.append(found[0])
            stds.append(found[1])
        return torch.cat(means).to(vae.device), torch.cat(stds).to(vae.device)

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        mean, std = one_by_one(pixels) if memo is not None or per_image else posterior(pixels)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        z = mean + std * eps
        return ((z - shift if shift else z) * scale).float()

    encode.memo = memo
    return encode


# ================================================================================================ optimizer ========
@dataclass(frozen=True)
class OptimizerOptions:
    learning_rate: float
    unet_lr: Optional[float]
    text_encoder_lr: Optional[list]
    embedding_lr: Optional[float]
    optimizer_type: str
    use_8bit_adam: bool
    use_lion_optimizer: bool
    optimizer_args: Optional[list]
    # read by lr_schedules.scheduler_from_options
    lr_scheduler: str
    lr_scheduler_type: str
    lr_scheduler_args: Optional[list]
    lr_warmup_steps: Any
    lr_decay_steps: Any
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    lr_scheduler_timescale: Optional[int]
    lr_scheduler_min_lr_ratio: Optional[float]


@dataclass(frozen=True)
class Optim:
    optimizer: torch.optim.Optimizer
    scheduler: Any  # lr_schedules.LRScheduler
    scaler: Any  # torch.amp.GradScaler under fp16, else None
    info: Any  # optimizers.OptimizerInfo
    trainable: list  # every trained parameter
    te_lr: Any  # text-encoder lr as sd-scripts records it (None, one float or a list)


def build_optimizer(o: OptimizerOptions, run: Run, net: Net, max_steps: int) -> Optim:
    from lorakit.train.lr_schedules import scheduler_from_options
    from lorakit.train.optimizers import create_optimizer, is_adaptive

    te_lr = None if not o.text_encoder_lr else (o.text_encoder_lr[0] if len(o.text_encoder_lr) == 1
                                                 else list(o.text_encoder_lr))
    groups = net.network.trainable_param_groups(o.unet_lr, te_lr, o.learning_rate, embedding_lr=o.embedding_lr)
    if not groups:
        raise UserError("nothing to train: every parameter group has learning rate 0.")
    optimizer_type = "AdamW8bit" if o.use_8bit_adam else ("Lion" if o.use_lion_optimizer else o.optimizer_type)
    info = create_optimizer(optimizer_type or "AdamW", groups, o.learning_rate, o.optimizer_args)
    if is_adaptive(info.name) and o.learning_rate <= 0.1:
        run.log(f"note: {info.name} estimates the step size itself; --learning_rate is a multiplier and 1.0 is usual "
                f"(got {o.learning_rate}).")
    scheduler = scheduler_from_options(info.optimizer, o, max_steps, schedule_free=info.is_schedule_free,
                                       relative_step_adafactor=info.relative_step_adafactor)
    scaler = torch.amp.GradScaler(run.device.type) if run.weight_dtype == torch.float16 else None
    trainable = [p for g in info.optimizer.param_groups for p in g["params"]]
    return Optim(info.optimizer, scheduler, scaler, info, trainable, te_lr)


# ================================================================================================ restore ==========
@dataclass(frozen=True)
class Start:
    """Where the loop begins: epoch (1-based), the next batch in it, optimizer steps already done."""

    epoch: int = 1
    batch: int = 0
    step: int = 0


def restore(run: Run, net: Net, optim: Optim) -> Start:
    """Continue a saved state exactly: adapter weights, optimizer, schedule, loss scaler and every RNG stream."""
    from lorakit.train.state import check_state_matches, restore_rng

    st = run.resume
    if st is None:
        return Start()
    # another rank or optimizer would fail inside torch with a bare shape error: name the flags instead
    check_state_matches(st, net.network, run.resume_from, optim.optimizer)
    net.network.load_state_dict({k: v.to(run.device) for k, v in st.network.items()}, strict=True)
    optim.optimizer.load_state_dict(st.optimizer)
    optim.scheduler.load_state_dict(st.scheduler)
    if optim.scaler is not None and st.scaler:
        optim.scaler.load_state_dict(st.scaler)
    gens, rng_state = st.generators, st.rng
    if "per_rank" in gens:
        if len(gens["per_rank"]) != run.world:
            run.log(f"note: the state was saved by {len(gens['per_rank'])} processes, this run has {run.world}; "
                    "training continues but is not bit-identical to an uninterrupted run.")
        gens = gens["per_rank"][min(run.rank, len(gens["per_rank"]) - 1)]
        rng_state = rng_state["per_rank"][min(run.rank, len(rng_state["per_rank"]) - 1)]
    restore_rng(rng_state)
    run.streams.noise.set_state(gens["noise"])
    run.streams.latent.set_state(gens["latent"])
    start = Start(int(st.counters["epoch"]), int(st.counters["batch"]), int(st.counters["global_step"]))
    run.log(f"resumed from {run.resume_from}: epoch {start.epoch}, batch {start.batch}, step {start.step}")
    return start
