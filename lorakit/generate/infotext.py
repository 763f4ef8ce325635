"""A1111 generation record ("parameters" PNG text chunk): format, parse, write and read.

Layout (A1111 processing.create_infotext / infotext_utils.parse_generation_parameters)::

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>
    Steps: 28, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: 1a2b3c4d5e, Model: nai,
    Clip skip: 2, Hires upscale: 2, Lora hashes: "aru: 1a2b3c4d5e6f", Version: lorakit 0.1.0

(the last line is one line). Values containing ',', ':' or a newline are written as JSON strings. A missing
"Clip skip" means 1. A last line with fewer than three ``key: value`` pairs belongs to the prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "GenerationParams",
    "format_infotext",
    "parse_infotext",
    "quote",
    "unquote",
    "format_lora_hashes",
    "parse_lora_hashes",
    "png_info_for",
    "save_png_with_infotext",
    "read_infotext",
    "lora_short_hash",
    "model_short_hash",
]

# key: value pairs of the last line; a value is a JSON string or anything up to the next comma.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE_PREFIX = "Negative prompt:"


def quote(value) -> str:
    """Write a value as A1111 does: JSON string when it contains ',', ':' or a newline, else as is."""
    s = str(value)
    if "," not in s and "\n" not in s and ":" not in s:
        return s
    return json.dumps(s, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _num(v) -> str:
    # Integral floats print without ".0" ("CFG scale: 7"), like the web UI's values do.
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def format_lora_hashes(hashes: dict[str, str]) -> str:
    return ", ".join(f"{k.replace(':', '').replace(',', '')}: {v}" for k, v in hashes.items())


def parse_lora_hashes(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, h = part.strip().rpartition(":")
        if sep and name.strip():
            out[name.strip()] = h.strip()
    return out


@dataclass
class GenerationParams:
    """The fields lorakit writes; anything else found when parsing is kept in ``extra`` (in order)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    schedule_type: str | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model_hash: str | None = None
    model: str | None = None
    vae: str | None = None
    denoising_strength: float | None = None
    clip_skip: int = 1
    hires_upscale: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str | None = None
    lora_hashes: dict[str, str] = field(default_factory=dict)
    version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


# (infotext key, attribute, kind) in A1111's order; extra params and Version come after these.
_FIELDS: list[tuple[str, str, str]] = [
    ("Steps", "steps", "int"),
    ("Sampler", "sampler", "str"),
    ("Schedule type", "schedule_type", "str"),
    ("CFG scale", "cfg_scale", "float"),
    ("Seed", "seed", "int"),
    ("Size", "size", "size"),
    ("Model hash", "model_hash", "str"),
    ("Model", "model", "str"),
    ("VAE", "vae", "str"),
    ("Denoising strength", "denoising_strength", "float"),
    ("Clip skip", "clip_skip", "clip"),
    ("Hires upscale", "hires_upscale", "float"),
    ("Hires steps", "hires_steps", "int"),
    ("Hires upscaler", "hires_upscaler", "str"),
    ("Lora hashes", "lora_hashes", "hashes"),
]


def format_infotext(p: GenerationParams) -> str:
    """The "parameters" text for ``p``."""
    pairs: list[tuple[str, str]] = []
    for key, attr, kind in _FIELDS:
        if kind == "size":
            if p.width is not None and p.height is not None:
                pairs.append((key, f"{p.width}x{p.height}"))
            continue
        v = getattr(p, attr)
        if kind == "clip":
            if v is not None and int(v) > 1:
                pairs.append((key, str(int(v))))
        elif kind == "hashes":
            if v:
                pairs.append((key, format_lora_hashes(v)))
        elif v is not None:
            pairs.append((key, _num(v) if kind in ("int", "float") else str(v)))
    for k, v in p.extra.items():
        pairs.append((k, str(v)))
    if p.version:
        pairs.append(("Version", p.version))

    params = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in pairs)
    neg = f"\n{NEGATIVE_PREFIX} {p.negative_prompt}" if p.negative_prompt else ""
    return f"{p.prompt}{neg}\n{params}".strip()


def _to_number(v: str, kind: str):
    try:
        if kind == "int":
            return int(v)
        f = float(v)
        return f
    except ValueError:
        return v


def parse_infotext(text: str) -> GenerationParams:
    """Parse a "parameters" text (written by A1111 or by lorakit)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt, negative = "", ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    p = GenerationParams(prompt=prompt, negative_prompt=negative)
    by_key = {key: (attr, kind) for key, attr, kind in _FIELDS}
    for k, v in _PARAM_RE.findall(last):
        if v[:1] == '"' and v[-1:] == '"':
            v = unquote(v)
        if k == "Version":
            p.version = v
            continue
        if k not in by_key:
            p.extra[k] = v
            continue
        attr, kind = by_key[k]
        if kind == "size":
            m = _SIZE_RE.match(v)
            if m:
                p.width, p.height = int(m.group(1)), int(m.group(2))
            else:
                p.extra[k] = v
        elif kind == "hashes":
            p.lora_hashes = parse_lora_hashes(v)
        elif kind == "clip":
            p.clip_skip = _to_number(v, "int")
        elif kind in ("int", "float"):
            setattr(p, attr, _to_number(v, kind))
        else:
            setattr(p, attr, v)
    return p


def png_info_for(text: str):
    """A ``PIL.PngImagePlugin.PngInfo`` carrying ``text`` as the "parameters" chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    # PIL writes tEXt when the text is Latin-1 and iTXt (UTF-8) otherwise, which is what A1111's files contain.
    info.add_text("parameters", text)
    return info


def save_png_with_infotext(image, path: str | Path, text: str) -> None:
    """Save ``image`` as PNG at ``path`` (atomically) with the "parameters" chunk."""
    from lorakit.utils.atomic import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info_for(text))


def read_infotext(source) -> str | None:
    """The "parameters" text of a PNG path or PIL image, or None when it has none."""
    from PIL import Image

    if isinstance(source, (str, Path)):
        with Image.open(source) as im:
            im.load()
            return _text_of(im)
    return _text_of(source)


def _text_of(im) -> str | None:
    text = getattr(im, "text", None)
    if isinstance(text, dict) and "parameters" in text:
        return text["parameters"]
    v = im.info.get("parameters")
    return v if isinstance(v, str) else None


def _sha256_from(path: str | Path, offset: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lora_short_hash(path: str | Path) -> str:
    """The 12-hex "Lora hashes" value A1111 writes: for .safetensors the sha256 of the data after the JSON header
    (the sd-scripts/additional-networks hash, unchanged by metadata edits), else of the whole file."""
    p = Path(path)
    offset = 0
    if p.suffix.lower() == ".safetensors":
        with open(p, "rb") as f:
            head = f.read(8)
        if len(head) == 8:
            offset = 8 + int.from_bytes(head, "little")
    return _sha256_from(p, offset)[:12]


def model_short_hash(path: str | Path) -> str:
    """The 10-hex "Model hash" A1111 writes: sha256 of the whole checkpoint file."""
    return _sha256_from(path, 0)[:10]
