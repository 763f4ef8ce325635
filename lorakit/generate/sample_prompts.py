"""Prompt files in sd-scripts' sample syntax, for batch generation and the trainer's previews.

Text files: one prompt per line, blank lines and ``#`` comment lines skipped, options after `` --``::

    1girl, solo, <lora:aru:1> --n lowres, bad hands --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss euler_a

``--n`` negative prompt, ``--w``/``--h`` size, ``--d`` seed, ``--l`` CFG scale, ``--s`` steps (clamped to 1..1000),
``--ss`` sampler, ``--g`` guidance scale, ``--cn`` control image, ``--ctr`` CFG truncation ratio, ``--rcfg``
renormalised CFG, ``--fs`` flow shift (the last five are kept in ``extra``).

``.toml`` files: a ``[prompt]`` table of defaults and ``[[prompt.subset]]`` entries; ``.json`` files: a list of
strings (parsed like text lines) or objects. Object keys are sd-scripts' (``prompt``, ``negative_prompt``,
``width``, ``height``, ``seed``, ``sample_steps``, ``scale``, ``sample_sampler``, ...).

sd-scripts' defaults for unspecified fields are in ``SD_SCRIPTS_DEFAULTS`` (steps 30, 512x512, scale 7.5).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from lorakit.errors import UserError

__all__ = ["SamplePrompt", "parse_prompt_line", "parse_prompt_text", "load_sample_prompts", "SD_SCRIPTS_DEFAULTS"]

SD_SCRIPTS_DEFAULTS = {"steps": 30, "width": 512, "height": 512, "scale": 7.5}


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    scale: float | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    extra: dict = field(default_factory=dict)
    index: int = 0  # position in the file (sd-scripts "enum", used in file names)

    def with_defaults(self, **defaults) -> "SamplePrompt":
        """Copy with unset fields filled from ``defaults`` (e.g. ``**SD_SCRIPTS_DEFAULTS``)."""
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **filled)


# option -> (field, pattern of the value, converter); sd-scripts matches these with re.match, case-insensitively.
_INT = r"(\d+)"
_FLOAT = r"([\d\.]+)"
_ANY = r"(.+)"
_OPTIONS: list[tuple[str, str, str, object]] = [
    ("w", "width", _INT, int),
    ("h", "height", _INT, int),
    ("d", "seed", _INT, int),
    ("s", "steps", _INT, lambda v: max(1, min(1000, int(v)))),
    ("l", "scale", _FLOAT, float),
    ("g", "guidance_scale", _FLOAT, float),
    ("n", "negative_prompt", _ANY, str),
    ("ss", "sampler", _ANY, str),
    ("cn", "extra:controlnet_image", _ANY, str),
    ("ctr", "extra:cfg_trunc_ratio", _ANY, float),
    ("rcfg", "extra:renorm_cfg", _ANY, float),
    ("fs", "extra:flow_shift", _ANY, str),
]


def _set(sp: SamplePrompt, target: str, value) -> None:
    if target.startswith("extra:"):
        sp.extra[target[6:]] = value
    else:
        setattr(sp, target, value)


def parse_prompt_line(line: str, *, where: str = "prompt line", index: int = 0) -> SamplePrompt:
    """Parse one ``prompt --opt value ...`` line (the line is split on " --" like sd-scripts)."""
    parts = line.split(" --")
    sp = SamplePrompt(prompt=parts[0].strip(), index=index)
    for part in parts[1:]:
        if not part.strip():
            continue
        opt, _, value = part.partition(" ")
        key = opt.lower()
        for name, target, pattern, conv in _OPTIONS:
            if key == name:
                m = re.fullmatch(pattern, value.strip(), re.S)
                if m is None:
                    raise UserError(f"{where}: option --{opt} has a bad value {value.strip()!r}.")
                try:
                    _set(sp, target, conv(m.group(1)))
                except ValueError:
                    raise UserError(f"{where}: option --{opt} has a bad value {value.strip()!r}.") from None
                break
        else:
            known = ", ".join("--" + o[0] for o in _OPTIONS)
            raise UserError(f"{where}: unknown option --{opt}. Options: {known}.")
    if not sp.prompt:
        raise UserError(f"{where}: the prompt text before the options is empty.")
    return sp


def parse_prompt_text(text: str, source: str = "prompt file") -> list[SamplePrompt]:
    """Parse the lines of a text prompt file."""
    out: list[SamplePrompt] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        out.append(parse_prompt_line(s, where=f"{source} line {lineno}", index=len(out)))
    return out


_DICT_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "sample_steps": "steps",
    "scale": "scale",
    "guidance_scale": "guidance_scale",
    "sample_sampler": "sampler",
    "controlnet_image": "extra:controlnet_image",
    "cfg_trunc_ratio": "extra:cfg_trunc_ratio",
    "renorm_cfg": "extra:renorm_cfg",
    "flow_shift": "extra:flow_shift",
    "enum": None,
    "subset": None,
}
_TYPES = {"width": int, "height": int, "seed": int, "steps": int, "scale": float, "guidance_scale": float}


def _from_dict(d: dict, where: str, index: int) -> SamplePrompt:
    sp = SamplePrompt(prompt="", index=index)
    for k, v in d.items():
        if k not in _DICT_KEYS:
            raise UserError(f"{where}: unknown key {k!r}. Keys: {', '.join(k for k in _DICT_KEYS if k != 'subset')}.")
        target = _DICT_KEYS[k]
        if target is None:
            continue
        conv = _TYPES.get(target)
        if conv is not None and v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (conv is int and float(v) != int(v)):
                raise UserError(f"{where}: {k} must be a {'whole number' if conv is int else 'number'}, got {v!r}.")
            v = conv(v)
            if target == "steps":
                v = max(1, min(1000, v))
        _set(sp, target, v)
    if not isinstance(sp.prompt, str) or not sp.prompt.strip():
        raise UserError(f"{where}: 'prompt' is missing or empty.")
    return sp


def load_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a .txt, .toml or .json prompt file as sd-scripts does."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"Prompt file {p} does not exist.") from None
    except UnicodeDecodeError:
        raise UserError(f"Prompt file {p} is not UTF-8 text.") from None

    suffix = p.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"Prompt file {p} is not valid TOML: {e}.") from None
        base = data.get("prompt")
        if not isinstance(base, dict) or not isinstance(base.get("subset"), list):
            raise UserError(f"Prompt file {p}: expected a [prompt] table with [[prompt.subset]] entries.")
        defaults = {k: v for k, v in base.items() if k != "subset"}
        return [
            _from_dict({**defaults, **sub}, f"{p} subset {i + 1}", i) for i, sub in enumerate(base["subset"])
        ]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"Prompt file {p} is not valid JSON: {e}.") from None
        if not isinstance(data, list):
            raise UserError(f"Prompt file {p}: expected a JSON list of prompts (strings or objects).")
        out = []
        for i, item in enumerate(data):
            where = f"{p} item {i + 1}"
            if isinstance(item, str):
                out.append(parse_prompt_line(item.strip(), where=where, index=i))
            elif isinstance(item, dict):
                out.append(_from_dict(item, where, i))
            else:
                raise UserError(f"{where}: expected a string or an object.")
        return out
    return parse_prompt_text(text, source=str(p))
