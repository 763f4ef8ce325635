"""Dataset and subset settings, named and defaulted like sd-scripts' config_util, declared in the option schema.

Values come from a dataset TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`) and the command line; a subset
value is looked up in the subset, then its dataset, then `[general]`, then the command-line values, then the default
below (sd-scripts' `generate_params_by_fallbacks`: the first value that is not None wins).

Without a TOML, `--train_data_dir`/`--reg_data_dir` folders named `N_class tokens` become DreamBooth subsets, and
`--in_json` makes one fine-tuning subset.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import field
from pathlib import Path
from typing import Any, Mapping

from lorakit import options as O
from lorakit.data.scan import repeat_folder_problem
from lorakit.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)


# The keys, types and defaults of dataset configs are the option schema's (lorakit.options): one declaration for the
# command line, --config_file, --dataset_config, the GUI and the docs. The two classes below are generated from it.
SUBSET_OPTIONS = O.dataset_config_keys("subset")  # every subset key (inherited ones too)
DATASET_OPTIONS = {k: o for k, o in O.dataset_config_keys("dataset").items() if o.scope == "dataset"}


def _config_class(cls_name: str, keys: dict, doc: str, extra_fields=(), members=None):
    fields = [(k, O.annotation(o), field(default=o.default)) for k, o in keys.items()]
    return dataclasses.make_dataclass(cls_name, fields + list(extra_fields),
                                      namespace={"__module__": __name__, "__doc__": doc, **(members or {})})


SubsetConfig = _config_class(
    "SubsetConfig", SUBSET_OPTIONS,
    "One image folder (DreamBooth) or one metadata file (fine-tuning): the subset keys of the option schema.",
    members={"is_finetune": property(lambda self: self.metadata_file is not None),
             "name": property(lambda self: Path(self.metadata_file).name if self.metadata_file
                              else (Path(self.image_dir).name if self.image_dir else "?"))})
DatasetConfig = _config_class(
    "DatasetConfig", DATASET_OPTIONS,
    "One dataset: a resolution and batch size shared by its subsets (the dataset keys of the option schema).",
    extra_fields=[("subsets", "list", field(default_factory=list))])

SUBSET_KEYS = set(SUBSET_OPTIONS)
DATASET_KEYS = set(DATASET_OPTIONS)
# keys that only make sense on a subset (sd-scripts' "distinct" schema)
SUBSET_ONLY_KEYS = {k for k, o in SUBSET_OPTIONS.items() if o.distinct}
# command-line names that map to another config name (sd-scripts' ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME + typo alias)
ARG_TO_CONFIG = {**{o.name: o.config_name for o in O.OPTIONS if o.config_name},
                 "dataset_repeats": "num_repeats", "caption_extention": "caption_extension"}


def _typed(o, value: Any, where: str) -> Any:
    """A value checked and converted by the schema (the error names the key and the file), as the classes hold it."""
    value = O.coerce_value(o, value, where)
    if o.type == "resolution":
        return O.parse_resolution(value)
    if o.type == "float_pair":
        return O.parse_float_pair(value)
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
    _check_keys(general, set(O.dataset_config_keys("general")), f"{path} [general]")
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"{path}: no [[datasets]] section; add at least one [[datasets]] with [[datasets.subsets]].")
    for i, ds in enumerate(datasets):
        _check_keys(ds, set(O.dataset_config_keys("dataset")) | {"subsets"}, f"{path} [[datasets]] #{i + 1}")
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
    if not isinstance(args, Mapping):  # a Namespace or the frozen Options of a run
        args = vars(args)
    out = {}
    for key, value in dict(args).items():
        key = ARG_TO_CONFIG.get(key, key)
        if key == "caption_extension" and out.get(key) is not None and value is None:
            continue
        out[key] = value
    try:
        out["resolution"] = O.parse_resolution(out.get("resolution"))
        out["face_crop_aug_range"] = O.parse_float_pair(out.get("face_crop_aug_range"))
    except ValueError as exc:
        raise UserError(f"--resolution / --face_crop_aug_range: {exc}; write WIDTH,HEIGHT (e.g. 1024,1024) or one "
                        "number, and two numbers like 2.0,4.0.") from None
    return out


def _fallback(cls, keys: dict, chains: list[Mapping], where: str):
    """sd-scripts' generate_params_by_fallbacks: each key takes the first value that is not None along `chains`."""
    values = {}
    for name, o in keys.items():
        value = next((source[name] for source in chains if source.get(name) is not None), None)
        if value is not None:
            values[name] = _typed(o, value, where)
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
                      notes: list[str] | None = None, bad_repeats: str = "error") -> list[dict]:
    """sd-scripts' generate_dreambooth_subsets_config_by_subdirs, with folders sorted by name and skips reported.
    A folder without a repeat count is skipped with a note (sd-scripts does the same: e.g. a `samples` folder); one
    with a count below 1 (`0_x`, `-3_x`) is a UserError, or with bad_repeats="skip" (`dataset check`, which
    reports every problem at once) a note."""
    out: list[dict] = []
    for base, is_reg in ((train_data_dir, False), (reg_data_dir, True)):
        if base is None:
            continue
        base_path = Path(base)
        flag = "--reg_data_dir" if is_reg else "--train_data_dir"
        if not base_path.is_dir():
            raise UserError(f"{flag} {base_path} is not a folder.")
        subdirs = sorted(p for p in base_path.iterdir() if p.is_dir() and not p.name.startswith("."))
        skipped: list[str] = []
        for sub in subdirs:
            problem = repeat_folder_problem(sub)
            if problem is not None:
                kind, msg = problem
                if kind == "error" and bad_repeats == "error":  # `0_x`: meant to be trained on, never left out
                    raise UserError(f"{flag} {base_path}: {msg}")
                skipped.append(msg)
                if notes is not None:
                    notes.append(msg)
                else:
                    logger.warning(msg)
                continue
            repeats, class_tokens = extract_dreambooth_params(sub.name)
            out.append({"image_dir": str(sub), "num_repeats": repeats, "is_reg": is_reg, "class_tokens": class_tokens})
        if not is_reg and not out:
            # the skip notes say which folders were seen and how to rename them: they belong in the error itself
            why = (" " + " ".join(skipped)) if skipped else (" It has no subfolders; images must be in `N_class` "
                                                              "subfolders, not directly in it." if not subdirs else "")
            raise UserError(f"--train_data_dir {base_path} has no usable `N_class` subfolder (e.g. `10_mychar girl`: "
                            f"10 repeats of the images inside, captions from their .txt files).{why}")
        if not subdirs and notes is not None:
            notes.append(f"{flag} {base_path} has no subfolders; images must be in `N_class` subfolders.")
    return out


