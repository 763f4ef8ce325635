"""diffusers/PEFT FLUX LoRA files (diffusers' `save_lora_weights`, ai-toolkit) onto our BFL-layout transformer.

Their transformer keys name diffusers' modules (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), where
BFL fuses layers: q, k and v (and a single block's MLP input) are one Linear. A LoRA on each part is one LoRA on the
fused layer whose down is the parts' downs stacked and whose up is block-diagonal:

    delta = [B_q A_q; B_k A_k; B_v A_v] = blockdiag(B_q, B_k, B_v) @ [A_q; A_k; A_v]     (rank r_q + r_k + r_v)

Each part's scale (alpha / rank) is folded into its up, and the fused module gets alpha = its rank (scale 1), so the
delta is exactly the sum the file describes. A part the file leaves out contributes zero rows. The final adaLN's
two halves are swapped (diffusers: scale, shift; BFL: shift, scale). Keys stay PEFT keys, under BFL module paths.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from lorakit.errors import UserError
from lorakit.models.flux_keys import _DOUBLE, _FUSED, _SINGLE, _TOP

_PARAM = re.compile(r"^transformer\.(?P<mod>.+)\.(?P<which>lora_A|lora_B)(?:\.default)?\.weight$")
_ALPHA = re.compile(r"^transformer\.(?P<mod>.+)\.alpha$")
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def is_diffusers_flux_lora(keys) -> bool:
    return any(k.startswith(("transformer.transformer_blocks.", "transformer.single_transformer_blocks.")) for k in keys)


def _bfl_module(mod: str) -> tuple[str, str | None]:
    """diffusers module path -> (BFL module path, fused part or None)."""
    m = _BLOCK.match(mod)
    if m is None:
        if mod == "norm_out.linear":
            return "final_layer.adaLN_modulation.1", None
        if mod in _TOP:
            return _TOP[mod], None
        raise UserError(f"diffusers FLUX LoRA module {mod!r} has no FLUX (BFL) layer.")
    kind = "double" if m.group(1) == "transformer_blocks" else "single"
    prefix, rest = f"{kind}_blocks.{m.group(2)}.", m.group(3)
    for (fkind, bfl), parts in _FUSED.items():
        if fkind == kind and rest in parts:
            return prefix + bfl, rest
    table = _DOUBLE if kind == "double" else _SINGLE
    if rest not in table:
        raise UserError(f"diffusers FLUX LoRA module {mod!r} has no FLUX (BFL) layer.")
    return prefix + table[rest], None


def diffusers_flux_to_bfl(sd: Mapping[str, torch.Tensor], default_alpha: float | None) -> dict[str, torch.Tensor]:
    """Transformer keys of a diffusers FLUX LoRA under BFL paths (fused where BFL fuses); other keys unchanged."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m, a = _PARAM.match(key), _ALPHA.match(key)
        if m:
            pairs.setdefault(m.group("mod"), {})[m.group("which")] = value
        elif a:
            pairs.setdefault(a.group("mod"), {})["alpha"] = value
        elif key.startswith("transformer."):
            raise UserError(f"diffusers FLUX LoRA key {key!r} is not a LoRA weight lorakit knows.")
        else:
            out[key] = value  # text encoders: the PEFT reader maps them
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for mod, w in pairs.items():
        if "lora_A" not in w or "lora_B" not in w:
            raise UserError(f"diffusers FLUX LoRA module {mod!r} lacks its lora_A or lora_B weight.")
        rank = w["lora_A"].shape[0]
        alpha = float(w["alpha"]) if "alpha" in w else (default_alpha if default_alpha is not None else rank)
        down, up = w["lora_A"].float(), w["lora_B"].float() * (alpha / rank)
        bfl, part = _bfl_module(mod)
        if part is not None:
            fused.setdefault(bfl, {})[part] = (down, up)
            continue
        if bfl == "final_layer.adaLN_modulation.1":
            scale, shift = up.chunk(2, dim=0)
            up = torch.cat([shift, scale], dim=0)
        _emit(out, bfl, down, up)
    for bfl, parts in fused.items():
        down, up = _fuse(bfl, parts)
        _emit(out, bfl, down, up)
    return out


def _emit(out: dict, bfl: str, down: torch.Tensor, up: torch.Tensor) -> None:
    out[f"transformer.{bfl}.lora_A.weight"] = down
    out[f"transformer.{bfl}.lora_B.weight"] = up
    out[f"transformer.{bfl}.alpha"] = torch.tensor(float(down.shape[0]))  # scales are in the ups: scale 1


def _fuse(bfl: str, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked downs and a block-diagonal up over the fused layer's parts, in BFL's order."""
    kind = "double" if bfl.startswith("double_blocks.") else "single"
    order = next(p for (k, name), p in _FUSED.items() if k == kind and bfl.endswith("." + name))
    hidden = next(iter(parts.values()))[0].shape[1]
    widths = [4 * hidden if p == "proj_mlp" else hidden for p in order]  # FLUX's MLP is 4x wide
    present = [p for p in order if p in parts]
    down = torch.cat([parts[p][0] for p in present], dim=0)
    up = torch.zeros(sum(widths), down.shape[0])
    row, col = 0, 0
    for p, width in zip(order, widths):
        if p in parts:
            b = parts[p][1]
            if b.shape[0] != width:
                raise UserError(f"diffusers FLUX LoRA {bfl} part {p}: {b.shape[0]} outputs, expected {width}.")
            up[row:row + width, col:col + b.shape[1]] = b
            col += b.shape[1]
        row += width
    return down, up
