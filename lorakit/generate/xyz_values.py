"""X/Y/Z grid axis values with A1111 scripts/xyz_grid.py syntax, and axis definitions (data only).

Value syntax (A1111):

* ``a, b, "c, with comma"`` - CSV, each value stripped (a quote may follow the comma's space, unlike A1111);
* integers: ``1-5`` (1..5), ``1-5 (+2)`` (1,3,5), ``1-10 [5]`` (5 values spread by linspace, truncated to int);
* floats: ``0.5-1.0 (+0.25)`` (numpy.arange up to end+step), ``0.5-1.0 [3]`` (linspace);
* seeds: ``-1`` or empty become random seeds (``fix_seeds``);
* Prompt S/R: the first value is the text searched for; every value replaces it in prompt and negative prompt.

A1111 quirks kept on purpose: a descending range needs a negative step and then stops one short of the end
(``5-1 (-1)`` = 5,4,3); ``5-1`` without a step gives no values (reported here as an error).
"""

from __future__ import annotations

import csv
import io
import random
import re
from dataclasses import dataclass
from typing import Sequence

from lorakit.errors import UserError

__all__ = [
    "AxisType",
    "AXIS_TYPES",
    "find_axis",
    "split_values",
    "parse_axis_values",
    "apply_prompt_sr",
    "fix_seeds",
    "format_label",
    "loop_order",
]

_RANGE_INT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_RANGE_INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
# A1111 writes the decimal point unescaped ('.' = any character); kept, since it only matters for odd input.
_RANGE_FLOAT = re.compile(
    r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*"
)
_RANGE_FLOAT_COUNT = re.compile(
    r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*"
)


@dataclass(frozen=True)
class AxisType:
    """One grid axis kind. ``value_type`` is "int", "float" or "str"; ``cost`` orders loops (highest outermost);
    ``show_label`` False writes the bare value (A1111 does this for Prompt S/R and Sampler)."""

    name: str
    value_type: str
    cost: float = 0.0
    show_label: bool = True
    lorakit_only: bool = False


AXIS_TYPES: list[AxisType] = [
    AxisType("Nothing", "str", show_label=False),
    AxisType("Seed", "int"),
    AxisType("Steps", "int"),
    AxisType("CFG Scale", "float"),
    AxisType("Prompt S/R", "str", show_label=False),
    AxisType("Sampler", "str", show_label=False),
    AxisType("Checkpoint name", "str", cost=1.0),
    AxisType("Clip skip", "int"),
    AxisType("Size", "str"),
    AxisType("Denoising", "float"),
    AxisType("Hires steps", "int"),
    AxisType("Hires upscale", "float"),
    AxisType("Schedule type", "str"),
    AxisType("VAE", "str", cost=0.7),
    # Axes A1111 lacks (with A1111 users do Prompt S/R over <lora:name-000010:1>).
    AxisType("LoRA file", "str", cost=0.5, lorakit_only=True),
    AxisType("LoRA weight", "float", cost=0.3, lorakit_only=True),
    AxisType("LBW preset", "str", cost=0.3, lorakit_only=True),
]

_ALIASES = {"cfg": "CFG Scale", "cfg scale": "CFG Scale", "checkpoint": "Checkpoint name", "prompt s/r": "Prompt S/R",
            "sr": "Prompt S/R", "lora": "LoRA file", "lbw": "LBW preset", "weight": "LoRA weight"}


