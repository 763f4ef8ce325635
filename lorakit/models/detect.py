"""Which family a checkpoint belongs to, from its keys and shapes (and metadata or flags when keys cannot tell)."""

from __future__ import annotations

from lorakit.errors import UserError
from lorakit.models.families import FAMILIES, Family, families_of_width

U = "model.diffusion_model."
V_PRED_KEY = "v_pred"  # top-level marker tensors of v-prediction and zero-terminal-SNR checkpoints (NoobAI-XL v-pred,
ZTSNR_KEY = "ztsnr"  # ComfyUI's CheckpointSave): the keys ComfyUI and A1111 read


def declares_zero_terminal_snr(keys, scheduler_config: dict | None = None) -> bool:
    """The model was trained on a zero-terminal-SNR schedule: a `ztsnr` marker key, or a diffusers scheduler config
    with rescale_betas_zero_snr."""
    return ZTSNR_KEY in keys or bool((scheduler_config or {}).get("rescale_betas_zero_snr"))


def _refuse(path, what: str, advice: str) -> UserError:
    return UserError(f"{path} is {what}, which lorakit does not train or load. {advice}")


def detect_ldm_family(path, keys: set[str], shape_of, metadata: dict[str, str],
                      v2: bool = False, v_parameterization: bool = False, sdxl: bool = False) -> tuple[Family, bool]:
    """(family, prediction_known) for a single-file LDM/SAI checkpoint. prediction_known is False only for SD2
    files whose keys, metadata and flags leave epsilon vs v-prediction open (the caller may probe the UNet)."""
    if any(k.startswith(U + "joint_blocks.") for k in keys):
        raise _refuse(path, "a Stable Diffusion 3 checkpoint", "Use an SD1.x, SD2.x, SDXL or FLUX.1 base model.")
    flux = flux_family_of(keys)
    if flux is not None:
        if any(k.endswith(".scale_weight") for k in keys):
            raise _refuse(path, "a scaled-fp8 FLUX file (ComfyUI's fp8_scaled: weights stored with per-tensor scales)",
                          "Use the plain fp8_e4m3fn, bf16 or fp16 release of the model.")
        return flux, True
    conv_in = shape_of(U + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        kind = {9: "an inpainting model (9 UNet input channels)", 8: "an instruct-pix2pix model (8 input channels)"}
        raise _refuse(path, kind.get(conv_in[1], f"a model with {conv_in[1]} UNet input channels"),
                      "Train on the matching base model (not the inpainting/edit variant) and use the LoRA on either.")
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        raise _refuse(path, "the SDXL refiner", "Train LoRAs on the SDXL base model (sd_xl_base_1.0 or a fine-tune of it).")
    if has("conditioner.embedders.1.model.") or (sdxl and not has("cond_stage_model.")):
        # v-prediction SDXL fine-tunes carry an empty `v_pred` tensor (ComfyUI's and A1111's marker)
        v = V_PRED_KEY in keys or v_parameterization or _declared_prediction(metadata) == "v_prediction"
        return FAMILIES["sdxl-v" if v else "sdxl"], True
    if has("cond_stage_model.model."):
        declared = _declared_prediction(metadata)
        if v_parameterization or declared == "v_prediction" or V_PRED_KEY in keys:
            return FAMILIES["sd2-v"], True
        if declared == "epsilon" or v2:  # --v2 without --v_parameterization declares epsilon, as in sd-scripts
            return FAMILIES["sd2"], True
        return FAMILIES["sd2"], False
    if has("cond_stage_model.transformer."):
        return FAMILIES["sd1"], True
    # UNet only: the cross-attention width tells the family.
    k_shape = shape_of(U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight") or shape_of(
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
    matches = families_of_width(k_shape[1]) if k_shape is not None else []
    if matches:  # SD2's epsilon and v variants share the width: the flag (or a probe) decides
        wanted = "v_prediction" if v_parameterization else "epsilon"
        family = next((f for f in matches if f.prediction_type == wanted), matches[0])
        return family, len(matches) == 1 or v_parameterization
    raise UserError(
        f"{path} does not look like a Stable Diffusion checkpoint: none of the SD1.x, SD2.x or SDXL key layouts "
        "matches (expected keys such as model.diffusion_model.input_blocks.* with cond_stage_model.* or "
        "conditioner.embedders.*). If it is a LoRA, use `lorakit lora info`; if it is a diffusers model, pass its folder."
    )


def flux_family_of(keys) -> Family | None:
    """FLUX.1 dev or schnell from a file's keys: BFL layout (bare or under ComfyUI's model.diffusion_model.) or
    diffusers' transformer; dev is the one with a guidance embedding."""
    keys = list(keys)
    bfl = any(k.startswith(("double_blocks.", U + "double_blocks.")) for k in keys)
    if bfl:
        return FAMILIES["flux-dev" if any(k.startswith(("guidance_in.", U + "guidance_in.")) for k in keys)
                        else "flux-schnell"]
    if any(k.startswith("single_transformer_blocks.") for k in keys):
        return FAMILIES["flux-dev" if any(k.startswith("time_text_embed.guidance_embedder.") for k in keys)
                        else "flux-schnell"]
    return None


def _declared_prediction(metadata: dict[str, str]) -> str | None:
    pred = metadata.get("modelspec.prediction_type", "").lower()
    if pred in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if pred in ("epsilon", "eps"):
        return "epsilon"
    arch = metadata.get("modelspec.architecture", "")
    if "768-v" in arch:
        return "v_prediction"
    if arch.startswith("stable-diffusion-v2-512"):
        return "epsilon"
    return None


def family_from_diffusers_config(unet_cfg: dict, scheduler_cfg: dict, folder, te_cfg: dict | None = None) -> Family:
    """From configs, by structure first (SDXL's size embedding; OpenAI CLIP's quick_gelu vs OpenCLIP's gelu), then
    by cross-attention width, so models of any width (our tiny ones included) are recognised."""
    if unet_cfg.get("in_channels", 4) != 4:
        raise _refuse(folder, f"a model with {unet_cfg['in_channels']} UNet input channels (inpainting or edit model)",
                      "Use the matching base model.")
    width = unet_cfg.get("cross_attention_dim")
    if unet_cfg.get("addition_embed_type") == "text_time":
        if width == 1280:
            raise _refuse(folder, "the SDXL refiner", "Train LoRAs on the SDXL base model.")
        return FAMILIES["sdxl-v" if scheduler_cfg.get("prediction_type") == "v_prediction" else "sdxl"]
    act = (te_cfg or {}).get("hidden_act")
    if act == "quick_gelu" or (act is None and width == 768):
        return FAMILIES["sd1"]
    if act == "gelu" or width == 1024:
        return FAMILIES["sd2-v" if scheduler_cfg.get("prediction_type") == "v_prediction" else "sd2"]
    raise UserError(f"{folder}: UNet cross_attention_dim {width} matches no supported family (SD1.x, SD2.x, SDXL).")


def looks_like_v_prediction(unet) -> bool:
    """A1111's test for SD2 files that do not say: a v-model maps a constant 0.5 latent at t=999 far below it."""
    import torch

    p = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=p.dtype, device=p.device)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=cond).sample
    return (out - x).float().mean().item() < -1


