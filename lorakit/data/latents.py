"""Latent and text-encoder output caches.

Latents: in memory or beside each image as sd-scripts' `<stem>_<W:04d>x<H:04d>_<sd|sdxl>.npz` (W x H = original image
size; keys latents [4,h,w], original_size, crop_ltrb, latents_flipped, alpha_mask), so sd-scripts and lorakit can
share caches. lorakit adds a `lorakit_meta` key (image mtime/bytes, bucket, flip/alpha, VAE id) and rebuilds a file
when any of those changed; a file written by sd-scripts is reused when its shapes fit and it is newer than the image.

Text encoder outputs: keyed by the caption text, in memory and optionally on disk (safetensors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from lorakit.data.augment import load_image_arrays, resize_and_crop, to_tensor
from lorakit.data.captions import captions_are_static, process_caption
from lorakit.data.scan import default_workers
from lorakit.errors import UserError
from lorakit.utils.atomic import atomic_path, save_safetensors_atomic
from lorakit.utils.images import ImageReadError

logger = logging.getLogger(__name__)


def latents_npz_path(image_path: str | os.PathLike, image_size: tuple[int, int], suffix: str = "sd") -> Path:
    """sd-scripts' cache file name: `<stem>_<W:04d>x<H:04d>_<suffix>.npz` beside the image."""
    suffix = suffix.lstrip("_")
    if suffix.endswith(".npz"):
        suffix = suffix[:-4]
    stem = os.path.splitext(str(image_path))[0]
    return Path(f"{stem}_{image_size[0]:04d}x{image_size[1]:04d}_{suffix}.npz")


def latent_cache_refusal(group) -> str | None:
    """Why latents cannot be cached for this group (augmentation that changes pixels every step), or None."""
    for ds in group.datasets:
        for s in ds.config.subsets:
            for opt in ("color_aug", "random_crop"):
                if getattr(s, opt):
                    return (f"latents cannot be cached with {opt} (subset {s.image_dir or s.metadata_file}): it changes "
                            f"the pixels every step, so a cache would train on one frozen version. Turn off {opt} or "
                            "--cache_latents / --cache_latents_to_disk.")
    return None


def _meta(entry, flip: bool, alpha: bool, vae_id: str, interpolation: str | None = None) -> dict:
    st = os.stat(entry.path)
    meta = {"image_mtime_ns": st.st_mtime_ns, "image_bytes": st.st_size, "bucket": list(entry.bucket.reso),
            "resized": list(entry.bucket.resized_size), "flip": bool(flip), "alpha": bool(alpha), "vae": vae_id}
    # added only when used, so caches written before these settings existed stay valid
    if getattr(entry, "mask_path", None) is not None:
        mst = os.stat(entry.mask_path)
        meta["mask"] = [str(entry.mask_path), mst.st_mtime_ns, mst.st_size]
    if interpolation is not None:
        meta["interpolation"] = interpolation
    return meta


def has_mask(entry, subset) -> bool:
    """The entry's cache holds a loss mask: its subset uses alpha_mask or it has a conditioning_data_dir mask."""
    return bool(subset.alpha_mask or getattr(entry, "mask_path", None) is not None)


