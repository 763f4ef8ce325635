"""Image chores before training: downscale oversized images, and find exact and near-duplicate images.

Resize: an image whose area exceeds the target area (W*H of --max_resolution) is scaled by sqrt(target/area), each side
rounded down, so the aspect ratio is kept and the area never exceeds the target; with `step` (bucket_reso_steps) each
side is then cut down to a multiple of step by a centred crop of fewer than `step` pixels (what bucketing would crop
anyway). Images within the target are never enlarged: in place they are left alone, into --out they are copied as is.
Captions and other files that belong to an image (`<stem>.txt`, `<stem>.caption`, `<image>.json`, ...) are copied
along; latent caches (*.npz) are not, since they no longer match. Work runs on a process pool; writes are atomic. Into
--out, a manifest (`.lorakit-resize.json`) remembers each source's size and mtime so a re-run skips what is done.

Dedupe: exact duplicates by SHA-256 of the file bytes; near duplicates by a 63-bit DCT perceptual hash (pHash: 32x32
grey, 2-D DCT-II, the 8x8 lowest frequencies without the DC term, each bit = coefficient > their median) whose Hamming
distance is <= threshold. Re-encodes, resizes and small edits land within a few bits; different pictures differ in
about half. Each group keeps its largest image (then largest file, then first path); the others are reported or moved.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from lorakit.errors import UserError
from lorakit.tools.tag_edit import IMAGE_KINDS, dataset_root, find_images, nothing_found
from lorakit.utils.atomic import atomic_path, write_text_atomic
from lorakit.utils.images import ImageReadError, image_size, is_image_file, open_image, split_alpha

MANIFEST = ".lorakit-resize.json"
NOT_COPIED = (".npz",)  # latent caches: stale once the image changes


def bounded_map(fn: Callable, items: Iterable, workers: int, window: int | None = None) -> Iterator:
    """map(fn, items) in order on `workers` processes (in-process when workers <= 1), with at most `window` results
    in flight so memory stays bounded however many images there are."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = window or workers * 4
    with ProcessPoolExecutor(max_workers=workers) as ex:
        pending = []
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


class CaptionWriter:
    """Atomic text writes on a few threads: each atomic write fsyncs, which costs milliseconds per file on many disks
    (tens of thousands of captions = minutes); overlapping them hides most of it. close() waits and re-raises."""

    def __init__(self, threads: int = 8):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.pending: list = []

    def submit(self, path: Path, text: str) -> None:
        self.pending.append(self.pool.submit(write_text_atomic, path, text))
        if len(self.pending) >= 256:
            self._drain(128)

    def _drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            self.pending.pop(0).result()

    def close(self) -> None:
        try:
            self._drain(0)
        finally:
            self.pool.shutdown(wait=True)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def associated_files(image: Path) -> list[Path]:
    """Non-image files beside `image` that belong to it: `<stem>.<ext>` and `<image name>.<ext>` (sidecar metadata)."""
    out = []
    for ext_owner in (image.stem, image.name):
        for p in image.parent.glob(glob_escape(ext_owner) + ".*"):
            if p.is_file() and not is_image_file(p) and p.suffix.lower() not in NOT_COPIED and p.stem == ext_owner:
                out.append(p)
    return sorted(set(out))


def glob_escape(s: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in s)


# ---------------------------------------------------------------------------------------------------------- resize


def parse_resolution(spec: str) -> tuple[int, int]:
    from lorakit.options import parse_resolution as parse  # the one resolution parser

    try:
        return parse(spec.lower().replace(" ", ""))
    except ValueError:
        raise UserError(f"--max_resolution {spec!r} is not WIDTHxHEIGHT (e.g. 1024x1024) or a single side (1024).") \
            from None


