"""Aspect-ratio buckets, with sd-scripts' generation, nearest-aspect assignment and crop maths.

All functions are pure: sizes in, sizes out. Sizes are (width, height).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorakit.errors import UserError


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
    """sd-scripts' bucket list: the square of the same area, plus for every width from min_size to max_size in
    `divisible` steps the tallest height (a multiple of `divisible`, <= max_size) within the area, both orientations.
    Sorted by (width, height)."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def adjust_min_max_bucket_reso(resolution: tuple[int, int], min_bucket_reso: int, max_bucket_reso: int,
                               bucket_reso_steps: int, notes: list[str] | None = None) -> tuple[int, int]:
    """Round min down / max up to the step, as sd-scripts does, and check they bracket the resolution."""
    if min_bucket_reso < bucket_reso_steps:
        raise UserError(f"min_bucket_reso ({min_bucket_reso}) is smaller than one bucket step ({bucket_reso_steps}); "
                        f"use --min_bucket_reso {bucket_reso_steps} or more, or a smaller --bucket_reso_steps.")
    if min_bucket_reso % bucket_reso_steps:
        new = min_bucket_reso - min_bucket_reso % bucket_reso_steps
        if notes is not None:
            notes.append(f"min_bucket_reso adjusted to a multiple of bucket_reso_steps: {min_bucket_reso} -> {new}")
        min_bucket_reso = new
    if max_bucket_reso % bucket_reso_steps:
        new = max_bucket_reso + bucket_reso_steps - max_bucket_reso % bucket_reso_steps
        if notes is not None:
            notes.append(f"max_bucket_reso adjusted to a multiple of bucket_reso_steps: {max_bucket_reso} -> {new}")
        max_bucket_reso = new
    if min(resolution) < min_bucket_reso:
        raise UserError(f"min_bucket_reso ({min_bucket_reso}) is larger than the resolution {resolution[0]}x{resolution[1]}; "
                        "lower --min_bucket_reso or raise --resolution.")
    if max(resolution) > max_bucket_reso:
        raise UserError(f"max_bucket_reso ({max_bucket_reso}) is smaller than the resolution {resolution[0]}x{resolution[1]}; "
                        "raise --max_bucket_reso or lower --resolution.")
    return min_bucket_reso, max_bucket_reso


def check_bucket_reso_steps(bucket_reso_steps: int, min_steps: int) -> None:
    """The model family's latent grid needs steps divisible by min_steps (SDXL 32, SD1/2 64, as in sd-scripts)."""
    if bucket_reso_steps % min_steps:
        raise UserError(f"bucket_reso_steps is {bucket_reso_steps}; this model needs a multiple of {min_steps}. "
                        f"Use --bucket_reso_steps {min_steps} (or a multiple of it).")


def round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


@dataclass(frozen=True)
class BucketChoice:
    reso: tuple[int, int]  # bucket size the image is cropped to
    resized_size: tuple[int, int]  # size the image is resized to before the crop
    ar_error: float  # bucket aspect - image aspect


class BucketAssigner:
    """Assigns images to buckets like sd-scripts' BucketManager.select_bucket.

    enable_bucket False: one bucket of exactly `resolution`; the image is resized to cover it and cropped.
    bucket_no_upscale: buckets come from the image sizes themselves (only shrinking), min/max are ignored.
    log_aspect: nearest bucket by |log(bucket aspect) - log(image aspect)| (symmetric for tall and wide images).
    """

    def __init__(self, resolution: tuple[int, int], enable_bucket: bool = False, min_bucket_reso: int = 256,
                 max_bucket_reso: int = 1024, bucket_reso_steps: int = 64, bucket_no_upscale: bool = False,
                 log_aspect: bool = False, notes: list[str] | None = None):
        self.resolution = tuple(resolution)
        self.enable_bucket = enable_bucket
        self.no_upscale = bool(enable_bucket and bucket_no_upscale)
        self.steps = bucket_reso_steps
        self.max_area = resolution[0] * resolution[1]
        self.log_aspect = log_aspect
        if enable_bucket:
            self.min_size, self.max_size = adjust_min_max_bucket_reso(resolution, min_bucket_reso, max_bucket_reso,
                                                                      bucket_reso_steps, notes)
            self.predefined = [] if self.no_upscale else make_bucket_resolutions(
                self.resolution, self.min_size, self.max_size, self.steps)
        else:
            self.predefined = [self.resolution]
        self._predefined_set = set(self.predefined)
        self._ars = np.array([w / h for w, h in self.predefined], dtype=np.float64)

    def select(self, width: int, height: int) -> BucketChoice:
        aspect = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._predefined_set:
                if self.log_aspect:
                    errors = np.abs(np.log(self._ars) - math.log(aspect))
                else:
                    errors = np.abs(self._ars - aspect)
                reso = self.predefined[int(errors.argmin())]
            # cover the bucket: match the side that would otherwise fall short
            if aspect > reso[0] / reso[1]:
                scale = reso[1] / height
            else:
                scale = reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * aspect)
                rh = self.max_area / rw
                bw = round_to_steps(rw, self.steps)
                bh_w = round_to_steps(bw / aspect, self.steps)
                bh = round_to_steps(rh, self.steps)
                bw_h = round_to_steps(bh * aspect, self.steps)
                err_w = abs(bw / bh_w - aspect) if bh_w else math.inf
                err_h = abs(bw_h / bh - aspect) if bh else math.inf
                if err_w < err_h:
                    resized = (bw, int(bw / aspect + 0.5))
                else:
                    resized = (int(bh * aspect + 0.5), bh)
            else:
                resized = (width, height)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if reso[0] < self.steps or reso[1] < self.steps:
                # smaller than one step: sd-scripts would make a 0-sized bucket; use one step and upscale instead
                reso = (max(reso[0], self.steps), max(reso[1], self.steps))
                scale = max(reso[0] / width, reso[1] / height)
                resized = (max(reso[0], int(width * scale + 0.5)), max(reso[1], int(height * scale + 0.5)))
        return BucketChoice(tuple(reso), tuple(resized), reso[0] / reso[1] - aspect)


def get_crop_ltrb(bucket_reso: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """sd-scripts' crop (left, top, right, bottom) for SDXL size conditioning: where the image would sit if it were
    fitted inside the bucket and centred (Stability AI's preprocessing); right is kept for flipped images."""
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        rw, rh = bucket_reso[1] * image_ar, bucket_reso[1]
    else:
        rw, rh = bucket_reso[0], bucket_reso[0] / image_ar
    left = (bucket_reso[0] - rw) // 2
    top = (bucket_reso[1] - rh) // 2
    return left, top, left + rw, top + rh


def crop_top_left(crop_ltrb, target_size: tuple[int, int], flipped: bool) -> tuple[int, int]:
    """(top, left) passed to SDXL's size conditioning; a flipped image mirrors the left edge (sd-scripts)."""
    left = target_size[0] - crop_ltrb[2] if flipped else crop_ltrb[0]
    return int(crop_ltrb[1]), int(left)
