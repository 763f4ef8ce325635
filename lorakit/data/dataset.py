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
    mask_path: Path | None = None  # loss mask from the subset's conditioning_data_dir


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
        self.masks: dict[tuple[int, Path], Path] = {}  # (subset index, image) -> its conditioning_data_dir mask
        self.held_out: list[tuple] = []  # (subset index, path, caption, source, size) kept for validation

    # ---- building ----
    def build(self, on_bad_image: str = "error", scan_cache: ScanCache | None = None, workers: int | None = None,
              sizes_known: dict | None = None, *, seed: int = 0, masked_loss: bool | None = None) -> "Dataset":
        """Scan the subsets. `seed` draws the validation split (unless the dataset sets validation_seed);
        `masked_loss` False refuses conditioning_data_dir masks (sd-scripts reads them only with --masked_loss),
        None (dataset checks) loads them when given."""
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

        self.masks = find_masks(cfg, pending, masked_loss, self.notes)
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

        good = []
        for si, p, cap, src, size in pending:
            if str(p) in bad_paths:
                continue
            size = size or sizes.get(p)
            if size is not None:
                good.append((si, p, cap, src, tuple(size)))
        _check_mask_sizes(self.masks, {(si, p): size for si, p, _, _, size in good}, scan_cache, workers)
        if cfg.validation_split:
            good, self.held_out = split_validation(good, cfg, seed, self.index)
        train, reg = self._entries(good)
        return self._finish(train, reg)

    def _entries(self, items, repeats: int | None = None) -> tuple[list[ImageEntry], list[ImageEntry]]:
        train, reg = [], []
        for si, p, cap, src, size in items:
            subset = self.config.subsets[si]
            face = parse_face_info(p) if subset.face_crop_aug_range is not None else None
            e = ImageEntry(0, p, cap, src, subset.is_reg, si, repeats or subset.num_repeats, subset.num_repeats,
                           tuple(size), self.assigner.select(*size), face, mask_path=self.masks.get((si, p)))
            (reg if subset.is_reg else train).append(e)
        return train, reg

    def validation_dataset(self) -> "Dataset | None":
        """The images held out by validation_split, each once (no repeats, no regularization images), in the same
        buckets and with the same subset settings; None when nothing was held out."""
        if not self.held_out:
            return None
        ds = Dataset(self.config, self.index)
        ds.assigner, ds.masks, ds.notes = self.assigner, self.masks, []
        train, _ = ds._entries(self.held_out, repeats=1)
        return ds._finish(train, [])

    def _finish(self, train: list[ImageEntry], reg: list[ImageEntry]) -> "Dataset":
        cfg = self.config
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


def split_validation(items: list[tuple], cfg: DatasetConfig, seed: int, dataset_index: int):
    """sd-scripts' validation split, per subset: shuffle the subset's images with the seed (the dataset's
    validation_seed, else the run's), keep the first ceil(n * (1 - split)) for training and hold out the rest.
    Regularization subsets are never split. (sd-scripts takes its held-out part as the last round(n * split), which
    overlaps the training part by one image when n * split ends in .5; here the two parts never overlap.)"""
    seed = cfg.validation_seed if cfg.validation_seed is not None else seed
    by_subset: dict[int, list[tuple]] = {}
    for item in items:
        by_subset.setdefault(item[0], []).append(item)
    keep, held = [], []
    for si, group in by_subset.items():
        if cfg.subsets[si].is_reg:
            keep += group
            continue
        order = R.rng_for(seed, R.VALIDATION_SPLIT, dataset_index, si).permutation(len(group))
        n_train = math.ceil(len(group) * (1 - cfg.validation_split))
        chosen = set(int(i) for i in order[:n_train])
        keep += [x for i, x in enumerate(group) if i in chosen]  # file order kept: batches stay seeded the same way
        held += [group[int(i)] for i in sorted(order[n_train:])]
    return keep, held


