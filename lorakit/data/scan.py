"""Finding images and their sizes fast.

Sizes come from image headers read by a thread pool and are remembered in a scan cache (JSON, keyed by path with
mtime and byte size), so a second start on thousands of images only stats the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from PIL import Image

from lorakit.utils.atomic import write_text_atomic
from lorakit.utils.cache import cache_root
from lorakit.utils.images import IMAGE_EXTENSIONS, ImageReadError, image_error

logger = logging.getLogger(__name__)

SCAN_CACHE_VERSION = 1


def _png_walk(path: Path) -> int:
    """Walk a PNG's chunk headers (no pixel decoding): the eXIf orientation, and an error if the file ends before
    IEND (a truncated download or copy)."""
    orientation = 1
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        pos = 8
        while True:
            fh.seek(pos)
            head = fh.read(8)
            if len(head) < 8:
                raise ImageReadError(f"image {path} is truncated (the PNG ends before its IEND chunk); re-export or "
                                     "delete it, or run with --on_bad_image skip to leave it out.")
            length = int.from_bytes(head[:4], "big")
            ctype = head[4:]
            if ctype == b"eXIf":
                exif = Image.Exif()
                exif.load(fh.read(length))
                orientation = exif.get(0x0112, 1)
            if ctype == b"IEND":
                return orientation
            pos += 12 + length
            if pos > size:
                raise ImageReadError(f"image {path} is truncated (chunk {ctype.decode('latin-1')!r} runs past the end "
                                     "of the file); re-export or delete it, or run with --on_bad_image skip.")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation from the header only; PNGs are also checked for truncation.

    lorakit.utils.images.image_size calls getexif(), which for PNG decodes the whole image (Pillow loads the file to
    look for an eXIf chunk after the pixels); this reader walks the chunk headers instead."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
            orientation = 1 if fmt == "PNG" else im.getexif().get(0x0112, 1)
        if fmt == "PNG":
            orientation = _png_walk(path)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - DecompressionBombError and decoder errors of every type
        raise image_error(path, exc) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Images directly in `folder` (not sub-folders), sorted by name, extensions matched case-insensitively."""
    folder = Path(folder)
    names = []
    with os.scandir(folder) as it:
        for e in it:
            if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                names.append(e.name)
    names.sort()
    return [folder / n for n in names]


def repeat_folder_problem(folder: str | os.PathLike) -> tuple[str, str] | None:
    """What is wrong with a DreamBooth folder name `N_class tokens`: ("skip", message) for a name without a leading
    repeat count (sd-scripts skips such folders, e.g. a `samples` folder), ("error", message) for a count below 1
    (`0_x`, `-3_x`: the user meant to train on it), None for a good name."""
    folder = Path(folder)
    head, _, rest = folder.name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return "skip", (f"folder {folder} is skipped: its name has no leading repeat count. Rename it "
                        f"`10_{folder.name}` (N_class tokens) to train on it.")
    if repeats >= 1:
        return None
    fixed = f"{max(1, -repeats)}_{rest}" if rest else f"{max(1, -repeats)}_class tokens"
    return "error", (f"folder {folder} has repeat count {repeats} (the number before the first '_'): every image "
                     f"must be shown at least once per epoch. Rename it `{fixed}` to train on it, or move it out of "
                     "the dataset folder to leave it out.")


def default_scan_cache_dir() -> Path:
    return cache_root() / "scan"