def find_axis(name: str) -> AxisType:
    """Axis by name, case-insensitively (a few short aliases accepted)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key).lower()
    for a in AXIS_TYPES:
        if a.name.lower() == key:
            return a
    raise UserError(f"Unknown grid axis {name!r}. Axes: {', '.join(a.name for a in AXIS_TYPES)}.")


def split_values(text: str, raw_lines: bool = False) -> list[str]:
    """CSV split (quotes allowed), each value stripped; ``raw_lines`` with a multi-line text splits on lines."""
    if raw_lines and "\n" in text.strip():
        return text.strip().split("\n")
    # skipinitialspace: `a, "b, c"` quotes as users expect (A1111's reader would keep the quote characters).
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [v.strip() for row in rows for v in row]


def _expand_int(val: str) -> list[int] | None:
    m = _RANGE_INT.fullmatch(val)
    if m is not None:
        start, end = int(m.group(1).replace(" ", "")), int(m.group(2).replace(" ", "")) + 1
        step = int(m.group(3)) if m.group(3) is not None else 1
        if step == 0:
            raise UserError(f"Grid values {val!r}: the step is 0.")
        return list(range(start, end, step))
    m = _RANGE_INT_COUNT.fullmatch(val)
    if m is not None:
        import numpy as np

        start, end = int(m.group(1).replace(" ", "")), int(m.group(2).replace(" ", ""))
        num = int(m.group(3)) if m.group(3) is not None else 1
        return [int(x) for x in np.linspace(start=start, stop=end, num=num).tolist()]
    return None


def _expand_float(val: str) -> list[float] | None:
    import numpy as np

    try:
        m = _RANGE_FLOAT.fullmatch(val)
        if m is not None:
            start, end = float(m.group(1).replace(" ", "")), float(m.group(2).replace(" ", ""))
            step = float(m.group(3)) if m.group(3) is not None else 1.0
            if step == 0:
                raise UserError(f"Grid values {val!r}: the step is 0.")
            return [float(x) for x in np.arange(start, end + step, step).tolist()]
        m = _RANGE_FLOAT_COUNT.fullmatch(val)
        if m is not None:
            start, end = float(m.group(1).replace(" ", "")), float(m.group(2).replace(" ", ""))
            num = int(float(m.group(3))) if m.group(3) is not None else 1
            return [float(x) for x in np.linspace(start=start, stop=end, num=num).tolist()]
    except ValueError:
        raise UserError(f"Grid values {val!r} is not a valid range; write 0.5-1.0 (+0.25) or 0.5-1.0 [3].") from None
    return None


def parse_axis_values(text: str, value_type: str, *, axis: str = "axis", raw_lines: bool = False) -> list:
    """Expand an axis value string into a list of int, float or str values."""
    vals = split_values(text, raw_lines=raw_lines)
    out: list = []
    for val in vals:
        if value_type == "int":
            expanded = _expand_int(val)
            if expanded is None:
                try:
                    out.append(int(val))
                except ValueError:
                    raise UserError(
                        f"{axis}: {val!r} is not a whole number or range like 1-5, 1-5 (+2), 1-10 [5]."
                    ) from None
            else:
                out.extend(expanded)
        elif value_type == "float":
            expanded = _expand_float(val)
            if expanded is None:
                try:
                    out.append(float(val))
                except ValueError:
                    raise UserError(f"{axis}: {val!r} is not a number or range like 0.5-1.0 [3].") from None
            else:
                out.extend(expanded)
        elif value_type == "str":
            out.append(val)
        else:
            raise ValueError(f"unknown value type {value_type!r}")
    if not out:
        raise UserError(f"{axis}: {text!r} gives no values (a range like 5-1 needs a negative step: 5-1 (-1)).")
    return out


def apply_prompt_sr(prompt: str, negative_prompt: str, values: Sequence[str], value: str) -> tuple[str, str]:
    """Prompt S/R: replace every occurrence of ``values[0]`` in both prompts with ``value``."""
    search = values[0]
    if search not in prompt and search not in negative_prompt:
        raise UserError(f"Prompt S/R did not find {search!r} in the prompt or the negative prompt.")
    return prompt.replace(search, value), negative_prompt.replace(search, value)


def fix_seeds(values: Sequence, rng: random.Random | None = None) -> list:
    """Replace -1, None or '' with random seeds (A1111 draws below 4294967294)."""
    rng = rng or random.Random()
    return [rng.randrange(4294967294) if v is None or v == "" or v == -1 else v for v in values]


def format_label(axis: AxisType, value) -> str:
    """Cell label: "Label: value" (floats rounded to 8 digits), or the bare value for S/R and Sampler."""
    if isinstance(value, float):
        value = round(value, 8)
    if axis.name == "Nothing":
        return ""
    return f"{axis.name}: {value}" if axis.show_label else f"{value}"


def loop_order(x_cost: float, y_cost: float, z_cost: float) -> tuple[str, str]:
    """(outermost, second) axis letters so the costliest axis changes least often; A1111's default is z, y."""
    first, second = "z", "y"
    if x_cost > y_cost and x_cost > z_cost:
        first, second = "x", ("y" if y_cost > z_cost else "z")
    elif y_cost > x_cost and y_cost > z_cost:
        first, second = "y", ("x" if x_cost > z_cost else "z")
    elif z_cost > x_cost and z_cost > y_cost:
        first, second = "z", ("x" if x_cost > y_cost else "y")
    return first, second
