"""Datasets: images + captions + repeats -> buckets -> batches, reproducible per (seed, epoch, batch index).

    configs = build_dataset_configs(args)                      # lorakit.data.config
    group = DatasetGroup.build(configs, seed=42, on_bad_image="skip")
    print(group.summary_text())
    for k, batch in group.iter_batches(epoch=1, start_batch=0):
        ...

Epochs count from 1 (as sd-scripts' current_epoch during training). The batches of epoch e are a pure function of
(seed, e): a resumed run calls iter_batches(e, start_batch=k) and gets exactly the batches k, k+1, ... of the
uninterrupted run, including caption shuffles, flips and crops.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lorakit.data import rng as R
from lorakit.data.augment import (color_aug, face_crop, load_image_arrays, parse_face_info, resize_and_crop,
                                  to_tensor)
from lorakit.data.buckets import BucketAssigner, BucketChoice, crop_top_left
from lorakit.data.captions import CaptionError, find_caption, process_caption
from lorakit.data.config import DatasetConfig, SubsetConfig
from lorakit.data.scan import ScanCache, default_workers, list_images, scan_sizes
from lorakit.errors import UserError
from lorakit.utils.images import IMAGE_EXTENSIONS, ImageReadError

logger = logging.getLogger(__name__)

ON_BAD_IMAGE = ("skip", "error")


@dataclass
class Problem:
    """Something wrong with the input, always naming the file or folder."""

    kind: str  # "image" | "caption" | "folder" | "metadata" | "repeats"
    path: str
    message: str


@dataclass
class ImageEntry:
    index: int  # position in its dataset's entry list
    path: Path
    caption: str  # raw caption (file, metadata, or class tokens)
    caption_source: str  # "file" | "metadata" | "class_tokens" | "none"
    is_reg: bool
    subset_index: int
    num_repeats: int  # after reg balancing (sd-scripts rewrites reg repeats the same way)
    folder_repeats: int
    image_size: tuple[int, int]
    bucket: BucketChoice
    face: tuple[int, int, int, int] | None = None
    # latent cache (filled by lorakit.data.latents.cache_latents)
    latents: Any = None
    latents_flipped: Any = None
    alpha_mask: Any = None
    latents_original_size: tuple[int, int] | None = None
    latents_crop_ltrb: tuple | None = None
    npz_path: Path | None = None


def balance_reg_repeats(num_train: int, reg_repeats: list[int]) -> list[int]:
    """sd-scripts' reg balancing: register reg images in file order with their folder repeats until their count
    reaches the weighted train count, then add one repeat to each in turn; images never reached get 0."""
    final = [0] * len(reg_repeats)
    if not reg_repeats or num_train <= 0:
        return final
    n, first = 0, True
    while n < num_train:
        for i, r in enumerate(reg_repeats):
            if first:
                final[i] = r
                n += r
            else:
                final[i] += 1
                n += 1
            if n >= num_train:
                break
        first = False
    return final


def _load_metadata(subset: SubsetConfig, problems: list[Problem]) -> list[tuple[Path, str, tuple | None]]:
    """Fine-tuning metadata (.json {key: {caption, tags, image_size}} or .jsonl lines with image_path)."""
    mpath = Path(subset.metadata_file)
    if not mpath.is_file():
        raise UserError(f"metadata file {mpath} does not exist (in_json / metadata_file).")
    try:
        text = mpath.read_text(encoding="utf-8")
        if mpath.suffix.lower() == ".jsonl":
            meta = {}
            for ln, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    d = json.loads(line)
                    if "image_path" not in d:
                        raise UserError(f"metadata file {mpath} line {ln} has no image_path.")
                    meta[d["image_path"]] = d
        else:
            meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"metadata file {mpath} cannot be parsed ({exc}); it must be UTF-8 JSON or JSON lines.") from None
    out = []
    for key, md in meta.items():
        caption = md.get("caption") or ""
        tags = md.get("tags")
        if tags:
            caption = caption + subset.caption_separator + tags if caption else tags
        p = Path(key)
        if not p.is_absolute():
            if subset.image_dir is None:
                raise UserError(f"metadata file {mpath}: image key {key!r} is relative; set image_dir (--train_data_dir).")
            p = Path(subset.image_dir) / key
        if not p.suffix.lower() in IMAGE_EXTENSIONS or not p.exists():
            # old sd-scripts metadata keys have no extension: find the image beside it
            for ext in IMAGE_EXTENSIONS:
                cand = p.with_name(p.name + ext)
                if cand.exists():
                    p = cand
                    break
            else:
                if not p.exists():
                    problems.append(Problem("image", str(p), f"image {p} listed in {mpath} does not exist."))
                    continue
        size = md.get("image_size")
        out.append((p, caption, tuple(size) if size else None))
    return out


class Dataset:
    """One dataset of a config: its subsets, one resolution and batch size, its buckets."""

    def __init__(self, config: DatasetConfig, index: int = 0):
        self.config = config
        self.index = index
        self.entries: list[ImageEntry] = []
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.subset_image_counts: list[int] = []
        self.assigner: BucketAssigner | None = None
        self.num_train_images = 0  # with repeats
        self.num_reg_images = 0  # with folder repeats, before balancing

    # ---- building ----
    def build(self, on_bad_image: str = "error", scan_cache: ScanCache | None = None, workers: int | None = None,
              sizes_known: dict | None = None) -> "Dataset":
        cfg = self.config
        self.assigner = BucketAssigner(cfg.resolution, cfg.enable_bucket, cfg.min_bucket_reso, cfg.max_bucket_reso,
                                       cfg.bucket_reso_steps, cfg.bucket_no_upscale, cfg.bucket_log_aspect, self.notes)
        if cfg.bucket_no_upscale and cfg.enable_bucket:
            self.notes.append("bucket_no_upscale: min_bucket_reso and max_bucket_reso are ignored (buckets follow image sizes).")
        pending: list[tuple[int, Path, str, str, tuple | None]] = []
        for si, subset in enumerate(cfg.subsets):
            count_before = len(pending)
            if subset.num_repeats < 1:
                where = subset.image_dir or subset.metadata_file
                self.problems.append(Problem("repeats", str(where), (
                    f"subset {where} has num_repeats = {subset.num_repeats}: every image must be shown at least "
                    "once per epoch. Set num_repeats = 1 or more, or remove the subset to leave its images out.")))
                self.subset_image_counts.append(0)
                continue
            if subset.is_finetune:
                for p, cap, size in _load_metadata(subset, self.problems):
                    pending.append((si, p, cap, "metadata", size))
            else:
                folder = Path(subset.image_dir)
                if not folder.is_dir():
                    self.problems.append(Problem("folder", str(folder), f"image_dir {folder} is not a folder; it is ignored."))
                    self.subset_image_counts.append(0)
                    continue
                images = list_images(folder)
                if not images:
                    self.problems.append(Problem("folder", str(folder), f"folder {folder} has no images "
                                                 f"({', '.join(IMAGE_EXTENSIONS)}); it is ignored."))
                names = set(os.listdir(folder))
                for p in images:
                    try:
                        cap, _ = find_caption(p, subset.caption_extension, subset.enable_wildcard, names)
                    except CaptionError as exc:
                        self.problems.append(Problem("caption", str(p), str(exc)))
                        continue
                    if cap is not None:
                        pending.append((si, p, cap, "file", None))
                    elif subset.class_tokens:
                        pending.append((si, p, subset.class_tokens, "class_tokens", None))
                    else:
                        pending.append((si, p, "", "none", None))
            self.subset_image_counts.append(len(pending) - count_before)

        need = [p for _, p, _, _, size in pending if size is None and not (sizes_known and p in sizes_known)]
        sizes, errors = scan_sizes(need, scan_cache, workers)
        if sizes_known:
            sizes.update({p: s for p, s in sizes_known.items() if p not in sizes})
        for p, msg in errors.items():
            self.problems.append(Problem("image", str(p), msg))

        repeats = [pr.message for pr in self.problems if pr.kind == "repeats"]
        if on_bad_image == "error" and repeats:
            raise UserError("\n".join(repeats))
        bad_paths = {pr.path for pr in self.problems if pr.kind in ("image", "caption")}
        if on_bad_image == "error" and bad_paths:
            raise UserError(_problems_message([pr for pr in self.problems if pr.kind in ("image", "caption")]))

        train, reg = [], []
        for si, p, cap, src, size in pending:
            if str(p) in bad_paths:
                continue
            size = size or sizes.get(p)
            if size is None:
                continue
            subset = cfg.subsets[si]
            face = parse_face_info(p) if subset.face_crop_aug_range is not None else None
            e = ImageEntry(0, p, cap, src, subset.is_reg, si, subset.num_repeats, subset.num_repeats,
                           tuple(size), self.assigner.select(*size), face)
            (reg if subset.is_reg else train).append(e)
        self.num_train_images = sum(e.num_repeats for e in train)
        self.num_reg_images = sum(e.num_repeats for e in reg)
        if reg:
            final = balance_reg_repeats(self.num_train_images, [e.folder_repeats for e in reg])
            for e, r in zip(reg, final):
                e.num_repeats = r
        self.entries = train + reg
        for i, e in enumerate(self.entries):
            e.index = i
        self._train = [e for e in self.entries if not e.is_reg]
        self._reg = [e for e in self.entries if e.is_reg]
        self.bucket_resos = sorted({e.bucket.reso for e in self.entries})
        if any(s.face_crop_aug_range is not None for s in cfg.subsets) and cfg.enable_bucket:
            self.notes.append("face_crop_aug_range has no effect with enable_bucket (as in sd-scripts).")
        return self

    # ---- epochs ----
    def epoch_samples(self, epoch: int, seed: int) -> list[int]:
        """Entry indices seen in `epoch`, with repeats (order not meaningful)."""
        out = []
        for e in self._train:
            out.extend([e.index] * e.num_repeats)
        if self._reg and self.num_train_images > 0:
            if self.config.reg_sampling == "random":
                pool = [e.index for e in self._reg for _ in range(e.folder_repeats)]
                need, passes = self.num_train_images, 0
                while need > 0:
                    perm = R.rng_for(seed, R.REG_DRAW, epoch, self.index, passes).permutation(len(pool))
                    out.extend(pool[i] for i in perm[:need])
                    need -= min(need, len(pool))
                    passes += 1
            else:
                for e in self._reg:
                    out.extend([e.index] * e.num_repeats)
        return out

    def epoch_batches(self, epoch: int, seed: int) -> list[tuple[tuple[int, int], list[int]]]:
        """[(bucket reso, [entry index, ...]), ...]: each bucket's samples shuffled, cut into batches."""
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for idx in self.epoch_samples(epoch, seed):
            by_bucket.setdefault(self.entries[idx].bucket.reso, []).append(idx)
        bs = max(1, self.config.batch_size)
        out = []
        for bi, reso in enumerate(self.bucket_resos):
            items = by_bucket.get(reso)
            if not items:
                continue
            perm = R.rng_for(seed, R.BUCKET_SHUFFLE, epoch, self.index, bi).permutation(len(items))
            items = [items[i] for i in perm]
            out.extend((reso, items[s:s + bs]) for s in range(0, len(items), bs))
        return out

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Samples per bucket in one epoch (with repeats; reg as balanced)."""
        c: Counter = Counter()
        for e in self.entries:
            c[e.bucket.reso] += e.num_repeats
        return dict(sorted(c.items()))

    def reg_summary(self) -> str:
        if not self._reg:
            return "no regularization images"
        n_imgs = len(self._reg)
        if self.num_train_images == 0:
            return f"{n_imgs} regularization images found but no training images; none are used"
        if self.config.reg_sampling == "random":
            pool = sum(e.folder_repeats for e in self._reg)
            per = self.num_train_images / pool
            return (f"{self.num_train_images} regularization samples per epoch (= training images x repeats), drawn at "
                    f"random each epoch from {n_imgs} regularization images ({pool} with folder repeats): each is used "
                    f"{math.floor(per)}-{math.ceil(per)} times per epoch; loss weight {self.config.prior_loss_weight}")
        used = Counter(e.num_repeats for e in self._reg)
        parts = [f"{cnt} used {r} time{'s' if r != 1 else ''}" for r, cnt in sorted(used.items(), reverse=True) if r > 0]
        unused = used.get(0, 0)
        text = (f"{sum(e.num_repeats for e in self._reg)} regularization samples per epoch to match "
                f"{self.num_train_images} training samples (round-robin by file order, as sd-scripts): "
                f"{n_imgs} regularization images, " + ", ".join(parts))
        if unused:
            text += (f"; {unused} never used (more regularization images than training samples; "
                     "reg_sampling=random draws a different subset each epoch)")
        return text + f"; loss weight {self.config.prior_loss_weight}"


def _problems_message(problems: list[Problem], limit: int = 20) -> str:
    lines = [pr.message for pr in problems[:limit]]
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return (f"{len(problems)} bad input file(s):\n" + "\n".join(lines) + more +
            "\nFix or remove them, or run with --on_bad_image skip to train without them.")


class DatasetGroup:
    """All datasets of a run; batches of all datasets are interleaved in one seeded order per epoch."""

    def __init__(self, datasets: list[Dataset], seed: int = 0, on_bad_image: str = "error"):
        if on_bad_image not in ON_BAD_IMAGE:
            raise UserError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}.")
        self.datasets = datasets
        self.seed = int(seed or 0)
        self.on_bad_image = on_bad_image
        self.max_train_steps = 0  # for fractional token_warmup_step
        self.skipped: dict[str, str] = {}  # path -> reason, images left out while loading
        self._lock = threading.Lock()
        self._plans: OrderedDict[int, list] = OrderedDict()
        self.latent_mode: str | None = None  # None | "memory" | "disk"

    @classmethod
    def build(cls, configs: list[DatasetConfig], seed: int = 0, on_bad_image: str = "error",
              scan_cache: ScanCache | str | os.PathLike | bool | None = None, workers: int | None = None) -> "DatasetGroup":
        """Scan every dataset. `scan_cache`: a ScanCache, a folder for it, None (default folder) or False (off)."""
        cache = scan_cache if isinstance(scan_cache, ScanCache) else ScanCache(scan_cache)
        datasets = [Dataset(c, i).build(on_bad_image, cache, workers) for i, c in enumerate(configs)]
        cache.save()
        group = cls(datasets, seed, on_bad_image)
        if not any(d.entries for d in datasets):
            msg = "no usable training images were found."
            probs = group.problems
            if probs:
                msg += "\n" + "\n".join(p.message for p in probs[:10])
            raise UserError(msg)
        return group

    def __getstate__(self):  # picklable for DataLoader worker processes
        state = self.__dict__.copy()
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def problems(self) -> list[Problem]:
        return [p for d in self.datasets for p in d.problems]

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    def plan(self, epoch: int) -> list[tuple[int, tuple[int, int], list[int]]]:
        """[(dataset index, bucket reso, [entry index, ...]), ...] in the order of `epoch`'s batches."""
        with self._lock:
            if epoch in self._plans:
                self._plans.move_to_end(epoch)
                return self._plans[epoch]
        batches = [(d.index, reso, idxs) for d in self.datasets for reso, idxs in d.epoch_batches(epoch, self.seed)]
        order = R.rng_for(self.seed, R.EPOCH_ORDER, epoch).permutation(len(batches))
        plan = [batches[i] for i in order]
        with self._lock:
            self._plans[epoch] = plan
            while len(self._plans) > 4:
                self._plans.popitem(last=False)
        return plan

    def num_batches(self, epoch: int = 1) -> int:
        """Batches in an epoch (constant unless reg_sampling=random changes bucket fill)."""
        return len(self.plan(epoch))

    def __len__(self) -> int:
        return self.num_batches(1)

    # ---- loading ----
    def _substitute(self, ds: Dataset, reso, bad: ImageEntry) -> ImageEntry:
        """A good entry of the same bucket to stand in for an unreadable one (keeps batch count and shapes)."""
        same = [e for e in ds.entries if e.bucket.reso == reso and str(e.path) not in self.skipped]
        if not same:
            raise UserError(f"every image in bucket {reso[0]}x{reso[1]} of dataset {ds.index + 1} is unreadable; "
                            f"last: {bad.path}. Fix the images or remove them.")
        after = [e for e in same if e.index > bad.index]
        return (after or same)[0]

    def _load_sample(self, ds: Dataset, reso, entry: ImageEntry, epoch: int, k: int, slot: int, step: int) -> dict:
        cfg = ds.config
        subset = cfg.subsets[entry.subset_index]
        keys = (epoch, k, slot)
        flipped = bool(subset.flip_aug and R.rng_for(self.seed, R.FLIP, *keys).random() < 0.5)
        sample: dict[str, Any] = {"path": str(entry.path), "is_reg": entry.is_reg, "flipped": flipped,
                                  "loss_weight": cfg.prior_loss_weight if entry.is_reg else 1.0,
                                  "image": None, "latents": None, "alpha_mask": None}
        cached = None
        if entry.latents is not None:
            cached = (entry.latents, entry.latents_flipped, entry.latents_original_size, entry.latents_crop_ltrb,
                      entry.alpha_mask)
        elif entry.npz_path is not None:
            from lorakit.data.latents import load_latents_npz

            cached = load_latents_npz(entry.npz_path)
        if cached is not None:
            import torch

            lat, lat_f, original_size, crop_ltrb, mask = cached
            if flipped:
                if lat_f is None:
                    raise UserError(f"latent cache for {entry.path} has no flipped latents; rebuild the cache with flip_aug.")
                lat = lat_f
                if mask is not None:
                    mask = torch.as_tensor(np.ascontiguousarray(np.asarray(mask)[:, ::-1]))
            sample["latents"] = torch.as_tensor(np.asarray(lat), dtype=torch.float32)
            sample["alpha_mask"] = None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.float32)
            target = (int(sample["latents"].shape[-1]) * 8, int(sample["latents"].shape[-2]) * 8)
        else:
            rgb, alpha = load_image_arrays(entry.path, subset.alpha_mask)
            if not cfg.enable_bucket and entry.face is not None and subset.face_crop_aug_range is not None:
                original_size = rgb.size
                rgb, alpha = face_crop(rgb, alpha, entry.face, cfg.resolution, subset.face_crop_aug_range,
                                       subset.random_crop, R.rng_for(self.seed, R.FACE, *keys))
                crop_ltrb = (0, 0, 0, 0)
            else:
                if rgb.size == tuple(entry.image_size) and entry.bucket.reso == reso:
                    resized = entry.bucket.resized_size
                else:  # the file changed since the scan: cover the planned bucket to keep the batch's shape
                    s = max(reso[0] / rgb.size[0], reso[1] / rgb.size[1])
                    resized = (max(reso[0], int(rgb.size[0] * s + 0.5)), max(reso[1], int(rgb.size[1] * s + 0.5)))
                rgb, alpha, original_size, crop_ltrb = resize_and_crop(
                    rgb, alpha, resized, reso, subset.random_crop, R.rng_for(self.seed, R.CROP, *keys))
            arr = np.asarray(rgb, dtype=np.uint8)
            if subset.color_aug:
                arr = color_aug(arr, R.rng_for(self.seed, R.COLOR, *keys))
            if flipped:
                arr = arr[:, ::-1]
            sample["image"] = to_tensor(arr)
            if alpha is not None:
                import torch

                m = np.asarray(alpha, dtype=np.float32) / 255.0
                if flipped:
                    m = m[:, ::-1]
                sample["alpha_mask"] = torch.from_numpy(np.ascontiguousarray(m))
            target = (arr.shape[1], arr.shape[0])
        sample["original_size_hw"] = (int(original_size[1]), int(original_size[0]))
        sample["crop_top_left"] = crop_top_left(crop_ltrb, target, flipped)
        sample["target_size_hw"] = (int(target[1]), int(target[0]))
        sample["caption"] = process_caption(entry.caption, subset, R.rng_for(self.seed, R.CAPTION, *keys), epoch,
                                            step, self.max_train_steps)
        return sample

    def get_batch(self, epoch: int, k: int, global_step: int | None = None) -> dict:
        """Batch k (from 0) of `epoch` (from 1). `global_step` drives token warmup; by default it is the number of
        batches before this one (assuming every epoch has the same count)."""
        plan = self.plan(epoch)
        if not 0 <= k < len(plan):
            raise IndexError(f"epoch {epoch} has {len(plan)} batches; batch {k} requested")
        ds_idx, reso, idxs = plan[k]
        ds = self.datasets[ds_idx]
        step = global_step if global_step is not None else (epoch - 1) * len(plan) + k
        samples = []
        for slot, idx in enumerate(idxs):
            entry = ds.entries[idx]
            for _attempt in range(len(ds.entries) + 1):
                if str(entry.path) in self.skipped:
                    entry = self._substitute(ds, reso, entry)
                    continue
                try:
                    samples.append(self._load_sample(ds, reso, entry, epoch, k, slot, step))
                    break
                except (ImageReadError, OSError) as exc:
                    msg = str(exc) if isinstance(exc, UserError) else f"image {entry.path} cannot be read ({exc})."
                    if self.on_bad_image == "error":
                        if not isinstance(exc, UserError):
                            msg += " Fix or remove it, or run with --on_bad_image skip."
                        raise UserError(msg) from None
                    with self._lock:
                        if str(entry.path) not in self.skipped:
                            logger.warning("warning: --on_bad_image skip: leaving out %s", msg)
                        self.skipped[str(entry.path)] = msg
        return collate(samples, epoch=epoch, batch_index=k, dataset_index=ds_idx, bucket=reso,
                       network_multiplier=ds.config.network_multiplier)

    def iter_batches(self, epoch: int, start_batch: int = 0, num_workers: int | None = None,
                     prefetch: int = 2) -> Iterator[tuple[int, dict]]:
        """Yield (k, batch) for k = start_batch .. end of `epoch`, decoding ahead with a thread pool."""
        n = self.num_batches(epoch)
        workers = num_workers or default_workers()
        if workers <= 1:
            for k in range(start_batch, n):
                yield k, self.get_batch(epoch, k)
            return
        with ThreadPoolExecutor(max_workers=workers) as ex:
            futures: dict[int, Any] = {}
            ahead = workers + prefetch
            try:
                for k in range(start_batch, n):
                    for j in range(k, min(n, k + ahead)):
                        if j not in futures:
                            futures[j] = ex.submit(self.get_batch, epoch, j)
                    yield k, futures.pop(k).result()
            finally:  # a consumer that stops early does not wait for batches it will never use
                for f in futures.values():
                    f.cancel()

    def torch_dataset(self, epoch: int, start_batch: int = 0) -> "EpochBatches":
        """A torch map-style Dataset over batches start_batch.. of `epoch`, for DataLoader(batch_size=None)."""
        return EpochBatches(self, epoch, start_batch)

    # ---- reporting ----
    def summary(self):
        from lorakit.data.check import build_report

        return build_report(self, decode=False)

    def summary_text(self) -> str:
        return self.summary().to_text()


