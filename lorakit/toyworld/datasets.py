"""Writing toy-world samples to disk in the layouts the trainer reads.

`write_dreambooth_folder` follows seed 001: `train/<repeats>_<instance> <class>/` holds the character images and
`reg/<repeats>_<class>/` the regularization images of the class, each image with a same-named .txt caption.
Every file is written atomically, and an existing file is left alone (samples are pure functions, so a rerun after an
interruption only fills in what is missing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.toyworld.world import (CLASS_TOKEN, INSTANCE_TOKEN, SPECIES, TRIGGER, ToyWorld, character_samples,
                                    class_samples)
from lorakit.utils.atomic import atomic_path, write_text_atomic


def _save(img, cap: str | None, stem: Path, overwrite: bool) -> None:
    png = stem.with_suffix(".png")
    if overwrite or not png.exists():
        with atomic_path(png) as tmp:
            img.save(tmp, format="PNG")
    if cap is not None:
        txt = stem.with_suffix(".txt")
        if overwrite or not txt.exists():
            write_text_atomic(txt, cap + "\n")


def write_dreambooth_folder(out_dir: str | os.PathLike, n_train: int = 15, n_reg: int = 75, train_repeats: int = 20,
                            reg_repeats: int = 1, instance: str = INSTANCE_TOKEN, class_name: str = CLASS_TOKEN,
                            seed: int = 1, reg_seed: int = 2, size: int = 64, captions: bool = True,
                            reg_captions: bool = True, overwrite: bool = False) -> dict:
    """Write the "usu bear" DreamBooth dataset; return {"train_dir", "reg_dir", "train_subdir", "reg_subdir"}.

    Defaults follow seed 001: 15 character images repeated 20 times (`train/20_usu bear`), and regularization images
    of the class, about five per training image, repeated once (`reg/1_bear`). With `captions`, each character image
    gets "usu bear, <scene tags>"; the identity (black fur, crescent, red scarf) is left to the trigger. Regularization
    captions are the full pretraining captions ("bear, brown fur, ..."); `n_reg=0` writes no reg folder.
    """
    if class_name not in SPECIES:
        raise ValueError(f"class_name must be a toy-world species {SPECIES} (got {class_name!r})")
    if n_train < 1 or n_reg < 0 or train_repeats < 1 or reg_repeats < 1:
        raise ValueError("n_train, train_repeats and reg_repeats must be >= 1 and n_reg >= 0")
    out = Path(out_dir)
    trigger = f"{instance} {class_name}"
    train_sub = out / "train" / f"{train_repeats}_{trigger}"
    train_sub.mkdir(parents=True, exist_ok=True)
    for i, (img, cap, _attrs) in enumerate(character_samples(n_train, seed=seed, size=size)):
        if trigger != TRIGGER:
            cap = trigger + cap[len(TRIGGER):]
        _save(img, cap if captions else None, train_sub / f"{i:04d}", overwrite)
    result = {"train_dir": out / "train", "train_subdir": train_sub, "reg_dir": None, "reg_subdir": None}
    if n_reg:
        reg_sub = out / "reg" / f"{reg_repeats}_{class_name}"
        reg_sub.mkdir(parents=True, exist_ok=True)
        for i, (img, cap, _attrs) in enumerate(class_samples(n_reg, seed=reg_seed, size=size, species=class_name)):
            _save(img, cap if reg_captions else None, reg_sub / f"{i:04d}", overwrite)
        result.update(reg_dir=out / "reg", reg_subdir=reg_sub)
    return result


def write_pretraining_set(out_dir: str | os.PathLike, n: int, seed: int = 0, size: int = 64, start: int = 0,
                          overwrite: bool = False) -> Path:
    """Write pretraining samples start..start+n-1 as `<index>.png` + `.txt`, and `metadata.jsonl` with attributes."""
    if n < 0 or start < 0:
        raise ValueError("n and start must be >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = ToyWorld(seed, size)
    lines = []
    for i in range(start, start + n):
        img, cap, attrs = world.sample(i)
        _save(img, cap, out / f"{i:06d}", overwrite)
        lines.append(json.dumps({"file": f"{i:06d}.png", "index": i, "caption": cap, **attrs}, sort_keys=True))
    write_text_atomic(out / "metadata.jsonl", "".join(line + "\n" for line in lines))
    return out
