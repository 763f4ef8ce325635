"""The Train tab's form, generated from `lorakit.options.OPTIONS` (the schema of `lorakit train`), without gradio.

Every command-line option is a field: bool -> checkbox, options with choices -> dropdown, everything else -> text
converted by the same converter argparse uses for the flag. Values go form -> `given` (what the user set, like the
command line) -> `options.resolve_given` -> Namespace, so the GUI, the CLI and `--config_file` can never disagree.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
from dataclasses import dataclass
from typing import Any

from lorakit import options as O
from lorakit.errors import UserError

# Options handled by the preset box instead of fields.
NOT_FIELDS = ("config_file", "output_config")

# The basic view, in the order of the seed's tabs: source model, folders, training parameters.
BASIC_SECTIONS: list[tuple[str, list[str]]] = [
    ("Source model", ["pretrained_model_name_or_path", "v2", "v_parameterization", "sdxl"]),
    ("Folders", ["train_data_dir", "reg_data_dir", "output_dir", "output_name"]),
    ("Training parameters", [
        "resolution", "train_batch_size", "max_train_epochs", "max_train_steps", "network_dim", "network_alpha",
        "learning_rate", "unet_lr", "text_encoder_lr", "optimizer_type", "lr_scheduler", "lr_warmup_steps",
        "mixed_precision", "save_precision", "save_every_n_epochs", "save_state", "seed", "enable_bucket",
        "cache_latents", "caption_extension", "shuffle_caption", "keep_tokens", "clip_skip", "network_train_unet_only",
        "gradient_checkpointing", "sample_prompts", "sample_every_n_epochs", "sample_sampler", "logging_dir"]),
]
# shown under the source model once it is detected as FLUX.1 (flux_section_visible), hidden for SD models
FLUX_SECTION = ("FLUX.1", ["clip_l", "t5xxl", "ae", "tokenizer_cache_dir", "t5xxl_max_token_length",
                           "apply_t5_attn_mask", "timestep_sampling", "discrete_flow_shift", "model_prediction_type",
                           "guidance_scale", "weighting_scheme", "blocks_to_swap"])
BASIC_SECTIONS.insert(1, FLUX_SECTION)
BASIC_NAMES: list[str] = [n for _, names in BASIC_SECTIONS for n in names]

# Suggestions for free-text options (custom values stay allowed).
SUGGESTIONS = {
    "optimizer_type": ["", "AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "DAdaptation",
                       "DAdaptAdam", "DAdaptLion", "Prodigy", "AdaFactor", "RAdamScheduleFree", "AdamWScheduleFree"],
    "network_module": ["networks.lora", "lycoris.kohya", "networks.dylora"],
}

REQUIRED = {"pretrained_model_name_or_path": "the base model file or folder",
            "output_dir": "the folder for the LoRA files"}
# input paths that must exist when set (output folders are created by the trainer)
INPUT_PATHS = ("pretrained_model_name_or_path", "vae", "train_data_dir", "reg_data_dir", "in_json", "dataset_config",
               "network_weights", "base_weights", "sample_prompts", "resume", "conditioning_data_dir")
OUTPUT_PATHS = ("output_dir", "logging_dir", "console_log_file")
# every path option is resolved and must lie under the GUI's roots (also those not listed above, e.g. vae)
PATH_FIELDS = tuple(dict.fromkeys(INPUT_PATHS + OUTPUT_PATHS + tuple(
    o.name for o in O.OPTIONS if o.cli and o.type == "path" and o.name not in NOT_FIELDS)))
# options that take a path or a keyword: the path form is held to the roots like PATH_FIELDS
PATH_OR_KEYWORD = {"eval_tagger": ("toy",)}


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "checkbox" | "dropdown" | "text"
    label: str
    help: str
    group: str
    basic: bool
    default: Any  # the widget's initial value
    choices: tuple | None = None
    custom: bool = False  # dropdown also takes typed values


def field_label(o: O.Option) -> str:
    return o.name


def field_help(o: O.Option) -> str:
    text = o.help
    if o.type not in ("bool", "str", "path") or o.is_list:
        text += f" [{o.type}{' list, space separated' if o.is_list else ''}]"
    if o.default not in (None, "", False, []):
        text += f" (default: {o.default})"
    return text


def to_widget_value(o: O.Option, value: Any) -> Any:
    """A Namespace/TOML value as the widget shows it."""
    if o.type == "bool":
        return bool(value)
    if value is None:
        return ""
    if o.is_list:
        return shlex.join(str(v) for v in value)
    return str(value)


def form_fields() -> list[Field]:
    """One Field per command-line option (except the preset controls), basic ones first in BASIC_SECTIONS order."""
    out = []
    for o in sorted((o for o in O.OPTIONS if o.cli and o.name not in NOT_FIELDS),
                    key=lambda o: (BASIC_NAMES.index(o.name) if o.name in BASIC_NAMES else len(BASIC_NAMES))):
        if o.type == "bool":
            kind, choices = "checkbox", None
        elif o.choices is not None and not o.is_list:
            kind, choices = "dropdown", tuple("" if c is None else str(c) for c in o.choices)
            if o.default is None and "" not in choices:  # empty: leave the option unset
                choices = ("",) + choices
        elif o.name in SUGGESTIONS:
            kind, choices = "dropdown", tuple(SUGGESTIONS[o.name])
        else:
            kind, choices = "text", None
        out.append(Field(o.name, kind, field_label(o), field_help(o), o.group, o.name in BASIC_NAMES,
                         to_widget_value(o, o.default), choices, custom=o.name in SUGGESTIONS))
    return out


def default_values() -> dict[str, Any]:
    return {f.name: f.default for f in form_fields()}


# ---- form -> options ------------------------------------------------------------------------------------------------
def _convert(o: O.Option, raw: Any) -> Any:
    """The widget's value -> the option's value, through the CLI's own converter. ValueError with a message."""
    if o.type == "bool":
        return bool(raw)
    text = "" if raw is None else str(raw).strip()
    if text == "":
        return None
    conv = O._cli_converter(o)
    items = shlex.split(text) if o.is_list else [text]
    values = []
    for item in items:
        try:
            values.append(conv(item))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
    if o.choices is not None and not o.is_list and values[0] not in o.choices:
        raise ValueError(f"{text!r} is not one of {', '.join(str(c) for c in o.choices if c is not None)}")
    return values if o.is_list else values[0]