class EpochBatches:
    """torch.utils.data.Dataset-compatible view (no torch import needed here)."""

    def __init__(self, group: DatasetGroup, epoch: int, start_batch: int = 0):
        self.group, self.epoch, self.start = group, epoch, start_batch

    def __len__(self):
        return max(0, self.group.num_batches(self.epoch) - self.start)

    def __getitem__(self, i):
        return self.group.get_batch(self.epoch, self.start + i)


def collate(samples: list[dict], **extra) -> dict:
    """Stack a bucket's samples: images [B,3,H,W] or latents [B,4,h,w], alpha_masks [B,H,W] (ones where a sample
    has none), loss_weights [B], SDXL conditioning original_sizes_hw / crop_top_lefts / target_sizes_hw [B,2]."""
    import torch

    out: dict[str, Any] = dict(extra)
    out["captions"] = [s["caption"] for s in samples]
    out["paths"] = [s["path"] for s in samples]
    out["is_reg"] = [s["is_reg"] for s in samples]
    out["flipped"] = [s["flipped"] for s in samples]
    out["loss_weights"] = torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32)
    imgs = [s["image"] for s in samples]
    lats = [s["latents"] for s in samples]
    out["images"] = torch.stack(imgs) if all(i is not None for i in imgs) else None
    out["latents"] = torch.stack(lats) if all(x is not None for x in lats) else None
    if out["images"] is None and out["latents"] is None:
        # mixed cached / uncached in one batch cannot happen when caching covers the dataset; refuse loudly
        raise UserError("a batch mixes cached latents and raw images; rebuild the latent cache for every image.")
    masks = [s["alpha_mask"] for s in samples]
    if all(m is None for m in masks):
        out["alpha_masks"] = None
    else:
        h, w = next(m.shape for m in masks if m is not None)
        out["alpha_masks"] = torch.stack([m if m is not None else torch.ones(h, w) for m in masks])
    out["original_sizes_hw"] = torch.tensor([s["original_size_hw"] for s in samples], dtype=torch.long)
    out["crop_top_lefts"] = torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long)
    out["target_sizes_hw"] = torch.tensor([s["target_size_hw"] for s in samples], dtype=torch.long)
    return out