def find_masks(cfg: DatasetConfig, pending: list[tuple], masked_loss: bool | None,
               notes: list[str] | None = None) -> dict[tuple[int, Path], Path]:
    """{(subset index, image): mask} for subsets with conditioning_data_dir: the mask is the image file with the same
    stem in that folder (or in its subfolder named like the image folder, so one --conditioning_data_dir serves
    `N_name` folders). Every training image of such a subset needs one (sd-scripts asserts the same). A
    regularization subset takes masks only from its own subfolder (`masks/1_bear/`; a flat folder's names belong to
    the training images) and may have none: its images then count everywhere."""
    subsets = {si for si, s in enumerate(cfg.subsets) if s.conditioning_data_dir}
    if not subsets:
        return {}
    if masked_loss is False:
        s = cfg.subsets[min(subsets)]
        raise UserError(f"conditioning_data_dir {s.conditioning_data_dir} is set (subset {s.image_dir or s.metadata_file}) "
                        "but --masked_loss is not: the mask images would be ignored. Add --masked_loss (masked_loss = "
                        "true in a --config_file) to train with them, or remove conditioning_data_dir.")
    indexes: dict[int, tuple[dict, dict]] = {}
    for si in subsets:
        s = cfg.subsets[si]
        folder = Path(s.conditioning_data_dir)
        if not folder.is_dir():
            raise UserError(f"conditioning_data_dir {folder} (subset {s.image_dir or s.metadata_file}) is not a folder; "
                            "point it at the folder of mask images (one per training image, same file name stem).")
        if s.image_dir and folder.resolve() == Path(s.image_dir).resolve():
            raise UserError(f"conditioning_data_dir {folder} is the image folder itself: every image would be its own "
                            "mask. Keep the masks in a separate folder with the same file names.")
        sub = folder / Path(s.image_dir).name if s.image_dir else None
        own = _stem_index(sub) if sub is not None and sub.is_dir() else {}
        indexes[si] = (own, {} if s.is_reg else _stem_index(folder))
    out: dict[tuple[int, Path], Path] = {}
    missing: dict[int, list[Path]] = {}
    for si, p, *_ in pending:
        if si in indexes:
            first, second = indexes[si]
            m = first.get(p.stem) or second.get(p.stem)
            if m is not None:
                out[(si, p)] = m
            elif not cfg.subsets[si].is_reg:
                missing.setdefault(si, []).append(p)
    for si in subsets:
        s = cfg.subsets[si]
        if s.is_reg and notes is not None and not any(k[0] == si for k in out):
            notes.append(f"regularization subset {s.image_dir}: no masks in "
                         f"{Path(s.conditioning_data_dir) / Path(s.image_dir or '').name}; its images count everywhere.")
    for si, paths in missing.items():
        folder = cfg.subsets[si].conditioning_data_dir
        names = ", ".join(x.name for x in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        raise UserError(f"{len(paths)} training image(s) have no mask in conditioning_data_dir {folder}: {names}. Each "
                        f"image needs a mask image with the same file stem (e.g. {paths[0].stem}.png), white where the "
                        "loss counts and black where it is ignored; add them, or remove conditioning_data_dir.")
    return out


def _stem_index(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in list_images(folder):
        out.setdefault(p.stem, p)
    return out


def _check_mask_sizes(masks: dict, image_sizes: dict, scan_cache, workers) -> None:
    """A mask must be the image at some scale: another aspect ratio cannot be lined up (checked before training)."""
    from lorakit.data.augment import MASK_ASPECT_TOLERANCE

    wanted = {m: image_sizes[p] for p, m in masks.items() if p in image_sizes}
    if not wanted:
        return
    sizes, errors = scan_sizes(list(dict.fromkeys(wanted)), scan_cache, workers)
    for m, msg in errors.items():
        raise UserError(f"mask {m} cannot be read ({msg}); fix or replace it (conditioning_data_dir).")
    for m, (iw, ih) in wanted.items():
        mw, mh = sizes[m]
        if abs((mw / mh) / (iw / ih) - 1) > MASK_ASPECT_TOLERANCE:
            raise UserError(f"mask {m} is {mw}x{mh} but its training image is {iw}x{ih}: a different aspect ratio, so "
                            "it cannot be lined up with the image. Save the mask at the image's size.")


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
              scan_cache: ScanCache | str | os.PathLike | bool | None = None, workers: int | None = None, *,
              masked_loss: bool | None = None) -> "DatasetGroup":
        """Scan every dataset. `scan_cache`: a ScanCache, a folder for it, None (default folder) or False (off).
        `masked_loss`: the run's --masked_loss (None: a dataset check, masks load when given)."""
        cache = scan_cache if isinstance(scan_cache, ScanCache) else ScanCache(scan_cache)
        datasets = [Dataset(c, i).build(on_bad_image, cache, workers, seed=seed, masked_loss=masked_loss)
                    for i, c in enumerate(configs)]
        cache.save()
        if masked_loss and not any(s.alpha_mask or s.conditioning_data_dir for c in configs for s in c.subsets):
            raise UserError("--masked_loss is set but no subset has a mask: set conditioning_data_dir (a folder of "
                            "mask images named like the training images) or alpha_mask = true (transparent pixels "
                            "are ignored) on the subsets in --dataset_config, or pass --conditioning_data_dir / "
                            "--alpha_mask; or remove --masked_loss.")
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

    def validation_group(self) -> "DatasetGroup | None":
        """The held-out images of every dataset with a validation_split, as a group of their own (None: none)."""
        held = [d.validation_dataset() for d in self.datasets]
        datasets = [d for d in held if d is not None]
        if not datasets:
            return None
        sources = [d.index for d in datasets]
        for i, d in enumerate(datasets):
            d.index = i
        group = DatasetGroup(datasets, self.seed, self.on_bad_image)
        group.max_train_steps = self.max_train_steps
        group.source_indices = sources  # the training dataset each held-out one came from (its network_multiplier)
        return group

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
            lat, lat_f, original_size, crop_ltrb, mask = cached
            if flipped:
                if lat_f is None:
                    raise UserError(f"latent cache for {entry.path} has no flipped latents; rebuild the cache with flip_aug.")
                lat = lat_f
                if mask is not None:
                    mask = np.ascontiguousarray(np.asarray(mask)[:, ::-1])
            sample["latents"] = lat  # a tensor or an array: `collate` makes the tensors (see its docstring)
            sample["alpha_mask"] = mask
            target = (int(reso[0]), int(reso[1]))  # the bucket the latents were encoded at (any VAE factor)
        else:
            rgb, alpha = load_image_arrays(entry.path, subset.alpha_mask, entry.mask_path)
            if not cfg.enable_bucket and entry.face is not None and subset.face_crop_aug_range is not None:
                original_size = rgb.size
                rgb, alpha = face_crop(rgb, alpha, entry.face, cfg.resolution, subset.face_crop_aug_range,
                                       subset.random_crop, R.rng_for(self.seed, R.FACE, *keys),
                                       subset.resize_interpolation)
                crop_ltrb = (0, 0, 0, 0)
            else:
                if rgb.size == tuple(entry.image_size) and entry.bucket.reso == reso:
                    resized = entry.bucket.resized_size
                else:  # the file changed since the scan: cover the planned bucket to keep the batch's shape
                    s = max(reso[0] / rgb.size[0], reso[1] / rgb.size[1])
                    resized = (max(reso[0], int(rgb.size[0] * s + 0.5)), max(reso[1], int(rgb.size[1] * s + 0.5)))
                rgb, alpha, original_size, crop_ltrb = resize_and_crop(
                    rgb, alpha, resized, reso, subset.random_crop, R.rng_for(self.seed, R.CROP, *keys),
                    subset.resize_interpolation)
            arr = np.asarray(rgb, dtype=np.uint8)
            if subset.color_aug:
                arr = color_aug(arr, R.rng_for(self.seed, R.COLOR, *keys))
            if flipped:
                arr = arr[:, ::-1]
            sample["image"] = arr  # HxWx3 uint8; `collate` makes the tensor
            if alpha is not None:
                m = np.asarray(alpha, dtype=np.float32) / 255.0
                if flipped:
                    m = m[:, ::-1]
                sample["alpha_mask"] = np.ascontiguousarray(m)
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
        return self.load_batch(epoch, k, global_step).collate()

    def load_batch(self, epoch: int, k: int, global_step: int | None = None) -> "LoadedBatch":
        """get_batch's decoding, resizing, augmentation and captions - numpy and PIL only, no torch call, so that it
        can run in a loader thread (see `iter_batches`)."""
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
        return LoadedBatch(samples, dict(epoch=epoch, batch_index=k, dataset_index=ds_idx, bucket=reso,
                                         network_multiplier=ds.config.network_multiplier))

    def iter_batches(self, epoch: int, start_batch: int = 0, num_workers: int | None = None,
                     prefetch: int = 2) -> Iterator[tuple[int, dict]]:
        """Yield (k, batch) for k = start_batch .. end of `epoch`, decoding ahead with a thread pool.

        The threads only decode (`load_batch`: PIL and numpy); the tensors are made here, in the consumer's thread.
        Why: a torch operation large enough to go parallel, run in another thread, starts a second OpenMP team, and
        once libgomp manages more threads than there are CPUs it shortens every team's spin-wait, so the training
        thread's thousands of parallel regions a step each wait for sleeping threads to wake: 15-30% slower steps on
        a 2-core CPU (benchmarks/bench_loader_threads.py)."""
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
                            futures[j] = ex.submit(self.load_batch, epoch, j)
                    yield k, futures.pop(k).result().collate()
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


@dataclass(frozen=True)
class LoadedBatch:
    """A batch as the loader threads leave it: samples with numpy images (HxWx3 uint8), latents and masks, and the
    batch's position; `collate` makes it the training loop's tensors."""
    samples: list[dict]
    extra: dict

    def collate(self) -> dict:
        return collate(self.samples, **self.extra)


def collate(samples: list[dict], **extra) -> dict:
    """Stack a bucket's samples: images [B,3,H,W] or latents [B,4,h,w], alpha_masks [B,H,W] (ones where a sample
    has none), loss_weights [B], SDXL conditioning original_sizes_hw / crop_top_lefts / target_sizes_hw [B,2].
    Samples carry numpy arrays (or tensors); every tensor of the batch is made here, in the caller's thread."""
    import torch

    def tensor(x):
        return None if x is None else torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x,
                                                      dtype=torch.float32)

    out: dict[str, Any] = dict(extra)
    out["captions"] = [s["caption"] for s in samples]
    out["paths"] = [s["path"] for s in samples]
    out["is_reg"] = [s["is_reg"] for s in samples]
    out["flipped"] = [s["flipped"] for s in samples]
    out["loss_weights"] = torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32)
    imgs = [None if s["image"] is None else to_tensor(s["image"]) for s in samples]
    lats = [tensor(s["latents"]) for s in samples]
    out["images"] = torch.stack(imgs) if all(i is not None for i in imgs) else None
    out["latents"] = torch.stack(lats) if all(x is not None for x in lats) else None
    if out["images"] is None and out["latents"] is None:
        # mixed cached / uncached in one batch cannot happen when caching covers the dataset; refuse loudly
        raise UserError("a batch mixes cached latents and raw images; rebuild the latent cache for every image.")
    masks = [tensor(s["alpha_mask"]) for s in samples]
    if all(m is None for m in masks):
        out["alpha_masks"] = None
    else:
        h, w = next(m.shape for m in masks if m is not None)
        out["alpha_masks"] = torch.stack([m if m is not None else torch.ones(h, w) for m in masks])
    out["original_sizes_hw"] = torch.tensor([s["original_size_hw"] for s in samples], dtype=torch.long)
    out["crop_top_lefts"] = torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long)
    out["target_sizes_hw"] = torch.tensor([s["target_size_hw"] for s in samples], dtype=torch.long)
    return out
