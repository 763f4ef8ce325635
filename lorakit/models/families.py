"""Model families: everything that differs between SD1.x, SD2.x and SDXL, described once.

Code asks the family (`get_family(name)`) instead of branching on `if sdxl` — configs, checkpoint layout, latent
scale, prediction type, text encoders, clip-skip rule, LoRA naming style and block layout all live here.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources

from lorakit.errors import UserError


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


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    base_model_version: str  # ss_base_model_version as sd-scripts writes it
    modelspec_architecture: str  # ModelSpec architecture of the base model ("/lora" appended for LoRA files)
    prediction_type: str  # "epsilon" or "v_prediction"
    resolution: int  # native training/generation size in pixels
    text_encoders: tuple[TextEncoderSpec, ...]
    lora_unet_style: str  # "diffusers" (SD1/2 paths) or "sai" (SDXL: LDM paths)
    default_clip_skip: int  # 1 = last layer; SD2 and SDXL use the penultimate layer by construction
    bucket_step: int  # bucket side multiple (SDXL 32, SD1/2 64)
    size_conditioning: bool  # SDXL's original-size/crop/target-size embedding
    train_block_count: int  # sd-scripts' block_dims vector length
    config_dir: str = field(default="")
    unet_ldm_prefix: str = "model.diffusion_model."
    vae_ldm_prefix: str = "first_stage_model."

    @property
    def is_v2(self) -> bool:
        return self.name.startswith("sd2")

    @property
    def lora_te_prefixes(self) -> tuple[str, ...]:
        return tuple(te.lora_prefix for te in self.text_encoders)

    @property
    def te_lora_layer_count(self) -> tuple[int, ...]:
        return tuple(te.lora_layers or self.config(te.config_name)["num_hidden_layers"] for te in self.text_encoders)

    @property
    def latent_scale(self) -> float:
        return float(self.config("vae")["scaling_factor"])

    def config(self, component: str) -> dict:
        """The bundled diffusers/transformers config of a component (unet, vae, text_encoder, text_encoder_2, scheduler)."""
        return dict(_read_config(self.config_dir or self.name, component))

    def unet_lora_path(self, diffusers_module_name: str) -> str:
        """The dotted module path kohya LoRA names use for a UNet module (SDXL: the SAI/LDM path)."""
        if self.lora_unet_style == "diffusers":
            return diffusers_module_name
        from lorakit.models.keymaps import unet_path_to_ldm

        return unet_path_to_ldm(diffusers_module_name, self.config("unet"))

    def lora_modelspec_architecture(self) -> str:
        return self.modelspec_architecture + "/lora"


@functools.lru_cache(maxsize=None)
def _read_config(folder: str, component: str) -> dict:
    path = resources.files("lorakit.models").joinpath(f"configs/{folder}/{component}.json")
    return json.loads(path.read_text())


_CLIP_L_SD1 = TextEncoderSpec("text_encoder", "cond_stage_model.transformer.text_model.", "hf", False, "<|endoftext|>", "lora_te")
_OPENCLIP_H_SD2 = TextEncoderSpec(
    "text_encoder", "cond_stage_model.model.", "openclip", False, "!", "lora_te",
    lora_layers=23,  # SD2 reads the penultimate layer: the last one never gets a gradient (sd-scripts builds 23)
)
_CLIP_L_XL = TextEncoderSpec(
    "text_encoder", "conditioner.embedders.0.transformer.text_model.", "hf", False, "<|endoftext|>", "lora_te1",
    final_norm_on_skip=False,
)
_OPENCLIP_G_XL = TextEncoderSpec(
    "text_encoder_2", "conditioner.embedders.1.model.", "openclip", True, "!", "lora_te2", final_norm_on_skip=False
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", "Stable Diffusion 1.x", "sd_v1", "stable-diffusion-v1", "epsilon", 512, (_CLIP_L_SD1,),
               "diffusers", 1, 64, False, 25),
        Family("sd2", "Stable Diffusion 2.x (512, epsilon)", "sd_v2", "stable-diffusion-v2-512", "epsilon", 512,
               (_OPENCLIP_H_SD2,), "diffusers", 2, 64, False, 25),
        Family("sd2-v", "Stable Diffusion 2.x (768, v-prediction)", "sd_v2_v", "stable-diffusion-v2-768-v",
               "v_prediction", 768, (_OPENCLIP_H_SD2,), "diffusers", 2, 64, False, 25),
        Family("sdxl", "Stable Diffusion XL base", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "epsilon", 1024,
               (_CLIP_L_XL, _OPENCLIP_G_XL), "sai", 2, 32, True, 23),
    )
}

ALIASES = {"sd15": "sd1", "sd1.5": "sd1", "v1": "sd1", "sd21": "sd2", "sd2.1": "sd2", "v2": "sd2", "sd2v": "sd2-v",
           "sd2-768": "sd2-v", "xl": "sdxl", "sdxl-base": "sdxl"}


def get_family(name: str) -> Family:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FAMILIES:
        raise UserError(f"unknown model family {name!r}: use one of {', '.join(FAMILIES)}.")
    return FAMILIES[key]


def family_from_flags(v2: bool = False, v_parameterization: bool = False, sdxl: bool = False) -> Family | None:
    """The family sd-scripts' --v2/--v_parameterization/--sdxl flags name, or None when none is given."""
    if sdxl:
        return FAMILIES["sdxl"]
    if v2:
        return FAMILIES["sd2-v" if v_parameterization else "sd2"]
    return None
