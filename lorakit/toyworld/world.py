"""A procedural toy world: small pictures of animal characters in scenes, with booru-style tag captions.

Every sample is a pure function of (world seed, stream, index): the same call returns the same bytes on any run.
Only PIL and numpy are used; shapes are drawn on a 4x canvas and box-downsampled, so 32/64/128 px images share one
layout.

Three distributions:

- pretraining (`ToyWorld.sample`, `pretraining_sample`): what a base model may see. It never contains the held-out
  concepts: no character ever carries the crescent marking, and bears are never black.
- character (`character_samples`): the new character "usu bear" (Kurokuma-chan), a black bear with a white crescent on
  the chest and a red scarf, in varied poses, backgrounds, positions and sizes. Captions start with the trigger
  ("usu bear, forest, ...") and leave the identity (black fur, crescent, red scarf) to the trigger, DreamBooth style.
- open (`ToyWorld.open_sample`): every attribute independent, held-out ones included (black bears, crescents on any
  species). Only the attribute classifier trains on it, so its marking head looks at the crescent, not at "black bear".

Caption tag order is fixed (see `TAG_ORDER`); shuffling is left to the trainer (`shuffle_caption`, `keep_tokens`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SPECIES = ("bear", "cat", "rabbit", "frog", "bird")
COLORS = ("brown", "black", "white", "grey", "orange", "pink", "blue")
BACKGROUNDS = ("sky", "forest", "room", "night", "beach")
SCARVES = ("none", "red", "blue", "green", "yellow")
POSITIONS = ("left", "center", "right")
SIZES = ("small", "large")
POSES = ("standing", "waving", "arms up")

INSTANCE_TOKEN = "usu"
CLASS_TOKEN = "bear"
TRIGGER = f"{INSTANCE_TOKEN} {CLASS_TOKEN}"
# the new character's fixed identity
CHARACTER = {"species": "bear", "color": "black", "marking": True, "scarf": "red", "hat": False, "glasses": False}

# the caption lists tags of these attribute groups in this order
TAG_ORDER = ("species", "color", "marking", "scarf", "hat", "glasses", "background", "position", "size", "pose",
             "blush", "surprised")

_FUR_NOUN = {"frog": "skin", "bird": "feathers"}  # mammals: "fur"

_FILL = {
    "brown": (140, 88, 48), "black": (36, 34, 40), "white": (244, 244, 238), "grey": (150, 150, 158),
    "orange": (240, 146, 44), "pink": (246, 160, 196), "blue": (66, 108, 224),
}
_SCARF_FILL = {"red": (222, 34, 40), "blue": (36, 72, 206), "green": (36, 160, 60), "yellow": (246, 206, 24)}
_HAT = ((96, 46, 146), (250, 214, 70))  # crown, band
_SS = 4  # supersampling factor of the drawing canvas

STREAM_PRETRAIN, STREAM_CHARACTER, STREAM_CLASS, STREAM_OPEN = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------------- captions
def tags(attrs: dict) -> list[str]:
    """Booru-style tags of attributes, in `TAG_ORDER`. The new character's identity collapses into the trigger."""
    out: list[str] = []
    is_char = attrs.get("character") == INSTANCE_TOKEN
    for key in TAG_ORDER:
        v = attrs[key]
        if is_char and key in CHARACTER and key != "hat" and key != "glasses":
            if key == "species":
                out.append(TRIGGER)
            continue
        if key == "species":
            out.append(v)
        elif key == "color":
            out.append(f"{v} {_FUR_NOUN.get(attrs['species'], 'fur')}")
        elif key == "marking":
            if v:
                out.append("crescent marking")
        elif key == "scarf":
            if v != "none":
                out.append(f"{v} scarf")
        elif key in ("hat", "glasses", "blush", "surprised"):
            if v:
                out.append(key)
        else:  # background, position, size, pose
            out.append(v)
    return out


def caption(attrs: dict) -> str:
    return ", ".join(tags(attrs))


