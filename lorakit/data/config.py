"""Dataset and subset settings, named and defaulted exactly like sd-scripts' config_util.

Values come from a dataset TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`) and the command line; a subset
value is looked up in the subset, then its dataset, then `[general]`, then the command-line values, then the default
below (sd-scripts' `generate_params_by_fallbacks`: the first value that is not None wins).

Without a TOML, `--train_data_dir`/`--reg_data_dir` folders named `N_class tokens` become DreamBooth subsets, and
`--in_json` makes one fine-tuning subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lorakit.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)


@dataclass
class SubsetConfig:
    """One image folder (DreamBooth) or one metadata file (fine-tuning); sd-scripts' subset params and defaults."""

    image_dir: str | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    custom_attributes: dict | None = None
    resize_interpolation: str | None = None
    # DreamBooth subsets
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".txt"  # sd-scripts defaults to .caption while its taggers write .txt: a known trap
    cache_info: bool = False
    alpha_mask: bool = False
    # fine-tuning subsets
    metadata_file: str | None = None

    @property
    def is_finetune(self) -> bool:
        return self.metadata_file is not None

    @property
    def name(self) -> str:
        if self.metadata_file:
            return Path(self.metadata_file).name
        return Path(self.image_dir).name if self.image_dir else "?"


@dataclass
class DatasetConfig:
    """One dataset: a resolution and batch size shared by its subsets; sd-scripts' dataset params and defaults."""

    resolution: tuple[int, int] | None = None
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0
    network_multiplier: float = 1.0
    resize_interpolation: str | None = None
    # lorakit additions (not in sd-scripts; defaults keep sd-scripts' behaviour)
    bucket_log_aspect: bool = False  # nearest bucket by |log(aspect)| instead of |aspect|
    reg_sampling: str = "round_robin"  # "round_robin" (sd-scripts) or "random" (fresh reg draw each epoch)
    subsets: list[SubsetConfig] = field(default_factory=list)


SUBSET_KEYS = {f.name for f in dataclasses.fields(SubsetConfig)}
DATASET_KEYS = {f.name for f in dataclasses.fields(DatasetConfig)} - {"subsets"}
# keys that only make sense on a subset (sd-scripts' "distinct" schema)
SUBSET_ONLY_KEYS = {"image_dir", "is_reg", "alpha_mask", "metadata_file"}
# command-line names that map to another config name (sd-scripts' ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME + typo alias)
ARG_TO_CONFIG = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats", "caption_extention": "caption_extension"}

_BOOL_KEYS = {f.name for f in dataclasses.fields(SubsetConfig) if f.type in ("bool",)} | {
    f.name for f in dataclasses.fields(DatasetConfig) if f.type in ("bool",)
}
_INT_KEYS = {"num_repeats", "keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min", "batch_size",
             "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"}
_FLOAT_KEYS = {"caption_dropout_rate", "caption_tag_dropout_rate", "token_warmup_step", "prior_loss_weight",
               "network_multiplier"}


def parse_resolution(value: Any, where: str = "resolution") -> tuple[int, int] | None:
    """'512' / '512,768' / 512 / [512, 768] -> (width, height)."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            parts = [int(p.strip()) for p in value.split(",") if p.strip()]
        elif isinstance(value, (int, float)):
            parts = [int(value)]
        else:
            parts = [int(v) for v in value]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or min(parts) <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a resolution; write WIDTH,HEIGHT (e.g. 1024,1024) or one number.") from None
    return parts[0], parts[1]


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check one value's type like sd-scripts' voluptuous schema; the error names the key and the file."""
    if value is None:
        return None
    bad = False
    if key in _BOOL_KEYS:
        bad = not isinstance(value, bool)
    elif key in _INT_KEYS:
        bad = isinstance(value, bool) or not isinstance(value, int)
    elif key in _FLOAT_KEYS:
        bad = isinstance(value, bool) or not isinstance(value, (int, float))
        value = value if bad else float(value)
    elif key == "resolution":
        return parse_resolution(value, f"{where}: resolution")
    elif key == "face_crop_aug_range":
        try:
            lo, hi = (float(v) for v in value)
            return (lo, hi)
        except (TypeError, ValueError):
            raise UserError(f"{where}: face_crop_aug_range must be two numbers like [2.0, 4.0], got {value!r}.") from None
    elif key == "custom_attributes":
        bad = not isinstance(value, dict)
    elif key == "reg_sampling":
        bad = value not in ("round_robin", "random")
    elif key in SUBSET_KEYS | DATASET_KEYS:
        bad = not isinstance(value, str)
    if bad:
        raise UserError(f"{where}: `{key}` has the wrong type ({value!r}); see the sd-scripts dataset config docs for its type.")
    return value


