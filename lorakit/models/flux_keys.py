"""FLUX.1 checkpoint layouts: BFL's (our module paths), ComfyUI's (the same under `model.diffusion_model.`) and
diffusers' FluxTransformer2DModel (split q/k/v, other names), mapped onto ours.

diffusers -> BFL, per double block i (`transformer_blocks.i.` -> `double_blocks.i.`):
    attn.to_q|to_k|to_v (concatenated)   img_attn.qkv        attn.add_q_proj|add_k_proj|add_v_proj  txt_attn.qkv
    attn.to_out.0                        img_attn.proj       attn.to_add_out                        txt_attn.proj
    attn.norm_q / norm_k                 img_attn.norm.query_norm / key_norm (weight -> scale)
    attn.norm_added_q / norm_added_k     txt_attn.norm.query_norm / key_norm
    norm1.linear / norm1_context.linear  img_mod.lin / txt_mod.lin
    ff.net.0.proj, ff.net.2              img_mlp.0, img_mlp.2  (ff_context: txt_mlp)
per single block i (`single_transformer_blocks.i.` -> `single_blocks.i.`):
    attn.to_q|to_k|to_v|proj_mlp (concatenated) linear1;  proj_out linear2;  norm.linear modulation.lin
    attn.norm_q / norm_k                 norm.query_norm / key_norm
and x_embedder img_in, context_embedder txt_in, time_text_embed.{timestep,guidance,text}_embedder.linear_1|2
time_in / guidance_in / vector_in .in_layer|out_layer, proj_out final_layer.linear, norm_out.linear
final_layer.adaLN_modulation.1 with its two halves swapped (diffusers chunks scale, shift; BFL shift, scale).
"""

from __future__ import annotations

import re

import torch

BFL_DENOISER_MARKERS = ("double_blocks.", "single_blocks.")
DIFFUSERS_MARKERS = ("transformer_blocks.", "single_transformer_blocks.")

_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}
_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
           "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
           "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
           "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
           "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm",
           "attn.norm_k": "norm.key_norm"}
_FUSED = {  # (block kind, BFL module) -> diffusers modules concatenated along the output dim, in order
    ("double", "img_attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("double", "txt_attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("single", "linear1"): ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


def is_diffusers_flux(keys) -> bool:
    return any(k.startswith("single_transformer_blocks.") for k in keys)


def _param(module: str, param: str) -> str:
    return f"{module}.{'scale' if module.endswith(('query_norm', 'key_norm')) else param}"


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict under BFL names (fused layers concatenated). Keys nothing maps
    are an error: a silently dropped tensor would leave a layer uninitialised."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    blocks: dict[tuple[str, int], set[str]] = {}
    for key in sd:
        m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", key)
        if m:
            blocks.setdefault(("double" if m.group(1) == "transformer_blocks" else "single", int(m.group(2))),
                              set()).add(m.group(1))
    for (kind, i), (src_prefix,) in sorted(blocks.items()):
        src, dst = f"{src_prefix}.{i}.", f"{'double' if kind == 'double' else 'single'}_blocks.{i}."
        table = _DOUBLE if kind == "double" else _SINGLE
        for ours, theirs in table.items():
            for param in ("weight", "bias"):
                if src + ours + "." + param in sd:
                    out[dst + _param(theirs, param)] = sd[src + ours + "." + param]
                    used.add(src + ours + "." + param)
        for (fkind, bfl), parts in _FUSED.items():
            if fkind != kind:
                continue
            for param in ("weight", "bias"):
                names = [f"{src}{p}.{param}" for p in parts]
                if all(n in sd for n in names):
                    out[f"{dst}{bfl}.{param}"] = torch.cat([sd[n] for n in names], dim=0)
                    used.update(names)
    for theirs, ours in _TOP.items():
        for param in ("weight", "bias"):
            if f"{theirs}.{param}" in sd:
                out[f"{ours}.{param}"] = sd[f"{theirs}.{param}"]
                used.add(f"{theirs}.{param}")
    for param in ("weight", "bias"):
        if f"norm_out.linear.{param}" in sd:
            scale, shift = sd[f"norm_out.linear.{param}"].chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale], dim=0)
            used.add(f"norm_out.linear.{param}")
    left = sorted(set(sd) - used)
    if left:
        raise KeyError(f"diffusers FLUX keys without a BFL name: {left[:3]}")
    return out
