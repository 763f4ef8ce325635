"""Model families: everything that differs between SD1.x, SD2.x, SDXL (epsilon or v-prediction) and FLUX.1 (dev,
schnell), described once.

Code asks the family (`get_family(name)`) instead of branching on `if sdxl` — configs, checkpoint layout, latent
scale, prediction type, text encoders, clip-skip rule, LoRA naming style and block layout all live here.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import NamedTuple

from lorakit.errors import UserError


class LoraSize(NamedTuple):
    """What a networks.lora file of this family holds per unit of rank: the sum of (in + out) widths over the layers
    it targets (3x3 convs: in * kh * kw + out), counted on the real architecture (tests/test_preflight.py recounts
    them with create_network on a weightless build), and its module count (header entries). Disk checks use it."""
    unet: int
    te: int  # the text encoders trained by default
    conv: int  # the UNet's 3x3 convs (conv_dim, LoCon)
    modules: int
    te_on_request: int = 0  # encoders trained only when asked (FLUX's T5-XXL: network_args train_t5xxl=True)
    modules_on_request: int = 0


@dataclass(frozen=True)
class TextEncoderSpec:
    config_name: str  # bundled config file (without .json)
    ldm_prefix: str  # key prefix inside a single-file checkpoint
    ldm_style: str  # "hf": transformers CLIP names; "openclip": OpenCLIP resblocks with fused qkv
    with_projection: bool  # CLIPTextModelWithProjection (SDXL's bigG pooled output is projected)
    pad_token: str  # "<|endoftext|>" (OpenAI CLIP) or "!" (id 0, OpenCLIP)
    lora_prefix: str  # kohya module-name prefix
    lora_layers: int | None = None  # CLIP layers that get LoRA modules (None: all)
    final_norm_on_skip: bool = True  # clip skip: apply final_layer_norm to the chosen hidden state
    kind: str = "clip"  # "clip" (transformers CLIP text model) or "t5" (T5EncoderModel; LoRA on its attention and FF)
    lora_aliases: tuple[str, ...] = ()  # other trainers' prefixes read as this one (OneTrainer's FLUX T5: lora_te2)
    lora_by_default: bool = True  # trained unless asked otherwise (FLUX's T5 only with network_args train_t5xxl=True)
    # key of this encoder's vectors in a bundled embedding (bundle_emb.<word>.<key>, A1111's format; None: no format)
    embedding_key: str | None = "string_to_param.*"


@dataclass(frozen=True)
class Family:
    """Every rule that differs between model families. Code outside lorakit/models/ reads these attributes and never
    compares family names."""

    name: str
    title: str
    short_title: str  # in messages about LoRA files ("SD 2.x")
    base_model_version: str  # ss_base_model_version as sd-scripts writes it
    modelspec_architecture: str  # ModelSpec architecture of the base model ("/lora" appended for LoRA files)
    modelspec_implementation: str  # ModelSpec implementation of the model and of its LoRAs (sd-scripts' values)
    prediction_type: str  # "epsilon" or "v_prediction"
    resolution: int  # native training/generation size in pixels
    text_encoders: tuple[TextEncoderSpec, ...]
    lora_unet_style: str  # "diffusers" (SD1/2 paths) or "sai" (SDXL: LDM paths)
    default_clip_skip: int  # layer from the end read by default and the shallowest one: SD2 never reads the last
    clip_skip_fixed: bool  # the layer is fixed (SDXL: penultimate), --clip_skip is ignored like in sd-scripts
    bucket_step: int  # bucket side multiple (SDXL 32, SD1/2 64)
    size_conditioning: bool  # the UNet takes original-size/crop/target-size ids and a pooled text embedding
    train_block_count: int  # sd-scripts' block_dims vector length
    block_scheme: str  # UNet block layout of block_dims / LBW (adapters.blocks.SCHEMES)
    weight_group: str  # families whose models and LoRAs share weights (SD2 epsilon and v-prediction)
    vae_fp16_safe: bool  # False: the VAE overflows in fp16 and stays fp32 under fp16 mixed precision
    latent_cache_suffix: str  # sd-scripts' latent cache file suffix (<stem>_<W>x<H>_<suffix>.npz)
    diffusers_pipeline: str  # model_index.json _class_name of a diffusers folder
    is_v2: bool  # ss_v2 in LoRA metadata
    config_dir: str = field(default="")
    unet_ldm_prefix: str = "model.diffusion_model."
    vae_ldm_prefix: str = "first_stage_model."
    # what differs between the UNet families and the DiT ones (FLUX.1); the defaults are the UNet families'
    denoiser: str = "unet"  # "unet": diffusers UNet2DConditionModel; "flux": models.flux.FluxTransformer (BFL layout)
    objective: str = "ddpm"  # training objective: "ddpm" (noise schedule, epsilon/v) or "flow" (rectified flow)
    conditioning: str = "clip"  # text path: "clip" (CLIP hidden states, 77-token windows) or "clip-pooled+t5"
    lora_block_classes: tuple[str, ...] = ("Transformer2DModel",)  # containers sd-scripts' networks.lora targets
    split_files: bool = False  # files usually hold the denoiser alone (BFL: no key prefix); encoders and AE come apart
    t5_max_length: int = 0  # T5 tokens when --t5xxl_max_token_length is not given (dev 512, schnell 256)
    guidance_embed: bool = False  # the denoiser takes a distilled-guidance value (FLUX.1-dev)
    lora_size: LoraSize = LoraSize(0, 0, 0, 0)  # see LoraSize
    # the denoiser's lists of transformer blocks as (module list, config key of its depth): --blocks_to_swap moves
    # them, network_args train_*_block_indices select in them
    block_lists: tuple[tuple[str, str], ...] = ()
    # fused layers sd-scripts' split_qkv gives one LoRA per part: (kohya name suffix, part widths in units of the
    # layer's input width)
    lora_split_parts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # sd-scripts' FLUX order: the denoiser comes to the device after the caches are filled, and text encoders whose
    # outputs are cached leave it (T5-XXL alone is 9 GiB in bf16)
    denoiser_after_caching: bool = False

    @property
    def lora_te_prefixes(self) -> tuple[str, ...]:
        return tuple(te.lora_prefix for te in self.text_encoders)

    @property
    def te_lora_layer_count(self) -> tuple[int, ...]:
        def layers(te: TextEncoderSpec) -> int:
            cfg = self.config(te.config_name)
            return te.lora_layers or cfg.get("num_hidden_layers") or cfg["num_layers"]  # CLIP's or T5's name

        return tuple(layers(te) for te in self.text_encoders)

    @property
    def latent_scale(self) -> float:
        return float(self.config("vae")["scaling_factor"])

    @property
    def context_width(self) -> int:
        """Width of the text context the full-size denoiser reads (UNet cross-attention: the CLIP widths added up;
        FLUX: T5's width)."""
        cfg = self.config("unet")
        return int(cfg.get("cross_attention_dim") or cfg["context_in_dim"])

    @property
    def lora_unet_diffusers_names(self) -> bool:
        """kohya UNet module names follow diffusers paths (False: SAI/LDM paths, which need the config to map)."""
        return self.lora_unet_style == "diffusers"

    @property
    def native_denoiser_paths(self) -> bool:
        """Our denoiser's module paths are the names its files and LoRAs use (FLUX: BFL's layout)."""
        return self.lora_unet_style == "native"

    def shares_weights_with(self, other: "Family") -> bool:
        """Same architecture and weights (a LoRA of one applies to the other)."""
        return self.weight_group == other.weight_group

    def train_clip_layer(self, clip_skip: int | None) -> int:
        """Hidden layer from the end for sd-scripts' --clip_skip N (training, caching, previews). sd-scripts' SD2
        encoder has its last layer removed, so its N reads our layer N + 1."""
        if self.clip_skip_fixed or clip_skip is None:
            return self.default_clip_skip
        return int(clip_skip) + self.default_clip_skip - 1

    def prompt_clip_layer(self, clip_skip: int | None) -> int:
        """Hidden layer from the end for A1111's "Clip skip" N (generation): never shallower than the default."""
        if self.clip_skip_fixed or clip_skip is None:
            return self.default_clip_skip
        return max(int(clip_skip), self.default_clip_skip)

    def config(self, component: str) -> dict:
        """The bundled diffusers/transformers config of a component (unet, vae, text_encoder, text_encoder_2, scheduler)."""
        return dict(_read_config(self.config_dir or self.name, component))

    def unet_lora_path(self, diffusers_module_name: str) -> str:
        """The dotted module path kohya LoRA names use for a UNet module (SDXL: the SAI/LDM path; FLUX: our module
        path, which is BFL's)."""
        if self.lora_unet_diffusers_names or self.native_denoiser_paths:
            return diffusers_module_name
        from lorakit.models.keymaps import unet_path_to_ldm

        return unet_path_to_ldm(diffusers_module_name, self.config("unet"))

    @property
    def modelspec_prediction_type(self) -> str | None:
        """ModelSpec's prediction type ("epsilon", "v"); None for flow models, whose files state none."""
        return {"epsilon": "epsilon", "v_prediction": "v"}.get(self.prediction_type)

    def lora_modelspec_architecture(self) -> str:
        return self.modelspec_architecture + "/lora"


@functools.lru_cache(maxsize=None)
def _read_config(folder: str, component: str) -> dict:
    path = resources.files("lorakit.models").joinpath(f"configs/{folder}/{component}.json")
    return json.loads(path.read_text())


_CLIP_L_SD1 = TextEncoderSpec(
    config_name="text_encoder", ldm_prefix="cond_stage_model.transformer.text_model.", ldm_style="hf",
    with_projection=False, pad_token="<|endoftext|>", lora_prefix="lora_te",
)
_OPENCLIP_H_SD2 = TextEncoderSpec(
    config_name="text_encoder", ldm_prefix="cond_stage_model.model.", ldm_style="openclip", with_projection=False,
    pad_token="!", lora_prefix="lora_te",
    lora_layers=23,  # SD2 reads the penultimate layer: the last one never gets a gradient (sd-scripts builds 23)
)
_CLIP_L_XL = TextEncoderSpec(
    config_name="text_encoder", ldm_prefix="conditioner.embedders.0.transformer.text_model.", ldm_style="hf",
    with_projection=False, pad_token="<|endoftext|>", lora_prefix="lora_te1", final_norm_on_skip=False,
    embedding_key="clip_l",
)
_OPENCLIP_G_XL = TextEncoderSpec(
    config_name="text_encoder_2", ldm_prefix="conditioner.embedders.1.model.", ldm_style="openclip",
    with_projection=True, pad_token="!", lora_prefix="lora_te2", final_norm_on_skip=False,
    embedding_key="clip_g",
)

_SAI = "https://github.com/Stability-AI/generative-models"
_SD = dict(  # what SD1.x and SD2.x share
    modelspec_implementation="diffusers", lora_unet_style="diffusers", clip_skip_fixed=False, bucket_step=64,
    size_conditioning=False, train_block_count=25, block_scheme="diffusers-25", vae_fp16_safe=True,
    latent_cache_suffix="sd", diffusers_pipeline="StableDiffusionPipeline",
)
_SD2 = dict(_SD, text_encoders=(_OPENCLIP_H_SD2,), default_clip_skip=2, weight_group="sd2", is_v2=True,
            lora_size=LoraSize(unet=432_128, te=423_936, conv=626_880, modules=330))
# SDXL and its v-prediction fine-tunes (NoobAI-XL v-pred...): the same weights, files and LoRAs; only the prediction
# differs (sd-scripts writes the same ss_base_model_version and ModelSpec architecture for both)
_SDXL = dict(base_model_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base",
             modelspec_implementation=_SAI, resolution=1024, text_encoders=(_CLIP_L_XL, _OPENCLIP_G_XL),
             lora_unet_style="sai", default_clip_skip=2, clip_skip_fixed=True, bucket_step=32, size_conditioning=True,
             train_block_count=23, block_scheme="sai-23", weight_group="sdxl", vae_fp16_safe=False,
             latent_cache_suffix="sdxl", diffusers_pipeline="StableDiffusionXLPipeline", is_v2=False,
             lora_size=LoraSize(unet=2_659_840, te=903_168, conv=414_400, modules=986))

# FLUX.1: CLIP-L gives only its pooled vector, T5-XXL the token features. sd-scripts names their LoRA modules
# lora_te1_ and lora_te3_ ("ComfyUI compatible"); ComfyUI also maps OneTrainer's lora_te2_ to T5.
_CLIP_L_FLUX = TextEncoderSpec(
    config_name="text_encoder", ldm_prefix="text_encoders.clip_l.transformer.text_model.", ldm_style="hf",
    with_projection=False, pad_token="<|endoftext|>", lora_prefix="lora_te1", embedding_key="clip_l",
)
_T5XXL_FLUX = TextEncoderSpec(
    config_name="text_encoder_2", ldm_prefix="text_encoders.t5xxl.transformer.", ldm_style="hf", with_projection=False,
    pad_token="<pad>", lora_prefix="lora_te3", kind="t5", lora_aliases=("lora_te2",), lora_by_default=False,
    embedding_key=None,
)
_BFL = "https://github.com/black-forest-labs/flux"
_FLUX = dict(
    prediction_type="flow", resolution=1024, text_encoders=(_CLIP_L_FLUX, _T5XXL_FLUX), lora_unet_style="native",
    default_clip_skip=1, clip_skip_fixed=True, bucket_step=16, size_conditioning=False, train_block_count=57,
    block_scheme="flux-57", vae_fp16_safe=False, latent_cache_suffix="flux", diffusers_pipeline="FluxPipeline",
    is_v2=False, modelspec_implementation=_BFL, vae_ldm_prefix="vae.",
    denoiser="flux", objective="flow", conditioning="clip-pooled+t5",
    lora_block_classes=("DoubleStreamBlock", "SingleStreamBlock"), split_files=True,
    block_lists=(("double_blocks", "depth"), ("single_blocks", "depth_single_blocks")),
    denoiser_after_caching=True, lora_split_parts=(("_attn_qkv", (1, 1, 1)), ("_linear1", (1, 1, 1, 4))),
    lora_size=LoraSize(unet=4_786_176, te=165_888, conv=0, modules=376, te_on_request=1_818_624,
                       modules_on_request=168),
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(name="sd1", title="Stable Diffusion 1.x", short_title="SD 1.x", base_model_version="sd_v1",
               modelspec_architecture="stable-diffusion-v1", prediction_type="epsilon", resolution=512,
               text_encoders=(_CLIP_L_SD1,), default_clip_skip=1, weight_group="sd1", is_v2=False,
               lora_size=LoraSize(unet=423_936, te=165_888, conv=626_880, modules=264), **_SD),
        Family(name="sd2", title="Stable Diffusion 2.x (512, epsilon)", short_title="SD 2.x",
               base_model_version="sd_v2", modelspec_architecture="stable-diffusion-v2-512",
               prediction_type="epsilon", resolution=512, **_SD2),
        Family(name="sd2-v", title="Stable Diffusion 2.x (768, v-prediction)", short_title="SD 2.x (v-prediction)",
               base_model_version="sd_v2_v", modelspec_architecture="stable-diffusion-v2-768-v",
               prediction_type="v_prediction", resolution=768, **_SD2),
        Family(name="sdxl", title="Stable Diffusion XL base", short_title="SDXL", prediction_type="epsilon", **_SDXL),
        Family(name="sdxl-v", title="Stable Diffusion XL (v-prediction)", short_title="SDXL (v-prediction)",
               prediction_type="v_prediction", config_dir="sdxl", **_SDXL),
        # dev and schnell share the block structure, but dev's guidance embedding makes their weights differ
        Family(name="flux-dev", title="FLUX.1 [dev]", short_title="FLUX.1-dev", base_model_version="flux1",
               modelspec_architecture="flux-1-dev", weight_group="flux-dev", t5_max_length=512, guidance_embed=True,
               **_FLUX),
        Family(name="flux-schnell", title="FLUX.1 [schnell]", short_title="FLUX.1-schnell",
               base_model_version="flux1", modelspec_architecture="flux-1-schnell", weight_group="flux-schnell",
               t5_max_length=256, **_FLUX),
    )
}