def parse_caption(text: str) -> dict:
    """The attributes a caption or prompt names, e.g. "usu bear, forest" -> the character's identity + background.

    Unknown tags are ignored; attributes the text does not name are absent from the result. Benchmarks use it to know
    what a prompt asks for.
    """
    out: dict = {}
    nouns = {"fur", "skin", "feathers"}
    for tag in (t.strip().lower() for t in text.split(",")):
        words = tag.split()
        if tag == TRIGGER:
            out.update(CHARACTER)
            out["character"] = INSTANCE_TOKEN
        elif tag in SPECIES:
            out["species"] = tag
        elif len(words) == 2 and words[0] in COLORS and words[1] in nouns:
            out["color"] = words[0]
        elif tag == "crescent marking":
            out["marking"] = True
        elif len(words) == 2 and words[1] == "scarf" and words[0] in SCARVES:
            out["scarf"] = words[0]
        elif tag in ("hat", "glasses", "blush", "surprised"):
            out[tag] = True
        elif tag in BACKGROUNDS:
            out["background"] = tag
        elif tag in POSITIONS:
            out["position"] = tag
        elif tag in SIZES:
            out["size"] = tag
        elif tag in POSES:
            out["pose"] = tag
    return out


def is_held_out(attrs: dict) -> bool:
    """True for anything pretraining must never show: the character, the crescent marking, a black bear."""
    return bool(attrs.get("character")) or bool(attrs["marking"]) or (
        attrs["species"] == "bear" and attrs["color"] == "black")


# ------------------------------------------------------------------------------------------------- attribute sampling
def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0 (got seed={seed}, index={index})")
    return np.random.default_rng([int(seed), int(stream), int(index)])


