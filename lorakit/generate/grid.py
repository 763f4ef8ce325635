"""X/Y/Z comparison grids (A1111 scripts/xyz_grid.py behaviour) with LoRA-native axes.

Axes: Seed, Steps, CFG Scale, Sampler, Prompt S/R, Checkpoint name, Clip skip, Size, Denoising, Hires steps,
Hires upscale, Schedule type, and lorakit's own LoRA file (names or globs such as `mylora-*` over epoch snapshots),
LoRA weight and LBW preset. The LoRA axes edit the first `<lora:...>` tag of the prompt (a LoRA file axis adds
`<lora:NAME:1>` when the prompt has none), so every cell's PNG text is a prompt that reproduces it.

The costliest axis is looped outermost (Checkpoint, then LoRA file), so a checkpoint loads and a LoRA merges once.
Each Z value gives one sub-grid with "Label: value" along the top (X) and the left (Y).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

from lorakit.errors import UserError
from lorakit.generate.extra_networks import parse_extra_networks
from lorakit.generate.xyz_values import (AxisType, apply_prompt_sr, find_axis, fix_seeds, format_label, loop_order,
                                         parse_axis_values)

__all__ = ["GridAxis", "GridResult", "make_axis", "run_save_labels", "apply_axis_value", "set_lora_tag", "run_grid",
           "draw_grid", "combine_subgrids"]

_GLOB_CHARS = "*?["
_TAG_RE = re.compile(r"<(\w+):([^>]+)>")  # the extra-network tag shape A1111 uses


@dataclass
class GridAxis:
    type: AxisType
    values: list
    labels: list[str]

    @property
    def name(self) -> str:
        return self.type.name

    def __len__(self) -> int:
        return len(self.values)



def make_axis(name: str | None, values_text: str | None, library=None) -> GridAxis:
    """Parse one axis; `library` (a LoraLibrary) expands LoRA file globs. No name: the one-value "Nothing" axis."""
    if not name or find_axis(name).name == "Nothing":
        t = find_axis("Nothing")
        return GridAxis(t, [None], [""])
    t = find_axis(name)
    if values_text is None or not str(values_text).strip():
        raise UserError(f"Grid axis {t.name} needs values, e.g. 1,2,3 or 1-5.")
    if t.name == "VAE":
        raise UserError("The VAE axis is not supported by lorakit grid; run one grid per --vae.")
    values = parse_axis_values(str(values_text), t.value_type, axis=t.name, raw_lines=t.name == "Prompt S/R")
    if t.name == "Seed":
        values = fix_seeds(values)
    elif t.name == "Sampler":
        from lorakit.generate.samplers import resolve_sampler

        values = [resolve_sampler(v).name for v in values]
    elif t.name == "Size":
        values = [_parse_size(v) for v in values]
    elif t.name == "LoRA file":
        expanded = []
        for v in values:
            if any(c in v for c in _GLOB_CHARS):
                if library is None:
                    raise UserError(f"LoRA file axis value {v!r} is a pattern; pass --lora_dir to expand it.")
                hits = library.glob(v)
                if not hits:
                    raise UserError(f"LoRA file axis: no LoRA in {library.root} matches {v!r}.")
                expanded.extend(training_order(hits, library))
            else:
                if library is not None:
                    library.resolve(v)  # a missing file fails before the first cell
                expanded.append(v)
        values = expanded
    elif t.name == "LBW preset" and library is not None:
        from lorakit.generate.lbw import resolve_lbw

        for v in values:
            resolve_lbw(v, library.presets, where="LBW preset axis")
    if t.name == "Prompt S/R" and len(values) < 1:
        raise UserError("Prompt S/R needs the text to search for as its first value.")
    labels = [format_label(t, f"{v[0]}x{v[1]}" if t.name == "Size" else v) for v in values]
    if t.name == "LoRA file":
        labels = run_save_labels(values) or labels
    return GridAxis(t, values, labels)


def run_save_labels(stems: list[str]) -> list[str] | None:
    """Labels for the saves of one training run (`name-000005`, `name-step00000500`, `name`): "name: epoch 5",
    "name: step 500", "name: final". In a narrow column the shared "name: " becomes the axis title (draw_grid), so
    each cell reads "epoch 5" instead of a file name broken into digit rows. None when the files are not one run's."""
    parts = []
    for stem in stems:
        m = _SUFFIX.match(stem)
        if m and m.group("base"):
            what = f"step {int(m.group('step'))}" if m.group("step") else f"epoch {int(m.group('epoch'))}"
            parts.append((m.group("base"), what))
        else:
            parts.append((stem, "final"))
    if len({base for base, _ in parts}) != 1 or len({what for _, what in parts}) != len(parts):
        return None
    return [f"{base}: {what}" for base, what in parts]


