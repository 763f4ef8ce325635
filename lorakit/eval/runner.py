"""Sample the base model once, then every checkpoint on the same prompts and seeds, tag everything, score.

    ev = Evaluation(bundle, concept, tagger, EvalSettings(...))
    ev.add_base()
    for ckpt in find_checkpoints(lora_dir, "usu_bear*"):
        ev.add_file(ckpt)                  # merged into the base weights, sampled, unmerged (exact copy back)
    result = ev.result()                   # rows, recommendation, Pareto set -> report.write_outputs(result, ...)

The training hook (lorakit.eval.training) calls `add_samples` with samples of the live network instead of a file.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from lorakit.errors import UserError
from lorakit.eval import scores as S
from lorakit.eval.concept import Concept, EvalPrompt, eval_prompts
from lorakit.eval.sampling import SampleSettings, sample_images


@dataclass(frozen=True)
class EvalSettings:
    seeds: int = 8  # samples per prompt
    seed: int = 1000  # the first seed; prompt p, sample k uses seed + k (the same for every model)
    sample: SampleSettings = field(default_factory=SampleSettings)
    thresholds: S.Thresholds = field(default_factory=S.Thresholds)
    multiplier: float = 1.0  # LoRA weight

    def as_dict(self) -> dict:
        s = self.sample
        return {"seeds": self.seeds, "seed": self.seed, "multiplier": self.multiplier, "steps": s.steps,
                "sampler": s.sampler, "cfg_scale": s.cfg_scale, "width": s.width, "height": s.height,
                "negative_prompt": s.negative_prompt, "clip_skip": s.clip_skip, **self.thresholds.as_dict()}


@dataclass
class Checkpoint:
    path: Path
    name: str
    step: Optional[int] = None
    epoch: Optional[int] = None


@dataclass
class Samples:
    images: np.ndarray  # uint8 (N, H, W, 3)
    tags: list[set[str]]
    hashes: np.ndarray  # uint64


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def find_checkpoints(lora_dir: str | Path, pattern: str | None = None) -> list[Checkpoint]:
    """LoRA files in `lora_dir` whose stem matches the glob `pattern` (default: all), in training order: by the
    ss_steps of their metadata when every file has it, else by name (epoch numbers sort as numbers)."""
    import fnmatch

    from lorakit.generate.lora_loading import LORA_EXTENSIONS
    from lorakit.models.checkpoint_io import read_safetensors_header

    root = Path(lora_dir)
    if not root.is_dir():
        raise UserError(f"--lora_dir {root} is not a folder; point it at the training run's --output_dir.")
    files = [p for p in sorted(root.iterdir()) if p.suffix.lower() in LORA_EXTENSIONS and p.is_file()
             and fnmatch.fnmatchcase(p.stem, pattern or "*")]
    if not files:
        raise UserError(f"no LoRA file in {root} matches --loras {pattern or '*'!r}; the checkpoints of a run are "
                        "named like usu_bear-000001.safetensors, so --loras \"usu_bear*\" picks them.")
    out = []
    for p in files:
        step = epoch = None
        if p.suffix.lower() == ".safetensors":
            try:
                _, md = read_safetensors_header(p)
                step = int(md["ss_steps"]) if str(md.get("ss_steps", "")).isdigit() else None
                epoch = int(md["ss_epoch"]) if str(md.get("ss_epoch", "")).isdigit() else None
            except UserError:
                pass  # a broken file is reported when it is loaded
        out.append(Checkpoint(p, p.stem, step, epoch))
    if all(c.step is not None for c in out):
        out.sort(key=lambda c: (c.step, _natural(c.name)))
    else:
        out.sort(key=lambda c: _natural(c.name))
    return out


class Evaluation:
    """The base model's samples, then one row of scores per checkpoint. The bundle is loaded once by the caller;
    each checkpoint is merged into it and taken out again, so its weights are the base's between checkpoints."""

    def __init__(self, bundle, concept: Concept, tagger, settings: EvalSettings | None = None,
                 log: Callable[[str], None] = print):
        from lorakit.generate.conditioning_prompt import PromptEncoder

        self.bundle, self.concept, self.tagger = bundle, concept, tagger
        self.settings = settings or EvalSettings()
        self.log = log
        self.prompts: list[EvalPrompt] = eval_prompts(concept)
        n = self.settings.seeds
        if n < 1:
            raise UserError(f"--seeds must be at least 1 (got {n}).")
        self.texts = [p.text for p in self.prompts for _ in range(n)]
        self.kinds = [p.kind for p in self.prompts for _ in range(n)]
        self.requested = [p.requested for p in self.prompts for _ in range(n)]
        self.seed_list = [self.settings.seed + k for _ in self.prompts for k in range(n)]
        self.encoder = PromptEncoder(bundle, self.settings.sample.clip_skip)
        self.base: Samples | None = None
        self.base_scores: dict | None = None
        self.base_seed_distance = math.nan
        self.rows: list[dict] = []
        self.sheet_images: list[np.ndarray] = []  # per row: the first seed of every prompt
        self.timing = {"sample_s": 0.0, "tag_s": 0.0, "merge_s": 0.0}

    @property
    def n_samples(self) -> int:
        return len(self.texts)

    # ---- sampling --------------------------------------------------------------------------------------------------
    def sample_now(self, progress=None) -> Samples:
        """Samples of the model as it is now (call `self.encoder.clear()` after changing text-encoder weights)."""
        from PIL import Image

        from lorakit.tools.image_prep import phash_image

        t = time.perf_counter()
        imgs = sample_images(self.bundle, self.texts, self.seed_list, self.settings.sample, encoder=self.encoder,
                             progress=progress)
        t2 = time.perf_counter()
        tags = self.tagger.tag(imgs)
        hashes = np.array([phash_image(Image.fromarray(a)) for a in imgs], dtype=np.uint64)
        self.timing["sample_s"] += t2 - t
        self.timing["tag_s"] += time.perf_counter() - t2
        return Samples(imgs, tags, hashes)

    def add_base(self, samples: Samples | None = None) -> dict:
        self.base = samples if samples is not None else self.sample_now()
        prior = [i for i, k in enumerate(self.kinds) if k != "trigger"]
        self.base_seed_distance = S.seed_distance([self.base.tags[i] for i in prior], [self.texts[i] for i in prior])
        self.base_scores = self._score(self.base)
        return self._add_row(Checkpoint(Path(""), "base model"), self.base, self.base_scores, is_base=True)

    def add_file(self, ckpt: Checkpoint, progress=None) -> dict:
        """Merge the LoRA file into the base weights, sample, and restore the base weights."""
        from lorakit.adapters.network import load_network

        if self.base is None:
            self.add_base()
        t = time.perf_counter()
        net = load_network(self.bundle, ckpt.path, multiplier=self.settings.multiplier, merge=True)
        self.timing["merge_s"] += time.perf_counter() - t
        try:
            self.encoder.clear()  # the text encoder's weights changed
            samples = self.sample_now(progress)
        finally:
            t = time.perf_counter()
            net.unmerge()
            self.encoder.clear()
            self.timing["merge_s"] += time.perf_counter() - t
        return self.add_samples(ckpt, samples)

    def add_samples(self, ckpt: Checkpoint, samples: Samples) -> dict:
        if self.base is None:
            raise RuntimeError("add_base() first: drift is measured against the base model's samples")
        return self._add_row(ckpt, samples, self._score(samples))

    # ---- scores ----------------------------------------------------------------------------------------------------
    def _score(self, s: Samples) -> dict:
        base = self.base
        return S.score_model(s.tags, s.images, s.hashes, self.kinds, self.requested, self.texts,
                             self.concept.core_tags, base.tags, base.images, self.concept.hashes,
                             self.settings.thresholds.copy_distance, self.base_seed_distance,
                             self.settings.thresholds.match_share)

    def _add_row(self, ckpt: Checkpoint, s: Samples, sc: dict, is_base: bool = False) -> dict:
        fl = [] if is_base else S.flags(sc, self.base_scores, self.settings.thresholds)
        row = {"name": ckpt.name, "path": str(ckpt.path) if not is_base else None, "step": ckpt.step,
               "epoch": ckpt.epoch, "is_base": is_base, **sc, "flags": fl, "memorised": S.memorised(fl)}
        self.rows.append(row)
        n = self.settings.seeds
        self.sheet_images.append(s.images[::n])
        self.log(format_row(row))
        return row

    def result(self) -> dict:
        """Rows, the recommended checkpoint and the Pareto set (JSON-ready)."""
        return build_result(self.rows, self.concept, self.prompts, self.settings, self.timing, self.n_samples,
                            self.base_seed_distance)


