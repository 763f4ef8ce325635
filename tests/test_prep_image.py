"""`lorakit dataset resize` and `lorakit dataset dedupe`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.cli.main import main
from lorakit.errors import UserError
from lorakit.tools.image_prep import (
    dedupe_folder,
    hamming,
    near_pairs,
    parse_resolution,
    phash_array,
    resize_folder,
    target_size,
)


def test_target_size_by_hand():
    # 2000x1000 into 1024x1024: s = sqrt(1048576 / 2e6) = 0.72408 -> 1448.15 x 724.08 -> 1448 x 724
    assert target_size(2000, 1000, 1024 * 1024) == ((1448, 724), (1448, 724))
    # with 64-pixel steps: 1448 -> 1408, 724 -> 704 (centre crop)
    assert target_size(2000, 1000, 1024 * 1024, 64) == ((1448, 724), (1408, 704))
    # 3000x2000: s = 0.418046 -> 1254.14 x 836.09
    assert target_size(3000, 2000, 1024 * 1024) == ((1254, 836), (1254, 836))
    # exactly 1/3: 300x300 -> 100x100 (not 99 from float rounding)
    assert target_size(300, 300, 100 * 100) == ((100, 100), (100, 100))
    # never enlarge, and an image exactly at the area is left alone
    assert target_size(1024, 1024, 1024 * 1024) is None
    assert target_size(640, 480, 1024 * 1024) is None
    # a side shorter than one step is not cropped away
    assert target_size(4000, 40, 100 * 100, 64) == ((1000, 10), (960, 10))
    assert parse_resolution("1024x768") == (1024, 768) and parse_resolution("512") == (512, 512)
    with pytest.raises(UserError):
        parse_resolution("big")


def halves(w: int, h: int) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


@pytest.fixture
def ds(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    halves(200, 100).save(d / "big.png")
    (d / "big.txt").write_text("big caption\n")
    (d / "big.png.json").write_text('{"score": 3}')
    (d / "big_200x100_sd.npz").write_bytes(b"stale latent")  # a latent cache: not copied
    (d / "big.npz").write_bytes(b"stale latent")
    Image.new("RGB", (50, 50), (0, 255, 0)).save(d / "small.png")
    (d / "small.caption").write_text("small caption\n")
    Image.new("RGB", (300, 300), (120, 120, 120)).save(d / "grey.jpg", quality=95)
    rgba = np.zeros((200, 200, 4), np.uint8)
    rgba[:, :100] = (255, 0, 0, 255)  # opaque red left half
    rgba[:, 100:] = (0, 255, 0, 0)  # fully transparent green right half
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    rot = Image.new("RGB", (300, 100), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 100 wide, 300 tall
    rot.save(d / "rot.jpg", exif=exif.tobytes(), quality=95)
    old = 1_600_000_000_000_000_000
    for p in d.iterdir():
        os.utime(p, ns=(old, old))
    return d


def check_outputs(d: Path) -> None:
    with Image.open(d / "big.png") as im:
        assert im.size == (141, 70)  # sqrt(200 * 10000 / 100) = 141.4, sqrt(100 * 10000 / 200) = 70.7
        a = np.asarray(im.convert("RGB")).astype(int)
    assert (np.abs(a[:, :60] - [255, 0, 0]) <= 2).all() and (np.abs(a[:, -60:] - [0, 0, 255]) <= 2).all()
    with Image.open(d / "grey.jpg") as im:
        assert im.size == (100, 100) and im.format == "JPEG"
        assert np.abs(np.asarray(im).astype(int) - 120).max() <= 3
    with Image.open(d / "alpha.png") as im:
        assert im.size == (100, 100) and im.mode == "RGBA"
        a = np.asarray(im).astype(int)
    # premultiplied resampling: no green from the transparent half bleeds into visible pixels
    visible = a[..., 3] > 0
    assert visible[:, :45].all() and not visible[:, 55:].any()
    assert (a[visible][:, 1] == 0).all()
    with Image.open(d / "rot.jpg") as im:
        # displayed 100x300 -> sqrt(100 * 10000 / 300) = 57.7, sqrt(300 * 10000 / 100) = 173.2; orientation applied
        assert im.size == (57, 173) and im.getexif().get(0x0112, 1) == 1


def test_resize_in_place(ds):
    small_before = ((ds / "small.png").read_bytes(), (ds / "small.png").stat().st_mtime_ns)
    rep = resize_folder(ds, "100x100", workers=1, progress=False)
    assert (rep.resized, rep.kept, rep.copied, rep.failed) == (4, 1, 0, [])
    check_outputs(ds)
    assert ((ds / "small.png").read_bytes(), (ds / "small.png").stat().st_mtime_ns) == small_before
    assert (ds / "big.txt").read_text() == "big caption\n"
    # a second run has nothing left to do
    rep = resize_folder(ds, "100x100", workers=1, progress=False)
    assert (rep.resized, rep.kept) == (0, 5)
    assert not [p for p in ds.iterdir() if p.name.endswith(".tmp")]


def test_resize_into_out_with_pool_and_rerun(ds, tmp_path):
    out = tmp_path / "out"
    src_before = {p.name: p.read_bytes() for p in ds.iterdir()}
    rc = main(["dataset", "resize", str(ds), "--max_resolution", "100x100", "--out", str(out), "--workers", "2",
               "--no_progress"])
    assert rc == 0
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == src_before  # sources untouched
    check_outputs(out)
    assert (out / "small.png").read_bytes() == src_before["small.png"]  # small: copied as is, never enlarged
    assert (out / "big.txt").read_text() == "big caption\n" and (out / "small.caption").read_text() == "small caption\n"
    assert (out / "big.png.json").read_text() == '{"score": 3}'
    assert not (out / "big.npz").exists() and not (out / "big_200x100_sd.npz").exists()
    # re-run: everything skipped; touching one source redoes only that one
    rep = resize_folder(ds, "100x100", out=out, workers=1, progress=False)
    assert (rep.skipped, rep.resized, rep.copied, rep.captions_copied) == (5, 0, 0, 0)
    os.utime(ds / "grey.jpg")
    rep = resize_folder(ds, "100x100", out=out, workers=1, progress=False)
    assert (rep.skipped, rep.resized) == (4, 1)
    # other settings: everything is redone
    rep = resize_folder(ds, "100x100", out=out, step=8, workers=1, progress=False)
    assert rep.skipped == 0
    with Image.open(out / "big.png") as im:
        assert im.size == (136, 64)  # 141 -> 136, 70 -> 64


def test_resize_recursive_out_inside(ds):
    with pytest.raises(UserError, match="inside"):
        resize_folder(ds, "100x100", out=ds / "resized", recursive=True, progress=False)


# ----------------------------------------------------------------------------------------------------- dedupe


def pattern(n: int, kind: int = 0) -> Image.Image:
    y, x = np.mgrid[0:n, 0:n] / n
    if kind == 0:
        a = 128 + 90 * np.sin(2 * np.pi * 1.5 * x) * np.cos(2 * np.pi * y) + 60 * (((x - 0.3) ** 2 + (y - 0.6) ** 2) < 0.04)
    else:
        a = 128 + 90 * np.cos(2 * np.pi * 2 * (x + y)) - 60 * (((x - 0.7) ** 2 + (y - 0.3) ** 2) < 0.03)
    a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([a, 255 - a, a // 2], -1))


def test_phash_properties():
    g = np.asarray(pattern(96).convert("L").resize((32, 32), Image.BOX), dtype=np.float64)
    h = phash_array(g)
    assert 0 < h < 2**63
    assert phash_array(g + 10.0) == h  # brightness only moves the DC term, which is left out
    assert hamming(h, phash_array(255.0 - g)) >= 60  # negation flips every AC sign (ties aside)
    assert near_pairs(np.array([0b0, 0b111, 0b1111, 2**62 - 1], dtype=np.uint64), 3) == [(0, 1), (1, 2)]


@pytest.fixture
def dup_ds(tmp_path):
    d = tmp_path / "dups"
    d.mkdir()
    pattern(96).save(d / "a_orig.png")
    (d / "a_orig.txt").write_text("orig\n")
    pattern(96).resize((80, 80), Image.LANCZOS).save(d / "a_orig.jpg", quality=90)  # shares a_orig.txt with the kept image
    shutil.copy(d / "a_orig.png", d / "b_copy.png")
    (d / "b_copy.txt").write_text("copy\n")
    (d / "b_copy.png.json").write_text("{}")
    pattern(96).resize((64, 64), Image.LANCZOS).save(d / "c_small.png")
    pattern(96, kind=1).save(d / "z_other.png")
    (d / "z_other.txt").write_text("other\n")
    return d


def test_dedupe_report(dup_ds):
    rep = dedupe_folder(dup_ds, workers=1, progress=False)
    assert rep.images == 5 and len(rep.groups) == 1
    g = rep.groups[0]
    assert g.keep.name == "a_orig.png"
    assert [(d.path.name, d.kind) for d in g.duplicates] == [
        ("b_copy.png", "exact"), ("a_orig.jpg", "near"), ("c_small.png", "near")]
    assert g.duplicates[0].distance == 0 and all(d.distance <= 4 for d in g.duplicates)
    # exact copies only
    rep = dedupe_folder(dup_ds, threshold=-1, workers=2, progress=False)
    assert [[d.path.name for d in g.duplicates] for g in rep.groups] == [["b_copy.png"]]


def test_dedupe_move(dup_ds, tmp_path, capsys):
    moved = tmp_path / "moved"
    rc = main(["dataset", "dedupe", str(dup_ds), "--move_to", str(moved), "--no_progress"])
    assert rc == 0
    assert sorted(p.name for p in dup_ds.iterdir()) == ["a_orig.png", "a_orig.txt", "z_other.png", "z_other.txt"]
    assert sorted(p.name for p in moved.iterdir()) == [
        "a_orig.jpg", "a_orig.txt", "b_copy.png", "b_copy.png.json", "b_copy.txt", "c_small.png"]
    assert (dup_ds / "a_orig.txt").read_text() == "orig\n"  # shared caption copied, not taken away
    out = capsys.readouterr().out
    assert "keep a_orig.png" in out and "1 exact and 2 near" in out