class ScanCache:
    """path -> [mtime_ns, bytes, width, height, sha1 or None]; one JSON file per image folder.

    `cache_dir` None: the default (~/.cache/lorakit/scan or $LORAKIT_CACHE_DIR/scan); False: no cache."""

    def __init__(self, cache_dir: str | os.PathLike | None | bool = None):
        self.dir = None if cache_dir is False else Path(cache_dir) if cache_dir else default_scan_cache_dir()
        self._data: dict[str, dict] = {}  # folder -> {name: entry}
        self._dirty: set[str] = set()

    def _file(self, folder: str) -> Path:
        h = hashlib.sha1(os.path.abspath(folder).encode("utf-8")).hexdigest()[:16]
        return self.dir / f"{Path(folder).name[:40]}-{h}.json"

    def _folder(self, folder: str) -> dict:
        if folder not in self._data:
            entries = {}
            if self.dir is not None:
                try:
                    raw = json.loads(self._file(folder).read_text(encoding="utf-8"))
                    if raw.get("version") == SCAN_CACHE_VERSION and raw.get("folder") == os.path.abspath(folder):
                        entries = raw.get("entries", {})
                except (OSError, ValueError):
                    pass
            self._data[folder] = entries
        return self._data[folder]

    def get(self, path: Path, st: os.stat_result) -> dict | None:
        e = self._folder(str(path.parent)).get(path.name)
        if e and e[0] == st.st_mtime_ns and e[1] == st.st_size:
            return e
        return None

    def put(self, path: Path, st: os.stat_result, size: tuple[int, int], sha1: str | None = None) -> None:
        folder = str(path.parent)
        old = self._folder(folder).get(path.name)
        if sha1 is None and old and old[0] == st.st_mtime_ns and old[1] == st.st_size:
            sha1 = old[4]
        self._folder(folder)[path.name] = [st.st_mtime_ns, st.st_size, size[0], size[1], sha1]
        self._dirty.add(folder)

    def save(self) -> None:
        if self.dir is None:
            return
        for folder in sorted(self._dirty):
            try:
                payload = {"version": SCAN_CACHE_VERSION, "folder": os.path.abspath(folder), "entries": self._data[folder]}
                write_text_atomic(self._file(folder), json.dumps(payload, separators=(",", ":")))
            except OSError as exc:  # a read-only cache dir only costs speed
                logger.warning("scan cache not saved (%s): %s", self._file(folder), exc)
        self._dirty.clear()


def _stat_and_size(path: Path, cache: ScanCache | None):
    """(stat, size, error, from_cache)"""
    try:
        st = path.stat()
    except OSError as exc:
        return None, None, f"image {path} cannot be read ({exc}).", False
    if st.st_size == 0:
        return st, None, f"image {path} is empty (0 bytes); delete or replace it.", False
    if cache is not None:
        hit = cache.get(path, st)
        if hit is not None:
            return st, (hit[2], hit[3]), None, True
    try:
        return st, image_size(path), None, False
    except ImageReadError as exc:
        return st, None, str(exc), False


def _cache_hit(path: Path, cache: ScanCache):
    try:
        st = path.stat()
    except OSError:
        return None
    hit = cache.get(path, st) if st.st_size else None
    return (st, (hit[2], hit[3]), None, True) if hit else None


def scan_sizes(paths: Iterable[Path], cache: ScanCache | None = None, workers: int | None = None):
    """{path: (w, h)} and {path: error message} for many images, reading headers in parallel; updates `cache`."""
    paths = list(paths)
    workers = workers or default_workers()
    sizes: dict[Path, tuple[int, int]] = {}
    errors: dict[Path, str] = {}
    if cache is not None:  # load each folder's cache once, before the threads read it
        for folder in {str(p.parent) for p in paths}:
            cache._folder(folder)
    # cache hits need only a stat; header reads for the rest go to threads (I/O bound, PIL releases the GIL)
    results = [_cache_hit(p, cache) if cache is not None and cache.dir is not None else None for p in paths]
    miss = [p for p, r in zip(paths, results) if r is None]
    if workers > 1 and len(miss) > 32:
        with ThreadPoolExecutor(max_workers=min(32, workers * 4)) as ex:
            done = iter(list(ex.map(lambda p: _stat_and_size(p, None), miss, chunksize=64)))
    else:
        done = iter([_stat_and_size(p, None) for p in miss])
    results = [r if r is not None else next(done) for r in results]
    for p, (st, size, err, hit) in zip(paths, results):
        if err is not None:
            errors[p] = err
            continue
        sizes[p] = size
        if cache is not None and not hit:
            cache.put(p, st, size)
    return sizes, errors


def file_sha1(path: str | os.PathLike, cache: ScanCache | None = None) -> str:
    """SHA-1 of the file bytes (for duplicate detection), cached beside the size."""
    path = Path(path)
    st = path.stat()
    if cache is not None:
        hit = cache.get(path, st)
        if hit is not None and hit[4]:
            return hit[4]
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if cache is not None:
        hit = cache.get(path, st)
        if hit is not None:
            cache.put(path, st, (hit[2], hit[3]), digest)
    return digest
