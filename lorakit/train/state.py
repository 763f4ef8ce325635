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


def save_state(folder: str | os.PathLike, state: TrainState) -> Path:
    """Write a state folder atomically (temporary sibling folder, then rename over the old one)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
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
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_state(folder: str | os.PathLike) -> TrainState:
    """Read a state folder written by save_state; a missing or foreign folder is a UserError naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--resume {folder}: no such state folder (look for `<output_name>-...-state` folders in "
                        f"--output_dir; they are written with --save_state).")
    missing = [n for n in FILES if not (folder / n).exists()]
    if missing:
        hint = " It looks like an sd-scripts/accelerate state; lorakit cannot continue those exactly." \
            if (folder / "optimizer.bin").exists() else ""
        raise UserError(f"--resume {folder}: not a complete lorakit state (missing {', '.join(missing)}).{hint}")
    info = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
    if int(info.get("version", 0)) > STATE_VERSION:
        raise UserError(f"--resume {folder}: written by a newer lorakit (state version {info.get('version')}).")
    training = torch.load(folder / "training.pt", map_location="cpu", weights_only=True)
    optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    counters = {k: v for k, v in info.items() if k not in ("options", "version")}
    return TrainState(network=load_file(str(folder / "network.safetensors")), optimizer=optimizer,
                      scheduler=training["scheduler"], scaler=training.get("scaler"), rng=training["rng"],
                      generators=training.get("generators", {}), counters=counters, options=info.get("options", {}),
                      extra=training.get("extra", {}))


def remove_state(folder: str | os.PathLike) -> None:
    shutil.rmtree(folder, ignore_errors=True)