def _pick(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _scene_attrs(rng: np.random.Generator) -> dict:
    """Attributes that every distribution draws the same way."""
    return {
        "background": _pick(rng, BACKGROUNDS),
        "position": _pick(rng, POSITIONS),
        "size": _pick(rng, SIZES),
        "pose": _pick(rng, POSES),
        "blush": bool(rng.random() < 0.3),
        "surprised": bool(rng.random() < 0.3),
    }


def _pretrain_attrs(rng: np.random.Generator, species: str | None = None) -> dict:
    sp = species or _pick(rng, SPECIES)
    colors = [c for c in COLORS if not (sp == "bear" and c == "black")]
    a = {"species": sp, "color": _pick(rng, colors), "marking": False,
         "scarf": "none" if rng.random() < 0.5 else _pick(rng, SCARVES[1:]),
         "hat": bool(rng.random() < 0.3), "glasses": bool(rng.random() < 0.3)}
    a.update(_scene_attrs(rng))
    a["character"] = None
    return a


def _open_attrs(rng: np.random.Generator) -> dict:
    # black bears are over-sampled so the classifier sees plenty of them with and without the crescent
    sp = _pick(rng, SPECIES)
    if sp == "bear" and rng.random() < 0.3:
        color = "black"
    else:
        color = _pick(rng, COLORS)
    a = {"species": sp, "color": color, "marking": bool(rng.random() < 0.35),
         "scarf": "none" if rng.random() < 0.5 else _pick(rng, SCARVES[1:]),
         "hat": bool(rng.random() < 0.3), "glasses": bool(rng.random() < 0.3)}
    a.update(_scene_attrs(rng))
    a["character"] = None
    return a


def _character_attrs(rng: np.random.Generator) -> dict:
    a = dict(CHARACTER)
    a.update(_scene_attrs(rng))
    a["character"] = INSTANCE_TOKEN
    return a


# ----------------------------------------------------------------------------------------------------------- drawing
def _mix(c, d, t):
    return tuple(int(round(a * (1 - t) + b * t)) for a, b in zip(c, d))


def _ellipse_poly(cx, cy, rx, ry, angle_deg=0.0, n=28):
    t = math.radians(angle_deg)
    ct, st = math.cos(t), math.sin(t)
    pts = []
    for k in range(n):
        a = 2 * math.pi * k / n
        x, y = rx * math.cos(a), ry * math.sin(a)
        pts.append((cx + x * ct - y * st, cy + x * st + y * ct))
    return pts


@dataclass
class _Pen:
    draw: ImageDraw.ImageDraw
    S: int  # canvas side in pixels

    @property
    def w(self) -> int:  # outline width: about one output pixel
        return max(1, round(self.S * 0.014))

    def ell(self, cx, cy, rx, ry, fill, outline=None, angle=0.0, width=None):
        S = self.S
        if angle:
            self.draw.polygon(_ellipse_poly(cx * S, cy * S, rx * S, ry * S, angle), fill=fill, outline=outline,
                              width=self.w if width is None else width)
        else:
            self.draw.ellipse([(cx - rx) * S, (cy - ry) * S, (cx + rx) * S, (cy + ry) * S], fill=fill,
                              outline=outline, width=self.w if width is None else width)

    def poly(self, pts, fill, outline=None):
        self.draw.polygon([(x * self.S, y * self.S) for x, y in pts], fill=fill, outline=outline, width=self.w)

    def rect(self, x0, y0, x1, y1, fill, outline=None, radius=0.0):
        S = self.S
        box = [x0 * S, y0 * S, x1 * S, y1 * S]
        if radius:
            self.draw.rounded_rectangle(box, radius=radius * S, fill=fill, outline=outline, width=self.w)
        else:
            self.draw.rectangle(box, fill=fill, outline=outline, width=self.w if outline else 0)

    def line(self, pts, fill, width_frac=0.014):
        self.draw.line([(x * self.S, y * self.S) for x, y in pts], fill=fill, width=max(1, round(self.S * width_frac)),
                       joint="curve")


def _gradient(S: int, top, bottom, y0=0.0, y1=1.0) -> np.ndarray:
    t = np.clip((np.arange(S) / S - y0) / max(y1 - y0, 1e-6), 0, 1)[:, None]
    col = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.broadcast_to(col[:, None, :], (S, S, 3)).astype(np.uint8)


def _draw_background(bg: str, S: int, rng: np.random.Generator) -> Image.Image:
    if bg == "sky":
        img = Image.fromarray(np.ascontiguousarray(_gradient(S, (96, 160, 238), (186, 220, 252))))
        pen = _Pen(ImageDraw.Draw(img), S)
        for _ in range(int(rng.integers(2, 5))):
            x, y, r = rng.uniform(0.05, 0.95), rng.uniform(0.08, 0.7), rng.uniform(0.05, 0.08)
            for dx, dy, k in ((-1.0, 0.2, 0.8), (0.0, 0.0, 1.0), (1.0, 0.2, 0.8)):
                pen.ell(x + dx * r, y + dy * r, r * k * 1.2, r * k, (252, 252, 252))
    elif bg == "forest":
        img = Image.fromarray(np.ascontiguousarray(_gradient(S, (170, 214, 170), (120, 176, 110), 0, 0.7)))
        pen = _Pen(ImageDraw.Draw(img), S)
        pen.rect(0, 0.72, 1, 1, (62, 120, 48))
        xs = np.sort(rng.uniform(0.0, 1.0, size=int(rng.integers(3, 6))))
        for x in xs:
            top, w = rng.uniform(0.08, 0.25), rng.uniform(0.09, 0.14)
            pen.rect(x - 0.022, 0.5, x + 0.022, 0.78, (96, 62, 34))
            pen.poly([(x, top), (x - w, 0.62), (x + w, 0.62)], (28, 96, 44))
    elif bg == "room":
        img = Image.new("RGB", (S, S), (232, 212, 178))
        pen = _Pen(ImageDraw.Draw(img), S)
        pen.rect(0, 0.7, 1, 1, (150, 98, 56))
        for k in range(1, 4):
            pen.line([(0, 0.7 + k * 0.075), (1, 0.7 + k * 0.075)], (118, 74, 40), 0.008)
        wx = rng.uniform(0.12, 0.7)
        pen.rect(wx, 0.12, wx + 0.2, 0.42, (176, 214, 246), outline=(250, 250, 250))
        pen.line([(wx + 0.1, 0.12), (wx + 0.1, 0.42)], (250, 250, 250), 0.012)
    elif bg == "night":
        img = Image.fromarray(np.ascontiguousarray(_gradient(S, (22, 30, 92), (54, 58, 130))))
        pen = _Pen(ImageDraw.Draw(img), S)
        for _ in range(int(rng.integers(8, 16))):
            x, y = rng.uniform(0, 1), rng.uniform(0, 0.75)
            pen.ell(x, y, 0.008, 0.008, (255, 250, 210))
        # a full moon: a crescent here would imitate the held-out marking
        pen.ell(rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.22), 0.07, 0.07, (250, 240, 180))
    elif bg == "beach":
        img = Image.fromarray(np.ascontiguousarray(_gradient(S, (110, 180, 244), (176, 220, 250), 0, 0.45)))
        pen = _Pen(ImageDraw.Draw(img), S)
        pen.rect(0, 0.45, 1, 0.62, (34, 120, 200))
        pen.rect(0, 0.62, 1, 1, (238, 214, 150))
        pen.ell(rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.25), 0.06, 0.06, (255, 226, 90))
    else:
        raise ValueError(f"unknown background {bg!r}; choose one of {BACKGROUNDS}")
    return img


