import math

import pytest

from lorakit.data.buckets import (BucketAssigner, check_bucket_reso_steps, crop_top_left, get_crop_ltrb,
                                  make_bucket_resolutions)
from lorakit.errors import UserError


def brute_force_buckets(area, lo, hi, step):
    """Every (w, h) on the step grid where, for its width, h is the tallest allowed height; plus the square."""
    grid = list(range(lo, hi + 1, step))
    out = set()
    for w in grid:
        fits = [h for h in range(step, hi + 1, step) if w * h <= area]
        if fits and max(fits) >= lo:
            out.add((w, max(fits)))
            out.add((max(fits), w))
    side = math.isqrt(area) // step * step
    out.add((side, side))
    return sorted(out)


def test_39_buckets_for_seed_command_line():
    got = make_bucket_resolutions((1024, 1024), 320, 2048, 64)
    expected = brute_force_buckets(1024 * 1024, 320, 2048, 64)
    assert got == expected
    assert len(got) == 39
    by_aspect = sorted(got, key=lambda r: r[0] / r[1])
    assert by_aspect[0] == (320, 2048) and by_aspect[-1] == (2048, 320)
    assert (1024, 1024) in got and (1216, 832) in got and (832, 1216) in got
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in got)


def test_assignment_nearest_aspect_and_cover_resize():
    a = BucketAssigner((1024, 1024), True, 320, 2048, 64)
    buckets = brute_force_buckets(1024 * 1024, 320, 2048, 64)
    for w, h in [(600, 400), (400, 600), (1000, 1000), (3000, 1000), (777, 1333), (200, 2000)]:
        want = min(buckets, key=lambda b: abs(b[0] / b[1] - w / h))
        c = a.select(w, h)
        assert c.reso == want
        s = max(want[0] / w, want[1] / h)  # cover the bucket
        assert c.resized_size == (int(w * s + 0.5), int(h * s + 0.5))
        assert c.resized_size[0] >= want[0] and c.resized_size[1] >= want[1]
    c = a.select(600, 400)
    assert c.reso == (1216, 832) and c.resized_size == (1248, 832)


def test_exact_bucket_size_kept():
    a = BucketAssigner((1024, 1024), True, 320, 2048, 64)
    c = a.select(1216, 832)
    assert c.reso == (1216, 832) and c.resized_size == (1216, 832)


def test_log_aspect_differs_between_arithmetic_and_geometric_midpoint():
    a_lin = BucketAssigner((512, 512), True, 256, 1024, 64)
    a_log = BucketAssigner((512, 512), True, 256, 1024, 64, log_aspect=True)
    b1, b2 = (512, 512), (576, 448)  # adjacent aspects 1.0 and 1.2857
    r1, r2 = 1.0, 576 / 448
    ratio = (math.sqrt(r1 * r2) + (r1 + r2) / 2) / 2  # between geometric and arithmetic mean
    w, h = round(ratio * 10000), 10000
    assert a_lin.select(w, h).reso == b1  # nearer on the linear scale
    assert a_log.select(w, h).reso == b2  # nearer on the log scale


def test_no_upscale():
    a = BucketAssigner((512, 512), True, 256, 1024, 64, bucket_no_upscale=True)
    c = a.select(300, 200)  # smaller than the area: no resize, floor to the step
    assert c.resized_size == (300, 200) and c.reso == (256, 192)
    c = a.select(2000, 1000)  # hand-computed from sd-scripts' rounding rules
    assert c.resized_size == (640, 320) and c.reso == (640, 320)


def test_no_bucket_single_resolution():
    a = BucketAssigner((512, 768), False)
    c = a.select(1000, 1000)
    assert c.reso == (512, 768) and c.resized_size == (768, 768)


def test_min_max_adjust_and_errors():
    notes = []
    a = BucketAssigner((512, 512), True, 300, 1000, 64, notes=notes)
    assert (a.min_size, a.max_size) == (256, 1024) and len(notes) == 2
    with pytest.raises(UserError, match="min_bucket_reso"):
        BucketAssigner((256, 256), True, 320, 1024, 64)
    with pytest.raises(UserError, match="max_bucket_reso"):
        BucketAssigner((1024, 1024), True, 256, 768, 64)


def test_steps_divisibility():
    check_bucket_reso_steps(64, 64)
    check_bucket_reso_steps(32, 32)
    with pytest.raises(UserError, match="multiple of 64"):
        check_bucket_reso_steps(32, 64)


def test_crop_ltrb_and_flip():
    l, t, r, b = get_crop_ltrb((1216, 832), (600, 400))
    # bucket aspect 1.4615 < image 1.5: fit width, image height 1216/1.5 = 810.67
    assert l == 0 and t == (832 - 1216 / 1.5) // 2 == 10.0
    assert r == 1216 and b == pytest.approx(10 + 1216 / 1.5)
    l, t, r, b = get_crop_ltrb((832, 1216), (1000, 1000))
    assert (l, t) == (0, (1216 - 832) // 2)
    assert crop_top_left((10, 20, 90, 100), (100, 120), flipped=False) == (20, 10)
    assert crop_top_left((10, 20, 90, 100), (100, 120), flipped=True) == (20, 10)  # 100 - 90
    assert crop_top_left((5, 0, 80, 100), (100, 100), flipped=True) == (0, 20)