def _check_keys(section: Mapping, allowed: set[str], where: str) -> None:
    for key in section:
        if key not in allowed:
            raise UserError(f"{where}: unknown key `{key}`. Allowed here: {', '.join(sorted(allowed))}.")


def load_dataset_toml(path: str | Path) -> dict:
    """Read a dataset config (.toml or .json) and check its keys; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset config {path} does not exist.")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"dataset config {path} cannot be parsed: {exc}. Fix the syntax and try again.") from None
    _check_keys(data, {"general", "datasets"}, f"{path}")
    general = data.get("general", {})
    _check_keys(general, (SUBSET_KEYS | DATASET_KEYS) - SUBSET_ONLY_KEYS, f"{path} [general]")
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"{path}: no [[datasets]] section; add at least one [[datasets]] with [[datasets.subsets]].")
    for i, ds in enumerate(datasets):
        _check_keys(ds, ((SUBSET_KEYS | DATASET_KEYS) - SUBSET_ONLY_KEYS) | {"subsets"}, f"{path} [[datasets]] #{i + 1}")
        subsets = ds.get("subsets", [])
        if not subsets:
            raise UserError(f"{path} [[datasets]] #{i + 1}: no [[datasets.subsets]]; add one with image_dir = \"...\".")
        kinds = {"metadata_file" in s for s in subsets}
        if len(kinds) > 1:
            raise UserError(f"{path} [[datasets]] #{i + 1}: DreamBooth subsets (image_dir) and fine-tuning subsets "
                            "(metadata_file) cannot be mixed in one dataset; split them into two [[datasets]].")
        for j, sub in enumerate(subsets):
            where = f"{path} [[datasets]] #{i + 1} subset #{j + 1}"
            _check_keys(sub, SUBSET_KEYS, where)
            if "image_dir" not in sub and "metadata_file" not in sub:
                raise UserError(f"{where}: image_dir is required.")
    data["_path"] = str(path)
    return data


def _args_to_dict(args: Any) -> dict:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    out = {}
    for key, value in dict(args).items():
        key = ARG_TO_CONFIG.get(key, key)
        if key == "caption_extension" and out.get(key) is not None and value is None:
            continue
        out[key] = value
    if out.get("resolution") is not None:
        out["resolution"] = parse_resolution(out["resolution"], "--resolution")
    if out.get("face_crop_aug_range") is not None and isinstance(out["face_crop_aug_range"], str):
        out["face_crop_aug_range"] = tuple(float(v) for v in out["face_crop_aug_range"].split(","))
    return out


def _fallback(cls, chains: list[Mapping], where: str):
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)}
    values = {}
    for name, default in defaults.items():
        if name == "subsets":
            continue
        value = None
        for source in chains:
            if source.get(name) is not None:
                value = source[name]
                break
        values[name] = default if value is None else _coerce(name, value, where)
    return cls(**values)


def extract_dreambooth_params(name: str) -> tuple[int, str]:
    """'20_usu bear' -> (20, 'usu bear'); (0, '') when the name has no leading number (sd-scripts' rule)."""
    tokens = name.split("_")
    try:
        repeats = int(tokens[0])
    except ValueError:
        return 0, ""
    return repeats, "_".join(tokens[1:])


def subsets_from_dirs(train_data_dir: str | None, reg_data_dir: str | None,
                      notes: list[str] | None = None) -> list[dict]:
    """sd-scripts' generate_dreambooth_subsets_config_by_subdirs, with folders sorted by name and skips reported."""
    out: list[dict] = []
    for base, is_reg in ((train_data_dir, False), (reg_data_dir, True)):
        if base is None:
            continue
        base_path = Path(base)
        flag = "--reg_data_dir" if is_reg else "--train_data_dir"
        if not base_path.is_dir():
            raise UserError(f"{flag} {base_path} is not a folder.")
        subdirs = sorted(p for p in base_path.iterdir() if p.is_dir() and not p.name.startswith("."))
        for sub in subdirs:
            repeats, class_tokens = extract_dreambooth_params(sub.name)
            if repeats < 1:
                msg = (f"folder {sub} is skipped: its name has no leading repeat count. Rename it `N_class tokens` "
                       f"(e.g. `10_{sub.name}`) to train on it.")
                if notes is not None:
                    notes.append(msg)
                else:
                    logger.warning(msg)
                continue
            out.append({"image_dir": str(sub), "num_repeats": repeats, "is_reg": is_reg, "class_tokens": class_tokens})
        if not subdirs and notes is not None:
            notes.append(f"{flag} {base_path} has no subfolders; images must be in `N_class` subfolders.")
    return out


def build_dataset_configs(args: Any = None, dataset_config: str | Path | dict | None = None,
                          notes: list[str] | None = None) -> list[DatasetConfig]:
    """Resolve the datasets to train on, like sd-scripts' BlueprintGenerator.

    `args`: a Namespace or mapping of sd-scripts option names (train_data_dir, reg_data_dir, in_json, resolution,
    train_batch_size, caption_extension, shuffle_caption, ...). `dataset_config`: a TOML path or already-loaded dict;
    defaults to args["dataset_config"]. `notes` collects messages about skipped folders.
    """
    argd = _args_to_dict(args)
    dataset_config = dataset_config if dataset_config is not None else argd.get("dataset_config")
    if dataset_config is not None:
        user = dataset_config if isinstance(dataset_config, dict) else load_dataset_toml(dataset_config)
        where = user.get("_path", "dataset config")
        general = user.get("general", {})
        datasets_cfg = user.get("datasets", [])
    else:
        where = "command line"
        general = {}
        if argd.get("in_json"):
            if not argd.get("train_data_dir") and not Path(argd["in_json"]).is_file():
                raise UserError(f"--in_json {argd['in_json']} does not exist.")
            subs = [{"image_dir": argd.get("train_data_dir"), "metadata_file": argd["in_json"]}]
        else:
            if not argd.get("train_data_dir"):
                raise UserError("no dataset given: pass --train_data_dir DIR (folders `N_class`) or --dataset_config FILE.toml.")
            subs = subsets_from_dirs(argd.get("train_data_dir"), argd.get("reg_data_dir"), notes)
            if not any(not s["is_reg"] for s in subs):
                raise UserError(f"--train_data_dir {argd['train_data_dir']} has no usable `N_class` subfolder "
                                "(e.g. `10_mychar girl`); put the training images in such a folder.")
        datasets_cfg = [{"subsets": subs}]

    out = []
    for i, ds in enumerate(datasets_cfg):
        ds_where = f"{where} dataset #{i + 1}"
        dataset = _fallback(DatasetConfig, [ds, general, argd], ds_where)
        if dataset.resolution is None:
            raise UserError(f"{ds_where}: resolution is required (e.g. --resolution 512,512 or resolution = 512 in the TOML).")
        for j, sub in enumerate(ds.get("subsets", [])):
            subset = _fallback(SubsetConfig, [sub, ds, general, argd], f"{ds_where} subset #{j + 1}")
            if subset.metadata_file is None and subset.image_dir is None:
                raise UserError(f"{ds_where} subset #{j + 1}: image_dir is required.")
            dataset.subsets.append(subset)
        out.append(dataset)
    return out
