"""UNet blocks on the training side: sd-scripts' block indices for block_dims / lr weights, LBW block names, and the
readable selector ("IN04-IN07,OUT03-OUT06", "MID", "TE").

SD1/SD2 (25 indices): 0 = IN00, down_blocks i resnets/attentions j -> 1+3i+j, downsamplers of i -> 3+3i, 12 = MID,
up_blocks i resnets/attentions j -> 13+3i+j, upsamplers of i -> 15+3i.  Index n < 12 is IN{n}, n > 12 is OUT{n-13}.
SDXL (23 indices, SAI names): 0 = time/label embedding, input_blocks n -> 1+n (IN{n}), middle_block n -> 10+n (MID),
output_blocks n -> 13+n (OUT{n}), 22 = out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lorakit.errors import UserError

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_RE_SAI = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")


@dataclass(frozen=True)
class BlockScheme:
    """The block layout of one family on the training side."""

    count: int  # length of block_dims
    side: int  # values in down_lr_weight / up_lr_weight
    mid: int  # values in mid_lr_weight
    sai_names: bool  # kohya UNet names use SAI paths

    def index(self, lora_name: str) -> int:
        """sd-scripts' block index of a kohya module name; -1 for text-encoder (or unknown) names."""
        if self.sai_names:
            if not lora_name.startswith("lora_unet_"):
                return -1
            name = lora_name[len("lora_unet_"):]
            if name.startswith(("time_embed_", "label_emb_")):
                return 0
            m = _RE_SAI.match(lora_name)
            if m:
                n = int(m.group(2))
                return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)] + n
            if name.startswith("out_"):
                return 22
            return -1
        m = _RE_UPDOWN.search(lora_name)
        if m:
            side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if side == "down" else 13 + idx
        if "mid_block_" in lora_name:
            return 12
        if lora_name.startswith("lora_unet_conv_in"):
            return 0
        if lora_name.startswith("lora_unet_conv_out") or lora_name.startswith("lora_unet_conv_norm_out"):
            return 24
        return -1

    def name_of(self, index: int) -> str:
        """IN00.. / MID / OUT00.. for a block index (SDXL 0 and 22 are "EMB" and "OUT")."""
        if self.sai_names:
            if index == 0:
                return "EMB"
            if index == 22:
                return "END"
            if 1 <= index <= 9:
                return f"IN{index - 1:02d}"
            if 10 <= index <= 12:
                return "MID"
            return f"OUT{index - 13:02d}"
        if index < 12:
            return f"IN{index:02d}"
        if index == 12:
            return "MID"
        return f"OUT{index - 13:02d}"

    def selectable(self) -> list[str]:
        names: list[str] = []
        for i in range(self.count):
            n = self.name_of(i)
            if n not in names and n not in ("EMB", "END"):
                names.append(n)
        return names

    def indices_of(self, name: str) -> list[int]:
        return [i for i in range(self.count) if self.name_of(i) == name]


_RE_FLUX = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_")


@dataclass(frozen=True)
class FluxScheme(BlockScheme):
    """FLUX.1: D00..D18 (double-stream blocks), then S00..S37 (single-stream); no down/mid/up sides."""

    double: int = 19

    def index(self, lora_name: str) -> int:
        m = _RE_FLUX.match(lora_name)
        if not m:
            return -1
        return int(m.group(2)) + (0 if m.group(1) == "double" else self.double)

    def name_of(self, index: int) -> str:
        return f"D{index:02d}" if index < self.double else f"S{index - self.double:02d}"


SD_SCHEME = BlockScheme(count=25, side=12, mid=1, sai_names=False)
SDXL_SCHEME = BlockScheme(count=23, side=9, mid=3, sai_names=True)
FLUX_SCHEME = FluxScheme(count=57, side=0, mid=0, sai_names=False)


SCHEMES = {"diffusers-25": SD_SCHEME, "sai-23": SDXL_SCHEME, "flux-57": FLUX_SCHEME}  # by Family.block_scheme


def scheme_for(family) -> BlockScheme:
    """The scheme of a Family (its `block_scheme`; the SD1/2 layout for stand-ins without one)."""
    return SCHEMES[getattr(family, "block_scheme", "diffusers-25")]


