"""Training the toy-world attribute classifier (used by scripts/train_toy_classifier.py).

Data are generated on the fly, so nothing is stored and no sample repeats: global sample k of the run is drawn from
a world stream chosen by k % 10 (4 pretraining, 4 open world, 2 character), with world seeds that evaluation never uses.
Batch contents depend only on (seed, step), so a resumed run sees exactly the samples an uninterrupted one would.
Evaluation uses fresh world seeds (EVAL_SEEDS) on the three distributions.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorakit.toyworld.classifier import HEADS, ToyClassifier, accuracy, save_classifier, targets_from_attrs
from lorakit.toyworld.world import ToyWorld

TRAIN_WORLD_SEEDS = {"pretrain": 101, "open": 102, "character": 103}
EVAL_SEEDS = {"pretrain": 90001, "open": 90002, "character": 90003}


def sample_by_kind(world: ToyWorld, kind: str, index: int):
    if kind == "pretrain":
        return world.sample(index)
    if kind == "open":
        return world.open_sample(index)
    if kind == "character":
        return world.character_sample(index)
    raise ValueError(kind)


def _kind(k: int) -> str:
    r = k % 10
    return "pretrain" if r < 4 else "open" if r < 8 else "character"


def make_batch(step: int, batch_size: int, seed: int, size: int = 64):
    worlds = {kind: ToyWorld(s + 1000 * seed, size) for kind, s in TRAIN_WORLD_SEEDS.items()}
    imgs, attrs = [], []
    for j in range(batch_size):
        k = step * batch_size + j
        img, _cap, a = sample_by_kind(worlds[_kind(k)], _kind(k), k // 10)
        imgs.append(np.asarray(img, dtype=np.uint8))
        attrs.append(a)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    return x, targets_from_attrs(attrs)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur, noise and colour gain, so samples of an imperfect generator are still read."""
    b = x.shape[0]
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        small = F.interpolate(x[blur], scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        x[blur] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    gain = 1 + 0.08 * (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1)
    noise = torch.randn(x.shape, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) * 0.05)
    return (x * gain + noise).clamp(0, 1)


def eval_sets(n_pretrain: int = 300, n_open: int = 300, n_character: int = 100, size: int = 64):
    sets = {}
    for kind, n in (("pretrain", n_pretrain), ("open", n_open), ("character", n_character)):
        w = ToyWorld(EVAL_SEEDS[kind], size)
        sets[kind] = [sample_by_kind(w, kind, i) for i in range(n)]
    return sets


def evaluate(model: ToyClassifier, sets: dict) -> dict[str, dict[str, float]]:
    out = {}
    for kind, samples in sets.items():
        pred = model.predict([s[0] for s in samples])
        out[kind] = {k: round(v, 4) for k, v in accuracy(pred, [s[2] for s in samples]).items()}
    return out


def train(out_path: str | Path, work_dir: str | Path, steps: int = 1800, batch_size: int = 64, lr: float = 3e-3,
          seed: int = 0, threads: int = 1, checkpoint_every: int = 100, log_every: int = 50,
          eval_sizes: tuple[int, int, int] = (300, 300, 100), log=print) -> dict:
    """Train, checkpointing to work_dir/classifier_ckpt.pt (resumed if present); save fp16 weights to out_path."""
    from lorakit.utils.atomic import atomic_path

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / "classifier_ckpt.pt"
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 50)

    def lr_at(step):  # linear warm-up, cosine decay to 2% of lr
        if step < warm:
            return lr * (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    start, elapsed_before, cpu_before = 0, 0.0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("steps") == steps and state.get("batch_size") == batch_size and state.get("seed") == seed:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, elapsed_before = state["step"], state.get("elapsed", 0.0)
            cpu_before = state.get("cpu", 0.0)
            log(f"resumed from {ckpt} at step {start}")
        else:
            log(f"ignoring {ckpt}: it was made with other settings")

    def save_ckpt(step, elapsed, cpu):
        with atomic_path(ckpt) as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "steps": steps,
                        "batch_size": batch_size, "seed": seed, "elapsed": elapsed, "cpu": cpu}, tmp)

    gen = torch.Generator().manual_seed(seed)
    t0, c0 = time.time(), time.process_time()
    model.train()
    run_loss = 0.0
    for step in range(start, steps):
        gen.manual_seed(seed * 1_000_003 + step)  # augmentation depends on the step only, like the data
        x, y = make_batch(step, batch_size, seed)
        x = augment(x, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[h], y[h]) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run_loss += loss.item()
        if (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps} loss {run_loss / log_every:.3f} lr {lr_at(step):.2e} "
                f"{time.time() - t0 + elapsed_before:.0f}s (cpu {time.process_time() - c0 + cpu_before:.0f}s)")
            run_loss = 0.0
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_ckpt(step + 1, time.time() - t0 + elapsed_before, time.process_time() - c0 + cpu_before)
    train_seconds = time.time() - t0 + elapsed_before
    cpu_seconds = time.process_time() - c0 + cpu_before
    save_ckpt(steps, train_seconds, cpu_seconds)

    model.eval()
    results = evaluate(model, eval_sets(*eval_sizes))
    for kind, acc in results.items():
        log(f"held-out {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    save_classifier(model, out_path, extra_metadata={
        "eval_accuracy": results, "eval_seeds": EVAL_SEEDS, "train_world_seeds": TRAIN_WORLD_SEEDS,
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(train_seconds),
                  "cpu_seconds": round(cpu_seconds),
                  "threads": threads},
        "rebuild": "python scripts/train_toy_classifier.py"})
    log(f"saved {out_path} ({Path(out_path).stat().st_size / 1024:.0f} KiB) after {train_seconds:.0f}s of training "
        f"({cpu_seconds:.0f}s of CPU time)")
    return {"eval": results, "seconds": train_seconds, "cpu_seconds": cpu_seconds}