def npz_is_valid(npz_path: Path, entry, flip_aug: bool, alpha_mask: bool, vae_id: str = "",
                 interpolation: str | None = None, latent_factor: int = 8) -> bool:
    """Whether an existing cache file fits this entry and these settings (`alpha_mask`: a mask is cached)."""
    if not npz_path.exists():
        return False
    w, h = entry.bucket.reso
    want = (h // latent_factor, w // latent_factor)
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if not {"latents", "original_size", "crop_ltrb"} <= keys:
                return False
            if tuple(npz["latents"].shape[1:3]) != want:
                return False
            if flip_aug and ("latents_flipped" not in keys or tuple(npz["latents_flipped"].shape[1:3]) != want):
                return False
            if alpha_mask != ("alpha_mask" in keys):
                return False
            if alpha_mask and tuple(npz["alpha_mask"].shape) != (h, w):
                return False
            if "lorakit_meta" in keys:
                return json.loads(str(npz["lorakit_meta"])) == _meta(entry, flip_aug, alpha_mask, vae_id,
                                                                       interpolation)
    except (OSError, ValueError, KeyError):
        return False
    # written by sd-scripts: trust it unless the image is newer
    return os.stat(npz_path).st_mtime_ns >= os.stat(entry.path).st_mtime_ns


def load_latents_npz(npz_path: str | os.PathLike):
    """(latents, latents_flipped or None, original_size, crop_ltrb, alpha_mask or None) from a cache file."""
    with np.load(npz_path, allow_pickle=False) as npz:
        return (npz["latents"], npz["latents_flipped"] if "latents_flipped" in npz.files else None,
                tuple(npz["original_size"].tolist()), tuple(npz["crop_ltrb"].tolist()),
                npz["alpha_mask"] if "alpha_mask" in npz.files else None)


def save_latents_npz(npz_path: Path, latents, original_size, crop_ltrb, latents_flipped=None, alpha_mask=None,
                     meta: dict | None = None) -> None:
    kw = {"latents": np.asarray(latents, dtype=np.float32), "original_size": np.array(original_size),
          "crop_ltrb": np.array(crop_ltrb)}
    if latents_flipped is not None:
        kw["latents_flipped"] = np.asarray(latents_flipped, dtype=np.float32)
    if alpha_mask is not None:
        kw["alpha_mask"] = np.asarray(alpha_mask, dtype=np.float32)
    if meta is not None:
        kw["lorakit_meta"] = np.array(json.dumps(meta, sort_keys=True))
    with atomic_path(npz_path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, **kw)


def _prepare(entry, subset, reso):
    rgb, alpha = load_image_arrays(entry.path, subset.alpha_mask, entry.mask_path)
    rgb, alpha, original_size, crop_ltrb = resize_and_crop(rgb, alpha, entry.bucket.resized_size, reso, False, None,
                                                           subset.resize_interpolation)
    mask = None if alpha is None else np.asarray(alpha, dtype=np.float32) / 255.0
    # an array, not a tensor: the caller makes the tensor in its own thread (why: DatasetGroup.iter_batches)
    return np.asarray(rgb, dtype=np.uint8), mask, original_size, crop_ltrb


def cache_latents(group, encode: Callable, suffix: str = "sd", to_disk: bool = False, batch_size: int = 4,
                  num_workers: int | None = None, vae_id: str = "", progress: Callable[[int, int], None] | None = None,
                  device=None, dtype=None, skip_check: bool = False, latent_factor: int = 8) -> dict:
    """Encode every image of `group` once (decode/resize in a thread pool, VAE in batches per bucket).

    encode(pixels [B,3,H,W] in [-1,1]) -> latents [B,4,H/f,W/f] (f = `latent_factor`), already scaled. `suffix`: "sd" or "sdxl".
    `skip_check` (--skip_cache_check): an existing cache file is used as it is, without opening it to check that it
    fits (faster start with many files; a stale file then trains on stale latents).
    Returns counts {"encoded", "reused", "skipped"}. Raises UserError when augmentation makes caching wrong."""
    import torch

    reason = latent_cache_refusal(group)
    if reason:
        raise UserError(reason)
    todo: dict[tuple, list] = {}
    reused = 0
    done_disk: dict[Path, tuple] = {}
    for ds in group.datasets:
        for e in ds.entries:
            subset = ds.config.subsets[e.subset_index]
            masked = has_mask(e, subset)
            if to_disk:
                p = latents_npz_path(e.path, e.image_size, suffix)
                if p in done_disk and done_disk[p] != e.bucket.reso:
                    # same image, other resolution: one sd-scripts file name cannot hold both; keep it in memory
                    todo.setdefault((e.bucket.reso, subset.flip_aug, masked, False), []).append((ds, e))
                    continue
                done_disk[p] = e.bucket.reso
                if (skip_check and p.exists()) or npz_is_valid(p, e, subset.flip_aug, masked, vae_id,
                                                                 subset.resize_interpolation, latent_factor):
                    e.npz_path = p
                    reused += 1
                    continue
            todo.setdefault((e.bucket.reso, subset.flip_aug, masked, to_disk), []).append((ds, e))
    chunks = []
    for (reso, flip, alpha, disk), items in todo.items():
        for s in range(0, len(items), batch_size):
            chunks.append((reso, flip, alpha, disk, items[s:s + batch_size]))
    total = sum(len(c[4]) for c in chunks)
    stats = {"encoded": 0, "reused": reused, "skipped": 0}
    workers = num_workers or default_workers()
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as ex, torch.no_grad():
        queue: deque = deque()
        it = iter(chunks)

        def submit():
            c = next(it, None)
            if c is not None:
                reso = c[0]
                queue.append((c, [ex.submit(_prepare, e, ds.config.subsets[e.subset_index], reso) for ds, e in c[4]]))

        for _ in range(2):  # decode the next chunk while this one is encoded
            submit()
        while queue:
            (reso, flip, alpha, disk, items), futs = queue.popleft()
            submit()
            good, prepared = [], []
            for (ds, e), f in zip(items, futs):
                try:
                    prepared.append(f.result())
                    good.append((ds, e))
                except (ImageReadError, OSError) as exc:
                    msg = str(exc) if isinstance(exc, UserError) else f"image {e.path} cannot be read ({exc})."
                    if group.on_bad_image == "error":
                        raise UserError(msg) from None
                    if str(e.path) not in group.skipped:
                        logger.warning("warning: --on_bad_image skip: leaving out %s", msg)
                    group.skipped[str(e.path)] = msg
                    stats["skipped"] += 1
            done += len(items)
            if good:
                pixels = torch.stack([to_tensor(p[0]) for p in prepared])
                if device is not None or dtype is not None:
                    pixels = pixels.to(device=device, dtype=dtype)
                lat = encode(pixels).float().cpu()
                lat_f = encode(torch.flip(pixels, dims=[3])).float().cpu() if flip else None
                for i, ((ds, e), (_, mask, osize, crop)) in enumerate(zip(good, prepared)):
                    if disk:
                        p = latents_npz_path(e.path, e.image_size, suffix)
                        save_latents_npz(p, lat[i].numpy(), osize, crop, None if lat_f is None else lat_f[i].numpy(),
                                         mask, _meta(e, flip, alpha, vae_id,
                                                     ds.config.subsets[e.subset_index].resize_interpolation))
                        e.npz_path = p
                    else:
                        e.latents = lat[i].clone()
                        e.latents_flipped = None if lat_f is None else lat_f[i].clone()
                        e.alpha_mask = None if mask is None else torch.from_numpy(mask)
                        e.latents_original_size, e.latents_crop_ltrb = osize, crop
                stats["encoded"] += len(good)
            if progress:
                progress(done, total)
    group.latent_mode = "disk" if to_disk else "memory"
    return stats


# ---------------------------------------------------------------------------------------------- text encoder outputs
def static_caption(entry, subset) -> str:
    """The caption an entry always gets when its subset's captions are static (no shuffle/dropout/wildcards)."""
    return process_caption(entry.caption, subset, np.random.default_rng(0))


def text_encoder_cache_refusal(group) -> str | None:
    for ds in group.datasets:
        for s in ds.config.subsets:
            why = captions_are_static(s)
            if why:
                return (f"text encoder outputs cannot be cached: subset {s.image_dir or s.metadata_file} changes "
                        f"captions every step ({why}). Turn those off or do not cache text encoder outputs.")
    return None


def group_static_captions(group) -> list[str]:
    """Every distinct caption the group will feed the text encoder; raises UserError if captions vary per step."""
    reason = text_encoder_cache_refusal(group)
    if reason:
        raise UserError(reason)
    caps = {static_caption(e, ds.config.subsets[e.subset_index]) for ds in group.datasets for e in ds.entries}
    return sorted(caps)


class BytesLRU:
    """A dict that keeps its entries least recently used first and, past `max_bytes` (None: no limit), lets the
    oldest go; both of a run's memos (VAE posteriors, frozen text-encoder outputs) keep to a budget with it."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: "OrderedDict[Any, tuple[Any, int]]" = OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        """The value (now the most recently used), or None."""
        found = self._items.get(key)
        if found is None:
            return None
        self._items.move_to_end(key)
        return found[0]

    def put(self, key, value, size: int, trim: bool = True) -> bool:
        """Keep `value` as the most recent entry; False (not kept) when it alone is over the budget. `trim=False`
        defers the eviction to `trim()` (a batch being gathered must not lose its first entries)."""
        if self.max_bytes is not None and size > self.max_bytes:
            return False
        old = self._items.pop(key, None)
        self.bytes += size - (old[1] if old else 0)
        self._items[key] = (value, size)
        if trim:
            self.trim()
        return True

    def trim(self, keep_newest: int = 0) -> None:
        """Drop the oldest entries until within budget, never the `keep_newest` most recent ones."""
        while self.max_bytes is not None and self.bytes > self.max_bytes and len(self._items) > keep_newest:
            self.bytes -= self._items.popitem(last=False)[1][1]


class TextEncoderCache:
    """Text-encoder outputs keyed by caption text.

    encode(list of captions) -> a Tensor, a tuple/list of Tensors, or a dict of Tensors, each with batch dim first.
    get(captions) returns the same structure stacked for those captions. `key_prefix` should name the encoder setup
    (model, clip_skip, max_token_length) so a change does not reuse stale outputs on disk."""

    def __init__(self, encode: Callable[[list[str]], Any], cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 16, key_prefix: str = "", max_bytes: int | None = None):
        self.encode = encode
        self.dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.prefix = key_prefix
        # max_bytes: a memo of a frozen text encoder (see stages.prepare_inputs) - least recently used entries go
        self.mem = BytesLRU(max_bytes)
        self.hits = self.misses = 0

    @property
    def bytes(self) -> int:
        return self.mem.bytes

    def key(self, caption: str) -> str:
        return hashlib.sha256((self.prefix + "\x00" + caption).encode("utf-8")).hexdigest()

    def _file(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    @staticmethod
    def _split(out, n: int) -> list[tuple[str, dict]]:
        import torch

        if isinstance(out, torch.Tensor):
            kind, d = "tensor", {"0": out}
        elif isinstance(out, dict):
            kind, d = "dict", dict(out)
        else:
            kind, d = "tuple", {str(i): t for i, t in enumerate(out)}
        return [(kind, {k: v[i].detach().cpu().contiguous() for k, v in d.items()}) for i in range(n)]

    @staticmethod
    def _join(items: list[tuple[str, dict]]):
        import torch

        kind = items[0][0]
        names = list(items[0][1].keys())
        stacked = {k: torch.stack([d[k] for _, d in items]) for k in names}
        if kind == "tensor":
            return stacked["0"]
        if kind == "dict":
            return stacked
        return tuple(stacked[str(i)] for i in range(len(names)))

    def _load_disk(self, key: str):
        if self.dir is None:
            return None
        f = self._file(key)
        if not f.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(f), "pt") as fh:
                kind = (fh.metadata() or {}).get("kind", "tensor")
                return kind, {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception:  # a damaged file is recomputed
            return None

    def precompute(self, captions: Iterable[str], progress: Callable[[int, int], None] | None = None) -> int:
        """Encode every caption not cached yet; returns how many were encoded."""
        import torch

        missing = []
        for c in dict.fromkeys(captions):
            k = self.key(c)
            if k in self.mem:
                continue
            hit = self._load_disk(k)
            if hit is not None:
                self.mem.put(k, hit, _item_bytes(hit), trim=False)
            else:
                missing.append(c)
        for s in range(0, len(missing), self.batch_size):
            chunk = missing[s:s + self.batch_size]
            with torch.no_grad():
                out = self.encode(chunk)
            for c, item in zip(chunk, self._split(out, len(chunk))):
                k = self.key(c)
                self.mem.put(k, item, _item_bytes(item), trim=False)
                if self.dir is not None:
                    save_safetensors_atomic(item[1], self._file(k), metadata={"kind": item[0], "caption": c[:1000]})
            if progress:
                progress(min(s + self.batch_size, len(missing)), len(missing))
        return len(missing)

    def get(self, captions: list[str]):
        missing = self.precompute(captions)
        self.misses += missing
        self.hits += len(captions) - missing
        items = [self.mem.get(self.key(c)) for c in captions]  # each now the most recently used
        self.mem.trim(keep_newest=len(captions))
        return self._join(items)


def _item_bytes(item: tuple[str, dict]) -> int:
    return sum(t.numel() * t.element_size() for t in item[1].values())


class PosteriorMemo:
    """The VAE posterior (mean, std) of each image the run has encoded, keyed by the exact pixels.

    Why: without --cache_latents every step runs the VAE encoder (at 256 px on a CPU about a third of an SD1.5 LoRA
    step), yet the encoder is deterministic - only the draw from N(mean, std) is random. An image that comes back
    (every repeat, every epoch) needs its posterior once; each step still draws a fresh sample, so training sees
    exactly what re-encoding gives (sd-scripts' per-step encode), unlike --cache_latents, which freezes one draw.
    Keyed by the pixels' bytes, an augmented image (colour, crop, flip) is a different key, never a stale hit.
    Least recently used entries go when `max_bytes` is reached."""

    def __init__(self, max_bytes: int):
        self._lru = BytesLRU(int(max_bytes))
        self.hits = self.misses = 0

    @property
    def bytes(self) -> int:
        return self._lru.bytes

    @staticmethod
    def key(pixels) -> bytes:
        arr = pixels.detach().cpu().contiguous().numpy()
        h = hashlib.blake2b(arr.tobytes(), digest_size=20)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        return h.digest()

    def get(self, key: bytes):
        found = self._lru.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: bytes, mean, std) -> None:
        self._lru.put(key, (mean, std), (mean.numel() + std.numel()) * mean.element_size())

    def __len__(self) -> int:
        return len(self._lru)


def memo_budget_bytes(total_ram: int | None = None) -> int:
    """The budget of each of a run's memos (VAE posteriors, frozen text-encoder outputs): 5% of the machine's
    memory, at most 1 GiB (8,000 posteriors of 512 px images; 4,500 SD1 captions)."""
    if total_ram is None:
        try:
            total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total_ram = 8 << 30
    return min(1 << 30, total_ram // 20)
