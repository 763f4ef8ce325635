"""The dataset report printed by `lorakit dataset check` and by the trainer before it starts.

build_report(group) -> DatasetReport (structured; .to_dict() for JSON, .to_text() for people).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

from lorakit.data.captions import estimate_tokens, tag_frequencies
from lorakit.data.scan import ScanCache, default_workers, file_sha1
from lorakit.utils.images import ImageReadError, open_image

DEFAULT_TOKEN_LIMIT = 75  # CLIP's 77 minus BOS/EOS; --max_token_length raises it to 150 or 225


@dataclass
class DatasetReport:
    datasets: list[dict] = field(default_factory=list)
    folders: list[dict] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)  # {kind, path, message}
    skipped: list[dict] = field(default_factory=list)  # images left out while loading {path, message}
    steps_per_epoch: int = 0
    num_train_images: int = 0  # with repeats
    top_tags: list[tuple[str, int]] = field(default_factory=list)
    upscaled: list[dict] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    long_captions: list[dict] = field(default_factory=list)
    token_limit: int = DEFAULT_TOKEN_LIMIT
    token_count_exact: bool = False
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_text(self, max_list: int = 10) -> str:
        L: list[str] = []
        for d in self.datasets:
            res = d["resolution"]
            L.append(f"dataset {d['index'] + 1}: resolution {res[0]}x{res[1]}, batch size {d['batch_size']}, "
                     f"buckets {'on' if d['enable_bucket'] else 'off'}, {d['steps_per_epoch']} steps per epoch")
            for f in [f for f in self.folders if f["dataset"] == d["index"]]:
                kind = "reg  " if f["is_reg"] else "train"
                extra = f", class tokens '{f['class_tokens']}'" if f.get("class_tokens") else ""
                L.append(f"  {kind} {f['path']}: {f['images']} images x {f['repeats']} repeats, "
                         f"{f['captions']} captions, {f['missing_captions']} without caption{extra}")
            L.append(f"  regularization: {d['reg_summary']}")
            if d["buckets"]:
                L.append("  buckets (samples per epoch with repeats / images):")
                for b in d["buckets"]:
                    w, h = b["reso"]
                    L.append(f"    {w:>4}x{h:<4} {b['samples']:>6} / {b['images']:<6} {'#' * min(40, b['bar'])}")
                if d["enable_bucket"]:
                    L.append(f"  mean aspect-ratio error {d['mean_ar_error']:.4f}")
        L.append(f"total: {self.num_train_images} training samples per epoch (with repeats), "
                 f"{self.steps_per_epoch} steps per epoch")
        if self.top_tags:
            L.append("top tags: " + ", ".join(f"{t} ({n})" for t, n in self.top_tags))
        for title, items in (("problems", self.problems), ("skipped while loading", self.skipped)):
            if items:
                L.append(f"{title} ({len(items)}):")
                L.extend(f"  {p['message']}" for p in items[:max_list])
                if len(items) > max_list:
                    L.append(f"  ... and {len(items) - max_list} more")
        if self.upscaled:
            L.append(f"warning: {len(self.upscaled)} images are smaller than their bucket and will be upscaled:")
            for u in self.upscaled[:max_list]:
                L.append(f"  {u['path']}: {u['size'][0]}x{u['size'][1]} -> bucket {u['bucket'][0]}x{u['bucket'][1]} "
                         f"(x{u['scale']:.2f})")
            if len(self.upscaled) > max_list:  # the count above must match what is listed
                L.append(f"  ... and {len(self.upscaled) - max_list} more")
        if self.duplicates:
            L.append(f"warning: {len(self.duplicates)} groups of identical image files:")
            L.extend("  " + " = ".join(g) for g in self.duplicates[:max_list])
            if len(self.duplicates) > max_list:
                L.append(f"  ... and {len(self.duplicates) - max_list} more")
        if self.long_captions:
            how = "tokens" if self.token_count_exact else "tokens, estimated from words and punctuation (no tokenizer given)"
            L.append(f"warning: {len(self.long_captions)} captions exceed {self.token_limit} {how}; the rest is cut off:")
            L.extend(f"  {c['path']}: {c['tokens']}" for c in self.long_captions[:max_list])
            if len(self.long_captions) > max_list:
                L.append(f"  ... and {len(self.long_captions) - max_list} more")
        L.extend(f"warning: {w}" for w in self.warnings)
        L.extend(f"note: {n}" for n in self.notes)
        return "\n".join(L)


def _decode_ok(path: str) -> str | None:
    try:
        open_image(path)
        return None
    except ImageReadError as exc:
        return str(exc)


def build_report(group, decode: bool = False, duplicates: bool = False,
                 token_counter: Callable[[str], int] | None = None, max_token_length: int | None = None,
                 top_n_tags: int = 20, workers: int | None = None, scan_cache: ScanCache | None = None) -> DatasetReport:
    """Summarise a DatasetGroup. decode: fully decode every image to find truncated/corrupt files (slow on big sets);
    duplicates: hash files to find identical images; token_counter(text) -> tokens without BOS/EOS."""
    rep = DatasetReport(token_limit=max_token_length or DEFAULT_TOKEN_LIMIT, token_count_exact=token_counter is not None)
    workers = workers or default_workers()
    rep.steps_per_epoch = len(group.plan(1))
    rep.num_train_images = group.num_train_images
    rep.problems = [asdict(p) for p in group.problems]
    all_entries = [(ds, e) for ds in group.datasets for e in ds.entries]

    if decode and all_entries:
        paths = sorted({str(e.path) for _, e in all_entries})
        with ThreadPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(_decode_ok, paths))
        for p, err in zip(paths, results):
            if err:
                rep.problems.append({"kind": "image", "path": p, "message": err})
                group.skipped.setdefault(p, err)
    rep.skipped = [{"path": p, "message": m} for p, m in group.skipped.items()
                   if not any(pr["path"] == p for pr in rep.problems)]

    plan = group.plan(1)
    for ds in group.datasets:
        cfg = ds.config
        counts = ds.bucket_counts()
        images = Counter(e.bucket.reso for e in ds.entries if e.num_repeats > 0)
        peak = max(counts.values(), default=1)
        errs = [abs(e.bucket.ar_error) for e in ds.entries]
        rep.datasets.append({
            "index": ds.index, "resolution": list(cfg.resolution), "batch_size": cfg.batch_size,
            "enable_bucket": cfg.enable_bucket, "steps_per_epoch": sum(1 for b in plan if b[0] == ds.index),
            "num_train_images": ds.num_train_images, "num_reg_images": ds.num_reg_images,
            "reg_summary": ds.reg_summary(), "mean_ar_error": (sum(errs) / len(errs)) if errs else 0.0,
            "buckets": [{"reso": list(r), "samples": n, "images": images.get(r, 0),
                         "bar": max(1, round(40 * n / peak))} for r, n in counts.items()],
        })
        per_subset = defaultdict(list)
        for e in ds.entries:
            per_subset[e.subset_index].append(e)
        for si, subset in enumerate(cfg.subsets):
            es = per_subset.get(si, [])
            rep.folders.append({
                "dataset": ds.index, "path": subset.metadata_file or subset.image_dir, "is_reg": subset.is_reg,
                "repeats": subset.num_repeats, "class_tokens": subset.class_tokens, "images": len(es),
                "captions": sum(1 for e in es if e.caption_source in ("file", "metadata")),
                "missing_captions": sum(1 for e in es if e.caption_source in ("class_tokens", "none")),
            })
            no_cap = [e for e in es if e.caption_source == "none"]
            if no_cap:
                rep.warnings.append(f"{len(no_cap)} images in {subset.image_dir} have no caption file and the folder "
                                    f"has no class tokens; they train with an empty caption (e.g. {no_cap[0].path.name}).")
        for e in ds.entries:
            w, h = e.image_size
            rw, rh = e.bucket.resized_size
            if rw > w or rh > h:
                rep.upscaled.append({"path": str(e.path), "size": [w, h], "bucket": list(e.bucket.reso),
                                     "scale": max(rw / w, rh / h)})
        rep.notes.extend(ds.notes)
    rep.upscaled.sort(key=lambda u: -u["scale"])

    train_caps = [e.caption for ds, e in all_entries if not e.is_reg]
    sep = group.datasets[0].config.subsets[0].caption_separator if group.datasets and group.datasets[0].config.subsets else ","
    freq = tag_frequencies(train_caps, sep)
    rep.top_tags = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n_tags]  # ties by name: stable output

    count = token_counter or estimate_tokens
    for ds, e in all_entries:
        s = ds.config.subsets[e.subset_index]
        cap = e.caption.split("\n")[0]
        cap = " ".join(x for x in (s.caption_prefix, cap, s.caption_suffix) if x)
        n = count(cap)
        if n > rep.token_limit:
            rep.long_captions.append({"path": str(e.path), "tokens": n, "limit": rep.token_limit})

    if duplicates and all_entries:
        paths = sorted({str(e.path) for _, e in all_entries} - set(group.skipped))
        with ThreadPoolExecutor(max_workers=workers) as ex:
            hashes = list(ex.map(lambda p: file_sha1(p, scan_cache), paths))
        if scan_cache is not None:
            scan_cache.save()
        by_hash = defaultdict(list)
        for p, h in zip(paths, hashes):
            by_hash[h].append(p)
        rep.duplicates = [g for g in by_hash.values() if len(g) > 1]
    return rep


def check_source(source, opts: dict, seed: int = 0, quick: bool = False,
                 token_counter: Callable[[str], int] | None = None,
                 max_token_length: int | None = None) -> DatasetReport:
    """The whole `dataset check` run (CLI and GUI): `source` is a train folder or a --dataset_config TOML/JSON;
    `opts` holds the dataset options (resolution, reg_data_dir, buckets...). A folder without a resolution is
    checked at 512; a config file keeps its own."""
    from pathlib import Path

    from lorakit.data.config import build_dataset_configs
    from lorakit.data.dataset import DatasetGroup
    from lorakit.errors import UserError

    src = Path(source)
    opts = dict(opts)
    if src.is_file() and src.suffix.lower() in (".toml", ".json"):
        opts["dataset_config"] = str(src)
    elif src.is_dir():
        opts["train_data_dir"] = str(src)
        if opts.get("resolution") is None:
            opts["resolution"] = "512"
    else:
        raise UserError(f"{src} is neither a folder nor a .toml dataset config.")
    folder_problems = _repeat_folder_problems(opts)
    notes: list[str] = []
    try:
        configs = build_dataset_configs(opts, notes=notes, bad_repeats="skip")  # every problem at once
        cache = ScanCache()
        group = DatasetGroup.build(configs, seed=seed, on_bad_image="skip", scan_cache=cache)
    except UserError as exc:
        if folder_problems:  # "no usable folder" because of them: say why each was left out
            raise UserError("\n".join([str(exc)] + [p["message"] for p in folder_problems
                                                     if p["message"] not in str(exc)])) from None
        raise
    report = build_report(group, decode=not quick, duplicates=not quick, token_counter=token_counter,
                          max_token_length=max_token_length, scan_cache=cache)
    # the config layer's generic "no leading repeat count" note is wrong for `0_x`/`-3_x`: keep the precise problem
    bad = {p["path"] for p in folder_problems}
    notes = [n for n in notes if not any(n.startswith(f"folder {b} ") for b in bad)]
    report.problems = folder_problems + report.problems
    report.warnings = notes + report.warnings
    return report


def _repeat_folder_problems(opts: dict) -> list[dict]:
    """Subfolders of --train_data_dir / --reg_data_dir whose repeat count is below 1 (see repeat_folder_problem)."""
    from pathlib import Path

    from lorakit.data.scan import repeat_folder_problem

    out = []
    for key in ("train_data_dir", "reg_data_dir"):
        base = opts.get(key)
        if not base or opts.get("in_json") or not Path(base).is_dir():
            continue
        for sub in sorted(p for p in Path(base).iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = repeat_folder_problem(sub)
            if found and found[0] == "error":
                out.append({"kind": "folder", "path": str(sub), "message": found[1]})
    return out
