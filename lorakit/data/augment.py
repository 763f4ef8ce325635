"""Turning one image file into the training pixels: load, resize, crop, colour jitter, flip, alpha mask.

Decoding goes through lorakit.utils.images (EXIF orientation, odd modes, errors naming the file). Every random choice
takes a numpy Generator from the caller (see lorakit.data.rng).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.data.buckets import get_crop_ltrb
from lorakit.errors import UserError
from lorakit.utils.images import open_image, split_alpha

# --resize_interpolation names (sd-scripts' cv2 names) -> PIL filters; "area" is PIL's box filter
FILTERS = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "linear": Image.BILINEAR,
           "bicubic": Image.BICUBIC, "cubic": Image.BICUBIC, "area": Image.BOX}
# a mask differing from its image by more than this in aspect ratio is another picture, not a scaled copy
MASK_ASPECT_TOLERANCE = 0.02


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> Image.Image:
    """A loss-mask image (sd-scripts' conditioning_data_dir masks) as an "L" image of `size`: the red channel (grey
    images: their value), 255 = learn, 0 = ignore. A mask stored at another scale of the same picture is resized."""
    img = open_image(path)
    if img.mode in ("L", "I", "I;16", "F"):
        m = img.convert("L")
    else:
        m = img.convert("RGB").getchannel("R")
    if m.size != tuple(size):
        w, h = m.size
        if abs((w / h) / (size[0] / size[1]) - 1) > MASK_ASPECT_TOLERANCE:
            raise UserError(f"mask {path} is {w}x{h} but its training image is {size[0]}x{size[1]}: a different "
                            "aspect ratio, so it cannot be lined up with the image. Save the mask at the image's size "
                            "(conditioning_data_dir).")
        m = _resize_mask(m, size)
    return m


def load_image_arrays(path: str | os.PathLike, alpha_mask: bool = False,
                      mask_path: str | os.PathLike | None = None) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image, loss mask or None). Without alpha_mask transparent pixels are composited on white; with it the
    alpha channel becomes the loss mask (fully opaque when the image has none) and RGB is kept as stored (sd-scripts).
    A `mask_path` (conditioning_data_dir) gives the mask instead of the alpha channel, as in sd-scripts."""
    img = open_image(path)
    if mask_path is not None:
        rgb = img.convert("RGB") if alpha_mask else split_alpha(img)[0]
        return rgb, load_mask(mask_path, img.size)
    if not alpha_mask:
        rgb, _ = split_alpha(img)
        return rgb, None
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB"), Image.new("L", img.size, 255)
    rgba = img.convert("RGBA")
    return rgba.convert("RGB"), rgba.getchannel("A")


