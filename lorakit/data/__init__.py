"""The dataset layer: folders/TOML -> captions, buckets, augmentation, caches -> reproducible batches.

Public API (see each module for details):
    build_dataset_configs(args, dataset_config=None, notes=None) -> list[DatasetConfig]
    DatasetGroup.build(configs, seed, on_bad_image="error"|"skip", scan_cache=None, workers=None)
        .plan(epoch) / .num_batches(epoch) / .get_batch(epoch, k) / .iter_batches(epoch, start_batch=0)
        .load_batch(epoch, k) -> LoadedBatch (numpy only, for loader threads; .collate() makes get_batch's tensors)
        .torch_dataset(epoch, start_batch) / .summary() / .summary_text() / .skipped
    cache_latents(group, encode, suffix="sd"|"sdxl", to_disk=False, batch_size=4, ...)
    TextEncoderCache(encode, cache_dir=None), group_static_captions(group)
    build_report(group, decode=True, duplicates=True, token_counter=None, max_token_length=None)
"""

from lorakit.data.buckets import (BucketAssigner, check_bucket_reso_steps, get_crop_ltrb,
                                  make_bucket_resolutions)
from lorakit.data.captions import process_caption
from lorakit.data.check import DatasetReport, build_report
from lorakit.data.config import DatasetConfig, SubsetConfig, build_dataset_configs, load_dataset_toml
from lorakit.data.dataset import Dataset, DatasetGroup, ImageEntry, balance_reg_repeats
from lorakit.data.latents import (TextEncoderCache, cache_latents, group_static_captions, latent_cache_refusal,
                                  latents_npz_path, text_encoder_cache_refusal)
from lorakit.data.scan import ScanCache

__all__ = [
    "BucketAssigner", "check_bucket_reso_steps", "get_crop_ltrb", "make_bucket_resolutions", "process_caption",
    "DatasetReport", "build_report", "DatasetConfig", "SubsetConfig", "build_dataset_configs", "load_dataset_toml",
    "Dataset", "DatasetGroup", "ImageEntry", "balance_reg_repeats", "TextEncoderCache", "cache_latents",
    "group_static_captions", "latent_cache_refusal", "latents_npz_path", "text_encoder_cache_refusal", "ScanCache",
]