# ---- LBW names (generation side, also shown by `lora info`) -------------------------------------------------------
_TE_PREFIXES = (
    "lora_te",  # lora_te_, lora_te1_, lora_te2_
    "te_",
    "te1_",
    "te2_",
    "text_encoder",
    "text_model",
    "cond_stage_model",
    "conditioner",
    "embedders",
)
_UNET_PREFIXES = (
    "lora_unet_",
    "base_model_model_",
    "unet_",
    "model_diffusion_model_",
    "diffusion_model_",
)
_SAI_IN = re.compile(r"input_blocks_(\d+)(?:_|$)")
_SAI_OUT = re.compile(r"output_blocks_(\d+)(?:_|$)")
_DOWN = re.compile(r"down_blocks_(\d+)_(resnets|attentions|downsamplers)_(\d+)(?:_|$)")
_UP = re.compile(r"up_blocks_(\d+)_(resnets|attentions|upsamplers)_(\d+)(?:_|$)")
_DIT = re.compile(r"(double|single)_blocks_(\d+)(?:_|$)")  # FLUX.1


def block_of_lora_name(name: str) -> str | None:
    """Block of a LoRA module name or key: "BASE", "IN00".."IN11", "M00", "OUT00".."OUT11" (FLUX: "D00".."D18",
    "S00".."S37").

    Works on kohya names (``lora_unet_down_blocks_1_attentions_0_...`` = input_blocks_4_1 = IN04, SDXL
    ``lora_unet_input_blocks_4_1_...``), full keys with ``.lora_down.weight`` and dotted diffusers/PEFT names.
    Text-encoder names are BASE. Returns None for UNet parts outside the numbered blocks (time embedding,
    conv_out, ...): LBW leaves those at weight 1.
    """
    n = name.replace(".", "_").lower()
    for prefix in _TE_PREFIXES:
        if n.startswith(prefix):
            return "BASE"
    for prefix in _UNET_PREFIXES:
        if n.startswith(prefix):
            n = n[len(prefix):]
            break
    if n.startswith("transformer_resblocks"):
        return "BASE"
    m = _SAI_IN.match(n)
    if m:
        return f"IN{int(m.group(1)):02d}"
    if n.startswith("middle_block") or n.startswith("mid_block"):
        return "M00"
    m = _SAI_OUT.match(n)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    m = _DOWN.match(n)
    if m:
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"IN{3 + 3 * i:02d}" if kind == "downsamplers" else f"IN{1 + 3 * i + j:02d}"
    m = _UP.match(n)
    if m:
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    if n.startswith("conv_in"):
        return "IN00"
    m = _DIT.match(n)
    if m:  # FLUX: D00..D18, S00..S37
        return f"{m.group(1)[0].upper()}{int(m.group(2)):02d}"
    return None


def lbw_block_of(lora_name: str) -> str:
    """Like block_of_lora_name, with OTHER for modules outside the block grid (time embedding, conv_out)."""
    return block_of_lora_name(lora_name) or "OTHER"


# ---- readable selector --------------------------------------------------------------------------------------------
TE_NAMES = ("TE", "BASE")


def parse_block_selector(text: str, scheme: BlockScheme) -> tuple[set[int], bool]:
    """"IN04-IN07,OUT03-06,MID,TE" -> (block indices, text encoder included). Accepts "M00" for MID and "OUT03-06"
    shorthand. Unknown names raise UserError listing the valid ones."""
    valid = scheme.selectable()
    order = {n: i for i, n in enumerate(valid)}
    aliases = {"M00": "MID", "MID00": "MID"}
    chosen: set[int] = set()
    te = False

    def norm(tok: str, prefix_from: str | None = None) -> str:
        t = tok.strip().upper()
        if prefix_from and t.isdigit():
            t = re.match(r"[A-Z]+", prefix_from).group(0) + t
        m = re.fullmatch(r"(IN|OUT)(\d{1,2})", t)
        if m:
            t = f"{m.group(1)}{int(m.group(2)):02d}"
        t = aliases.get(t, t)
        if t not in order:
            raise UserError(f"network_args blocks: unknown block {tok.strip()!r}. Valid names: "
                            f"{', '.join(valid)}, TE (text encoder); ranges like IN04-IN07 or OUT03-06.")
        return t

    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.upper() in TE_NAMES:
            te = True
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            a = norm(a)
            b = norm(b, prefix_from=a)
            lo, hi = order[a], order[b]
            if lo > hi:
                raise UserError(f"network_args blocks: range {part!r} runs backwards; write it as {b}-{a}.")
            names = valid[lo:hi + 1]
        else:
            names = [norm(part)]
        for n in names:
            chosen.update(scheme.indices_of(n))
    return chosen, te