def build_result(rows: list[dict], concept: Concept, prompts: list[EvalPrompt], settings: EvalSettings,
                 timing: dict, n_samples: int, base_seed_distance: float = math.nan) -> dict:
    cands = [r for r in rows if not r["is_base"]]
    # only files can be recommended (a training-time row may have no file saved at its step)
    eligible = [not r["flags"] and r["path"] is not None for r in cands]
    best = S.recommend(cands, eligible)
    front = S.pareto(cands)
    if best is not None:
        why = (f"{cands[best]['name']}: the best concept recall ({cands[best]['concept_recall']:.2f}) of the "
               f"checkpoints within the thresholds (prior drift <= {settings.thresholds.max_drift}, copies <= "
               f"{settings.thresholds.max_copy_rate}, diversity >= {settings.thresholds.min_diversity_ratio} x base)")
    elif cands:
        why = ("no checkpoint stays within the thresholds (" + "; ".join(
            f"{r['name']}: {', '.join(r['flags']) or 'not saved'}" for r in cands) +
            "); look at the Pareto set, or loosen --max_drift / --max_copy_rate")
    else:
        why = "no checkpoint was evaluated"
    return {
        "format": "lorakit-eval/1",
        "settings": settings.as_dict(),
        "concept": concept.as_dict(),
        "prompts": [{"text": p.text, "kind": p.kind, "requested": list(p.requested)} for p in prompts],
        "samples_per_model": n_samples,
        "base_seed_tag_distance": round(base_seed_distance, 4) if math.isfinite(base_seed_distance) else None,
        "rows": [_jsonable(r) for r in rows],
        "recommended": cands[best]["name"] if best is not None else None,
        "recommended_path": cands[best]["path"] if best is not None else None,
        "why": why,
        "pareto": [cands[i]["name"] for i in front],
        "timing": {k: round(v, 2) for k, v in timing.items()},
    }


def _jsonable(r: dict) -> dict:
    out = {}
    for k, v in r.items():
        if isinstance(v, float):
            out[k] = None if not math.isfinite(v) else round(v, 4)
        elif isinstance(v, dict):
            out[k] = {kk: (None if isinstance(vv, float) and not math.isfinite(vv) else round(vv, 4)
                           if isinstance(vv, float) else vv) for kk, vv in v.items()}
        else:
            out[k] = v
    return out


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2f}"


def format_row(r: dict) -> str:
    where = "" if r["is_base"] else (f" step {r['step']}" if r.get("step") is not None else "")
    flags = f"  [{', '.join(r['flags'])}]" if r.get("flags") else ""
    return (f"{r['name']}{where}: recall {_f(r['concept_recall'])}, adherence {_f(r['adherence'])}, prior drift "
            f"{_f(r['prior_drift'])} (tags {_f(r['tag_drift'])}), pixel drift {_f(r['pixel_drift'])}, copies "
            f"{_f(r['copy_rate'])}, diversity {_f(r['diversity'])}{flags}")
