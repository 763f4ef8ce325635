"""Checks that run before the model loads: nothing that can be checked in a second is discovered after an hour.

    notes = preflight(opts)        # raises UserError (one paragraph naming the flag); returns notes to log

`train()` runs it in two parts: `check_before_run` (values, inputs, outputs) before anything opens a file, and
`check_before_load` (disk space with the scanned dataset's steps per epoch; optimizer, scheduler and network
arguments for the planned model family) after the data scan, before the checkpoint loads.

- every option in its range (the schema's Option.check) and the combinations a range cannot express (a learning
  rate that trains nothing, the resolution against the bucket step, bucket limits, timesteps, output_name);
- input files and folders exist;
- the output, logging and console-log folders can be written (created and probed with a test file), also when a
  parent is a file or the folder is read-only;
- the disk holding --output_dir has room for every LoRA and state the save schedule will write (an upper bound);
- the optimizer and scheduler names and their arguments, and the network module and --network_args.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lorakit import options as O
from lorakit.errors import UserError

HEADER_BYTES_PER_MODULE = 3 * 150  # down, up, alpha entries of the safetensors JSON header


def _get(opts, name: str, default: Any = None) -> Any:
    value = opts.get(name, default) if isinstance(opts, dict) else getattr(opts, name, default)
    return default if value is None else value


# ---- option values ---------------------------------------------------------------------------------------------
def check_values(opts) -> None:
    """Ranges of single options (Option.check), then the combinations a range cannot express."""
    O.check_ranges(opts)
    _check_learning_rates(opts)
    _check_resolution(opts)
    lo, hi = _get(opts, "min_timestep"), _get(opts, "max_timestep")
    if lo is not None and hi is not None and lo >= hi:
        raise UserError(f"--min_timestep {lo} must be below --max_timestep {hi} (timesteps are drawn from "
                        "min <= t < max).")
    if _get(opts, "network_train_unet_only", False) and _get(opts, "network_train_text_encoder_only", False):
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other; pick one "
                        "(or neither to train both).")
    check_output_name(_get(opts, "output_name"))
    check_file_name("--log_prefix", _get(opts, "log_prefix"), "the TensorBoard folder is --logging_dir/<log_prefix><time>",
                    "--logging_dir")


def _check_learning_rates(opts) -> None:
    base = _get(opts, "learning_rate", 0.0)
    unet_lr = _get(opts, "unet_lr")
    te_lr = _get(opts, "text_encoder_lr") or []
    te_lr = te_lr if isinstance(te_lr, (list, tuple)) else [te_lr]
    used = []
    if not _get(opts, "network_train_text_encoder_only", False):
        used.append(("--unet_lr" if unet_lr is not None else "--learning_rate", base if unet_lr is None else unet_lr))
    if not _get(opts, "network_train_unet_only", False):
        used += [("--text_encoder_lr", v) for v in te_lr] if te_lr else [("--learning_rate", base)]
    if used and all(float(v) == 0 for _, v in used):
        flags = " and ".join(dict.fromkeys(f for f, _ in used))
        raise UserError(f"{flags} {'is' if ' and ' not in flags else 'are'} 0 for every part that trains, so nothing "
                        "would learn. Give a learning rate above 0 (1e-4 is a usual start for LoRA; 1.0 for "
                        "D-Adaptation/Prodigy).")


def _check_resolution(opts) -> None:
    steps = int(_get(opts, "bucket_reso_steps", 64))
    text = _get(opts, "resolution")
    if text is None:
        return
    try:
        w, h = O.parse_resolution(text)
    except ValueError as exc:
        raise UserError(f"--resolution {text!r}: {exc}.") from None
    if w % steps or h % steps:
        lower = lambda v: max(steps, v // steps * steps)  # noqa: E731
        raise UserError(f"--resolution {text} is not a multiple of --bucket_reso_steps {steps} (the model's latent "
                        f"grid): use {lower(w)},{lower(h)} or {lower(w) + steps},{lower(h) + steps}, or change "
                        "--bucket_reso_steps.")
    if _get(opts, "enable_bucket", False) and not _get(opts, "bucket_no_upscale", False):
        lo, hi = int(_get(opts, "min_bucket_reso", 256)), int(_get(opts, "max_bucket_reso", 1024))
        if lo > hi:
            raise UserError(f"--min_bucket_reso {lo} is above --max_bucket_reso {hi}; swap them.")
        if min(w, h) < lo or max(w, h) > hi:
            raise UserError(f"--resolution {text} lies outside the bucket range --min_bucket_reso {lo} .. "
                            f"--max_bucket_reso {hi}; widen the range or change the resolution.")
        for flag, v in (("--min_bucket_reso", lo), ("--max_bucket_reso", hi)):
            if v % steps:
                raise UserError(f"{flag} {v} is not a multiple of --bucket_reso_steps {steps}; use "
                                f"{max(steps, v // steps * steps)}.")


def check_output_name(name: str | None) -> None:
    """--output_name is a file stem inside --output_dir, never a path."""
    check_file_name("--output_name", name, "the LoRA is saved as --output_dir/<output_name>.safetensors",
                    "--output_dir")
    if name is None:
        return
    if len(name.encode("utf-8")) > 200:
        raise UserError(f"--output_name is {len(name.encode('utf-8'))} bytes long; file systems allow about 255 "
                        "with the suffixes lorakit adds. Use a shorter name.")


def check_file_name(flag: str, name: str | None, where: str, folder_flag: str) -> None:
    """A name that becomes part of a file name inside a chosen folder: "../x" or "/abs/x" would write outside it
    (and outside the GUI's roots)."""
    if name is None:
        return
    bad = (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"))
    if bad:
        raise UserError(f"{flag} {name!r} must be a plain file name (no folders, no '..'): {where}. "
                        f"Put folders into {folder_flag} instead.")


# ---- files and folders -------------------------------------------------------------------------------------------
INPUT_FILES = ("pretrained_model_name_or_path", "vae", "network_weights", "sample_prompts", "dataset_config",
               "in_json", "config_file")
INPUT_FOLDERS = ("train_data_dir", "reg_data_dir", "resume", "conditioning_data_dir")


def check_inputs(opts) -> None:
    for name in INPUT_FILES + INPUT_FOLDERS + ("base_weights",):
        values = _get(opts, name)
        for v in (values if isinstance(values, (list, tuple)) else [values] if values else []):
            p = Path(v)
            if not p.exists() and name in ("pretrained_model_name_or_path", "vae"):
                from lorakit.models.paths import missing_model_error

                raise missing_model_error(v, f"--{name}")
            if not p.exists():
                raise UserError(f"--{name} {v} does not exist; check the path.")
            if name in INPUT_FOLDERS and not p.is_dir():
                raise UserError(f"--{name} {v} is a file; it must be a folder.")
            if name in ("network_weights", "sample_prompts", "dataset_config", "in_json", "base_weights") \
                    and p.is_dir():
                raise UserError(f"--{name} {v} is a folder; it must be a file.")
    if not (_get(opts, "train_data_dir") or _get(opts, "dataset_config") or _get(opts, "in_json")):
        raise UserError("no dataset given: pass --train_data_dir DIR (folders `N_class`) or --dataset_config "
                        "FILE.toml.")
    if _get(opts, "sample_prompts"):
        from lorakit.generate.sample_prompts import load_sample_prompts

        load_sample_prompts(_get(opts, "sample_prompts"))  # its errors name the file and the line
    if _get(opts, "eval_every_n_epochs") or _get(opts, "eval_every_n_steps"):
        from lorakit.eval.training import check_inputs as check_eval_inputs

        check_eval_inputs(_get(opts, "eval_tagger"))  # the tagger folder, before minutes of model loading


def check_outputs(opts) -> Path:
    """--output_dir, --logging_dir and --console_log_file's folder exist (created) and are writable."""
    from lorakit.utils.atomic import check_writable_dir

    out = _get(opts, "output_dir")
    if not out:
        raise UserError("--output_dir is required: the folder for the LoRA files.")
    folder = check_writable_dir(out, "--output_dir")
    name = _get(opts, "output_name", "last")
    final = folder / f"{name}.safetensors"
    if final.is_dir():
        raise UserError(f"--output_dir {folder} holds a folder named {final.name}, where the LoRA will be saved; "
                        "rename it or choose another --output_name.")
    if _get(opts, "logging_dir"):
        check_writable_dir(_get(opts, "logging_dir"), "--logging_dir")
    log_file = _get(opts, "console_log_file")
    if log_file:
        p = Path(log_file)
        if p.is_dir():
            raise UserError(f"--console_log_file {p} is a folder; give a file name.")
        check_writable_dir(p.parent if str(p.parent) else ".", f"--console_log_file {p}: its folder")
    return folder


# ---- disk space --------------------------------------------------------------------------------------------------
def guess_family(opts) -> str:
    """sd1/sd2/sdxl/flux-dev from the flags or the checkpoint's key names (header only); sdxl when unknown (the
    largest of the UNet families; a FLUX file says what it is by its keys)."""
    if _get(opts, "sdxl", False):
        return "sdxl"
    model = _get(opts, "pretrained_model_name_or_path")
    if model and Path(model).is_dir():
        if (Path(model) / "text_encoder_2").is_dir():
            return "sdxl"
        try:
            import json

            cfg = json.loads((Path(model) / "text_encoder" / "config.json").read_text(encoding="utf-8"))
            return "sd2" if int(cfg.get("hidden_size", 768)) == 1024 else "sd1"
        except (OSError, ValueError):
            return "sdxl"
    if model and str(model).lower().endswith(".safetensors") and Path(model).is_file():
        try:
            from lorakit.models.checkpoint_io import read_safetensors_header

            keys = read_safetensors_header(model)[0].keys()
        except UserError:
            return "sdxl"
        from lorakit.models.detect import flux_family_of

        flux = flux_family_of(keys)
        if flux is not None:
            return flux.name
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return "sdxl"
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            return "sd2"
        if any(k.startswith("cond_stage_model.transformer.") for k in keys):
            return "sd1"
    return "sd2" if _get(opts, "v2", False) else "sdxl"


def lora_bytes(opts, family: str | None = None) -> int:
    """An upper bound of one saved LoRA file's size (the family's `lora_size`)."""
    from lorakit.adapters.network import arg_true
    from lorakit.models.families import get_family

    size = get_family(family or guess_family(opts)).lora_size
    dim = int(_get(opts, "network_dim", 4))
    args = O.network_args_dict(_get(opts, "network_args"))
    params, modules = 0, size.modules
    if not _get(opts, "network_train_text_encoder_only", False):
        params += size.unet * dim
        if "conv_dim" in args:
            try:
                params += size.conv * max(dim, int(float(args["conv_dim"])))
            except ValueError:
                pass
    if not _get(opts, "network_train_unet_only", False):
        params += size.te * dim
        if arg_true(args.get("train_t5xxl", False)):
            params += size.te_on_request * dim
            modules += size.modules_on_request
    if args.get("algo", "").lower() in ("loha",):
        params *= 2  # two factor pairs per layer
    width = 2 if _get(opts, "save_precision") in ("fp16", "bf16") else 4
    size = params * width + HEADER_BYTES_PER_MODULE * modules
    model = _get(opts, "pretrained_model_name_or_path")
    if model and Path(model).is_file():
        # while rank <= the layers' widths a LoRA holds at most twice the targeted layers' parameters, so four times
        # a (possibly fp16) checkpoint's size bounds an fp32 LoRA too; this keeps tiny test models' estimates tiny
        size = min(size, 4 * Path(model).stat().st_size + (1 << 20))
    return size


def _min_batches_per_epoch(opts) -> int:
    """A lower bound of optimizer steps per epoch from the folder names alone (fewer steps per epoch means more
    epochs, hence more epoch saves); 1 when the dataset is a TOML/JSON."""
    from lorakit.data.scan import list_images, repeat_folder_problem

    base = _get(opts, "train_data_dir")
    if not base or _get(opts, "dataset_config") or _get(opts, "in_json") or not Path(base).is_dir():
        return 1
    samples = 0
    for sub in Path(base).iterdir():
        if sub.is_dir() and repeat_folder_problem(sub) is None:
            try:
                samples += len(list_images(sub)) * int(sub.name.split("_", 1)[0])
            except (OSError, ValueError):
                continue
    per_step = int(_get(opts, "train_batch_size", 1)) * int(_get(opts, "gradient_accumulation_steps", 1))
    return max(1, samples // max(1, per_step))


def planned_saves(opts, steps_per_epoch: int | None = None) -> tuple[int, int]:
    """(LoRA files, state folders) that exist at once at the end of the run, at most: epoch and step saves (after
    --save_last_n_* pruning), the final save, and one more of each for an interrupt or a NaN stop."""
    spe = max(1, steps_per_epoch or _min_batches_per_epoch(opts))
    epochs_opt = _get(opts, "max_train_epochs")
    max_steps = int(epochs_opt * spe if epochs_opt else _get(opts, "max_train_steps", 1600))
    epochs = int(epochs_opt or math.ceil(max_steps / spe))
    every_e = _get(opts, "save_every_n_epochs")
    ratio = _get(opts, "save_n_epoch_ratio")
    if ratio:
        every_e = max(1, epochs // ratio)
    every_s = _get(opts, "save_every_n_steps")
    by_epoch = (epochs - 1) // every_e if every_e else 0
    by_step = (max_steps - 1) // every_s if every_s else 0
    lora_e, state_e, lora_s, state_s = by_epoch, by_epoch, by_step, by_step
    if _get(opts, "save_last_n_epochs"):
        lora_e = min(by_epoch, _get(opts, "save_last_n_epochs") + 1)
    if _get(opts, "save_last_n_epochs_state") or _get(opts, "save_last_n_epochs"):
        state_e = min(by_epoch, (_get(opts, "save_last_n_epochs_state") or _get(opts, "save_last_n_epochs")) + 1)
    if _get(opts, "save_last_n_steps") and every_s:
        lora_s = min(by_step, _get(opts, "save_last_n_steps") // every_s + 1)
    if (_get(opts, "save_last_n_steps_state") or _get(opts, "save_last_n_steps")) and every_s:
        keep = _get(opts, "save_last_n_steps_state") or _get(opts, "save_last_n_steps")
        state_s = min(by_step, keep // every_s + 1)
    loras = lora_e + lora_s + 1 + 1
    states = (state_e + state_s + 1 if _get(opts, "save_state", False) else
              1 if _get(opts, "save_state_on_train_end", False) else 0) + 1  # + an interrupt's state
    return loras, states


def check_disk_space(opts, folder: Path, steps_per_epoch: int | None = None) -> str:
    """UserError when the disk holding `folder` cannot take the planned saves; returns a note with the numbers."""
    from lorakit.utils.atomic import free_bytes, human_bytes

    one_lora = lora_bytes(opts)
    one_state = 3 * (one_lora if _get(opts, "save_precision") not in ("fp16", "bf16") else 2 * one_lora) + (1 << 20)
    loras, states = planned_saves(opts, steps_per_epoch)
    needed = loras * one_lora + states * one_state
    free = free_bytes(folder)
    note = (f"planned saves: up to {loras} LoRA files of at most {human_bytes(one_lora)} and {states} state folders "
            f"of at most {human_bytes(one_state)} ({human_bytes(needed)} in all)")
    if free is not None:
        note += f"; {human_bytes(free)} free in {folder}"
        if free < needed:
            raise UserError(f"--output_dir {folder}: the disk has {human_bytes(free)} free, but the planned saves need "
                            f"up to {human_bytes(needed)} ({loras} LoRA files of up to {human_bytes(one_lora)} each"
                            f"{f' and {states} training states' if states else ''}). Free some space, choose an "
                            "--output_dir on another disk, or save less: fewer --save_every_n_epochs/steps saves, "
                            "--save_last_n_epochs, --save_precision fp16, or a smaller --network_dim.")
    return note


# ---- optimizer, scheduler, network ------------------------------------------------------------------------------
def _unknown_kwargs(cls, kwargs: dict, skip: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(names in kwargs that cls(...) does not take, the names it takes); nothing when it takes **kwargs."""
    import inspect

    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return [], []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return [], []
    takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in skip]
    return sorted(k for k in kwargs if k not in takes), takes


def optimizer_name(opts) -> str:
    """The optimizer a run builds (--use_8bit_adam and --use_lion_optimizer are sd-scripts' older spellings)."""
    if _get(opts, "use_8bit_adam", False):
        return "AdamW8bit"
    if _get(opts, "use_lion_optimizer", False):
        return "Lion"
    return _get(opts, "optimizer_type", "") or "AdamW"


def check_optimizer(opts) -> None:
    """--optimizer_type names an optimizer that imports here, and --optimizer_args are literals it accepts."""
    from lorakit.train.optimizers import parse_optimizer_args, resolve_optimizer_class

    canon, cls, _ = resolve_optimizer_class(optimizer_name(opts))
    kwargs = parse_optimizer_args(_get(opts, "optimizer_args"))
    unknown, takes = _unknown_kwargs(cls, kwargs, skip=("params", "lr"))
    if unknown:
        raise UserError(f"--optimizer_args: {canon} has no argument {', '.join(unknown)}; it takes "
                        f"{', '.join(takes) or 'none'}.")
    if kwargs and not cls.__module__.startswith("bitsandbytes"):  # bnb kernels may need a GPU: names checked only
        _probe_optimizer(opts, canon)


def _probe_optimizer(opts, canon: str) -> None:
    """One step on a 4-element tensor: argument VALUES of the wrong type or range (d_coef=x, betas=1) fail here in
    milliseconds instead of as a traceback in the first training step."""
    import torch

    from lorakit.train.optimizers import create_optimizer

    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.full((4,), 1e-3)
    lr = _get(opts, "learning_rate", None) or 1e-4
    args = _get(opts, "optimizer_args")
    try:
        create_optimizer(optimizer_name(opts), [{"params": [p]}], lr, args).optimizer.step()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the optimizer raises is reported with the flag
        raise UserError(f"--optimizer_args {' '.join(args or [])}: {canon} cannot run with these values "
                        f"({type(exc).__name__}: {exc}). Check each value's type and range in the optimizer's "
                        "documentation (e.g. d_coef=1.0, betas=0.9,0.999).") from None


def check_scheduler(opts) -> None:
    """--lr_scheduler (or --lr_scheduler_type module.Class) exists, and --lr_scheduler_args are literals it takes."""
    import importlib

    from lorakit.train.lr_schedules import SCHEDULER_NAMES, parse_scheduler_args

    kwargs = parse_scheduler_args(_get(opts, "lr_scheduler_args"))
    custom = _get(opts, "lr_scheduler_type", "")
    if custom:
        import torch

        mod_name, _, cls_name = custom.rpartition(".")
        try:
            mod = importlib.import_module(mod_name) if mod_name else torch.optim.lr_scheduler
        except ImportError as exc:
            raise UserError(f"--lr_scheduler_type {custom}: cannot import module {mod_name!r} ({exc}).") from None
        cls = getattr(mod, cls_name, None)
        if cls is None:
            raise UserError(f"--lr_scheduler_type {custom!r} not found (a torch.optim.lr_scheduler class name or "
                            "module.Class).")
        unknown, takes = _unknown_kwargs(cls, kwargs, skip=("optimizer",))
        if unknown:
            raise UserError(f"--lr_scheduler_args: {custom} has no argument {', '.join(unknown)}; it takes "
                            f"{', '.join(takes) or 'none'}.")
        return
    name = str(_get(opts, "lr_scheduler", "constant")).lower()
    if name not in SCHEDULER_NAMES and not name.startswith("adafactor"):
        raise UserError(f"Unknown --lr_scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}.")


def check_network(opts, family) -> None:
    """--network_module and --network_args as the adapter layer reads them, for this model family."""
    from lorakit.adapters.network import parse_network_args

    net_args = O.network_args_dict(_get(opts, "network_args"))
    for flag in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if _get(opts, flag) is not None:
            net_args.setdefault(flag, str(_get(opts, flag)))
    parse_network_args(family, _get(opts, "network_module", "networks.lora"), _get(opts, "network_dim"),
                       _get(opts, "network_alpha", 1.0), net_args, _get(opts, "network_dropout"))


# ---- all of it ---------------------------------------------------------------------------------------------------
def check_before_run(opts) -> Path:
    """The checks that need neither the dataset nor the model, before a run opens any file: values, inputs,
    outputs. Returns the output folder (created and probed)."""
    check_values(opts)
    check_inputs(opts)
    return check_outputs(opts)


def check_before_load(opts, folder: Path, steps_per_epoch: int | None = None, family=None) -> list[str]:
    """After the dataset scan, before the model loads: disk space for the save schedule (tighter with the real
    `steps_per_epoch`), optimizer and scheduler, and (with the planned `family`) the network arguments."""
    notes = [check_disk_space(opts, folder, steps_per_epoch)]
    check_optimizer(opts)
    check_scheduler(opts)
    if family is not None:
        check_network(opts, family)
    return notes


def preflight(opts, steps_per_epoch: int | None = None, family=None) -> list[str]:
    """Every check that needs no model, in the order a user fixes things: values, inputs, outputs, disk space,
    optimizer, scheduler, network. Raises UserError (one paragraph naming the flag); returns notes for the log.
    `steps_per_epoch`, when known (after the dataset scan), makes the disk-space bound tighter; `family` (the
    planned model's) enables the network-argument check."""
    return check_before_load(opts, check_before_run(opts), steps_per_epoch, family)


__all__ = ["preflight", "check_before_run", "check_before_load", "check_values", "check_inputs", "check_outputs",
           "check_output_name", "check_disk_space", "check_optimizer", "check_scheduler", "check_network",
           "optimizer_name", "planned_saves", "lora_bytes", "guess_family"]