def lora_metadata_families(md) -> tuple[set[str] | None, str]:
    """Family names a LoRA file's metadata declares (ss_base_model_version, modelspec.architecture, ss_v2), and why;
    (None, "") when it says nothing. SD 2.x without a prediction type leaves epsilon and v open."""
    v = str(md.get("ss_base_model_version", ""))
    arch = str(md.get("modelspec.architecture", ""))
    if arch.startswith(("flux-1-dev", "flux-1-schnell")):
        which = "dev" if arch.startswith("flux-1-dev") else "schnell"
        return {f"flux-{which}"}, f"metadata says FLUX.1-{which}"
    if v == "flux1" or arch.startswith("flux-1"):
        return {"flux-dev", "flux-schnell"}, "metadata says FLUX.1"
    if v.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        if str(md.get("modelspec.prediction_type", "")).lower() in ("v", "v_prediction"):
            return {"sdxl-v"}, "metadata says SDXL v-prediction"
        return {"sdxl"}, "metadata says SDXL"
    if v == "sd_v2_v" or arch.startswith("stable-diffusion-v2-768-v"):
        return {"sd2-v"}, "metadata says SD 2.x v-prediction"
    if v.startswith("sd_v2") or arch.startswith("stable-diffusion-v2") or str(md.get("ss_v2", "")) == "True":
        if str(md.get("ss_v_parameterization", "")) == "True":
            return {"sd2-v"}, "metadata says SD 2.x v-prediction"
        return {"sd2", "sd2-v"}, "metadata says SD 2.x"
    if v == "sd_v1" or arch.startswith("stable-diffusion-v1") or str(md.get("ss_v2", "")) == "False":
        return {"sd1"}, "metadata says SD 1.x"
    return None, ""
