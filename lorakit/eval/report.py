"""The outputs of an evaluation, written next to the LoRAs: `<name>_eval.json` (every score, the concept, the
settings, the recommendation), `<name>_eval.md` (the table), `<name>_eval_chart.png` (scores over steps, the
recommended checkpoint marked) and `<name>_eval_sheet.png` (rows: base model then checkpoints; columns: the prompts,
first seed). Every file is written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT = "lorakit-eval/1"
SERIES = (("concept_recall", "concept recall", (31, 119, 180)), ("adherence", "adherence", (44, 160, 44)),
          ("prior_drift", "prior drift", (214, 39, 40)), ("pixel_drift", "pixel drift", (255, 127, 14)),
          ("copy_rate", "copies", (148, 103, 189)))


def output_prefix(names: Sequence[str]) -> str:
    """The run's name from its checkpoints' stems: usu_bear-000001, usu_bear -> "usu_bear"."""
    names = [n for n in names if n]
    if not names:
        return "eval"
    import re

    # the trainer's names: NAME, NAME-000001 (epoch), NAME-step00000100 (step)
    bases = {re.sub(r"-(step)?\d+$", "", n) for n in names}
    if len(bases) == 1:
        return bases.pop()
    return os.path.commonprefix(sorted(bases)).rstrip("-_. ") or "eval"


def output_paths(folder: str | Path, prefix: str) -> dict[str, Path]:
    folder = Path(folder)
    return {"json": folder / f"{prefix}_eval.json", "table": folder / f"{prefix}_eval.md",
            "chart": folder / f"{prefix}_eval_chart.png", "sheet": folder / f"{prefix}_eval_sheet.png"}


def _x(row: dict, i: int) -> float:
    return float(row["step"]) if row.get("step") is not None else float(i)


def _f(v, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def table_markdown(result: dict) -> str:
    rows = result["rows"]
    head = ("| checkpoint | step | concept recall ↑ | tag recall | all core tags | adherence ↑ | prior drift ↓ | "
            "tag drift | pixel drift | class leak | copies ↓ | diversity | flags |")
    lines = [head, "|" + "---|" * 13]
    pareto = set(result.get("pareto", []))
    for r in rows:
        name = r["name"]
        if name == result.get("recommended"):
            name = f"**{name}** (recommended)"
        elif name in pareto:
            name = f"{name} (Pareto)"
        cells = [name, r["step"] if r.get("step") is not None else "-", _f(r["concept_recall"]), _f(r["tag_recall"]),
                 _f(r["full_match"]), _f(r["adherence"]), _f(r["prior_drift"]), _f(r["tag_drift"]),
                 _f(r["pixel_drift"], 3), _f(r["class_leak"]), _f(r["copy_rate"]), _f(r["diversity"]),
                 ", ".join(r["flags"]) or "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    c = result["concept"]
    lines += ["", f"trigger `{c['trigger']}`, class prompt `{c['class_prompt']}`, core tags: "
              f"{', '.join(c['core_tags'])}; scene tags: {', '.join(c['scene_tags']) or '-'}"
              + (f" ({c['scene_reason']})" if c.get("scene_reason") else ""),  # results written before it lack it
              f"recommended: {result['why']}", f"Pareto set: {', '.join(result['pareto']) or '-'}"]
    return "\n".join(lines) + "\n"


def chart(result: dict, width: int = 720, height: int = 320):
    """Scores over steps: one line per score, the recommended checkpoint marked, the drift threshold dashed."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [r for r in result["rows"] if not r["is_base"]]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 44, 150, 26, 36
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    verdict = "" if result.get("recommended") or not rows else "; none within the thresholds (see the Pareto set)"
    d.text((left, 6), f"eval of {len(rows)} checkpoints ({result['samples_per_model']} samples each){verdict}",
           fill=(30, 30, 30), font=font)
    d.rectangle([x0, y0, x1, y1], outline=(90, 90, 90))
    if not rows:
        d.text((x0 + 10, (y0 + y1) // 2), "no checkpoint evaluated", fill=(90, 90, 90), font=font)
        return img
    xs = [_x(r, i) for i, r in enumerate(rows)]
    xmin, xmax = min(xs), max(xs)
    if xmax == xmin:
        xmin, xmax = xmin - 1, xmax + 1
    vals = [r[k] for r in rows for k, _, _ in SERIES if r.get(k) is not None]
    ymax = max([1.0] + [v for v in vals if math.isfinite(v)])

    def px(x, y):
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - y / ymax * (y1 - y0)

    for k in range(5):
        yv = ymax * k / 4
        _, yy = px(xmin, yv)
        d.line([x0, yy, x1, yy], fill=(230, 230, 230))
        d.text((6, yy - 5), f"{yv:.2f}", fill=(30, 30, 30), font=font)
    for x in sorted(set(xs)):
        xx, _ = px(x, 0)
        d.text((xx - 10, y1 + 4), f"{x:.0f}", fill=(30, 30, 30), font=font)
    d.text((x1 - 24, height - 14), "step" if rows[0].get("step") is not None else "#", fill=(90, 90, 90), font=font)
    thr = result["settings"].get("max_drift")
    if thr is not None and thr <= ymax:
        _, yy = px(xmin, thr)
        for xx in range(int(x0), int(x1), 8):
            d.line([xx, yy, xx + 4, yy], fill=(214, 39, 40))
        d.text((x0 + 4, yy - 12), f"max drift {thr:g}", fill=(214, 39, 40), font=font)
    rec = result.get("recommended")
    for i, r in enumerate(rows):
        if r["name"] == rec:
            xx, _ = px(xs[i], 0)
            d.line([xx, y0, xx, y1], fill=(0, 0, 0), width=2)
            d.text((min(xx + 3, x1 - 80), y0 + 3), "recommended", fill=(0, 0, 0), font=font)
    for n, (key, label, color) in enumerate(SERIES):
        pts = [px(x, r[key]) for x, r in zip(xs, rows) if r.get(key) is not None and math.isfinite(r[key])]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for cx, cy in pts:
            d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
        ly = y0 + 8 + 16 * n
        d.line([x1 + 8, ly + 5, x1 + 26, ly + 5], fill=color, width=3)
        d.text((x1 + 30, ly), label, fill=(30, 30, 30), font=font)
    return img


def contact_sheet(result: dict, images: Sequence[np.ndarray], cell: int | None = None):
    """Rows: base model then every checkpoint; columns: every prompt's first seed. `images[r]`: (P, H, W, 3)."""
    from PIL import Image

    from lorakit.generate.grid import draw_grid

    h = images[0].shape[1]
    # small samples (the toy world's 64 px) are enlarged so labels fit; large ones shrunk to keep the sheet small
    cell = cell or (128 if h < 128 else min(h, 192))
    rows = [[Image.fromarray(a).resize((cell, cell), Image.NEAREST if h < cell else Image.BOX) for a in imgs]
            for imgs in images]
    labels = []
    for r in result["rows"]:
        text = r["name"]
        if r["name"] == result.get("recommended"):
            text = f"* {text}\n(recommended)"
        if not r["is_base"]:
            text += f"\nrecall {_f(r['concept_recall'])}\ndrift {_f(r['prior_drift'])}"
            if r["flags"]:
                text += f"\n[{', '.join(r['flags'])}]"
        labels.append(text)
    img, _ = draw_grid(rows, [p["text"] for p in result["prompts"]], labels)
    return img


def write_outputs(result: dict, images: Sequence[np.ndarray], folder: str | Path, prefix: str) -> dict[str, Path]:
    from lorakit.utils.atomic import atomic_path, write_text_atomic

    paths = output_paths(folder, prefix)
    result = dict(result, files={k: str(p) for k, p in paths.items()})
    write_text_atomic(paths["json"], json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    write_text_atomic(paths["table"], table_markdown(result))
    for key, draw in (("chart", lambda: chart(result)), ("sheet", lambda: contact_sheet(result, images))):
        with atomic_path(paths[key]) as tmp:
            draw().save(tmp, format="PNG")
    return paths


def read_result(path: str | Path) -> dict:
    from lorakit.errors import UserError

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{p} cannot be read as an eval result ({exc}); run `lorakit eval` again to rewrite "
                        "it.") from None
    if data.get("format") != FORMAT:
        raise UserError(f"{p} is not a lorakit eval result (format {data.get('format')!r}).")
    return data
