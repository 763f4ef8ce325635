"""sd-scripts' network args of its DiT LoRA (networks/lora_flux.py) beyond train_blocks / train_t5xxl: which modules
get which rank, and split_qkv. The family says which block lists and fused layers it has (Family.block_lists,
Family.lora_split_parts); these rules only read kohya module names.

    train_double_block_indices / train_single_block_indices   "all", "none", or indices and ranges: "0,2-5,10"
    img_attn_dim txt_attn_dim img_mlp_dim txt_mlp_dim img_mod_dim txt_mod_dim single_dim single_mod_dim
                  the rank of that kind of layer (0: no LoRA there); the first that matches the name wins
    in_dims       "[img, time, vector, guidance, txt]": LoRA ranks on the input embedders (0: none)
    split_qkv     one LoRA per q/k/v part of a fused layer (adapters.lora.SplitLoRAModule)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lorakit.errors import UserError

# sd-scripts' order; a layer takes the first kind whose words all occur in its name
TYPE_DIMS = (("img_attn_dim", ("img_attn",)), ("txt_attn_dim", ("txt_attn",)), ("img_mlp_dim", ("img_mlp",)),
             ("txt_mlp_dim", ("txt_mlp",)), ("img_mod_dim", ("img_mod",)), ("txt_mod_dim", ("txt_mod",)),
             ("single_dim", ("single_blocks", "linear")), ("single_mod_dim", ("modulation",)))
# in_dims' five entries: the embedders' module paths (sd-scripts filters names by _img_in, _time_in, ...)
IN_LAYERS = (("img_in",), ("time_in.in_layer", "time_in.out_layer"), ("vector_in.in_layer", "vector_in.out_layer"),
             ("guidance_in.in_layer", "guidance_in.out_layer"), ("txt_in",))
INDEX_ARGS = {"train_double_block_indices": "double_blocks", "train_single_block_indices": "single_blocks"}
ARGS = ("split_qkv", "in_dims", *INDEX_ARGS, *(name for name, _ in TYPE_DIMS))


@dataclass
class DitArgs:
    split_qkv: bool = False
    block_indices: dict[str, set[int]] = field(default_factory=dict)  # module list -> selected block indices
    type_dims: dict[str, int] = field(default_factory=dict)  # arg name -> rank
    in_dims: tuple[int, ...] | None = None

    def dim(self, lora_name: str, dim: int) -> int:
        """The rank of a transformer-block layer: its kind's rank (type dims), 0 outside the selected blocks."""
        for arg, words in TYPE_DIMS:
            if arg in self.type_dims and all(w in lora_name for w in words):
                dim = self.type_dims[arg]
                break
        for blocks, chosen in self.block_indices.items():
            m = re.match(rf"lora_unet_{blocks}_(\d+)_", lora_name)
            if m and int(m.group(1)) not in chosen:
                return 0
        return dim


def parse_dit_args(args: dict, family, algo: str) -> DitArgs:
    given = [k for k in ARGS if k in args]
    if not given:
        return DitArgs()
    if not family.block_lists:
        raise UserError(f"network_args {', '.join(given)}: sd-scripts' FLUX.1 LoRA arguments; this model is "
                        f"{family.title}. Remove them.")
    unet = family.config("unet")
    depths = {name: int(unet[key]) for name, key in family.block_lists}
    out = DitArgs(split_qkv=str(args.get("split_qkv", "False")).strip().lower() == "true")
    if out.split_qkv and algo != "lora":
        raise UserError(f"network_args split_qkv=True splits plain LoRA modules (sd-scripts' networks.lora_flux); "
                        f"not {algo}. Remove it or train networks.lora.")
    for arg, blocks in INDEX_ARGS.items():
        if arg in args:
            out.block_indices[blocks] = block_selection(arg, str(args[arg]), depths[blocks])
    for arg, _words in TYPE_DIMS:
        if arg in args:
            out.type_dims[arg] = _int(arg, args[arg])
    if "in_dims" in args:
        text = str(args["in_dims"]).strip().removeprefix("[").removesuffix("]")
        out.in_dims = tuple(_int("in_dims", v) for v in text.split(","))
        if len(out.in_dims) != len(IN_LAYERS):
            raise UserError(f"network_args in_dims={args['in_dims']!r}: give 5 ranks [img, time, vector, guidance, "
                            f"txt] (0: no LoRA), e.g. in_dims=[4,0,0,0,4].")
    return out


def block_selection(arg: str, text: str, total: int) -> set[int]:
    """sd-scripts' parse_block_selection: "all", "none"/"", or comma-separated indices and ranges a-b."""
    text = text.strip()
    if text == "all":
        return set(range(total))
    if text in ("none", ""):
        return set()
    chosen: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"network_args {arg}={text!r}: use all, none, or indices and ranges like 0,2-5.") from None
        if not (0 <= a <= b < total):
            raise UserError(f"network_args {arg}={text!r}: {part.strip()} is outside 0-{total - 1} (this model has "
                            f"{total} of these blocks).")
        chosen.update(range(a, b + 1))
    return chosen


def _int(arg: str, value) -> int:
    try:
        v = int(str(value).strip())
    except ValueError:
        raise UserError(f"network_args {arg}={value!r}: expected a whole number (a rank; 0 for none).") from None
    if v < 0:
        raise UserError(f"network_args {arg}={value!r}: a rank cannot be negative.")
    return v


def split_parts(family, lora_name: str, in_features: int) -> tuple[int, ...] | None:
    """The part widths split_qkv gives a fused layer (None: not a fused layer)."""
    for suffix, units in family.lora_split_parts:
        if lora_name.startswith("lora_unet_") and lora_name.endswith(suffix):
            return tuple(u * in_features for u in units)
    return None
