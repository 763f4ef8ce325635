"""`lorakit lora relora`: seed 000's "ReLoRA with sd-scripts" loop as one command.

    round 1: train a LoRA on the base model            -> round_01/<name>_r01.safetensors
             merge it into the base model (ratio 1)    -> round_01/<name>_r01_merged.safetensors
    round k: train on round k-1's merged model with the next learning rate, merge into that model, ...

Every round's LoRA and merged model are kept. `relora_state.json` in the output folder records the finished steps
(trained, merged) of each round, so rerunning the same command continues after the last finished step; asking for
more rounds later extends the run. Training flags are `lorakit train` flags (sd-scripts names); the loop sets
--pretrained_model_name_or_path, --output_dir, --output_name and the learning rates of each round.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Callable

from lorakit.errors import UserError

STATE_FILE = "relora_state.json"
STATE_VERSION = 1


def round_learning_rates(rounds: int, first_lr: float, learning_rates: list[float] | None = None,
                         lr_decay: float = 0.5) -> list[float]:
    """One rate per round: the given list (its last value repeating), or first_lr x lr_decay^(k-1)."""
    if rounds < 1:
        raise UserError("--rounds must be at least 1.")
    if learning_rates:
        return [float(learning_rates[min(i, len(learning_rates) - 1)]) for i in range(rounds)]
    return [float(first_lr) * (lr_decay ** i) for i in range(rounds)]


def _read_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable ReLoRA state ({exc}); move it away to start over.") from None
    if state.get("version") != STATE_VERSION:
        raise UserError(f"{path}: state version {state.get('version')} is not {STATE_VERSION}; start a new folder.")
    return state


def _write_state(path: Path, state: dict) -> None:
    from lorakit.utils.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(state, indent=2) + "\n")


def _strip(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given flags and their values (the loop sets them per round)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if name in flags:
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


LOOP_FLAGS = ("--pretrained_model_name_or_path", "--output_dir", "--output_name", "--resume")


def relora(train_argv: list[str], output_dir: str | os.PathLike, rounds: int | None = None,
           learning_rates: list[float] | None = None, lr_decay: float = 0.5, merge_ratio: float = 1.0,
           save_precision: str | None = None, log: Callable[[str], None] = print,
           train_fn: Callable | None = None) -> dict:
    """Run (or continue) the loop. `train_fn(opts, log=...)` defaults to lorakit.train.trainer.train and must return
    its TrainResult. Returns the state dict (also in output_dir/relora_state.json)."""
    from lorakit import options as O
    from lorakit.tools.lora_merge import LoraSpec, merge_into_model

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    argv = [str(a) for a in train_argv]
    if argv and argv[0] == "--":
        argv = argv[1:]
    first = O.resolve(argv)  # validates the flags before anything runs
    initial = first.pretrained_model_name_or_path
    if not initial:
        raise UserError("relora: the training flags need --pretrained_model_name_or_path (the starting model).")
    state = _read_state(state_path)
    loop_argv = _strip(argv, LOOP_FLAGS)
    if state is not None:
        if state["train_args"] != loop_argv or state["initial_model"] != str(initial):
            raise UserError(f"{state_path} belongs to a run with other training flags or another starting model "
                            f"({shlex.join(state['train_args'])}); rerun with the same flags to continue it, or use a "
                            f"new --output_dir.")
        if rounds is None and not learning_rates:
            rounds = state["rounds"]
        if not learning_rates:
            learning_rates = state["learning_rates"]
    n = rounds or (len(learning_rates) if learning_rates else None)
    if not n:
        raise UserError("relora: give --rounds N or --learning_rates LR1 LR2 ...")
    lrs = round_learning_rates(n, first.learning_rate, learning_rates, lr_decay)
    if state is None:
        state = {"version": STATE_VERSION, "train_args": loop_argv, "initial_model": str(initial), "rounds": n,
                 "learning_rates": lrs, "merge_ratio": float(merge_ratio), "completed": []}
    else:
        done = state["completed"]
        if any(abs(r["learning_rate"] - lrs[i]) > 1e-12 * max(1.0, lrs[i]) for i, r in enumerate(done) if i < n):
            raise UserError(f"{state_path}: the finished rounds used learning rates "
                            f"{[r['learning_rate'] for r in done]}, which differ from {lrs[:len(done)]}; keep the "
                            f"earlier rates (only later rounds can change) or use a new --output_dir.")
        state.update(rounds=max(n, len(done)), learning_rates=[r["learning_rate"] for r in done] + lrs[len(done):])
    _write_state(state_path, state)
    if train_fn is None:
        from lorakit.train.trainer import train as train_fn  # noqa: N813
    stem = first.output_name or "relora"
    base_factor_lr = first.learning_rate or lrs[0]

    for i in range(1, n + 1):
        done = state["completed"]
        entry = done[i - 1] if len(done) >= i else None
        if entry and entry.get("merged_model") and Path(entry["merged_model"]).exists():
            continue
        lr = state["learning_rates"][i - 1]
        base_model = str(initial) if i == 1 else done[i - 2]["merged_model"]
        rdir = out / f"round_{i:02d}"
        name = f"{stem}_r{i:02d}"
        if entry is None or not entry.get("lora") or not Path(entry["lora"]).exists():
            log(f"relora: round {i}/{n}: training on {base_model} at learning rate {lr:g}")
            opts = O.resolve(loop_argv + ["--pretrained_model_name_or_path", base_model, "--output_dir", str(rdir),
                                          "--output_name", name, "--learning_rate", repr(lr)])
            factor = lr / base_factor_lr if base_factor_lr else 1.0
            if first.unet_lr:  # explicit per-part rates follow the same schedule
                opts.unet_lr = first.unet_lr * factor
            if first.text_encoder_lr:
                opts.text_encoder_lr = [v * factor for v in first.text_encoder_lr]
            started = time.time()
            result = train_fn(opts, log=log)
            if getattr(result, "interrupted", False):
                log(f"relora: round {i} was interrupted; rerun the same command to train round {i} again.")
                return state
            if result.final_lora is None:
                raise UserError(f"relora: round {i} saved no LoRA.")
            entry = {"round": i, "learning_rate": lr, "base_model": base_model, "lora": str(result.final_lora),
                     "steps": int(getattr(result, "global_step", 0)), "train_seconds": round(time.time() - started, 1)}
            done[i - 1:] = [entry]
            _write_state(state_path, state)
        merged = rdir / f"{name}_merged.safetensors"
        log(f"relora: round {i}/{n}: merging {Path(entry['lora']).name} into {Path(base_model).name}")
        merge_into_model(base_model, [LoraSpec(entry["lora"], state["merge_ratio"])], merged,
                         save_precision=save_precision, log=log)
        entry["merged_model"] = str(merged)
        _write_state(state_path, state)
    log(f"relora: {n} round(s) done; final model {state['completed'][n - 1]['merged_model']}")
    return state


def relora_from_cli(args, log: Callable[[str], None] = print) -> int:
    relora(list(args.train_args or []), args.output_dir, args.rounds, args.learning_rates, args.lr_decay,
           args.merge_ratio, args.save_precision, log=log)
    return 0


__all__ = ["relora", "round_learning_rates", "relora_from_cli", "STATE_FILE"]
