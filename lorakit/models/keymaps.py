"""Key maps between our diffusers/transformers modules and the single-file LDM/SAI checkpoint layout.

One function per component turns a diffusers key into its LDM key; the reverse map is that table inverted over the
model's own keys, so loading and saving can never disagree. Tensor reshapes that the two layouts need (VAE attention
1x1 convs, OpenCLIP's fused qkv and transposed projection) are described by `TensorRule.kind`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _rename_head(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return _join(table.get(head, head), tail)


def unet_path_to_ldm(path: str, config: dict) -> str:
    """Diffusers UNet module path or parameter key -> LDM path (without `model.diffusion_model.`)."""
    per = config["layers_per_block"] + 1  # LDM input/output slots per resolution level
    up_types = config["up_block_types"]
    fixed = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for src, dst in fixed.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.?(.*)$", path)
    if m:
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            if kind == "downsamplers":
                return _join(f"input_blocks.{(i + 1) * per}.0.op", rest.removeprefix("conv").lstrip("."))
            slot = 1 + i * per + j
            block = "input_blocks"
        else:
            if kind == "upsamplers":
                sub = 2 if up_types[i].startswith("CrossAttn") else 1
                return _join(f"output_blocks.{i * per + per - 1}.{sub}", rest)
            slot = i * per + j
            block = "output_blocks"
        if kind == "resnets":
            return _join(f"{block}.{slot}.0", _rename_head(rest, _RESNET_TO_LDM))
        return _join(f"{block}.{slot}.1", rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.?(.*)$", path)
    if m:
        kind, k, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{0 if k == 0 else 2}", _rename_head(rest, _RESNET_TO_LDM))
    raise KeyError(f"no LDM name for UNet key {path!r}")


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_key_to_ldm(key: str, config: dict) -> str:
    """Diffusers AutoencoderKL key -> LDM key (without `first_stage_model.`)."""
    levels = len(config["block_out_channels"])
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out", r"\1.norm_out", key)
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$", key)
    if m:
        part, side, i, kind, j, rest = m.groups()
        level = int(i) if side == "down" else levels - 1 - int(i)  # LDM numbers decoder levels bottom-up
        if kind == "resnets":
            return f"{part}.{side}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", key)
    if m:
        part, kind, k, rest = m.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(k) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        head, _, tail = rest.partition(".")
        if head == "to_out":
            tail = tail.partition(".")[2]  # to_out.0.weight -> proj_out.weight
        return f"{part}.mid.attn_1.{_VAE_ATTN_TO_LDM[head]}.{tail}"
    return key


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def openclip_key_to_ldm(key: str) -> str:
    """transformers CLIP key (without `text_model.`) -> OpenCLIP key; q/k/v map to the fused in_proj."""
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "text_projection.weight": "text_projection"}
    if key in fixed:
        return fixed[key]
    if key.startswith("final_layer_norm."):
        return "ln_final." + key.split(".", 1)[1]
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if not m:
        raise KeyError(f"no OpenCLIP name for text-encoder key {key!r}")
    i, mod, param = m.groups()
    if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"transformer.resblocks.{i}.attn.in_proj_{param}"
    return f"transformer.resblocks.{i}.{_OPENCLIP_LAYER[mod]}.{param}"


@dataclass(frozen=True)
class TensorRule:
    """How one LDM tensor relates to one or more of our tensors.

    kind: "same"; "conv1x1" (LDM [C,C,1,1] <-> ours [C,C]); "qkv" (LDM fused [3D,...] <-> ours q,k,v);
    "transpose" (LDM [D,P] <-> ours [P,D]).
    """

    ldm: str
    ours: tuple[str, ...]
    kind: str = "same"


def _strip_text_model(key: str) -> str:
    return key.removeprefix("text_model.")


def build_rules(family, component_keys: dict[str, list[str]]) -> list[TensorRule]:
    """Rules for every tensor of a bundle. component_keys: component name -> its state_dict keys, where component
    names are "unet", "vae", "text_encoder", "text_encoder_2" (our keys get that prefix plus a dot)."""
    rules: list[TensorRule] = []
    unet_cfg, vae_cfg = family.config("unet"), family.config("vae")
    for key in component_keys.get("unet", []):
        file_key = key if family.native_denoiser_paths else unet_path_to_ldm(key, unet_cfg)
        rules.append(TensorRule(family.unet_ldm_prefix + file_key, ("unet." + key,)))
    for key in component_keys.get("vae", []):
        ldm = vae_key_to_ldm(key, vae_cfg)
        is_attn_weight = re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", ldm) is not None
        rules.append(TensorRule(family.vae_ldm_prefix + ldm, ("vae." + key,), "conv1x1" if is_attn_weight else "same"))
    for spec in family.text_encoders:
        keys = component_keys.get(spec.config_name, [])
        comp = spec.config_name + "."
        if spec.ldm_style == "hf":
            rules.extend(TensorRule(spec.ldm_prefix + _strip_text_model(k), (comp + k,)) for k in keys)
            continue
        fused: dict[str, dict[str, str]] = {}
        for k in keys:
            bare = _strip_text_model(k)
            ldm = spec.ldm_prefix + openclip_key_to_ldm(bare)
            if ".attn.in_proj_" in ldm:
                fused.setdefault(ldm, {})[bare.split(".")[-2]] = comp + k
            else:
                rules.append(TensorRule(ldm, (comp + k,), "transpose" if bare == "text_projection.weight" else "same"))
        for ldm, parts in fused.items():
            rules.append(TensorRule(ldm, (parts["q_proj"], parts["k_proj"], parts["v_proj"]), "qkv"))
    return rules


def to_ldm_tensor(rule: TensorRule, tensors: list):
    """Our tensor(s) -> the LDM tensor."""
    import torch

    if rule.kind == "conv1x1":
        return tensors[0].reshape(*tensors[0].shape, 1, 1)
    if rule.kind == "qkv":
        return torch.cat(tensors, dim=0)
    if rule.kind == "transpose":
        return tensors[0].t().contiguous()
    return tensors[0]


def from_ldm_tensor(rule: TensorRule, tensor) -> list:
    """The LDM tensor -> our tensor(s)."""
    if rule.kind == "conv1x1":
        return [tensor.reshape(tensor.shape[0], tensor.shape[1]) if tensor.ndim == 4 else tensor]
    if rule.kind == "qkv":
        return list(tensor.chunk(3, dim=0))
    if rule.kind == "transpose":
        return [tensor.t().contiguous()]
    return [tensor]
