"""Small charts drawn with PIL (no plotting library, nothing fetched by the browser): loss and learning-rate lines
of a run, and the per-block weight-change norms of a LoRA."""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
BG, AXIS, GRID, TEXT = (255, 255, 255), (90, 90, 90), (225, 225, 225), (30, 30, 30)


def _font():
    return ImageFont.load_default()


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    return f"{v:.2e}" if a < 1e-2 or a >= 1e4 else f"{v:.3g}"


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, width: int = 520,
               height: int = 260, x_label: str = "step") -> Image.Image:
    """{label: (xs, ys)} as lines on one set of axes; non-finite points are skipped."""
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    font = _font()
    left, right, top, bottom = 62, 12, 24, 34
    d.text((left, 5), title, fill=TEXT, font=font)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    d.rectangle([x0, y0, x1, y1], outline=AXIS)
    if not pts:
        d.text((x0 + 10, (y0 + y1) // 2), "no data yet", fill=AXIS, font=font)
        return img
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymin, ymax = min(p[1] for p in pts), max(p[1] for p in pts)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        pad = abs(ymax) * 0.1 or 1.0
        ymin, ymax = ymin - pad, ymax + pad

    def px(x, y):
        return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

    for i in range(5):
        fy = ymin + (ymax - ymin) * i / 4
        _, yy = px(xmin, fy)
        d.line([x0, yy, x1, yy], fill=GRID)
        d.text((4, yy - 5), _fmt(fy), fill=TEXT, font=font)
    for i in range(5):
        fx = xmin + (xmax - xmin) * i / 4
        xx, _ = px(fx, ymin)
        d.text((xx - 8, y1 + 4), f"{fx:.0f}", fill=TEXT, font=font)
    d.text((x1 - 30, height - 14), x_label, fill=AXIS, font=font)
    lx = x0 + 110
    for n, (label, (xs, ys)) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        line = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(line) == 1:
            cx, cy = line[0]
            d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
        elif line:
            d.line(line, fill=color, width=2)
        d.line([lx, 11, lx + 14, 11], fill=color, width=3)
        d.text((lx + 18, 5), label, fill=TEXT, font=font)
        lx += 24 + int(d.textlength(label, font=font))
    return img


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, width: int = 760,
              height: int = 280) -> Image.Image:
    """Vertical bars, one per label (e.g. LBW blocks), value printed above each."""
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    font = _font()
    left, right, top, bottom = 10, 10, 26, 40
    d.text((left, 6), title, fill=TEXT, font=font)
    x0, x1, y0, y1 = left, width - right, top + 12, height - bottom
    d.line([x0, y1, x1, y1], fill=AXIS)
    n = max(1, len(labels))
    vmax = max([v for v in values if math.isfinite(v)] or [0.0]) or 1.0
    slot = (x1 - x0) / n
    for i, (lab, v) in enumerate(zip(labels, values)):
        bx0 = x0 + i * slot + slot * 0.15
        bx1 = x0 + (i + 1) * slot - slot * 0.15
        h = (v / vmax) * (y1 - y0) if math.isfinite(v) and v > 0 else 0
        d.rectangle([bx0, y1 - h, bx1, y1], fill=COLORS[0])
        d.text((bx0, y1 + 4 + (12 if i % 2 else 0)), lab, fill=TEXT, font=font)
        if n <= 30:
            d.text((bx0, max(top, y1 - h - 11)), f"{v:.2g}", fill=AXIS, font=font)
    return img


def block_norm_chart(info: dict) -> Image.Image:
    """The mean weight-change norm per block of `lorakit.adapters.info.summarize(...)`."""
    blocks = info.get("blocks", {})
    labels = list(blocks)
    values = [float(b.get("mean_delta_norm") or 0.0) for b in blocks.values()]
    return bar_chart(labels, values, "mean |dW| per block (Frobenius norm of the weight change at multiplier 1)")


__all__ = ["line_chart", "bar_chart", "block_norm_chart"]