ALIASES = {"sd15": "sd1", "sd1.5": "sd1", "v1": "sd1", "sd21": "sd2", "sd2.1": "sd2", "v2": "sd2", "sd2v": "sd2-v",
           "sd2-768": "sd2-v", "xl": "sdxl", "sdxl-base": "sdxl", "sdxlv": "sdxl-v", "sdxl-vpred": "sdxl-v",
           "xl-v": "sdxl-v", "flux": "flux-dev", "flux1": "flux-dev", "flux-1-dev": "flux-dev", "flux1-dev": "flux-dev",
           "dev": "flux-dev", "schnell": "flux-schnell", "flux1-schnell": "flux-schnell",
           "flux-1-schnell": "flux-schnell"}


def get_family(name: str) -> Family:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FAMILIES:
        raise UserError(f"unknown model family {name!r}: use one of {', '.join(FAMILIES)}.")
    return FAMILIES[key]


def family_from_flags(v2: bool = False, v_parameterization: bool = False, sdxl: bool = False,
                      default: str | None = None) -> Family | None:
    """The family sd-scripts' --v2/--v_parameterization/--sdxl flags name, or `default` (a name) when none is given."""
    if sdxl:
        return FAMILIES["sdxl-v" if v_parameterization else "sdxl"]
    if v2:
        return FAMILIES["sd2-v" if v_parameterization else "sd2"]
    return get_family(default) if default else None


def with_prediction(family: Family, prediction_type: str) -> Family:
    """The family sharing `family`'s weights that predicts `prediction_type` (SD2: epsilon or v), else `family`."""
    siblings = (f for f in FAMILIES.values() if f.shares_weights_with(family))
    return next((f for f in siblings if f.prediction_type == prediction_type), family)


def families_of_width(width: int) -> list[Family]:
    """Families whose full-size UNet cross-attention width is `width` (768 SD1, 1024 SD2, 2048 SDXL)."""
    return [f for f in FAMILIES.values() if f.context_width == width]
