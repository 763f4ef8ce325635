"""Which layers get an adapter, and their kohya names (sd-scripts networks.lora rules, LyCORIS presets).

UNet: every Linear/Conv2d inside the target container classes (Transformer2DModel; with conv layers also
ResnetBlock2D, Downsample2D, Upsample2D), named "lora_unet_" + the family's kohya path with "." -> "_".
Text encoders: CLIP q/k/v/out_proj and mlp fc1/fc2 of the first `te_lora_layer_count` layers, named from the layer
index and a fixed map, never from the installed transformers' module tree (5.x drops `text_model.`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorakit.adapters.base import layer_kind
from lorakit.errors import UserError

TE_MODULES = {"self_attn.q_proj": "self_attn_q_proj", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
              "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}
TE_ATTN_ONLY = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
# T5 (FLUX's second encoder): sd-scripts' targets T5Attention and T5DenseGatedActDense, per encoder block
T5_MODULES = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
              "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
              "layer.1.DenseReluDense.wo")

UNET_TRANSFORMER = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


@dataclass(frozen=True)
class Preset:
    """Which containers/names are targets (LyCORIS preset semantics)."""

    unet_classes: tuple[str, ...]
    unet_names: tuple[str, ...] = ()  # extra diffusers module names (only where kohya names are diffusers paths)
    te_modules: tuple[str, ...] = tuple(TE_MODULES)
    enable_conv: bool = True  # 3x3 convs allowed (still need a conv dim)


PRESETS = {
    # sd-scripts networks.lora: transformer layers; conv blocks join when conv_dim is given
    "kohya": Preset(UNET_TRANSFORMER),
    "full": Preset(UNET_TRANSFORMER + UNET_CONV_BLOCKS,
                   ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")),
    "full-lin": Preset(UNET_TRANSFORMER + ("ResnetBlock2D",), ("time_embedding.linear_1", "time_embedding.linear_2"),
                       enable_conv=False),
    "attn-mlp": Preset(UNET_TRANSFORMER, enable_conv=False),
    "attn-only": Preset(("Attention",), te_modules=TE_ATTN_ONLY, enable_conv=False),
    "unet-only": Preset(UNET_TRANSFORMER + UNET_CONV_BLOCKS,
                        ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"), te_modules=()),
    "unet-transformer-only": Preset(UNET_TRANSFORMER, te_modules=(), enable_conv=False),
    "unet-convblock-only": Preset(UNET_CONV_BLOCKS, ("conv_in", "conv_out"), te_modules=()),
}


@dataclass
class Target:
    lora_name: str
    module: nn.Module
    kind: str  # "linear", "conv1x1", "conv"
    te_index: int | None  # None for the UNet


def unet_lora_name(family, diffusers_name: str) -> str:
    return "lora_unet_" + family.unet_lora_path(diffusers_name).replace(".", "_")


def te_lora_name(prefix: str, layer: int, module_path: str) -> str:
    return f"{prefix}_text_model_encoder_layers_{layer}_{TE_MODULES[module_path]}"


def t5_lora_name(prefix: str, block: int, module_path: str) -> str:
    """kohya's name of a T5 layer: its T5EncoderModel module path (lora_te3_encoder_block_0_layer_0_SelfAttention_q)."""
    return f"{prefix}_encoder_block_{block}_{module_path.replace('.', '_')}"


def family_classes(family, classes: tuple[str, ...]) -> tuple[str, ...]:
    """A preset's UNet containers for this family: the transformer container becomes the family's own
    (FLUX: DoubleStreamBlock, SingleStreamBlock, as sd-scripts' networks.lora_flux targets)."""
    out: list[str] = []
    for c in classes:
        out.extend(family.lora_block_classes if c in UNET_TRANSFORMER else (c,))
    return tuple(out)


def _clip_layers(te):
    from lorakit.models.bundle import clip_layers

    return clip_layers(te)


def unet_targets(unet: nn.Module, family, classes: tuple[str, ...], conv: bool = False,
                 extra_names: tuple[str, ...] = ()) -> list[Target]:
    """Linear/Conv2d layers inside containers of `classes`; 3x3 convs only when `conv`."""
    out: dict[str, Target] = {}
    for name, module in unet.named_modules():
        if type(module).__name__ in classes:
            for child_name, child in module.named_modules():
                if not isinstance(child, (nn.Linear, nn.Conv2d)):
                    continue
                kind = layer_kind(child)
                if kind == "conv" and not conv:
                    continue
                full = f"{name}.{child_name}" if child_name else name
                ln = unet_lora_name(family, full)
                out.setdefault(ln, Target(ln, child, kind, None))
    if extra_names and getattr(family, "lora_unet_diffusers_names", True):
        # LyCORIS finds these by diffusers name; in SAI-named UNets (sd-scripts SDXL) they never match
        modules = dict(unet.named_modules())
        for name in extra_names:
            child = modules.get(name)
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                kind = layer_kind(child)
                if kind == "conv" and not conv:
                    continue
                ln = unet_lora_name(family, name)
                out.setdefault(ln, Target(ln, child, kind, None))
    return list(out.values())


def te_targets(text_encoders: list, family, modules: tuple[str, ...] = tuple(TE_MODULES),
               all_layers: bool = False, optional: bool = False) -> list[Target]:
    """Text-encoder layers: CLIP's `modules` of the first te_lora_layer_count layers (every layer with all_layers),
    and T5's attention and FF layers; encoders trained only on request (FLUX's T5) need `optional` or all_layers."""
    out = []
    counts = family.te_lora_layer_count
    for idx, (spec, te) in enumerate(zip(family.text_encoders, text_encoders)):
        if te is None or not (spec.lora_by_default or optional or all_layers):
            continue
        if spec.kind == "t5":
            if modules:
                out.extend(_t5_targets(te, spec.lora_prefix, idx))
            continue
        prefix = spec.lora_prefix
        layers = _clip_layers(te)
        n = len(layers) if all_layers else min(counts[idx], len(layers))
        for i in range(n):
            for path in modules:
                child = layers[i].get_submodule(path)
                out.append(Target(te_lora_name(prefix, i, path), child, "linear", idx))
    return out


def _t5_targets(te, prefix: str, index: int) -> list[Target]:
    return [Target(t5_lora_name(prefix, i, path), block.get_submodule(path), "linear", index)
            for i, block in enumerate(te.encoder.block) for path in T5_MODULES]


def module_map(bundle) -> dict[str, Target]:
    """Every kohya name a file may use for this bundle -> its layer: all UNet Linear/Conv2d/norm layers (SDXL: also
    their diffusers-style aliases) and the six CLIP layers of every text-encoder layer."""
    family = bundle.family
    out: dict[str, Target] = {}
    for name, module in bundle.unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            kind = layer_kind(module)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            kind = "norm"
        else:
            continue
        try:
            ln = unet_lora_name(family, name)
        except KeyError:
            ln = None
        if ln:
            out[ln] = Target(ln, module, kind, None)
        alias = "lora_unet_" + name.replace(".", "_")
        out.setdefault(alias, Target(ln or alias, module, kind, None))
    for t in te_targets(bundle.text_encoders, family, all_layers=True):
        out[t.lora_name] = t
        spec = family.text_encoders[t.te_index]
        for alias in spec.lora_aliases:  # OneTrainer's FLUX T5 prefix, read as sd-scripts' (ComfyUI does the same)
            out.setdefault(alias + t.lora_name[len(spec.lora_prefix):], t)
    return out


def check_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"network_args preset: unknown preset {name!r}; use one of {', '.join(PRESETS)}.")
    return PRESETS[name]
