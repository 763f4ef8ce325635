"""ModelBundle: tokenizer(s), text encoder(s), VAE, UNet and noise schedule of one model, plus its Family."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.models.families import Family


@dataclass
class ModelBundle:
    family: Family
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    configs: dict[str, dict] = field(default_factory=dict)  # the configs the modules were built from
    source: str | None = None
    info: dict = field(default_factory=dict)  # facts found while loading (EMA present, dropped keys, ...)

    def components(self) -> dict[str, torch.nn.Module]:
        """Component name -> module, with names matching the family's config files."""
        out: dict[str, torch.nn.Module] = {}
        if self.unet is not None:
            out["unet"] = self.unet
        if self.vae is not None:
            out["vae"] = self.vae
        for spec, te in zip(self.family.text_encoders, self.text_encoders):
            if te is not None:
                out[spec.config_name] = te
        return out

    @property
    def latent_scale(self) -> float:
        return float(self.configs.get("vae", self.family.config("vae"))["scaling_factor"])

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel: the VAE halves the size at each level after the first (8 for SD's VAE,
        4 for a three-level one such as the v2 toy base's)."""
        return 2 ** (len(self.configs.get("vae", self.family.config("vae"))["block_out_channels"]) - 1)

    @property
    def latent_shift(self) -> float:
        """Subtracted before scaling (FLUX's AE: 0.1159; SD VAEs have none): latents = (z - shift) * scale."""
        return float(self.configs.get("vae", self.family.config("vae")).get("shift_factor") or 0.0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype=None) -> "ModelBundle":
        for module in self.components().values():
            p = next(module.parameters())
            same_device = device is None or p.device == torch.device(device)
            if same_device and (dtype is None or p.dtype == dtype):
                continue  # nothing to do (and diffusers warns on every .to() call)
            module.to(device=device, dtype=dtype)
        return self


def clip_layers(text_encoder) -> list:
    """The CLIPEncoderLayer list of a transformers CLIP text model, whatever its module nesting (4.x or 5.x)."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return list(inner.encoder.layers)


def build_unet(config: dict, denoiser: str = "unet"):
    """The family's denoiser (Family.denoiser): a diffusers UNet, or FLUX's transformer in BFL layout."""
    if denoiser == "flux":
        from lorakit.models.flux import FluxTransformer

        return FluxTransformer.from_config(config)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def import_model_libraries() -> None:
    """Import what building any family's modules imports (diffusers' UNet and VAE, transformers' text encoders).
    build_bundle and loading.load_bundle call it first, so that a run's first import of diffusers is this one."""
    try:
        with _bitsandbytes_unseen():
            _import_model_libraries()
    except ImportError as exc:  # a diffusers that imports bitsandbytes unconditionally: let it
        if "bitsandbytes" not in str(exc):
            raise
        _import_model_libraries()


def _import_model_libraries() -> None:
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401


@contextlib.contextmanager
def _bitsandbytes_unseen():
    """While diffusers is first imported, bitsandbytes looks absent (a None entry in sys.modules: find_spec returns
    None, an import raises ModuleNotFoundError); afterwards it imports as usual.

    Why: diffusers notes at import whether bitsandbytes is installed and, if so, imports it with its modules; that
    import pulls torch._inductor and, on CPUs with AVX512-BF16, makes the `kernels` package look for a kernel on the
    Hub - 0.9 s of every start on this kind of machine (python -X importtime) for diffusers' 4/8-bit model
    quantizer, which lorakit never uses. lorakit's 8-bit optimizers import bitsandbytes themselves when chosen
    (train.optimizers). Once diffusers is imported it has made its note, so the window is only opened then."""
    if "diffusers" in sys.modules or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]


def build_vae(config: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config)


def build_text_encoder(config: dict, with_projection: bool, kind: str = "clip"):
    if kind == "t5":
        return build_t5_encoder(config)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**config)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


def build_t5_encoder(config: dict):
    """transformers T5EncoderModel with its input embedding untied from `shared` when the config says so: T5-XXL
    files (t5xxl_fp16.safetensors, diffusers' text_encoder_2) store both tensors, and the encoder reads only
    encoder.embed_tokens (4,893,906,944 parameters in all)."""
    from torch import nn
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(**{k: v for k, v in config.items() if not k.startswith("_")})
    model = T5EncoderModel(cfg)
    if config.get("tie_word_embeddings") is False:  # read from our dict: transformers' T5Config may reset it
        embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        embed.weight = nn.Parameter(model.shared.weight.detach().clone())  # the same values, as in the real model
        model.encoder.embed_tokens = embed
    return model


def build_noise_scheduler(config: dict, prediction_type: str):
    """The training/sampling schedule the config names: FLUX's flow-matching Euler scheduler, else DDPM."""
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in config.items() if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                                      "clip_sample", "steps_offset", "timestep_spacing",
                                                      "rescale_betas_zero_snr")}
    return DDPMScheduler(**cfg, prediction_type=prediction_type)


def build_bundle(family: Family, configs: dict[str, dict] | None = None, device: str | torch.device = "cpu",
                 components: tuple[str, ...] = ("unet", "vae", "text_encoders"), prediction_type: str | None = None,
                 dtype: torch.dtype | None = None) -> ModelBundle:
    """Modules built from configs (the family's full-size ones unless given). device="meta" allocates no weights;
    device="empty" puts parameters on meta but keeps real buffers (CLIP's position_ids), ready for assigned weights."""
    from lorakit.models.tokenizer import make_tokenizer

    import_model_libraries()
    configs = {**{name: family.config(name) for name in _config_names(family)}, **(configs or {})}
    if str(device) == "meta":
        ctx = torch.device("meta")
    elif str(device) == "empty":
        from accelerate import init_empty_weights

        ctx = init_empty_weights(include_buffers=False)
    else:
        ctx = contextlib.nullcontext()
    old_dtype = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)  # build directly in the target dtype: no fp32 copy first
    try:
        with ctx:
            unet = build_unet(configs["unet"], family.denoiser) if "unet" in components else None
            vae = build_vae(configs["vae"]) if "vae" in components else None
            tes = [build_text_encoder(configs[s.config_name], s.with_projection, s.kind)
                   if "text_encoders" in components else None for s in family.text_encoders]
    finally:
        torch.set_default_dtype(old_dtype)
    tokenizers = [make_tokenizer(s, configs[s.config_name]) for s in family.text_encoders]
    scheduler = build_noise_scheduler(configs["scheduler"], prediction_type or family.prediction_type)
    bundle = ModelBundle(family, unet, vae, tes, tokenizers, scheduler, configs)
    if str(device) not in ("meta", "empty", "cpu"):
        bundle.to(device)
    for module in bundle.components().values():
        module.eval().requires_grad_(False)
    return bundle


def _config_names(family: Family) -> list[str]:
    return ["unet", "vae", "scheduler"] + [s.config_name for s in family.text_encoders]


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