def target_size(w: int, h: int, max_area: int, step: int | None = None) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """None when w*h <= max_area (never enlarge); else ((scaled w, h), (final w, h after the crop to multiples of step))."""
    if w * h <= max_area:
        return None
    # floor(w * sqrt(A / (w h))) = floor(sqrt(w A / h)), in integers: no float rounding at exact boundaries (300x300 ->
    # 100x100 for 100x100, not 99x99), and the area stays <= A.
    nw = max(1, math.isqrt(w * max_area // h))
    nh = max(1, math.isqrt(h * max_area // w))
    if step and step > 1:
        return (nw, nh), (nw // step * step or nw, nh // step * step or nh)  # a side below one step stays as is
    return (nw, nh), (nw, nh)


def _save(img: Image.Image, dst: Path, fmt: str, src_info: dict, jpeg_quality: int) -> None:
    kw: dict = {}
    if src_info.get("icc_profile"):
        kw["icc_profile"] = src_info["icc_profile"]
    if fmt == "JPEG":
        kw.update(quality=jpeg_quality, subsampling=0)
        if img.mode not in ("RGB", "L", "CMYK"):
            img = img.convert("RGB")
    elif fmt == "WEBP":
        kw.update(quality=jpeg_quality, method=4)
    elif fmt == "AVIF":
        kw.update(quality=jpeg_quality)
    with atomic_path(dst) as tmp:
        img.save(tmp, format=fmt, **kw)


def resize_image(img: Image.Image, scaled: tuple[int, int], final: tuple[int, int]) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    # Pillow resamples RGBA/LA premultiplied, so transparent pixels' colour does not bleed into the edges.
    img = img.resize(scaled, Image.LANCZOS, reducing_gap=3.0)
    if final != scaled:
        left, top = (scaled[0] - final[0]) // 2, (scaled[1] - final[1]) // 2
        img = img.crop((left, top, left + final[0], top + final[1]))
    return img


def _resize_one(job: tuple) -> tuple[str, str, str]:
    """-> (relative path, status, detail); status: resized | copied | kept | failed."""
    src, dst, rel, max_area, step, jpeg_quality = job
    src, dst = Path(src), Path(dst)
    try:
        w, h = image_size(src)
        sizes = target_size(w, h, max_area, step)
        if sizes is None:
            if src != dst:
                dst.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(dst) as tmp:
                    shutil.copy2(src, tmp)
                return rel, "copied", f"{w}x{h}"
            return rel, "kept", f"{w}x{h}"
        img = open_image(src)
        fmt = Image.registered_extensions().get(src.suffix.lower())
        if not fmt or fmt not in Image.SAVE:
            return rel, "failed", f"{src}: Pillow cannot write {src.suffix} files"
        info = dict(img.info)
        # Recompute from the decoded size (EXIF rotation already applied; equals image_size's answer).
        sizes = target_size(img.width, img.height, max_area, step) or sizes
        out = resize_image(img, *sizes)
        _save(out, dst, fmt, info, jpeg_quality)
        return rel, "resized", f"{img.width}x{img.height} -> {out.width}x{out.height}"
    except ImageReadError as exc:
        return rel, "failed", str(exc)
    except OSError as exc:
        return rel, "failed", f"{src}: {exc}"


@dataclass
class ResizeReport:
    images: int = 0
    resized: int = 0
    copied: int = 0
    kept: int = 0
    skipped: int = 0  # done on an earlier run (into --out)
    failed: list[str] = field(default_factory=list)
    captions_copied: int = 0


def resize_folder(
    root: str | os.PathLike,
    max_resolution: str | tuple[int, int] = (1024, 1024),
    *,
    out: str | os.PathLike | None = None,
    step: int | None = None,
    workers: int | None = None,
    recursive: bool = False,
    jpeg_quality: int = 95,
    progress: bool = True,
) -> ResizeReport:
    """Downscale every image under root whose area exceeds max_resolution's, in place or into `out`."""
    from tqdm import tqdm

    source, root = root, dataset_root(root)
    tw, th = parse_resolution(max_resolution) if isinstance(max_resolution, str) else max_resolution
    max_area = tw * th
    if step is not None and step < 1:
        raise UserError(f"--bucket_reso_steps {step} must be a positive number of pixels (e.g. 64).")
    dest = Path(out) if out else root
    if out and dest.resolve() == root.resolve():
        dest = root
    # An --out inside the dataset would be read back as input by --recursive or, named `N_x`, as a DreamBooth
    # subfolder (unless hidden: those are never scanned).
    if dest != root and root.resolve() in dest.resolve().parents:
        parts = dest.resolve().relative_to(root.resolve()).parts
        if not any(part.startswith(".") for part in parts) and (recursive or re.match(r"-?\d+_", parts[0])):
            raise UserError(f"--out {dest} is inside {root}; the output would be read as input next time. "
                            "Pick a folder outside the dataset.")
    images = find_images(source, recursive)
    if not images:
        raise nothing_found(source, recursive, IMAGE_KINDS)
    report = ResizeReport(images=len(images))
    settings = f"{max_area}:{step or 0}:{jpeg_quality}"
    manifest_path = dest / MANIFEST
    manifest: dict = {}
    if dest != root and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = {}

    jobs, stamps = [], {}
    for img in images:
        rel = img.relative_to(root).as_posix()
        st = img.stat()
        stamp = [st.st_size, st.st_mtime_ns, settings]
        stamps[rel] = stamp
        if dest != root and manifest.get(rel) == stamp and (dest / rel).is_file():
            report.skipped += 1
            continue
        jobs.append((str(img), str(dest / rel), rel, max_area, step, jpeg_quality))

    workers = workers or default_workers()
    bar = tqdm(total=len(jobs), unit="img", desc="resizing", disable=not progress, smoothing=0.0)
    try:
        for rel, status, detail in bounded_map(_resize_one, jobs, min(workers, max(1, len(jobs))), window=workers * 8):
            bar.update(1)
            if status == "failed":
                report.failed.append(detail)
                continue
            setattr(report, status, getattr(report, status) + 1)
            if dest != root:
                manifest[rel] = stamps[rel]
    finally:
        bar.close()
        if dest != root:
            dest.mkdir(parents=True, exist_ok=True)
            write_text_atomic(manifest_path, json.dumps(manifest, indent=0, sort_keys=True))

    if dest != root:  # captions and sidecars: copied when missing or changed
        for img in images:
            for f in associated_files(img):
                target = dest / f.relative_to(root)
                st = f.stat()
                if target.is_file():
                    tst = target.stat()
                    if tst.st_size == st.st_size and tst.st_mtime_ns == st.st_mtime_ns:
                        continue
                with atomic_path(target) as tmp:
                    shutil.copy2(f, tmp)
                report.captions_copied += 1
    return report


# ---------------------------------------------------------------------------------------------------------- dedupe


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)


def phash_array(grey32: np.ndarray) -> int:
    """63-bit perceptual hash of a 32x32 grey array: sign of the 8x8 low-frequency DCT terms (DC left out) against
    their median, first row first."""
    d = _DCT32 @ np.asarray(grey32, dtype=np.float64) @ _DCT32.T
    low = d[:8, :8].reshape(-1)[1:]
    bits = low > np.median(low)
    v = 0
    for b in bits:
        v = (v << 1) | int(b)
    return v


def phash_image(img: Image.Image) -> int:
    rgb, _ = split_alpha(img)
    grey = rgb.convert("L").resize((32, 32), Image.BOX)
    return phash_array(np.asarray(grey, dtype=np.float64))


def _hash_one(path: str) -> tuple[str, str | None, int | None, tuple[int, int] | None, int, str | None]:
    """-> (path, sha256, phash, (w, h), bytes, error)"""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return path, None, None, None, 0, f"{path}: {exc}"
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (64, 64))  # decode at 1/2..1/8 scale: the hash needs 32x32
            im.load()
            img = ImageOps.exif_transpose(im) or im
            size = image_size(path)
            return path, sha, phash_image(img), size, len(data), None
    except Exception:  # noqa: BLE001 - let the shared reader produce the message that names the file
        try:
            img = open_image(path)
            return path, sha, phash_image(img), img.size, len(data), None
        except ImageReadError as exc:
            return path, sha, None, None, len(data), str(exc)


@dataclass
class Duplicate:
    path: Path
    kind: str  # "exact" or "near"
    distance: int  # Hamming distance of the perceptual hashes to the kept image (0 for exact)
    same_as: Path | None = None  # an exact copy of this other duplicate (not of the kept image)


@dataclass
class DuplicateGroup:
    keep: Path
    duplicates: list[Duplicate]


@dataclass
class DedupeReport:
    images: int = 0
    groups: list[DuplicateGroup] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    moved: int = 0

    @property
    def exact(self) -> int:
        return sum(d.kind == "exact" for g in self.groups for d in g.duplicates)

    @property
    def near(self) -> int:
        return sum(d.kind == "near" for g in self.groups for d in g.duplicates)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def near_pairs(hashes: np.ndarray, threshold: int, block: int = 128) -> list[tuple[int, int]]:
    """All index pairs i < j with popcount(h[i] ^ h[j]) <= threshold (vectorised all-pairs, in row blocks)."""
    h = np.asarray(hashes, dtype=np.uint64)
    pairs = []
    for s in range(0, len(h), block):
        d = np.bitwise_count(h[s : s + block, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= threshold)
        ii = ii + s
        keep = ii < jj
        pairs.extend(zip(ii[keep].tolist(), jj[keep].tolist()))
    return pairs


def find_duplicates(
    paths: list[Path], threshold: int = 4, workers: int | None = None, progress: bool = True
) -> DedupeReport:
    from tqdm import tqdm

    report = DedupeReport(images=len(paths))
    workers = workers or default_workers()
    rows = []
    for path, sha, ph, size, nbytes, err in tqdm(
        bounded_map(_hash_one, [str(p) for p in paths], min(workers, max(1, len(paths))), window=workers * 8),
        total=len(paths), unit="img", desc="hashing", disable=not progress, smoothing=0.0,
    ):
        if err:
            report.failed.append(err)
        else:
            rows.append((Path(path), sha, ph, size, nbytes))
    n = len(rows)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    by_sha: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r[1] in by_sha:
            union(by_sha[r[1]], i)
        else:
            by_sha[r[1]] = i
    if threshold >= 0 and n > 1:
        reps = sorted(by_sha.values())
        for a, b in near_pairs(np.array([rows[i][2] for i in reps], dtype=np.uint64), threshold):
            union(reps[a], reps[b])

    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        # Keep the largest picture, then the largest file, then the first path.
        members.sort(key=lambda i: (-(rows[i][3][0] * rows[i][3][1]), -rows[i][4], str(rows[i][0])))
        k = members[0]
        dups, first_with = [], {rows[k][1]: k}  # sha -> first member with it: a byte copy is exact, never "near"
        for i in members[1:]:
            twin = first_with.setdefault(rows[i][1], i)
            kind = "exact" if twin != i else "near"
            dups.append(Duplicate(rows[i][0], kind, hamming(rows[i][2], rows[k][2]),
                                  rows[twin][0] if twin not in (i, k) else None))
        report.groups.append(DuplicateGroup(rows[k][0], dups))
    report.groups.sort(key=lambda g: str(g.keep))
    return report


def dedupe_folder(
    root: str | os.PathLike,
    *,
    threshold: int = 4,
    move_to: str | os.PathLike | None = None,
    recursive: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> DedupeReport:
    """Find duplicates under root; with move_to, move each duplicate (and its caption/sidecar files) there, keeping
    its path relative to root."""
    source, root = root, dataset_root(root)
    if threshold > 32:
        raise UserError(f"--threshold {threshold} is too loose: unrelated images differ in about 32 of the 63 bits. "
                        "Use 0-10 (default 4).")
    images = find_images(source, recursive)
    if not images:
        raise nothing_found(source, recursive, IMAGE_KINDS)
    report = find_duplicates(images, threshold, workers, progress)
    if move_to:
        dest_root = Path(move_to)
        moving = {d.path for g in report.groups for d in g.duplicates}
        for g in report.groups:
            for d in g.duplicates:
                for f in [d.path, *associated_files(d.path)]:
                    target = _free_name(dest_root / f.relative_to(root))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # A caption shared with an image that stays (a.png kept, a.jpg moved: both use a.txt) is copied.
                    shared = f != d.path and any(
                        p not in moving and is_image_file(p) and f.stem in (p.stem, p.name)
                        for p in f.parent.iterdir()
                    )
                    if shared:
                        shutil.copy2(f, target)
                    else:
                        shutil.move(str(f), str(target))
                report.moved += 1
    return report


def _free_name(p: Path) -> Path:
    if not p.exists():
        return p
    i = 1
    while True:
        q = p.with_name(f"{p.stem}.dup{i}{p.suffix}")
        if not q.exists():
            return q
        i += 1
