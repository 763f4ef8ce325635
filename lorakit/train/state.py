"""Training state folders for exact resume (`--save_state`, `--resume`).

A state folder holds everything a run needs to continue as if never stopped:
  network.safetensors   the adapter weights in float32 (exact; not the save_precision copy)
  optimizer.pt          optimizer state_dict (moments, D-Adaptation's d, step counts)
  training.pt           scheduler and grad-scaler state, every RNG (torch CPU/CUDA, python, noise generators)
  train_state.json      counters, readable: epoch, next batch in that epoch, global step (sd-scripts writes
                        current_step here too), plus the options the run used
Folders are written under a temporary name and renamed into place, so an interrupted save never leaves a half state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import UserError

STATE_VERSION = 1
FILES = ("network.safetensors", "optimizer.pt", "training.pt", "train_state.json")


@dataclass
class TrainState:
    """What a resumed run restores; `counters` has epoch (1-based, the epoch in progress), batch (next batch index
    inside that epoch), global_step (optimizer steps done)."""

    network: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict[str, Any]
    generators: dict[str, torch.Tensor]
    counters: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """Global RNG states: torch CPU (+ CUDA when present), python `random`, numpy legacy global."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    # python's random state is nested tuples; a loader may hand back lists
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items() if not str(k).startswith("_")}
    return str(v)


def _state_bytes(state: TrainState) -> int:
    """What a state folder will take: the weights, about twice that in optimizer moments (Adam), plus RNG states."""
    net = sum(int(v.numel()) * 4 for v in state.network.values())
    return 3 * net + (1 << 20)


def save_state(folder: str | os.PathLike, state: TrainState) -> Path:
    """Write a state folder atomically (temporary sibling folder, then rename over the old one). A full disk or an
    unwritable folder is a UserError naming the folder; the previous state folder is kept in that case."""
    from safetensors.torch import save_file

    from lorakit.utils.atomic import DIR_MODE, FILE_MODE, make_dir, write_error

    folder = Path(folder)
    make_dir(folder.parent)
    needed = _state_bytes(state)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as exc:
        raise write_error(exc, folder, needed, what="state") from None
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.network.items()}, str(tmp / "network.safetensors"),
                  metadata={"lorakit.state_version": str(STATE_VERSION)})
        torch.save(state.optimizer, tmp / "optimizer.pt")
        torch.save({"scheduler": state.scheduler, "scaler": state.scaler, "rng": state.rng,
                    "generators": state.generators, "extra": state.extra}, tmp / "training.pt")
        info = {"version": STATE_VERSION, **_jsonable(state.counters),
                "current_step": int(state.counters.get("global_step", 0)),
                "current_epoch": int(state.counters.get("epoch", 0)), "options": _jsonable(state.options)}
        (tmp / "train_state.json").write_text(json.dumps(info, indent=1, ensure_ascii=False), encoding="utf-8")
        for name in FILES:
            os.chmod(tmp / name, FILE_MODE)  # safetensors writes 0600
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes 0700
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        from lorakit.utils.atomic import is_io_failure

        if isinstance(exc, Exception) and not isinstance(exc, UserError) and is_io_failure(exc):
            raise write_error(exc, folder / "optimizer.pt", needed, what="state") from None
        raise
    return folder


RESUME_HINT = ("Resume from another state folder (one is written beside each saved LoRA with --save_state), or "
               "start without --resume.")


def _damaged(folder: Path, name: str, exc: BaseException | None = None) -> UserError:
    first = str(exc).strip().splitlines()[0].split(". ")[0][:160] if exc is not None and str(exc).strip() else ""
    why = f" ({type(exc).__name__}: {first})" if first else ""
    return UserError(f"--resume {folder}: {name} is damaged or incomplete{why}; the save was probably interrupted or "
                     f"the disk was full. {RESUME_HINT}")


def _torch_file(folder: Path, name: str):
    import pickle

    try:
        return torch.load(folder / name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc) or "Unsupported global" in str(exc):  # a pickled object that is not plain data
            raise UserError(f"--resume {folder}: {name} holds Python objects other than tensors and numbers; it was "
                            f"not written by lorakit and is not loaded (loading it could run code). {RESUME_HINT}") \
                from None
        raise _damaged(folder, name, exc) from None
    except Exception as exc:  # noqa: BLE001 - zip, EOF and pickle errors of a damaged file all mean the same
        raise _damaged(folder, name, exc) from None