_SUFFIX = re.compile(r"^(?P<base>.*?)-(?:step(?P<step>\d+)|(?P<epoch>\d+))$")


def training_order(stems: list[str], library=None) -> list[str]:
    """LoRA files of training runs in the order they were saved: by step (the file's ss_steps, else the number in
    `name-000005` / `name-step00000500`), each run's final `name` file last; runs grouped by name. A glob sorted
    as text puts `name` before `name-000005`, i.e. the final LoRA first."""
    def key(stem: str):
        m = _SUFFIX.match(stem)
        base, final = (m.group("base"), False) if m and m.group("base") else (stem, True)
        steps = _saved_steps(stem, library)
        if steps is None and not final:
            steps = int(m.group("step") or m.group("epoch"))
        return (base, final, -1 if steps is None else steps, stem)

    return sorted(stems, key=key)


def _saved_steps(stem: str, library) -> int | None:
    """ss_steps of the file named `stem` (header only), or None."""
    if library is None:
        return None
    try:
        path = library.resolve(stem)
        if path.suffix.lower() != ".safetensors":
            return None
        from lorakit.models.checkpoint_io import read_safetensors_header

        return int(read_safetensors_header(path)[1].get("ss_steps"))
    except (UserError, TypeError, ValueError, OSError):
        return None


def _parse_size(v: str) -> tuple[int, int]:
    parts = v.lower().replace(" ", "").split("x")
    try:
        w, h = int(parts[0]), int(parts[1])
        if len(parts) != 2:
            raise ValueError
    except (ValueError, IndexError):
        raise UserError(f"Size axis value {v!r}: write WIDTHxHEIGHT, e.g. 512x768.") from None
    return w, h


