"""Reading training images robustly.

Every reader in lorakit goes through here so that EXIF orientation, odd modes (RGBA, LA, P, CMYK, I;16) and broken
files are handled the same way everywhere, with errors that name the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lorakit.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif", ".jxl")


class ImageReadError(UserError):
    """An image file cannot be decoded; the message names the file."""


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_8bit(img: Image.Image) -> Image.Image:
    # 16/32-bit greyscale: scale to 8 bits instead of clipping (PIL's convert("L") clips I;16 at 255).
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img


SKIP_HINT = "run with --on_bad_image skip to leave it out"


def image_error(path: str | os.PathLike, exc: BaseException) -> ImageReadError:
    """The ImageReadError for any failure to open or decode `path` (one wording for every reader)."""
    if isinstance(exc, FileNotFoundError):
        return ImageReadError(f"image {path} does not exist.")
    if isinstance(exc, Image.DecompressionBombError):
        return ImageReadError(
            f"image {path} is too large to decode safely ({exc}). Save it smaller with an image editor (lorakit "
            f"refuses to decode it too) or delete it, or {SKIP_HINT}.")
    if isinstance(exc, MemoryError):
        return ImageReadError(f"image {path} does not fit in memory when decoded; shrink or delete it, or "
                              f"{SKIP_HINT}.")
    return ImageReadError(
        f"image {path} cannot be read ({type(exc).__name__}: {exc}). The file is corrupt, truncated or not an "
        f"image: re-export or delete it, or {SKIP_HINT}.")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image with EXIF orientation applied; raise ImageReadError naming the file."""
    path = Path(path)
    try:
        img = Image.open(path)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no second copy of a large image
        return _to_8bit(img)
    except ImageReadError:
        raise
    # Pillow's decoders raise many types on damaged files (struct.error, IndexError, ZeroDivisionError...) and
    # DecompressionBombError is none of OSError/ValueError: every failure here is "this image is unreadable".
    except Exception as exc:  # noqa: BLE001
        raise image_error(path, exc) from None


def split_alpha(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Return (RGB image composited on white, alpha channel or None)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), alpha
    if img.mode == "CMYK":
        return img.convert("RGB"), None
    return img.convert("RGB"), None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """An RGB image, transparent pixels composited on white."""
    rgb, _ = split_alpha(open_image(path))
    return rgb


def load_rgb_and_alpha(path: str | os.PathLike) -> tuple[Image.Image, Image.Image | None]:
    return split_alpha(open_image(path))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the header."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001 - see open_image
        raise image_error(path, exc) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