def load_state(folder: str | os.PathLike) -> TrainState:
    """Read a state folder written by save_state; a missing, foreign, damaged or partial folder is a UserError naming
    the file and what to do."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--resume {folder}: no such state folder (look for `<output_name>-...-state` folders in "
                        f"--output_dir; they are written with --save_state).")
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        hint = " It looks like an sd-scripts/accelerate state; lorakit cannot continue those exactly." \
            if (folder / "optimizer.bin").exists() else ""
        raise UserError(f"--resume {folder}: not a complete lorakit state (missing {', '.join(missing)}).{hint} "
                        f"{RESUME_HINT}")
    try:
        info = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _damaged(folder, "train_state.json", exc) from None
    if not isinstance(info, dict):
        raise _damaged(folder, "train_state.json")
    try:
        version = int(info.get("version", 0))
        counters = {k: v for k, v in info.items() if k not in ("options", "version")}
        for key in ("epoch", "batch", "global_step"):
            counters[key] = int(counters[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(folder, "train_state.json", exc) from None
    if version > STATE_VERSION:
        raise UserError(f"--resume {folder}: written by a newer lorakit (state version {version}); update lorakit.")
    training = _torch_file(folder, "training.pt")
    optimizer = _torch_file(folder, "optimizer.pt")
    if not isinstance(training, dict) or not {"scheduler", "rng"} <= set(training) or \
            not isinstance(training["rng"], dict) or "torch" not in training["rng"]:
        raise _damaged(folder, "training.pt")
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise _damaged(folder, "optimizer.pt")
    try:
        network = load_file(str(folder / "network.safetensors"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise _damaged(folder, "network.safetensors", exc) from None
    if not network:
        raise _damaged(folder, "network.safetensors")
    from lorakit.utils.finite import nonfinite_names

    bad = nonfinite_names(network.items())
    if bad:
        raise UserError(f"--resume {folder}: network.safetensors holds NaN/inf weights ({bad[0]}): the run diverged "
                        f"before this state was saved. {RESUME_HINT}")
    return TrainState(network=network, optimizer=optimizer,
                      scheduler=training["scheduler"], scaler=training.get("scaler"), rng=training["rng"],
                      generators=training.get("generators", {}), counters=counters, options=info.get("options", {}),
                      extra=training.get("extra", {}))


def check_state_matches(state: TrainState, network, folder: str | os.PathLike, optimizer=None) -> None:
    """UserError when a loaded state does not fit this run's network (another --network_dim, module, network_args,
    family or train_unet_only choice) or optimizer (another --optimizer_type); call before load_state_dict."""
    mine = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.network.items()}
    saved = state.options or {}

    def was(flag: str) -> str:
        v = saved.get(flag)
        return f"{flag} {v}" if v is not None else f"the default {flag}"

    flags = "--network_dim, --network_alpha, --network_module, --network_args, --network_train_unet_only"
    if set(mine) != set(theirs):
        only_state = sorted(set(theirs) - set(mine))
        only_run = sorted(set(mine) - set(theirs))
        example = (f"e.g. {only_state[0]} is only in the state" if only_state else
                   f"e.g. {only_run[0]} is missing from the state")
        raise UserError(f"--resume {folder}: the state was saved from a different network ({len(theirs)} tensors "
                        f"there, {len(mine)} in this run; {example}). Resume with the same base model and {flags} as "
                        f"the run that saved it (its train_state.json lists them under \"options\"), or start without "
                        "--resume.")
    for k in sorted(mine):
        if mine[k] != theirs[k]:
            raise UserError(f"--resume {folder}: the state's {k} has shape {theirs[k]}, this run's {mine[k]}: the "
                            f"state was saved with {was('network_dim')} (this run: another rank or network_args). "
                            f"Resume with the same {flags} as the run that saved it, or start without --resume.")
    if optimizer is not None:
        ours = [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]
        stored = [len(g.get("params", [])) for g in state.optimizer.get("param_groups", [])]
        if ours != stored:
            raise UserError(f"--resume {folder}: the optimizer state has parameter groups {stored}, this run {ours}: "
                            f"resume with the same --optimizer_type, --unet_lr/--text_encoder_lr (0 leaves a group "
                            f"out) and LoRA+ ratios as the run that saved it ({was('optimizer_type')}).")


def remove_state(folder: str | os.PathLike) -> None:
    shutil.rmtree(folder, ignore_errors=True)