def build_dataset_configs(args: Any = None, dataset_config: str | Path | dict | None = None,
                          notes: list[str] | None = None, default_resolution: int | None = None,
                          bad_repeats: str = "error") -> list[DatasetConfig]:
    """Resolve the datasets to train on, like sd-scripts' BlueprintGenerator.

    `args`: a Namespace or mapping of sd-scripts option names (train_data_dir, reg_data_dir, in_json, resolution,
    train_batch_size, caption_extension, shuffle_caption, ...). `dataset_config`: a TOML path or already-loaded dict;
    defaults to args["dataset_config"]. `notes` collects messages about skipped folders. `default_resolution` (the
    model family's) applies to command-line datasets without --resolution. `bad_repeats`: see subsets_from_dirs.
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
        if argd.get("resolution") is None and default_resolution:
            argd["resolution"] = (default_resolution, default_resolution)
        if argd.get("in_json"):
            if not argd.get("train_data_dir") and not Path(argd["in_json"]).is_file():
                raise UserError(f"--in_json {argd['in_json']} does not exist.")
            subs = [{"image_dir": argd.get("train_data_dir"), "metadata_file": argd["in_json"]}]
        else:
            if not argd.get("train_data_dir"):
                raise UserError("no dataset given: pass --train_data_dir DIR (folders `N_class`) or --dataset_config FILE.toml.")
            subs = subsets_from_dirs(argd.get("train_data_dir"), argd.get("reg_data_dir"), notes, bad_repeats)
            if not any(not s["is_reg"] for s in subs):
                raise UserError(f"--train_data_dir {argd['train_data_dir']} has no usable `N_class` subfolder "
                                "(e.g. `10_mychar girl`); put the training images in such a folder.")
        datasets_cfg = [{"subsets": subs}]

    out = []
    for i, ds in enumerate(datasets_cfg):
        ds_where = f"{where} dataset #{i + 1}"
        dataset = _fallback(DatasetConfig, DATASET_OPTIONS, [ds, general, argd], ds_where)
        if dataset.resolution is None:
            raise UserError(f"{ds_where}: resolution is required (e.g. --resolution 512,512 or resolution = 512 in the TOML).")
        for j, sub in enumerate(ds.get("subsets", [])):
            subset = _fallback(SubsetConfig, SUBSET_OPTIONS, [sub, ds, general, argd], f"{ds_where} subset #{j + 1}")
            if subset.metadata_file is None and subset.image_dir is None:
                raise UserError(f"{ds_where} subset #{j + 1}: image_dir is required.")
            dataset.subsets.append(subset)
        out.append(dataset)
    return out
