"""Traced steps kept between runs (~/.cache/lorakit/memory, or $LORAKIT_CACHE_DIR/memory).

Tracing a step of full-size SD1.5 with fake tensors takes ~2 s of single-threaded Python (plus ~0.6 s to collect
its garbage), and the GUI traces again whenever a field changes. What the trace decides - weights, trainable
parameters, optimizer state, the activation peak - depends only on the model's configs, the step's shape, the
options that build and run the step, the device and the code, so it is kept under a digest of exactly those: the
same settings on another dataset of the same shape, with another output folder, step count or seed, reuse it;
any edit to lorakit or upgrade of torch/diffusers/transformers traces again (utils.cache.code_fingerprint). The
caches and the process' own memory are computed fresh every time."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

from lorakit.errors import UserError
from lorakit.utils.atomic import write_text_atomic
from lorakit.utils.cache import cache_root, code_fingerprint

logger = logging.getLogger(__name__)
VERSION = 1

# option groups that never reach a training step (what is saved, logged, sampled, validated; how long it runs)
_UNKEYED_GROUPS = frozenset({"output", "metadata", "logging", "sampling", "steps", "validation", "misc"})
# files and folders (the model's shapes are keyed by its configs, the data's by the step shape), the schedule of the
# learning rate (the rates themselves stay keyed: a zero rate can leave parameters untrained) and the memory check's
# own options
_UNKEYED = frozenset({"pretrained_model_name_or_path", "vae", "clip_l", "t5xxl", "ae", "tokenizer_cache_dir",
                      "train_data_dir", "reg_data_dir", "in_json", "dataset_config", "image_dir", "metadata_file",
                      "conditioning_data_dir", "network_weights", "base_weights", "training_comment", "no_metadata",
                      "lr_scheduler", "lr_scheduler_type", "lr_scheduler_args", "lr_warmup_steps", "lr_decay_steps",
                      "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_timescale",
                      "lr_scheduler_min_lr_ratio", "estimate_memory", "max_memory", "auto_fit"})


@dataclass(frozen=True)
class TracedStep:
    """What a traced step decides: bytes of the device's weights, of the trainable parameters (their gradients are
    as large), of the optimizer state and the activation peak, and the notes the trace wrote."""

    weights: int
    trainable: int
    optimizer: int
    activations: int
    notes: tuple[str, ...] = ()


def step_key(opts, device, weight_dtype, family_name: str, configs: dict, shape: tuple[int, int, int]) -> str:
    from lorakit import options as O

    keyed = {o.name: repr(getattr(opts, o.name, None)) for o in O.OPTIONS
             if o.group not in _UNKEYED_GROUPS and o.name not in _UNKEYED}
    payload = {"version": VERSION, "code": code_fingerprint(), "device": str(device), "dtype": str(weight_dtype),
               "family": family_name, "configs": configs, "shape": list(shape), "options": keyed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()


def _file(key: str):
    return cache_root() / "memory" / f"{key[:40]}.json"


def load(key: str) -> TracedStep | None:
    try:
        raw = json.loads(_file(key).read_text(encoding="utf-8"))
        if raw.get("key") != key:
            return None
        t = raw["traced"]
        return TracedStep(int(t["weights"]), int(t["trainable"]), int(t["optimizer"]), int(t["activations"]),
                          tuple(str(n) for n in t.get("notes", ())))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(key: str, traced: TracedStep) -> None:
    try:
        write_text_atomic(_file(key), json.dumps({"key": key, "traced": asdict(traced)}))
    except (OSError, UserError) as exc:  # a read-only cache only costs the next run its trace
        logger.warning("memory prediction not cached (%s): %s", _file(key), exc)