def _resize(img: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    if img.size == tuple(size):
        return img
    if interpolation is not None:
        return img.resize(size, FILTERS[interpolation])
    shrinking = size[0] < img.size[0] and size[1] < img.size[1]
    # reducing_gap: fast box pre-reduction for big downscales, same quality as plain LANCZOS to the eye
    return img.resize(size, Image.LANCZOS, reducing_gap=3.0 if shrinking else None)


def _resize_mask(mask: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """Masks default to area (shrinking) or bilinear (enlarging): no ringing, so a region that is 0 in the mask stays
    exactly 0 (no gradient leaks from ignored pixels), and a constant mask stays constant."""
    if mask.size == tuple(size):
        return mask
    if interpolation is None:
        interpolation = "area" if size[0] <= mask.size[0] and size[1] <= mask.size[1] else "bilinear"
    return mask.resize(size, FILTERS[interpolation])


def resize_and_crop(img: Image.Image, alpha: Image.Image | None, resized_size: tuple[int, int],
                    reso: tuple[int, int], random_crop: bool = False, rng: np.random.Generator | None = None,
                    interpolation: str | None = None):
    """sd-scripts' trim_and_resize_if_required: resize to `resized_size`, then crop to the bucket `reso` at the centre
    (or at a random offset); the mask `alpha` gets the same resize and crop. Returns (img, alpha, original_size,
    crop_ltrb)."""
    original_size = img.size
    img = _resize(img, resized_size, interpolation)
    if alpha is not None:
        alpha = _resize_mask(alpha, resized_size, interpolation)
    w, h = img.size
    left = top = 0
    if w > reso[0]:
        trim = w - reso[0]
        left = int(rng.integers(0, trim + 1)) if random_crop else trim // 2
    if h > reso[1]:
        trim = h - reso[1]
        top = int(rng.integers(0, trim + 1)) if random_crop else trim // 2
    box = (left, top, left + reso[0], top + reso[1])
    if box != (0, 0, w, h):
        img = img.crop(box)
        if alpha is not None:
            alpha = alpha.crop(box)
    return img, alpha, original_size, get_crop_ltrb(reso, original_size)


def parse_face_info(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """Face position from a name like `img_cx_cy_w_h.png` (sd-scripts' face_crop_aug_range convention)."""
    tokens = Path(path).stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, fw, fh = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return cx, cy, fw, fh


def face_crop(img: Image.Image, alpha: Image.Image | None, face: tuple[int, int, int, int],
              resolution: tuple[int, int], face_crop_aug_range: tuple[float, float], random_crop: bool,
              rng: np.random.Generator, interpolation: str | None = None):
    """sd-scripts' crop_target: scale so the face spans 1/range of the short side, crop around the face."""
    tw, th = resolution
    width, height = img.size
    if (width, height) == (tw, th):
        return img, alpha
    cx, cy, fw, fh = face
    face_size = max(fw, fh, 1)
    size = min(th, tw)
    min_scale = max(th / height, tw / width)
    min_scale = min(1.0, max(min_scale, size / (face_size * face_crop_aug_range[1])))
    max_scale = min(1.0, max(min_scale, size / (face_size * face_crop_aug_range[0])))
    scale = min_scale if min_scale >= max_scale else float(rng.uniform(min_scale, max_scale))
    # never below the target (sd-scripts asserts this; small images are upscaled to cover instead)
    scale = max(scale, th / height, tw / width)
    nw, nh = max(tw, int(width * scale + 0.5)), max(th, int(height * scale + 0.5))
    img = _resize(img, (nw, nh), interpolation)
    if alpha is not None:
        alpha = _resize_mask(alpha, (nw, nh), interpolation)
    cx, cy = int(cx * scale + 0.5), int(cy * scale + 0.5)
    offsets = []
    for target, length, p in ((th, nh, cy), (tw, nw, cx)):
        p1 = p - target // 2
        if random_crop:
            rng_range = max(length - p, p)
            p1 = p1 + int(rng.integers(0, rng_range + 1)) + int(rng.integers(0, rng_range + 1)) - rng_range
        elif face_crop_aug_range[0] != face_crop_aug_range[1] and face_size > size // 10 and face_size >= 40:
            p1 = p1 + int(rng.integers(-(face_size // 20), face_size // 20 + 1))
        offsets.append(max(0, min(p1, length - target)))
    top, left = offsets
    box = (left, top, left + tw, top + th)
    img = img.crop(box)
    if alpha is not None:
        alpha = alpha.crop(box)
    return img, alpha


HUE_SHIFT_LIMIT = 8  # degrees on OpenCV's 0..180 hue scale (sd-scripts)


def color_aug(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """sd-scripts' colour augmentation: with p=0.33, either a hue shift of up to +-8/180 or a gamma in [0.95, 1.05]
    applied to the 0..255 values (as sd-scripts does, which also changes brightness)."""
    if rng.random() > 0.33:
        return arr
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT) / 180.0 * 256.0
        hsv = np.asarray(Image.fromarray(arr, "RGB").convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(shift))) % 256).astype(np.uint8)
        return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(arr.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def to_tensor(arr: np.ndarray):
    """HxWx3 uint8 -> torch float32 [3,H,W] in [-1, 1]."""
    import torch

    arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr)
    t = torch.from_numpy(arr).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)