def form_to_given(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Widget values -> (given: {option: value} for the values that differ from the default, errors: {option: msg}).

    An empty text field means "the default", like leaving the flag out.
    """
    given: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, raw in values.items():
        o = O.OPTIONS_BY_NAME.get(name)
        if o is None or not o.cli or name in NOT_FIELDS:
            continue
        try:
            v = _convert(o, raw)
        except ValueError as exc:
            errors[name] = str(exc)
            continue
        if v is None or v == o.default or (o.is_list and not v):
            continue
        given[name] = v
    return given, errors


def given_to_values(given: dict[str, Any]) -> dict[str, Any]:
    """{option: value} (from a preset) -> widget values for every field (unset fields show their default)."""
    values = default_values()
    for k, v in given.items():
        o = O.get_option(k)
        if o.name in values:
            values[o.name] = to_widget_value(o, v)
    return values


_FLAG_RE = re.compile(r"--([A-Za-z0-9_]+)")


def field_of_message(message: str) -> str | None:
    """The first option named `--flag` in an error message (the trainer's checks name the flag they refuse)."""
    for m in _FLAG_RE.finditer(message):
        try:
            return O.get_option(m.group(1)).name
        except KeyError:
            continue
    return None


def prepare(values: dict[str, Any], roots=None) -> tuple[dict[str, Any], argparse.Namespace | None, dict[str, str]]:
    """Check a form the way `lorakit train` would before loading anything: types and choices (the CLI converters),
    required fields, input paths exist (and lie under the GUI's roots, made absolute there so the worker process
    reads the same files), then the trainer's own combination checks.
    Returns (given, resolved Namespace or None, {field: message})."""
    from pathlib import Path

    given, errors = form_to_given(values)
    for name, what in REQUIRED.items():
        if name not in given and name not in errors:
            errors[name] = f"required: {what}."
    if not any(k in given for k in ("train_data_dir", "dataset_config", "in_json")) and "train_data_dir" not in errors:
        errors["train_data_dir"] = "required: the folder of `N_name` image subfolders (or set dataset_config)."
    for name in PATH_FIELDS + tuple(PATH_OR_KEYWORD):
        if name not in given or given[name] in PATH_OR_KEYWORD.get(name, ()):
            continue
        paths = given[name] if isinstance(given[name], list) else [given[name]]
        resolved = []
        for p in paths:
            if roots is not None:
                try:
                    p = str(roots.check(p, name))
                except UserError as exc:
                    errors[name] = str(exc)
                    break
            if name in INPUT_PATHS and not Path(p).exists():
                errors[name] = f"{p} does not exist."
                break
            resolved.append(p)
        else:
            given[name] = resolved if isinstance(given[name], list) else resolved[0]
    if "output_name" in given and "output_name" not in errors:
        from lorakit.train.preflight import check_output_name

        try:  # a file name inside output_dir: "../../x" or "/abs/x" would write outside it (and the roots)
            check_output_name(given["output_name"])
        except UserError as exc:
            errors["output_name"] = str(exc)
    if given.get("log_prefix") is not None:
        from lorakit.train.preflight import check_file_name

        try:  # the TensorBoard folder's name inside logging_dir
            check_file_name("--log_prefix", given["log_prefix"], "it names a folder inside --logging_dir",
                            "--logging_dir")
        except UserError as exc:
            errors["log_prefix"] = str(exc)
    if roots is not None and not errors:
        # a folder or TOML inside the roots may still lead outside: symlinks below it, image_dir entries, JSON keys
        errors.update(roots.check_dataset(given.get("train_data_dir"), given.get("reg_data_dir"),
                                          given.get("dataset_config"), given.get("in_json")))
    if errors:
        return given, None, errors
    ns = O.resolve_given(given)
    try:
        from lorakit.models.families import family_from_flags
        from lorakit.train.preflight import check_values

        check_values(ns)  # ranges and combinations (resolution vs bucket step, learning rates...), model-free
        from lorakit.train.trainer import check_options

        check_options(copy.copy(ns), family_from_flags(v2=ns.v2, sdxl=ns.sdxl, default="sd1"))
    except UserError as exc:
        errors[field_of_message(str(exc)) or "_form"] = str(exc)
        return given, None, errors
    return given, ns, {}


def validate(values: dict[str, Any], roots=None) -> tuple[argparse.Namespace | None, dict[str, str]]:
    """`prepare` without the given values: (Namespace or None, {field: message})."""
    _, ns, errors = prepare(values, roots)
    return ns, errors


# ---- command line and presets ---------------------------------------------------------------------------------------
def command_args(given: dict[str, Any]) -> list[str]:
    """The flags of `lorakit train` that give these values (schema order)."""
    argv: list[str] = []
    for o in O.OPTIONS:
        if o.name not in given:
            continue
        v = given[o.name]
        if o.type == "bool":
            if v:
                argv.append(f"--{o.name}")
            continue
        if o.is_list:
            argv += [f"--{o.name}"] + [str(x) for x in v]
        else:
            argv += [f"--{o.name}", _text(v)]
    return argv


def _text(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def command_line(given: dict[str, Any]) -> str:
    return shlex.join(["lorakit", "train", *command_args(given)])


def save_preset(values: dict[str, Any], path) -> str:
    """Write the form as a `--config_file` TOML (the non-default values); returns the path written."""
    given, errors = form_to_given(values)
    if errors:
        name, msg = next(iter(errors.items()))
        raise UserError(f"{name}: {msg}")
    ns = O.resolve_given(given)
    return str(O.write_config_file(ns, path, overwrite=True))


def load_preset(path) -> dict[str, Any]:
    """A `--config_file` TOML -> widget values for every field."""
    return given_to_values(O.load_config_file(path))


__all__ = ["Field", "BASIC_SECTIONS", "BASIC_NAMES", "NOT_FIELDS", "form_fields", "default_values", "form_to_given",
           "given_to_values", "prepare", "validate", "field_of_message", "command_args", "command_line", "save_preset",
           "load_preset"]


def detected_family(model_path: str | None, roots, v2: bool = False, v_parameterization: bool = False,
                    sdxl: bool = False):
    """(family or None, a line for the form) from the header of a model path inside the GUI's roots (no weights
    read)."""
    from lorakit.errors import UserError
    from lorakit.models.loading import plan_model

    if not model_path or not str(model_path).strip():
        return None, ""
    try:
        path = roots.check(str(model_path).strip(), "base model")
        if not path.exists():
            return None, "Model: not found yet (the family is read from the file once it exists)."
        plan = plan_model(path, v2=v2, v_parameterization=v_parameterization, sdxl=sdxl)
    except UserError as e:
        return None, f"Model: {e}"
    fam = plan.family
    extra = " The FLUX.1 section below applies." if fam.objective == "flow" else ""
    return fam, f"Model: **{fam.title}** (detected from the file).{extra}"


def flux_section_visible(family) -> bool:
    """The FLUX.1 options mean something for this model (its flags are refused on SD models)."""
    return family is not None and family.objective == "flow"
