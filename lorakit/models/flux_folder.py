"""A diffusers FLUX.1 folder (FluxPipeline: transformer/, text_encoder/, text_encoder_2/, tokenizer_2/, vae/,
scheduler/) loaded into a bundle with our BFL-layout transformer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit.errors import UserError
from lorakit.models.families import FAMILIES, Family


def is_flux_folder(folder: Path) -> bool:
    index = folder / "model_index.json"
    if not index.exists():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == "FluxPipeline"
    except (OSError, json.JSONDecodeError):
        return False


def transformer_config(diffusers_cfg: dict) -> dict:
    """Our transformer config (BFL's parameter names) from diffusers' FluxTransformer2DModel config."""
    heads = int(diffusers_cfg["num_attention_heads"])
    return {"_class_name": "FluxTransformer", "in_channels": diffusers_cfg["in_channels"],
            "out_channels": diffusers_cfg.get("out_channels") or diffusers_cfg["in_channels"],
            "vec_in_dim": diffusers_cfg["pooled_projection_dim"],
            "context_in_dim": diffusers_cfg["joint_attention_dim"],
            "hidden_size": heads * int(diffusers_cfg["attention_head_dim"]), "mlp_ratio": 4.0, "num_heads": heads,
            "depth": diffusers_cfg["num_layers"], "depth_single_blocks": diffusers_cfg["num_single_layers"],
            "axes_dim": list(diffusers_cfg.get("axes_dims_rope", (16, 56, 56))), "theta": 10000, "qkv_bias": True,
            "guidance_embed": bool(diffusers_cfg.get("guidance_embeds", False))}


def _read(folder: Path, name: str) -> dict:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder}: cannot read {name} ({exc}); the diffusers FLUX folder is incomplete.") from None


def folder_plan(folder: Path) -> tuple[Family, dict[str, dict]]:
    """The family and module configs of a FLUX folder (configs only, no weights)."""
    unet = transformer_config(_read(folder, "transformer/config.json"))
    family = FAMILIES["flux-dev" if unet["guidance_embed"] else "flux-schnell"]
    configs = {"unet": unet}
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if (folder / name / "config.json").exists():
            configs[name] = _read(folder, f"{name}/config.json")
    if (folder / "scheduler" / "scheduler_config.json").exists():
        configs["scheduler"] = _read(folder, "scheduler/scheduler_config.json")
    return family, configs


def load_flux_folder(folder: Path, dtype: torch.dtype, components=("unet", "vae", "text_encoders")):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    from lorakit.models.bundle import build_bundle, build_unet
    from lorakit.models.checkpoint_io import StateSource
    from lorakit.models.flux_keys import diffusers_to_bfl
    from lorakit.models.tokenizer import make_tokenizer

    family, configs = folder_plan(folder)
    bundle = build_bundle(family, configs=configs, device="meta", components=())
    bundle.source = str(folder)
    if "unet" in components:
        shards = sorted((folder / "transformer").glob("*.safetensors"))
        if not shards:
            raise UserError(f"{folder}/transformer has no .safetensors weights.")
        sd = {}
        for shard in shards:
            src = StateSource(shard)
            sd.update({k: src.get(k, dtype).to(dtype) for k in src.keys()})
        with init_empty_weights(include_buffers=False):
            unet = build_unet(configs["unet"], family.denoiser)
        unet.load_state_dict(diffusers_to_bfl(sd), assign=True, strict=True)
        bundle.unet = unet
    if "vae" in components and (folder / "vae").exists():
        bundle.vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, local_files_only=True)
    if "text_encoders" in components:
        bundle.text_encoders = [
            CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype, local_files_only=True),
            T5EncoderModel.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype, local_files_only=True)]
    if (folder / "tokenizer_2").exists():  # T5's SentencePiece vocabulary comes with the folder
        bundle.tokenizers[1] = make_tokenizer(family.text_encoders[1], configs.get("text_encoder_2", {}),
                                              folder / "tokenizer_2")
    for module in bundle.components().values():
        module.eval().requires_grad_(False)
    return bundle