def _num(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(round(v, 6))


def set_lora_tag(prompt: str, name: str | None = None, weight: float | None = None, lbw: str | None = None) -> str:
    """Rewrite the first <lora:...> tag of `prompt` with a new name, weight (te and unet) or LBW preset.
    With no tag, a new `<lora:NAME:WEIGHT>` is appended (a name is then required)."""
    m = None
    for cand in _TAG_RE.finditer(prompt):
        if cand.group(1).lower() in ("lora", "lyco"):
            m = cand
            break
    if m is None:
        if name is None:
            raise UserError("The LoRA weight / LBW preset axes need a <lora:NAME:WEIGHT> tag in the prompt "
                            "(or a LoRA file axis).")
        tag_text = f"<lora:{name}:{_num(1.0 if weight is None else weight)}" + (f":lbw={lbw}" if lbw else "") + ">"
        return f"{prompt}, {tag_text}" if prompt.strip() else tag_text
    _, tags = parse_extra_networks(m.group(0))
    tag = tags[0]
    te = tag.te if weight is None else float(weight)
    unet = tag.unet if weight is None else float(weight)
    parts = [tag.kind, name or tag.name, _num(te)]
    if unet != te:
        parts.append(f"unet={_num(unet)}")
    if tag.dyn is not None:
        parts.append(f"dyn={tag.dyn}")
    new_lbw = lbw if lbw is not None else tag.lbw
    if new_lbw:
        parts.append(f"lbw={new_lbw}")
    if tag.lbwe:
        parts.append(f"lbwe={tag.lbwe}")
    if tag.start is not None:
        parts.append(f"start={tag.start}")
    if tag.stop is not None:
        parts.append(f"stop={tag.stop}")
    if tag.x is not None:
        parts.append(f"x={_num(tag.x)}")
    new = "<" + ":".join(parts) + ">"
    return prompt[:m.start()] + new + prompt[m.end():]


def apply_axis_value(s, axis: GridAxis, value):
    """A copy of GenerationSettings `s` with one axis value applied (Checkpoint is handled by run_grid)."""
    n = axis.name
    s = replace(s)
    if n in ("Nothing", "Checkpoint name"):
        return s
    if n == "Seed":
        s.seed = int(value)
    elif n == "Steps":
        s.steps = int(value)
    elif n == "CFG Scale":
        s.cfg_scale = float(value)
    elif n == "Sampler":
        s.sampler = value
    elif n == "Schedule type":
        s.schedule_type = value
    elif n == "Prompt S/R":
        s.prompt, s.negative_prompt = apply_prompt_sr(s.prompt, s.negative_prompt, axis.values, value)
    elif n == "Clip skip":
        s.clip_skip = int(value)
    elif n == "Size":
        s.width, s.height = value
    elif n == "Denoising":
        s.denoising_strength = float(value)
    elif n == "Hires steps":
        s.hires_steps = int(value)
    elif n == "Hires upscale":
        s.hires_scale = float(value)
    elif n == "LoRA file":
        s.prompt = set_lora_tag(s.prompt, name=value)
    elif n == "LoRA weight":
        s.prompt = set_lora_tag(s.prompt, weight=float(value))
    elif n == "LBW preset":
        s.prompt = set_lora_tag(s.prompt, lbw=str(value))
    else:
        raise UserError(f"Grid axis {n} is not supported.")
    return s


# Prompt S/R rewrites the text the LoRA axes then edit, so it goes first; the rest commute.
_APPLY_ORDER = {"Prompt S/R": 0, "LoRA file": 1, "LoRA weight": 2, "LBW preset": 3}


@dataclass
class GridResult:
    subgrids: list = field(default_factory=list)  # one PIL image per Z value
    image: object = None  # all sub-grids side by side (the only one when Z is Nothing)
    cells: dict = field(default_factory=dict)  # (ix, iy, iz) -> PIL image
    infotexts: dict = field(default_factory=dict)  # (ix, iy, iz) -> parameters text
    cell_origin: tuple[int, int] = (0, 0)  # top-left of cell (0, 0) inside a sub-grid
    cell_size: tuple[int, int] = (0, 0)


def run_grid(get_generator: Callable, base, x: GridAxis, y: GridAxis, z: GridAxis, progress=None,
             on_cell: Callable | None = None) -> GridResult:
    """Render every cell, costliest axis outermost. `get_generator(checkpoint or None)` returns a Generator; when a
    Checkpoint axis is used the previous generator is closed before the next checkpoint is asked for."""
    import itertools

    axes = {"x": x, "y": y, "z": z}
    if base.seed is None or int(base.seed) < 0:
        from lorakit.generate.pipeline import random_seed

        base = replace(base, seed=random_seed())  # one seed for the whole grid unless Seed is an axis
    first, second = loop_order(x.type.cost, y.type.cost, z.type.cost)
    third = next(a for a in "xyz" if a not in (first, second))
    order = [first, second, third]
    result = GridResult()
    total = len(x) * len(y) * len(z)
    done = 0
    current_ckpt = object()
    gen = None
    ckpt_axis = next((k for k, a in axes.items() if a.name == "Checkpoint name"), None)
    for idx in itertools.product(*(range(len(axes[a])) for a in order)):
        pos = dict(zip(order, idx))
        ckpt = axes[ckpt_axis].values[pos[ckpt_axis]] if ckpt_axis else None
        if gen is None or ckpt != current_ckpt:
            if gen is not None and ckpt_axis:
                gen.close()
            gen = get_generator(ckpt)
            current_ckpt = ckpt
        s = replace(base, batch_size=1, n_iter=1)
        for letter in sorted("xyz", key=lambda a: _APPLY_ORDER.get(axes[a].name, 9)):
            a = axes[letter]
            s = apply_axis_value(s, a, a.values[pos[letter]])
        r = gen(s)
        key = (pos["x"], pos["y"], pos["z"])
        result.cells[key] = r.images[0]
        result.infotexts[key] = r.infotexts[0]
        if on_cell is not None:
            on_cell(key, r)
        done += 1
        if progress is not None:
            progress(done, total)
    if ckpt_axis and gen is not None:
        gen.close()
    for iz in range(len(z)):
        rows = [[result.cells[(ix, iy, iz)] for ix in range(len(x))] for iy in range(len(y))]
        img, origin = draw_grid(rows, x.labels, y.labels)
        result.subgrids.append(img)
        result.cell_origin = origin
    result.cell_size = result.cells[(0, 0, 0)].size
    result.image = combine_subgrids(result.subgrids, z.labels) if len(z) > 1 else result.subgrids[0]
    return result


# ---- drawing ------------------------------------------------------------------------------------------------------
_PAD = 4


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Word wrap to `width` pixels; a word wider than that is broken, after a '-', '_', '/' or ',' when one fits,
    else between characters, so no line ever runs into the next cell."""
    width = max(1, width)
    lines: list[str] = []
    for para in text.split("\n"):
        cur = ""
        for word in para.split(" "):
            cand = word if not cur else f"{cur} {word}"
            if draw.textlength(cand, font=font) <= width:
                cur = cand
                continue
            if cur:
                lines.append(cur)
                cur = ""
            while draw.textlength(word, font=font) > width:
                head = _break_word(draw, word, font, width)
                lines.append(head)
                word = word[len(head):]
            cur = word
        lines.append(cur)
    return lines


def _break_word(draw, word: str, font, width: int) -> str:
    """The longest head of `word` that fits (at least one character), ending at a separator when one is in it."""
    n = 1
    while n < len(word) and draw.textlength(word[:n + 1], font=font) <= width:
        n += 1
    cut = max((word.rfind(c, 0, n) for c in "-_/,"), default=-1)
    return word[:cut + 1] if cut >= max(1, n // 3) else word[:n]


def _axis_title(labels: list[str], fits) -> tuple[str, list[str]]:
    """When some "Axis: value" labels do not fit their cell, ("Axis", [values]): the name is drawn once as a title
    and each cell shows its value only. ("", labels) otherwise."""
    head = labels[0].split(": ", 1)[0] + ": " if labels and ": " in labels[0] else ""
    if not head or not all(t.startswith(head) for t in labels) or all(fits(t) for t in labels):
        return "", labels
    return head[:-2], [t[len(head):] for t in labels]


def _line_height(draw, font) -> int:
    box = draw.textbbox((0, 0), "Ag", font=font)
    return box[3] - box[1] + 2


def draw_grid(rows: list[list], col_labels: list[str], row_labels: list[str]):
    """Cells (rows of equal-size PIL images) with column labels on top and row labels on the left.
    Returns (image, (left, top)) where (left, top) is where cell (0, 0) starts."""
    from PIL import Image, ImageDraw

    cw, ch = rows[0][0].size
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lh = _line_height(probe, font)
    col_w = max(1, cw - 2 * _PAD)
    title, col_labels = _axis_title(list(col_labels), lambda t: probe.textlength(t, font=font) <= col_w)
    col_lines = [_wrap(probe, t, font, col_w) if t else [] for t in col_labels]
    # the X axis name over all the columns (itself wrapped to their width)
    title_lines = _wrap(probe, title, font, max(1, cw * len(rows[0]) - 2 * _PAD)) if title else []
    top = (max(len(ls) for ls in col_lines) + len(title_lines)) * lh + 2 * _PAD if any(col_lines) else 0
    row_w = [max((probe.textlength(line, font=font) for line in t.split("\n")), default=0) if t else 0
             for t in row_labels]
    left = int(min(max(row_w), max(4 * cw, 64)) + 2 * _PAD) if any(row_labels) else 0
    row_lines = [_wrap(probe, t, font, max(left - 2 * _PAD, 1)) if t else [] for t in row_labels]
    if any(len(ls) * lh > ch for ls in row_lines):  # wrapped labels taller than a row would run into the next one
        left = int(max(row_w) + 2 * _PAD)
        row_lines = [_wrap(probe, t, font, max(left - 2 * _PAD, 1)) if t else [] for t in row_labels]
    W, H = left + cw * len(rows[0]), top + ch * len(rows)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    for iy, row in enumerate(rows):
        for ix, cell in enumerate(row):
            img.paste(cell, (left + ix * cw, top + iy * ch))
    for k, line in enumerate(title_lines):
        tw = draw.textlength(line, font=font)
        draw.text((left + (cw * len(rows[0]) - tw) / 2, _PAD + k * lh), line, fill="black", font=font)
    for ix, lines in enumerate(col_lines):
        y0 = top - _PAD - len(lines) * lh
        for k, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((left + ix * cw + (cw - tw) / 2, y0 + k * lh), line, fill="black", font=font)
    for iy, lines in enumerate(row_lines):
        y0 = top + iy * ch + (ch - len(lines) * lh) / 2
        for k, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((left - _PAD - tw, y0 + k * lh), line, fill="black", font=font)
    return img, (left, top)


def combine_subgrids(subgrids: list, labels: list[str]):
    """Sub-grids side by side, each under its Z label."""
    from PIL import Image, ImageDraw

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lh = _line_height(probe, font)
    wrapped = [_wrap(probe, t, font, g.size[0] - 2 * _PAD) if t else [] for t, g in zip(labels, subgrids)]
    title = max(len(ls) for ls in wrapped) * lh + 2 * _PAD if any(wrapped) else 0
    gap = 2 * _PAD * 4
    W = sum(g.size[0] for g in subgrids) + gap * (len(subgrids) - 1)
    H = title + max(g.size[1] for g in subgrids)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    x0 = 0
    for g, lines in zip(subgrids, wrapped):
        img.paste(g, (x0, title))
        for k, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((x0 + (g.size[0] - tw) / 2, _PAD + k * lh), line, fill="black", font=font)
        x0 += g.size[0] + gap
    return img
