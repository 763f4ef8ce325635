"""LoRA Block Weight (LBW): block-weight vectors, presets, key-to-block mapping and block selectors.

Facts from hako-mikan/sd-webui-lora-block-weight and sd-scripts (see ../shared/reference/blocks-and-lbw.md):

* vectors of 17 (SD1/2 LoRA), 26 (SD1/2 all), 12 (SDXL LoRA) or 20 (SDXL all) values, named by ``BLOCKS_17`` …;
  shorter vectors expand to the 26 blocks with 0 for blocks they do not list;
* values may be ``R`` (random 0..1), ``U`` (random -0.5..1.5), ``X`` / ``X+0.1`` / ``X-0.2`` (the tag's ``x=``
  value, default 1);
* presets are ``NAME:v1,v2,...`` lines; ``DEFAULT_PRESETS`` are the extension's defaults, user files add to them;
* a LoRA key maps to BASE (text encoder), IN00..IN11, M00 or OUT00..OUT11 through its SAI/LDM block path.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from lorakit.adapters.blocks import block_of_lora_name  # one key->block rule for the whole project
from lorakit.errors import UserError

__all__ = [
    "BLOCKS_26",
    "BLOCKS_17",
    "BLOCKS_12",
    "BLOCKS_20",
    "VECTOR_BLOCKS",
    "DEFAULT_PRESETS",
    "parse_preset_text",
    "load_preset_file",
    "parse_weight_values",
    "expand_to_26",
    "resolve_lbw",
    "block_of_lora_name",
    "block_weight",
    "parse_block_selector",
    "ElementalRule",
    "parse_elemental",
    "elemental_weight",
    "DEFAULT_ELEMENTAL_PRESETS",
    "weights_for_tag",
]

BLOCKS_26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCKS_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
BLOCKS_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]
BLOCKS_20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
# FLUX.1: 19 double-stream and 38 single-stream blocks (as `lorakit lora info` names them); selectors and block weights
# (`lora filter`, `lora merge --block_weights`) name them D00..D18, S00..S37
BLOCKS_FLUX = ["BASE"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)]
VECTOR_BLOCKS: dict[int, list[str]] = {12: BLOCKS_12, 17: BLOCKS_17, 20: BLOCKS_20, 26: BLOCKS_26}

DEFAULT_PRESETS: dict[str, str] = {
    "NONE": ",".join(["0"] * 17),
    "ALL": ",".join(["1"] * 17),
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}

_X_RE = re.compile(r"X(?:([+-])\s*(\d+(?:\.\d*)?|\.\d+))?")


# ---------------------------------------------------------------------------------------------------------------
# Presets and weight vectors
# ---------------------------------------------------------------------------------------------------------------


def parse_preset_text(text: str, source: str = "preset text") -> dict[str, str]:
    """Parse ``NAME:v1,v2,...`` lines (blank lines and ``#`` comments skipped) into {name: csv}."""
    presets: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        name, sep, values = s.partition(":")
        name, values = name.strip(), values.strip()
        if not sep or not name or not values:
            raise UserError(f"{source} line {lineno}: expected NAME:v1,v2,... (17, 26, 12 or 20 values), got {s!r}.")
        count = len(values.split(","))
        if count not in VECTOR_BLOCKS:
            raise UserError(
                f"{source} line {lineno}: preset {name!r} has {count} values; LBW vectors have 17 or 26 (SD1/SD2) "
                "or 12 or 20 (SDXL) values."
            )
        # Check every value now so a typo is reported with its line, not at generation time.
        parse_weight_values(values, x=1.0, rng=random.Random(0), where=f"{source} line {lineno}")
        presets[name] = values
    return presets


def load_preset_file(path: str | Path) -> dict[str, str]:
    """Read a user preset file (the extension's ``lbwpresets.txt`` format)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"LBW preset file {p} does not exist; pass a file of NAME:v1,v2,... lines.") from None
    except UnicodeDecodeError:
        raise UserError(f"LBW preset file {p} is not UTF-8 text.") from None
    return parse_preset_text(text, source=str(p))


def parse_weight_values(
    csv: str, *, x: float = 1.0, rng: random.Random | None = None, where: str = "block weights"
) -> list[float]:
    """Turn ``"1,0,R,U,X+0.1,..."`` into floats (R: random 0..1, U: random -0.5..1.5, rounded to 3 digits)."""
    rng = rng or random.Random()
    out: list[float] = []
    for raw in csv.split(","):
        v = raw.strip()
        if v == "R":
            out.append(round(rng.random(), 3))
        elif v == "U":
            out.append(round(rng.uniform(-0.5, 1.5), 3))
        elif v.startswith("X"):
            m = _X_RE.fullmatch(v)
            if m is None:
                raise UserError(f"{where}: {v!r} is not a valid X value; write X, X+0.1 or X-0.2.")
            if m.group(1) is None:
                out.append(float(x))
            else:
                d = float(m.group(2))
                out.append(float(x) + d if m.group(1) == "+" else float(x) - d)
        else:
            try:
                out.append(float(v))
            except ValueError:
                raise UserError(f"{where}: {v!r} is not a number (allowed: numbers, R, U, X, X+d, X-d).") from None
    return out


def expand_to_26(values: list[float]) -> list[float]:
    """Place a 12/17/20/26-value vector on the 26 blocks, 0 where a shorter vector lists no value."""
    names = VECTOR_BLOCKS.get(len(values))
    if names is None:
        raise UserError(f"A block-weight vector needs 12, 17, 20 or 26 values, got {len(values)}.")
    out = [0.0] * 26
    for name, v in zip(names, values):
        out[BLOCKS_26.index(name)] = float(v)
    return out


def resolve_lbw(
    spec: str,
    presets: Mapping[str, str] | None = None,
    *,
    x: float | None = None,
    rng: random.Random | None = None,
    where: str = "lbw",
) -> dict[str, float]:
    """Resolve a preset name or csv to {block: weight} over all 26 blocks.

    ``presets`` defaults to ``DEFAULT_PRESETS``; pass ``{**DEFAULT_PRESETS, **load_preset_file(p)}`` for user
    presets. An unknown name raises ``UserError`` listing the valid names.
    """
    table = DEFAULT_PRESETS if presets is None else presets
    s = spec.strip()
    if s in table:
        csv = table[s]
    elif "," in s:
        csv = s
        n = len(csv.split(","))
        if n not in VECTOR_BLOCKS:
            raise UserError(
                f"{where}: block weights {spec!r} have {n} values; give 17 or 26 (SD1/SD2) or 12 or 20 (SDXL)."
            )
    else:
        raise UserError(
            f"{where}: unknown block-weight preset {spec!r}. Valid presets: {', '.join(table)}. "
            "User presets come from a preset file of NAME:v1,v2,... lines."
        )
    values = parse_weight_values(csv, x=1.0 if x is None else x, rng=rng, where=f"{where} {spec!r}")
    return dict(zip(BLOCKS_26, expand_to_26(values)))


# ---------------------------------------------------------------------------------------------------------------
# LoRA key -> block
# ---------------------------------------------------------------------------------------------------------------

def block_weight(name: str, weights: Mapping[str, float]) -> float:
    """LBW factor for a module: its block's weight, 1.0 for modules outside the numbered blocks."""
    block = block_of_lora_name(name)
    if block is None:
        return 1.0
    return float(weights.get(block, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# Readable block selectors: "IN04-IN07,OUT03-06", "MID", "TE"
# ---------------------------------------------------------------------------------------------------------------

def _one_block(token: str, text: str) -> str:
    t = token.strip().upper()
    if t in ("BASE", "TE"):
        return "BASE"
    if t in ("M", "MID", "M0", "M00", "MID00"):
        return "M00"
    m = re.fullmatch(r"(IN|OUT|D|S)(\d{1,2})", t)
    if m and f"{m.group(1)}{int(m.group(2)):02d}" in BLOCKS_26 + BLOCKS_FLUX:
        return f"{m.group(1)}{int(m.group(2)):02d}"
    raise UserError(
        f"Block selector {text!r}: {token!r} is not a block. Valid blocks: BASE (or TE), IN00..IN11, "
        "M00 (or MID), OUT00..OUT11 (FLUX.1: D00..D18, S00..S37); ranges like IN04-IN07, OUT03-06 or D00-D09, "
        "separated by commas."
    )


def parse_block_selector(text: str) -> set[str]:
    """Parse ``"IN04-07,OUT03-OUT06"``, ``"MID"``, ``"TE"`` or ``"ALL"`` into a set of canonical block names."""
    result: set[str] = set()
    tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not tokens:
        raise UserError("Block selector is empty; write e.g. IN04-IN07,OUT03-OUT06.")
    for tok in tokens:
        if tok.upper() == "ALL":
            result.update(BLOCKS_26)
            continue
        if "-" in tok:
            a, _, b = tok.partition("-")
            first = _one_block(a, text)
            if b.strip().isdigit() and first.startswith(("IN", "OUT", "D", "S")):
                b = first.rstrip("0123456789") + b.strip()  # "IN04-07" means IN04-IN07
            last = _one_block(b, text)
            order = BLOCKS_FLUX if {first, last} - set(BLOCKS_26) else BLOCKS_26
            if {first, last} - set(order):
                raise UserError(f"Block selector {text!r}: {tok!r} mixes FLUX.1 blocks (D.., S..) with IN/MID/OUT.")
            i, j = order.index(first), order.index(last)
            if i > j:
                i, j = j, i
            result.update(order[i : j + 1])
        else:
            result.add(_one_block(tok, text))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Elemental weights (lbwe): "BLOCKS:ELEMENTS:WEIGHT" rules
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElementalRule:
    """Set ``weight`` for modules in ``blocks`` whose name contains one of ``elements`` (empty = any).

    ``NOT`` as the first word inverts the block or element list, as in the LBW extension.
    """

    blocks: tuple[str, ...]
    blocks_not: bool
    elements: tuple[str, ...]
    elements_not: bool
    weight: float


def parse_elemental(spec: str, presets: Mapping[str, str] | None = None) -> list[ElementalRule]:
    """Parse ``"IN05-OUT05:attn:0, OUT03:NOT ff:0.5"`` (or a preset name from ``presets``) into rules.

    Rules are separated by commas or newlines; each is ``BLOCKS:ELEMENTS:WEIGHT`` with space-separated blocks
    (ranges allowed) and element substrings such as ``attn1``, ``attn2``, ``ff``, ``proj``.
    """
    text = presets[spec] if presets and spec in presets else spec
    rules: list[ElementalRule] = []
    for part in re.split(r"[,\n]", text):
        s = part.strip()
        if not s:
            continue
        fields = s.split(":")
        if len(fields) != 3:
            raise UserError(f"lbwe {spec!r}: rule {s!r} must be BLOCKS:ELEMENTS:WEIGHT.")
        bwords = fields[0].split()
        bnot = bool(bwords) and bwords[0] == "NOT"
        if bnot:
            bwords = bwords[1:]
        blocks: list[str] = []
        for w in bwords:
            blocks.extend(b for b in BLOCKS_26 if b in parse_block_selector(w))
        ewords = fields[1].split()
        enot = bool(ewords) and ewords[0] == "NOT"
        if enot:
            ewords = ewords[1:]
        try:
            weight = float(fields[2])
        except ValueError:
            raise UserError(f"lbwe {spec!r}: weight {fields[2]!r} in {s!r} is not a number.") from None
        rules.append(ElementalRule(tuple(blocks), bnot, tuple(ewords), enot, weight))
    return rules


def elemental_weight(name: str, rules: list[ElementalRule], default: float) -> float:
    """Apply rules in order (last match wins) to a module name; ``default`` is its block weight."""
    block = block_of_lora_name(name)
    lname = name.lower()
    w = default
    for r in rules:
        in_blocks = (block in r.blocks) if r.blocks else True
        if r.blocks and r.blocks_not:
            in_blocks = not in_blocks
        if not in_blocks:
            continue
        has_elem = any(e.lower() in lname for e in r.elements) if r.elements else True
        if r.elements and r.elements_not:
            has_elem = not has_elem
        if has_elem:
            w = r.weight
    return w


DEFAULT_ELEMENTAL_PRESETS: dict[str, str] = {
    "ATTNDEEPON": "IN05-OUT05:attn:1",
    "ATTNDEEPOFF": "IN05-OUT05:attn:0",
    "PROJDEEPOFF": "IN05-OUT05:proj:0",
}


def weights_for_tag(tag, presets: Mapping[str, str] | None = None, rng: random.Random | None = None):
    """{block: weight} for a ``LoraTag`` with ``lbw``, or None when the tag has no block weights."""
    if tag.lbw is None:
        return None
    return resolve_lbw(tag.lbw, presets, x=tag.x, rng=rng, where=tag.raw or tag.name)