# ---- block lr weights (sd-scripts) --------------------------------------------------------------------------------
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def _preset(spec: str, n: int) -> list[float]:
    name, _, base = spec.partition("+")
    base_lr = float(base) if base else 0.0
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base_lr for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base_lr for i in range(n)]
    if name == "linear":
        return [i / (n - 1) + base_lr for i in range(n)]
    if name == "reverse_linear":
        return [i / (n - 1) + base_lr for i in reversed(range(n))]
    if name == "zeros":
        return [0.0 + base_lr] * n
    raise UserError(f"network_args: unknown lr weight preset {spec!r}; use one of {', '.join(LR_PRESETS)} "
                    f"(optionally with +base, e.g. cosine+0.1) or {n} comma-separated numbers.")


def _floats(field: str, text: str) -> list[float]:
    try:
        return [float(s) if s.strip() else 0.0 for s in text.split(",")]
    except ValueError:
        raise UserError(f"network_args {field}: {text!r} is not a list of numbers.") from None


def block_lr_weights(scheme: BlockScheme, down: str | None, mid: str | None, up: str | None,
                     zero_threshold: float = 0.0) -> list[float] | None:
    """The per-block lr factor vector (length scheme.count) from down/mid/up_lr_weight, or None when none is set.
    Short lists are filled with 1, long ones cut (sd-scripts); factors <= zero_threshold become 0."""
    if down is None and mid is None and up is None:
        return None
    if not scheme.side:
        raise UserError("network_args down_lr_weight / mid_lr_weight / up_lr_weight: this model has no down/mid/up "
                        "UNet sides (FLUX's blocks are D00-D18 and S00-S37); use block_dims or blocks instead.")

    def side(field, spec):
        if spec is None:
            return [1.0] * scheme.side
        vals = _floats(field, spec) if ("," in spec or _is_number(spec)) else _preset(spec.strip(), scheme.side)
        vals = vals[:scheme.side] + [1.0] * (scheme.side - len(vals))
        return [v if v > zero_threshold else 0.0 for v in vals]

    d = side("down_lr_weight", down)
    u = side("up_lr_weight", up)
    if mid is None:
        m = [1.0] * scheme.mid
    else:
        m = _floats("mid_lr_weight", mid)
        m = m[:scheme.mid] + [1.0] * (scheme.mid - len(m))
        m = [v if v > zero_threshold else 0.0 for v in m]
    out = d + m + u
    if scheme.sai_names:
        out = [1.0] + out + [1.0]
    return out


def block_lr_vector(scheme: BlockScheme, text: str, zero_threshold: float = 0.0) -> list[float]:
    """block_lr_weight: one lr factor per block of any family, as `scheme.count` numbers in block order or as
    readable groups "SELECTOR:factor;SELECTOR:factor" (e.g. "D00-D09:0.5;S30-S37:2"; blocks not named keep 1).
    Factors <= zero_threshold become 0 (that block gets no LoRA), as with down_lr_weight."""
    text = text.strip()
    n = scheme.count
    if ":" not in text:
        vals = _floats("block_lr_weight", text)
        if len(vals) != n:
            raise UserError(f"network_args block_lr_weight: {len(vals)} values given, this model needs {n} (one per "
                            f"block: {', '.join(scheme.name_of(i) for i in range(n))}), or groups like "
                            f"{scheme.name_of(0)}-{scheme.name_of(n // 2)}:0.5;{scheme.name_of(n - 1)}:2.")
    else:
        vals = [1.0] * n
        for group in text.split(";"):
            if not group.strip():
                continue
            selector, _, factor = group.rpartition(":")
            if not selector.strip() or not _is_number(factor.strip()):
                raise UserError(f"network_args block_lr_weight: {group.strip()!r} is not SELECTOR:factor (e.g. "
                                f"{scheme.name_of(0)}-{scheme.name_of(2)}:0.5); separate groups with ';'.")
            chosen, te = parse_block_selector(selector, scheme)
            if te:
                raise UserError("network_args block_lr_weight: TE is not a block; set the text encoders' rate with "
                                "--text_encoder_lr.")
            for i in chosen:
                vals[i] = float(factor)
    if any(v < 0 for v in vals):
        raise UserError(f"network_args block_lr_weight={text!r}: a learning-rate factor cannot be negative.")
    return [v if v > zero_threshold else 0.0 for v in vals]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
