"""Regularization (class) images: `lorakit generate --prompt "bear" --count 100 --outdir reg/1_bear`.

Image i is `NNNNN-<seed+i>.png` with NNNNN = i, so a run that was interrupted continues where it stopped and makes
exactly the images an uninterrupted run would have made. The settings of the first run are kept in
`.lorakit_reg.json` in the folder; a resumed run with a different prompt or settings is refused rather than
mixing two classes in one folder. Writes are atomic, so a killed run never leaves a half-written PNG.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from lorakit.errors import UserError
from lorakit.generate.infotext import save_png_with_infotext

__all__ = ["generate_reg_images", "existing_indices", "STATE_FILE", "suggested_count"]

STATE_FILE = ".lorakit_reg.json"
_NAME_RE = re.compile(r"^(\d{5,})-(\d+)\.png$")
# settings that change the images: a resumed run must use the same ones
_KEYS = ("prompt", "negative_prompt", "steps", "sampler", "schedule_type", "cfg_scale", "seed", "width", "height",
         "clip_skip", "hires_scale", "hires_steps", "denoising_strength", "emphasis")


def suggested_count(n_train_images: int, repeats: int = 1) -> int:
    """Seed 001's rule of thumb: about 5x the training images (times their repeats)."""
    return 5 * int(n_train_images) * max(int(repeats), 1)


def existing_indices(outdir: str | Path) -> set[int]:
    outdir = Path(outdir)
    if not outdir.is_dir():
        return set()
    out = set()
    for p in outdir.iterdir():
        m = _NAME_RE.match(p.name)
        if m:
            out.add(int(m.group(1)))
    return out


def generate_reg_images(generator, settings, count: int, outdir: str | Path, model_id: str | None = None,
                        progress=None) -> list[Path]:
    """Make images 0..count-1 that are not there yet; returns the paths written by this call."""
    from lorakit.generate.pipeline import random_seed
    from lorakit.utils.atomic import write_text_atomic

    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}.")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    state_path = outdir / STATE_FILE
    s = replace(settings, n_iter=1)
    wanted = {k: getattr(s, k) for k in _KEYS}
    wanted["model"] = model_id
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{state_path} is damaged; delete it to start the folder over.") from None
        if wanted["seed"] is None or int(wanted["seed"]) < 0:
            wanted["seed"] = state.get("seed")  # resuming without --seed: the first run's seed
        diff = [k for k in wanted if k in state and state[k] != wanted[k]]
        if diff:
            raise UserError(f"{outdir} holds regularization images made with other settings "
                            f"({', '.join(f'{k}: {state[k]!r} vs {wanted[k]!r}' for k in diff)}). Use another "
                            f"--outdir, or the same settings to resume.")
    else:
        if wanted["seed"] is None or int(wanted["seed"]) < 0:
            wanted["seed"] = random_seed()
        write_text_atomic(state_path, json.dumps(wanted, indent=2, ensure_ascii=False))
    base_seed = int(wanted["seed"])
    have = existing_indices(outdir)
    todo = [i for i in range(count) if i not in have]
    written: list[Path] = []
    bs = max(int(s.batch_size), 1)
    k = 0
    while k < len(todo):
        # consecutive missing indices share a batch (image i always has seed base + i)
        run = [todo[k]]
        while len(run) < bs and k + len(run) < len(todo) and todo[k + len(run)] == run[-1] + 1:
            run.append(todo[k + len(run)])
        r = generator(replace(s, seed=base_seed + run[0], batch_size=len(run)))
        for i, img, text in zip(run, r.images, r.infotexts):
            path = outdir / f"{i:05d}-{base_seed + i}.png"
            save_png_with_infotext(img, path, text)
            written.append(path)
        k += len(run)
        if progress is not None:
            progress(count - len(todo) + k, count)
    return written
