"""The ss_* metadata of a run's LoRA files, as sd-scripts writes it: the options, the data and the run."""

from __future__ import annotations

import functools
import json
import os
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RunMetadata:
    base: dict[str, str]  # every key known before the loop; each save adds ss_steps, ss_epoch, the finish time
    save_kwargs: dict = field(default_factory=dict)  # Network.save_weights' ModelSpec arguments


class ModelFileHashes:
    """sd-scripts' hashes of the base model and VAE files (ss_sd_model_hash and ss_new_sd_model_hash: the legacy
    8-digit hash and the sha256 of the whole file; ss_vae_hash, ss_new_vae_hash), computed in a daemon thread that
    starts with the run. The sha256 of a 2 GB checkpoint takes ~1.3 s, which start-up used to wait for; file reads
    and hashlib release the GIL, so the thread runs on the core that single-threaded start-up (imports, the memory
    estimate's trace) leaves idle, and `keys()` finds it done."""

    def __init__(self, opts):
        from lorakit.models.saving import file_hashes  # imported here, not in the thread beside start-up's imports

        self._hash_file = file_hashes
        self._paths = {key: path for key, path in (("sd_model", opts.pretrained_model_name_or_path),
                                                   ("vae", opts.vae)) if path and os.path.isfile(path)}
        self._keys: dict[str, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hash, name="lorakit-model-hash", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        try:
            for key, path in self._paths.items():
                h = self._hash_file(path)
                self._keys[f"ss_{key}_hash"], self._keys[f"ss_new_{key}_hash"] = h["legacy_hash"], h["sha256"]
        except BaseException as e:  # re-raised where the keys are read, in the run's thread
            self._error = e

    def keys(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._keys)


def run_metadata(opts, run, data, net, optim, model=None, hashes: ModelFileHashes | None = None) -> RunMetadata:
    """Metadata records the options, so it reads them all (through the schema's `ss_metadata`). `model` (the
    prepared Model) records what the checkpoint itself decided: a zero-terminal-SNR schedule from its `ztsnr` key.
    `hashes`: the model files' hashes, started earlier (hashed now without it)."""
    from lorakit import options as O

    validation = getattr(data, "validation", None)
    md = O.ss_metadata(opts, max_train_steps=data.max_steps, optimizer=optim.info.metadata_string, seed=run.seed)
    md.update(dataset_metadata(data.group, from_config=bool(opts.dataset_config)))
    md = {k: v for k, v in md.items() if v is not None}
    md.update({
        "ss_session_id": str(random.SystemRandom().randint(0, 2**32 - 1)),
        "ss_training_started_at": str(run.started_at),
        "ss_num_batches_per_epoch": str(data.batches_per_epoch), "ss_num_epochs": str(data.num_epochs),
        "ss_total_batch_size": str(opts.train_batch_size * data.accum * run.world),
        "ss_network_dim": str(net.network.config.dim), "ss_network_alpha": str(float(net.network.config.alpha)),
        "ss_text_encoder_lr": str(optim.te_lr),
        # sd-scripts writes these two always: held-out images (0 without validation) and its own git commit
        "ss_num_validation_images": str(validation.num_train_images if validation is not None else 0),
        "ss_sd_scripts_commit_hash": lorakit_revision(),
    })
    if model is not None and model.alphas_cumprod is not None and float(model.alphas_cumprod[-1]) == 0.0:
        md["ss_zero_terminal_snr"] = "True"  # trained on a zero-terminal-SNR schedule
    if model is not None and model.objective is not None:
        md.update(flow_metadata(opts))
    if not opts.network_args:
        md.pop("ss_network_args", None)
    md.update((hashes or ModelFileHashes(opts)).keys())
    save_kwargs = dict(resolution=data.configs[0].resolution, clip_skip=opts.clip_skip, title=opts.metadata_title,
                       trigger_phrase=opts.metadata_trigger_phrase, description=opts.metadata_description,
                       author=opts.metadata_author)
    return RunMetadata(md, save_kwargs)


def flow_metadata(opts) -> dict[str, str]:
    """The keys sd-scripts' flux_train_network.py adds for a FLUX run."""
    return {"ss_apply_t5_attn_mask": str(bool(opts.apply_t5_attn_mask)), "ss_guidance_scale": str(opts.guidance_scale),
            "ss_timestep_sampling": str(opts.timestep_sampling), "ss_sigmoid_scale": str(opts.sigmoid_scale),
            "ss_model_prediction_type": str(opts.model_prediction_type),
            "ss_discrete_flow_shift": str(opts.discrete_flow_shift), "ss_weighting_scheme": str(opts.weighting_scheme),
            "ss_logit_mean": str(opts.logit_mean), "ss_logit_std": str(opts.logit_std),
            "ss_mode_scale": str(opts.mode_scale)}


def dataset_metadata(group, from_config: bool) -> dict[str, str]:
    """ss_* keys about the data, as sd-scripts writes them (per-dataset keys for a command-line dataset, ss_datasets
    for a --dataset_config or several datasets)."""
    tag_freq_all: dict[str, dict[str, int]] = {}
    dirs_all: dict[str, dict[str, int]] = {}
    datasets_md = []
    md: dict[str, str] = {}
    for ds in group.datasets:
        cfg = ds.config
        counts = Counter(e.subset_index for e in ds.entries)
        dirs, reg_dirs, tag_freq = _subset_dirs_and_tags(ds, counts)
        buckets = {i: {"resolution": list(r), "count": c} for i, (r, c) in enumerate(ds.bucket_counts().items())}
        ar = [abs(e.bucket.ar_error) for e in ds.entries]
        bucket_info = {"buckets": buckets, "mean_img_ar_error": (sum(ar) / len(ar)) if ar else 0.0}
        tag_freq_all.update(tag_freq)
        dirs_all.update(dirs)
        datasets_md.append(_dataset_entry(ds, counts, tag_freq, bucket_info))
        if not from_config and len(group.datasets) == 1:
            md.update({
                "ss_batch_size_per_device": str(cfg.batch_size), "ss_resolution": str(tuple(cfg.resolution)),
                "ss_enable_bucket": str(bool(cfg.enable_bucket)), "ss_bucket_no_upscale": str(bool(cfg.bucket_no_upscale)),
                "ss_min_bucket_reso": str(cfg.min_bucket_reso), "ss_max_bucket_reso": str(cfg.max_bucket_reso),
                "ss_dataset_dirs": json.dumps(dirs), "ss_reg_dataset_dirs": json.dumps(reg_dirs),
                "ss_tag_frequency": json.dumps(tag_freq), "ss_bucket_info": json.dumps(bucket_info),
            })
    if from_config or len(group.datasets) > 1:
        md["ss_datasets"] = json.dumps(datasets_md)
        md["ss_tag_frequency"] = json.dumps(tag_freq_all)
        md["ss_dataset_dirs"] = json.dumps(dirs_all)
        for k in ("ss_resolution", "ss_batch_size_per_device", "ss_enable_bucket", "ss_bucket_no_upscale",
                  "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_color_aug", "ss_flip_aug", "ss_random_crop",
                  "ss_shuffle_caption", "ss_keep_tokens"):
            md[k] = None  # sd-scripts writes these only for a command-line dataset
    md["ss_num_train_images"] = str(group.num_train_images)
    md["ss_num_reg_images"] = str(sum(d.num_reg_images for d in group.datasets))
    return md


def _subset_dirs_and_tags(ds, counts):
    tag_freq: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    for si, sub in enumerate(ds.config.subsets):
        name = os.path.basename(str(sub.metadata_file or sub.image_dir or "").rstrip("/\\"))
        (reg_dirs if sub.is_reg else dirs)[name] = {"n_repeats": int(sub.num_repeats), "img_count": counts[si]}
        freq: Counter = Counter()
        for e in ds.entries:
            if e.subset_index == si:
                freq.update(t.strip() for t in e.caption.split(",") if t.strip())
        tag_freq[name] = dict(freq)
    return dirs, reg_dirs, tag_freq


def _dataset_entry(ds, counts, tag_freq, bucket_info) -> dict:
    cfg = ds.config
    return {
        "is_dreambooth": not any(s.is_finetune for s in cfg.subsets), "batch_size_per_device": cfg.batch_size,
        "num_train_images": ds.num_train_images, "num_reg_images": ds.num_reg_images,
        "resolution": list(cfg.resolution), "enable_bucket": cfg.enable_bucket,
        "min_bucket_reso": cfg.min_bucket_reso, "max_bucket_reso": cfg.max_bucket_reso,
        "tag_frequency": tag_freq, "bucket_info": bucket_info,
        "subsets": [{"img_count": counts[i], "num_repeats": s.num_repeats, "color_aug": s.color_aug,
                     "flip_aug": s.flip_aug, "random_crop": s.random_crop, "shuffle_caption": s.shuffle_caption,
                     "keep_tokens": s.keep_tokens, "keep_tokens_separator": s.keep_tokens_separator or "",
                     "secondary_separator": s.secondary_separator, "enable_wildcard": s.enable_wildcard,
                     "caption_prefix": s.caption_prefix, "caption_suffix": s.caption_suffix,
                     "image_dir": os.path.basename(str(s.image_dir or "")), "class_tokens": s.class_tokens,
                     "is_reg": s.is_reg} for i, s in enumerate(cfg.subsets)],
    }


@functools.lru_cache(maxsize=1)
def lorakit_revision() -> str:
    """lorakit's version, with the git commit when it runs from a checkout: "lorakit/0.1.0+g5925ba4" (what
    ss_sd_scripts_commit_hash records for sd-scripts: the code that trained the file)."""
    import subprocess

    from lorakit import __version__

    try:
        out = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"lorakit/{__version__}" + (f"+g{commit}" if commit else "")


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})