def _draw_character(pen: _Pen, a: dict, rng: np.random.Generator) -> None:
    sp, fill = a["species"], _FILL[a["color"]]
    dark = _mix(fill, (0, 0, 0), 0.55) if a["color"] != "black" else (8, 8, 10)
    light = _mix(fill, (255, 255, 255), 0.45)
    h = (0.64 if a["size"] == "large" else 0.46) * rng.uniform(0.94, 1.06)
    cx = {"left": 0.27, "center": 0.5, "right": 0.73}[a["position"]] + rng.uniform(-0.03, 0.03)
    y0 = 0.94 + rng.uniform(-0.03, 0.02) if a["size"] == "large" else 0.86 + rng.uniform(-0.06, 0.04)

    # head geometry per species: centre, radii, eye height, top of head (for hats and surprise marks)
    if sp == "frog":
        hy, hrx, hry = y0 - 0.56 * h, 0.3 * h, 0.19 * h
        eye_y, eye_dx = y0 - 0.76 * h, 0.14 * h
        head_top = y0 - 0.86 * h
    elif sp == "bird":
        hy, hrx, hry = y0 - 0.62 * h, 0.24 * h, 0.23 * h
        eye_y, eye_dx = y0 - 0.66 * h, 0.09 * h
        head_top = y0 - 0.85 * h
    else:
        hy, hrx, hry = y0 - 0.62 * h, 0.25 * h, 0.235 * h
        eye_y, eye_dx = y0 - 0.64 * h, 0.095 * h
        head_top = y0 - 0.855 * h

    # behind the body: cat tail, ears
    if sp == "cat":
        side = 1 if rng.random() < 0.5 else -1
        pts = [(cx + side * (0.18 * h + 0.1 * h * math.sin(t / 6 * math.pi)), y0 - 0.1 * h - t / 6 * 0.45 * h)
               for t in range(7)]
        pen.line(pts, dark, 0.075 * h + 0.02 * h)
        pen.line(pts, fill, 0.075 * h)
    if sp == "bear":
        for s in (-1, 1):
            pen.ell(cx + s * 0.19 * h, hy - 0.19 * h, 0.105 * h, 0.105 * h, fill, dark)
            pen.ell(cx + s * 0.19 * h, hy - 0.19 * h, 0.055 * h, 0.055 * h, light)
    elif sp == "cat":
        for s in (-1, 1):
            pen.poly([(cx + s * 0.25 * h, hy - 0.02 * h), (cx + s * 0.04 * h, hy - 0.2 * h),
                      (cx + s * 0.25 * h, hy - 0.46 * h)], fill, dark)
            pen.poly([(cx + s * 0.21 * h, hy - 0.1 * h), (cx + s * 0.1 * h, hy - 0.2 * h),
                      (cx + s * 0.225 * h, hy - 0.37 * h)], light)
    elif sp == "rabbit":
        for s in (-1, 1):
            ang = s * rng.uniform(5, 15)
            pen.ell(cx + s * 0.1 * h, hy - 0.38 * h, 0.075 * h, 0.24 * h, fill, dark, angle=ang)
            pen.ell(cx + s * 0.1 * h, hy - 0.36 * h, 0.035 * h, 0.17 * h, _mix(light, (255, 150, 180), 0.4),
                    angle=ang)

    # legs and body
    if sp == "bird":
        for s in (-1, 1):
            pen.line([(cx + s * 0.08 * h, y0 - 0.12 * h), (cx + s * 0.08 * h, y0)], (232, 140, 30), 0.03 * h)
        pen.ell(cx, y0 - 0.3 * h, 0.27 * h, 0.25 * h, fill, dark)
    else:
        for s in (-1, 1):
            pen.ell(cx + s * 0.12 * h, y0 - 0.05 * h, 0.1 * h if sp == "frog" else 0.085 * h, 0.05 * h, fill, dark)
        bw = 0.3 * h if sp == "frog" else 0.25 * h
        pen.ell(cx, y0 - 0.27 * h, bw, 0.25 * h, fill, dark)

    if a["marking"]:  # the crescent: white lower rim left over when the fur-coloured ellipse covers the top
        my = y0 - 0.25 * h
        pen.ell(cx, my, 0.19 * h, 0.13 * h, (250, 250, 246), dark)
        pen.ell(cx, my - 0.08 * h, 0.195 * h, 0.11 * h, fill, width=0)

    # arms (wings for birds); raised arms sit beside the head
    arm_fill = fill
    up = {"standing": (), "waving": (1,), "arms up": (-1, 1)}[a["pose"]]
    for s in (-1, 1):
        if s in up:
            pen.ell(cx + s * 0.3 * h, y0 - 0.58 * h, 0.06 * h, 0.15 * h, arm_fill, dark, angle=s * 25)
        else:
            pen.ell(cx + s * 0.25 * h, y0 - 0.28 * h, 0.06 * h, 0.14 * h, arm_fill, dark, angle=-s * 25)

    # head
    if sp == "frog":
        for s in (-1, 1):
            pen.ell(cx + s * eye_dx, eye_y, 0.085 * h, 0.085 * h, fill, dark)
        pen.ell(cx, hy, hrx, hry, fill, dark)
        for s in (-1, 1):  # re-cover the bump bases so they merge with the head
            pen.ell(cx + s * eye_dx, eye_y + 0.02 * h, 0.07 * h, 0.06 * h, fill)
    else:
        pen.ell(cx, hy, hrx, hry, fill, dark)
    if sp == "bird":
        for k in (-1, 0, 1):
            pen.ell(cx + k * 0.05 * h, head_top - 0.01 * h, 0.035 * h, 0.095 * h, fill, dark, angle=k * 28)
        pen.ell(cx, hy, hrx - 0.01 * h, hry - 0.01 * h, fill)

    # face
    mouth_y = y0 - 0.5 * h
    if sp == "bear":
        pen.ell(cx, y0 - 0.55 * h, 0.09 * h, 0.065 * h, light)
        pen.ell(cx, y0 - 0.575 * h, 0.03 * h, 0.022 * h, (20, 16, 16))
        mouth_y = y0 - 0.52 * h
    elif sp == "cat":
        pen.ell(cx, y0 - 0.575 * h, 0.022 * h, 0.016 * h, (236, 110, 140))
        for s in (-1, 1):
            for dy in (-0.01, 0.02):
                pen.line([(cx + s * 0.07 * h, y0 - 0.56 * h), (cx + s * 0.22 * h, y0 - (0.57 + dy) * h)],
                         (30, 30, 30), 0.008 * h + 0.004)
    elif sp == "rabbit":
        pen.ell(cx, y0 - 0.575 * h, 0.022 * h, 0.018 * h, (236, 110, 140))
    elif sp == "bird":
        pen.poly([(cx - 0.075 * h, y0 - 0.6 * h), (cx + 0.075 * h, y0 - 0.6 * h), (cx, y0 - 0.47 * h)],
                 (240, 150, 30), (150, 80, 10))
    if a["blush"]:
        blush = (232, 64, 100) if a["color"] == "pink" else (250, 110, 140)
        for s in (-1, 1):
            pen.ell(cx + s * 0.16 * h, y0 - 0.56 * h, 0.05 * h, 0.028 * h, blush)
    if sp != "bird":
        if a["surprised"]:
            pen.ell(cx, mouth_y, 0.03 * h, 0.035 * h, (60, 10, 20), (20, 10, 10))
        else:
            mw = 0.11 * h if sp == "frog" else 0.05 * h
            pen.draw.arc([(cx - mw) * pen.S, (mouth_y - 0.04 * h) * pen.S, (cx + mw) * pen.S,
                          (mouth_y + 0.02 * h) * pen.S], 20, 160, fill=(20, 12, 12),
                         width=max(1, round(pen.S * 0.012 * h / 0.5)))
    if a["glasses"]:
        gr = 0.085 * h
        for s in (-1, 1):
            pen.ell(cx + s * eye_dx, eye_y, gr, gr, (206, 232, 255), (12, 12, 14),
                    width=max(1, round(pen.S * 0.028 * h)))
        pen.line([(cx - eye_dx + gr, eye_y), (cx + eye_dx - gr, eye_y)], (12, 12, 14), 0.02 * h)
    for s in (-1, 1):  # eyes: white ring keeps them visible on dark fur
        pen.ell(cx + s * eye_dx, eye_y, 0.042 * h, 0.046 * h, (250, 250, 250))
        pen.ell(cx + s * eye_dx, eye_y + 0.005 * h, 0.03 * h, 0.034 * h, (14, 12, 16))

    # accessories on top
    if a["scarf"] != "none":
        sc = _SCARF_FILL[a["scarf"]]
        sd = _mix(sc, (0, 0, 0), 0.45)
        ny = y0 - 0.44 * h
        side = 1 if rng.random() < 0.5 else -1
        pen.rect(cx + side * 0.13 * h - 0.045 * h, ny, cx + side * 0.13 * h + 0.045 * h, ny + 0.16 * h, sc, sd,
                 radius=0.02 * h)
        pen.rect(cx - 0.22 * h, ny - 0.045 * h, cx + 0.22 * h, ny + 0.045 * h, sc, sd, radius=0.04 * h)
    if a["hat"]:
        crown, band = _HAT
        ty = head_top + 0.04 * h
        pen.rect(cx - 0.2 * h, ty - 0.035 * h, cx + 0.2 * h, ty + 0.01 * h, crown, (30, 14, 50), radius=0.015 * h)
        pen.rect(cx - 0.12 * h, ty - 0.24 * h, cx + 0.12 * h, ty - 0.02 * h, crown, (30, 14, 50))
        pen.rect(cx - 0.12 * h, ty - 0.08 * h, cx + 0.12 * h, ty - 0.035 * h, band)
    if a["surprised"]:  # three surprise strokes above the head, haloed so they read on any background
        top = head_top - (0.25 * h if a["hat"] else 0.05 * h)
        if sp == "rabbit" and not a["hat"]:
            top = head_top - 0.3 * h
        for ang in (-35, 0, 35):
            t = math.radians(ang)
            p0 = (cx + math.sin(t) * 0.06 * h, top - math.cos(t) * 0.03 * h)
            p1 = (cx + math.sin(t) * 0.17 * h, top - math.cos(t) * 0.13 * h)
            pen.line([p0, p1], (255, 255, 255), 0.04 * h)
            pen.line([p0, p1], (16, 16, 16), 0.022 * h)


