"""The shape of a run: options resolved once and frozen, stages that declare the options they read, one schema for
dataset configs, and family rules read from the family descriptor only."""

import argparse
import copy
import dataclasses
import re
from pathlib import Path

import pytest

from lorakit import options as O
from lorakit.errors import UserError
from test_train_common import dataset, one_thread, options, run  # noqa: F401

LORAKIT = Path(__file__).resolve().parents[1] / "lorakit"


def test_normalize_freezes_and_resolves_implied_flags():
    ns = O.resolve(["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--seed", "7"])
    opts = O.normalize(ns)
    assert opts.cache_latents is True and opts.cache_text_encoder_outputs is True and opts.seed == 7
    assert ns.cache_latents is False  # the caller's namespace is left alone
    assert opts._given == {"cache_latents_to_disk", "cache_text_encoder_outputs_to_disk", "seed"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 8
    assert O.normalize(opts) is opts
    # anything with option attributes works; missing ones take their defaults
    partial = O.normalize(argparse.Namespace(learning_rate=0.5))
    assert partial.learning_rate == 0.5 and partial.max_train_steps == 1600 and partial._given == frozenset()


def test_train_does_not_write_the_options(tmp_path):
    data = dataset(tmp_path, n_train=1)
    ns = options(tmp_path, data, "--max_train_steps", "1", "--network_train_unet_only", "--cache_latents_to_disk")
    ns.seed, ns.resolution = None, None  # the run draws a seed and takes the family's resolution
    before = copy.deepcopy(vars(ns))
    result = run(ns)
    assert vars(ns) == before
    assert result.global_step == 1


def test_each_stage_reads_only_declared_options():
    from lorakit.train import checkpointer, loop, previews, stages, steplog

    declared = [stages.RunOptions, stages.LoadOptions, stages.ModelOptions, stages.DataOptions,
                stages.NetworkOptions, stages.InputOptions, stages.OptimizerOptions, checkpointer.SaveOptions,
                previews.PreviewOptions, steplog.LogOptions, loop.NoiseOptions, loop.LossOptions, loop.LoopOptions]
    for cls in declared:
        fields = list(dataclasses.fields(cls))
        while any("options" in f.metadata for f in fields):  # nested option groups (ModelOptions.flow)
            fields = [g for f in fields for g in (dataclasses.fields(f.metadata["options"]) if "options" in f.metadata
                                                  else [f])]
        for f in fields:
            assert f.name in O.OPTIONS_BY_NAME and O.OPTIONS_BY_NAME[f.name].cli, (cls.__name__, f.name)
        picked = stages.picked(cls, O.normalize(O.resolve([])))
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(picked, dataclasses.fields(cls)[0].name, None)


def test_dataset_config_classes_are_the_schema():
    from lorakit.data.config import DatasetConfig, SubsetConfig, build_dataset_configs

    subset = {f.name: f.default for f in dataclasses.fields(SubsetConfig)}
    assert subset == {k: o.default for k, o in O.dataset_config_keys("subset").items()}
    ds_keys = {f.name for f in dataclasses.fields(DatasetConfig)} - {"subsets"}
    assert ds_keys == {k for k, o in O.dataset_config_keys("dataset").items() if o.scope == "dataset"}
    # values are checked by the schema: the error names the key and where it was
    bad = {"datasets": [{"resolution": 64, "batch_size": "two", "subsets": [{"image_dir": "x"}]}], "_path": "d.toml"}
    with pytest.raises(UserError, match=r"'batch_size' in d.toml dataset #1 is 'two'"):
        build_dataset_configs({}, dataset_config=bad)
    cfg = build_dataset_configs({}, dataset_config={"datasets": [{"resolution": [64, 128], "subsets": [
        {"image_dir": "x", "face_crop_aug_range": [2, 4], "caption_dropout_rate": 0}]}]})[0]
    assert cfg.resolution == (64, 128) and cfg.subsets[0].face_crop_aug_range == (2.0, 4.0)
    assert cfg.subsets[0].caption_dropout_rate == 0.0 and isinstance(cfg.subsets[0].caption_dropout_rate, float)


def test_one_resolution_parser_and_one_dtype_map():
    import torch

    from lorakit.models.dtypes import DTYPES, dtype_named

    assert O.parse_resolution("768,512") == (768, 512) and O.parse_resolution("1024x768") == (1024, 768)
    assert O.parse_resolution(512.0) == (512, 512) and O.parse_resolution([64]) == (64, 64)
    with pytest.raises(ValueError):
        O.parse_resolution("big")
    assert dtype_named("bf16") is torch.bfloat16 and dtype_named("no", torch.float32) is torch.float32
    assert {DTYPES[k] for k in ("fp16", "float16", "half")} == {torch.float16}


# name comparisons and proxies that stand for "is SDXL" / "is SD2": only lorakit/models/ may decide by family
FAMILY_BRANCHES = re.compile(r"""(\bfam(ily)?\.name\s*[!=]=|\.family\.name\s*[!=]=|size_conditioning|"""
                             r"""lora_unet_style\s*[!=]=|\{\s*"sd2",\s*"sd2-v"\s*\}|ALL_FAMILIES|FAMILY_TITLES)""")


def test_no_family_branches_outside_models():
    found = []
    for path in LORAKIT.rglob("*.py"):
        if path.relative_to(LORAKIT).parts[0] == "models":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FAMILY_BRANCHES.search(line.split("#")[0]):
                found.append(f"{path.relative_to(LORAKIT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_family_rules_are_named_attributes():
    from lorakit.models.families import FAMILIES, family_from_flags

    sd1, sd2, sd2v, xl = (FAMILIES[n] for n in ("sd1", "sd2", "sd2-v", "sdxl"))
    assert [f.context_width for f in (sd1, sd2, xl)] == [768, 1024, 2048]
    assert sd2.shares_weights_with(sd2v) and not sd1.shares_weights_with(sd2)
    assert not xl.vae_fp16_safe and sd1.vae_fp16_safe and xl.latent_cache_suffix == "sdxl"
    assert xl.diffusers_pipeline == "StableDiffusionXLPipeline" and sd2.is_v2 and not xl.is_v2
    # sd-scripts' --clip_skip (training) vs A1111's clip skip (generation)
    assert (sd2.train_clip_layer(1), sd2.train_clip_layer(2), sd2.prompt_clip_layer(1)) == (2, 3, 2)
    assert (xl.train_clip_layer(1), xl.prompt_clip_layer(3), sd1.prompt_clip_layer(2)) == (2, 2, 2)
    assert family_from_flags(v2=True, v_parameterization=True) is sd2v and family_from_flags(default="sd1") is sd1


def test_cache_progress_lines_report_count_rate_and_time_left_and_stay_quiet_when_quick():
    from lorakit.train.stages import ProgressLines

    lines: list[str] = []
    every_call = ProgressLines(lines.append, "latents", every=0.0)
    every_call(2, 8)
    every_call(8, 8)
    assert lines[0].startswith("  latents: 2/8 done (") and "s each, about" in lines[0] and "s left)" in lines[0]
    assert lines[1].startswith("  latents: 8/8 done (") and "left" not in lines[1]
    quiet: list[str] = []
    quick = ProgressLines(quiet.append, "captions", every=60.0)
    quick(1, 2)
    quick(2, 2)
    assert quiet == []  # a cache filled in under a minute: the caller's own summary line is enough


def test_allocator_keeps_freed_memory_for_low_rank_networks_only(tmp_path, monkeypatch):
    """glibc is told to keep freed blocks (lorakit.utils.allocator) for LoRA runs on the CPU, not for LoHa, whose
    full-size temporaries would fragment a heap that keeps everything; and mallopt really takes the settings."""
    import ctypes
    import ctypes.util
    import sys

    from lorakit.utils import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    data = dataset(tmp_path, n_train=1)
    run(options(tmp_path / "a", data, "--max_train_steps", "1"))
    assert calls == [1]
    run(options(tmp_path / "b", data, "--max_train_steps", "1", "--network_module", "lycoris.kohya",
                "--network_args", "algo=loha"))
    assert calls == [1]
    monkeypatch.undo()
    if sys.platform.startswith("linux") and ctypes.util.find_library("c"):
        assert allocator.keep_freed_memory() is True


def test_importing_lorakit_asks_torch_for_huge_pages_unless_the_user_chose():
    """utils/allocator.prefer_huge_pages: torch's CPU allocator then madvises blocks of 2 MB and more as huge pages
    (seen in the process' AnonHugePages where the kernel gives them on request, THP "madvise"); a user's
    THP_MEM_ALLOC_ENABLE=0 is kept. Fresh interpreters: torch reads the variable at its first large allocation."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import os, lorakit, torch\n"
            "ts = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(4)]\n"
            "huge = [line.split()[1] for line in open('/proc/self/smaps_rollup') if line.startswith('AnonHuge')]\n"
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], int(huge[0]) if huge else -1)\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    asked = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                          capture_output=True, text=True, check=True).stdout
    assert asked.split()[0] == "1" and kept.split()[0] == "0"
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if mode.exists() and "[madvise]" in mode.read_text():
        assert int(asked.split()[1]) > 0 and int(kept.split()[1]) == 0  # kB in huge pages: only when asked
