"""``<lora:...>`` / ``<lyco:...>`` tags in prompts (A1111 extra networks + the LoRA Block Weight extension).

Accepted forms (see docs in ../shared/reference/prompt-syntax.md and blocks-and-lbw.md):

* ``<lora:NAME>``, ``<lora:NAME:MULT>``, positional ``<lora:NAME:TE:UNET:DYN>`` (UNET defaults to TE, TE to 1.0,
  DYN = use only the first N ranks);
* named ``te=``, ``unet=``, ``dyn=``, and from LoRA Block Weight ``lbw=`` (preset name or csv), ``lbwe=``,
  ``start=``, ``stop=``, ``step=START-STOP``, ``x=`` (value of ``X`` in block weights);
* the legacy LBW form ``<lora:NAME:TE:PRESET>``: a third positional argument that is not a number is a preset name,
  optionally followed by an elemental preset name.

Tags are removed from the prompt text; they apply to the whole generation. Anything malformed raises
``UserError`` naming the tag (A1111 instead drops every LoRA of the generation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lorakit.errors import UserError

__all__ = ["LoraTag", "parse_extra_networks", "strip_extra_networks", "hash_alias", "NETWORK_KINDS", "NAMED_ARGS"]

NETWORK_KINDS = ("lora", "lyco")
NAMED_ARGS = ("te", "unet", "dyn", "lbw", "lbwe", "start", "stop", "step", "x")

# Same tag shape A1111 uses: word characters, a colon, anything up to '>'.
_TAG_RE = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` occurrence."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    lbw: str | None = None  # preset name or comma-separated weights; resolved by lorakit.generate.lbw
    lbwe: str | None = None  # elemental (per-element) preset name or spec
    start: int | None = None  # first step where the LoRA is active (LBW start=)
    stop: int | None = None  # step from which the LoRA is off (LBW stop=)
    x: float | None = None  # value for X in LBW weights (default 1)
    kind: str = "lora"
    raw: str = ""  # the tag as written, for messages

    @property
    def needs_unmerged(self) -> bool:
        """start/stop switch the LoRA during sampling, so weights cannot stay merged for the whole run."""
        return self.start is not None or self.stop is not None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _float(value: str, what: str, raw: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise UserError(f"{raw}: {what} {value!r} is not a number. Write e.g. <lora:name:0.8>.") from None
    if not math.isfinite(v):
        raise UserError(f"{raw}: {what} {value!r} must be a finite number.")
    return v


def _int(value: str, what: str, raw: str, minimum: int) -> int:
    try:
        v = int(value.strip())
    except ValueError:
        raise UserError(f"{raw}: {what} {value!r} must be a whole number.") from None
    if v < minimum:
        raise UserError(f"{raw}: {what} must be at least {minimum}, got {v}.")
    return v


def _parse_tag(kind: str, args: str) -> LoraTag:
    raw = f"<{kind}:{args}>"
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        parts = item.split("=")
        if len(parts) == 2:
            key = parts[0].strip().lower()
            if key not in NAMED_ARGS:
                raise UserError(
                    f"{raw}: unknown argument {parts[0]!r}. Known named arguments: {', '.join(NAMED_ARGS)}."
                )
            if key in named:
                raise UserError(f"{raw}: argument {key}= is given twice.")
            named[key] = parts[1].strip()
        elif len(parts) > 2:
            raise UserError(f"{raw}: {item!r} has more than one '='.")
        else:
            positional.append(item)

    if not positional or not positional[0].strip():
        raise UserError(f"{raw}: the LoRA name is missing. Write <{kind}:NAME:WEIGHT>.")
    name = positional[0].strip()

    te = _float(positional[1], "text-encoder weight", raw) if len(positional) > 1 else 1.0
    unet: float | None = None
    lbw: str | None = None
    lbwe: str | None = None
    dyn: int | None = None
    if len(positional) > 2:
        third = positional[2].strip()
        if _is_number(third):
            unet = _float(third, "UNet weight", raw)
            if len(positional) > 3:
                dyn = _int(positional[3], "dyn (rank limit)", raw, 1)
        else:
            # Legacy LoRA Block Weight form <lora:NAME:TE:PRESET[:ELEMENTAL]>.
            if not third:
                raise UserError(f"{raw}: the third value is empty.")
            lbw = third
            if len(positional) > 3:
                fourth = positional[3].strip()
                if not fourth or _is_number(fourth):
                    raise UserError(
                        f"{raw}: after the block-weight preset {third!r} only an elemental preset name may follow."
                    )
                lbwe = fourth
    if len(positional) > 4:
        raise UserError(f"{raw}: too many values; the form is <{kind}:NAME:TE:UNET:DYN> or named te=/unet=/dyn=.")

    if "te" in named:
        te = _float(named["te"], "te", raw)
    if unet is None:
        unet = te
    if "unet" in named:
        unet = _float(named["unet"], "unet", raw)
    if "dyn" in named:
        dyn = _int(named["dyn"], "dyn", raw, 1)
    if "lbw" in named:
        if lbw is not None:
            raise UserError(f"{raw}: block weights are given twice (positional preset and lbw=).")
        lbw = named["lbw"]
        if not lbw:
            raise UserError(f"{raw}: lbw= is empty.")
    if "lbwe" in named:
        if lbwe is not None:
            raise UserError(f"{raw}: elemental weights are given twice.")
        lbwe = named["lbwe"] or None

    start = _int(named["start"], "start", raw, 0) if "start" in named else None
    stop = _int(named["stop"], "stop", raw, 0) if "stop" in named else None
    if "step" in named:
        if start is not None or stop is not None:
            raise UserError(f"{raw}: use either step=START-STOP or start=/stop=, not both.")
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", named["step"])
        if m is None:
            raise UserError(f"{raw}: step= must look like step=5-20.")
        start, stop = int(m.group(1)), int(m.group(2))
    if start is not None and stop is not None and stop <= start:
        raise UserError(f"{raw}: stop ({stop}) must be after start ({start}).")
    x = _float(named["x"], "x", raw) if "x" in named else None

    return LoraTag(
        name=name, te=te, unet=unet, dyn=dyn, lbw=lbw, lbwe=lbwe, start=start, stop=stop, x=x, kind=kind, raw=raw
    )


def parse_extra_networks(prompt: str) -> tuple[str, list[LoraTag]]:
    """Remove every ``<kind:...>`` tag from ``prompt``; return the cleaned text and the LoRA tags in order.

    Only ``lora`` and ``lyco`` are supported; other extra networks (``<hypernet:...>``) raise ``UserError``.
    """
    tags: list[LoraTag] = []

    def take(m: re.Match) -> str:
        kind = m.group(1).lower()
        if kind not in NETWORK_KINDS:
            raise UserError(
                f"Prompt tag {m.group(0)!r}: extra network type {m.group(1)!r} is not supported; "
                "use <lora:NAME:WEIGHT> (or <lyco:...>)."
            )
        tags.append(_parse_tag(kind, m.group(2)))
        return ""

    return _TAG_RE.sub(take, prompt), tags


def strip_extra_networks(prompt: str) -> str:
    """The prompt with every extra-network tag removed (no validation)."""
    return _TAG_RE.sub("", prompt)


def hash_alias(name: str) -> str:
    """Name as written into "Lora hashes" (A1111 drops ':' and ',' so the list stays parseable)."""
    return name.replace(":", "").replace(",", "")