def render(attrs: dict, detail_seed: int = 0, size: int = 64) -> Image.Image:
    """Draw an attribute dict (see `ToyWorld.sample`) as a size x size RGB image.

    `detail_seed` drives what the tags do not say: cloud/tree/star placement, small jitter of position and scale.
    """
    if size < 16 or size > 1024:
        raise ValueError(f"size must be between 16 and 1024 pixels (got {size})")
    rng = np.random.default_rng([int(detail_seed), 7919])
    S = size * _SS
    img = _draw_background(attrs["background"], S, rng)
    _draw_character(_Pen(ImageDraw.Draw(img), S), attrs, rng)
    return img.resize((size, size), Image.BOX)


# -------------------------------------------------------------------------------------------------------------- world
class ToyWorld:
    """A world with a seed; every method is a pure function of (seed, index)."""

    def __init__(self, seed: int = 0, size: int = 64):
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (got {seed})")
        self.seed = int(seed)
        self.size = int(size)

    def _make(self, stream: int, index: int, attrs_fn) -> tuple[Image.Image, str, dict]:
        rng = _rng(self.seed, stream, index)
        attrs = attrs_fn(rng)
        detail = int(rng.integers(0, 2**62))
        return render(attrs, detail, self.size), caption(attrs), attrs

    def sample(self, index: int) -> tuple[Image.Image, str, dict]:
        """Pretraining sample `index`: (image, caption, attributes); never shows a held-out concept."""
        return self._make(STREAM_PRETRAIN, index, _pretrain_attrs)

    pretraining_sample = sample

    def class_sample(self, index: int, species: str = CLASS_TOKEN) -> tuple[Image.Image, str, dict]:
        """A pretraining-distribution sample of one species (regularization images for the class prompt)."""
        if species not in SPECIES:
            raise ValueError(f"unknown species {species!r}; choose one of {SPECIES}")
        return self._make(STREAM_CLASS, index, lambda rng: _pretrain_attrs(rng, species))

    def character_sample(self, index: int) -> tuple[Image.Image, str, dict]:
        """The new character "usu bear" in a random scene, pose, position and size."""
        return self._make(STREAM_CHARACTER, index, _character_attrs)

    def open_sample(self, index: int) -> tuple[Image.Image, str, dict]:
        """Every attribute independent, held-out ones included (for the attribute classifier only)."""
        return self._make(STREAM_OPEN, index, _open_attrs)


def pretraining_sample(index: int, seed: int = 0, size: int = 64) -> tuple[Image.Image, str, dict]:
    return ToyWorld(seed, size).sample(index)


def character_samples(n: int = 15, seed: int = 1, size: int = 64) -> list[tuple[Image.Image, str, dict]]:
    """`n` images of "usu bear". The backgrounds cycle through every scene so a small set still varies them."""
    w = ToyWorld(seed, size)
    out = []
    for i in range(n):
        rng = _rng(seed, STREAM_CHARACTER, i)
        attrs = _character_attrs(rng)
        attrs["background"] = BACKGROUNDS[(i + seed) % len(BACKGROUNDS)]
        attrs["pose"] = POSES[(i // len(BACKGROUNDS) + seed) % len(POSES)]
        detail = int(rng.integers(0, 2**62))
        out.append((render(attrs, detail, w.size), caption(attrs), attrs))
    return out


def class_samples(n: int, seed: int = 2, size: int = 64, species: str = CLASS_TOKEN
                  ) -> list[tuple[Image.Image, str, dict]]:
    """`n` regularization images of the class ("bear") from the pretraining distribution."""
    w = ToyWorld(seed, size)
    return [w.class_sample(i, species) for i in range(n)]
