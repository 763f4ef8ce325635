"""Tiny models of every family: the same module names and nesting as the real ones (so LoRA and checkpoint keys are
identical), with tiny widths, for tests and demos."""

from __future__ import annotations

import torch

from lorakit.models.bundle import ModelBundle, build_bundle
from lorakit.models.families import Family, get_family

TINY_TE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32)
TINY_T5 = dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, vocab_size=384)  # 384: ByT5's byte vocabulary
TINY_FLUX = dict(hidden_size=32, num_heads=2, axes_dim=[4, 6, 6])  # axes_dim adds up to the head width 16


def tiny_configs(family: Family) -> dict[str, dict]:
    """Configs with tiny widths; depths, block types and layer counts stay those of the real model."""
    if family.denoiser == "flux":
        return _tiny_flux_configs(family)
    unet = family.config("unet")
    levels = len(unet["block_out_channels"])
    te_hidden = [TINY_TE["hidden_size"]] * len(family.text_encoders)
    # Channel ratios stay those of the real model: they decide where 1x1 skip convs exist, hence the key names.
    unet.update(block_out_channels=[32, 64, 128, 128][:levels], norm_num_groups=8, cross_attention_dim=sum(te_hidden),
                attention_head_dim=[2, 4, 8, 8][:levels] if isinstance(unet["attention_head_dim"], list) else 4)
    if unet.get("addition_embed_type") == "text_time":
        unet.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + TINY_TE["projection_dim"])
    vae = family.config("vae")
    vae.update(block_out_channels=[16, 32, 64, 64], norm_num_groups=8, sample_size=64)
    configs = {"unet": unet, "vae": vae}
    for spec in family.text_encoders:
        configs[spec.config_name] = {**family.config(spec.config_name), **TINY_TE}
    return configs


def _tiny_flux_configs(family: Family) -> dict[str, dict]:
    """FLUX.1 with 19 double and 38 single blocks of width 32; the AE keeps its 16 latent channels (64 packed)."""
    te = {**family.config("text_encoder"), **TINY_TE}
    t5 = {**family.config("text_encoder_2"), **TINY_T5}
    unet = {**family.config("unet"), **TINY_FLUX, "vec_in_dim": te["hidden_size"], "context_in_dim": t5["d_model"]}
    vae = {**family.config("vae"), "block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "sample_size": 64}
    return {"unet": unet, "vae": vae, "text_encoder": te, "text_encoder_2": t5}


def tiny_bundle(family: str | Family = "sd1", seed: int = 0, dtype: torch.dtype = torch.float32) -> ModelBundle:
    """A randomly initialised tiny model; the same seed gives the same weights."""
    fam = family if isinstance(family, Family) else get_family(family)
    devices = []  # fork_rng wants an explicit (empty) device list on CPU-only machines
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        bundle = build_bundle(fam, configs=tiny_configs(fam))
    bundle.source = f"tiny:{fam.name}"
    return bundle if dtype == torch.float32 else bundle.to(dtype=dtype)
