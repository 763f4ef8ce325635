"""How good is a "usu bear" LoRA? Four numbers read by the attribute classifier from samples of the toy base model.

- fidelity: share of samples of trigger prompts ("usu bear", "usu bear, forest", ...) that the classifier reads as the
  new character (a black bear with the crescent; the base model never saw one).
- composability: share of "usu bear, <tag>" samples that show the character AND the other tag (background or hat).
- prior preservation: the class prompt without the trigger ("bear", "bear, forest") should keep drawing the base
  model's bears: the share of its samples whose species/colour/background labels equal the base model's on the same
  seeds, and the share read as the character ("leak": the class absorbed the identity; 0 is ideal).
- bleed: unrelated prompts ("cat, sky", ...) should be unchanged: label agreement with the base model on the same
  seeds, and the mean absolute pixel change (0-1 scale).

Base and LoRA are sampled with the same prompts and seeds by the batched DDIM + CFG loop of `evaluate.py` (our own,
so the score does not depend on the generation pipeline's defaults). Every number is a function of (base, LoRA,
settings): the evaluation draws no randomness of its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorakit.toyworld.world import BACKGROUNDS, TRIGGER

COMPARED_HEADS = ("species", "color", "background")
UNRELATED_PROMPTS = ("cat, sky", "rabbit, forest", "frog, beach", "bird, night", "cat, orange fur, room",
                     "rabbit, white fur, sky")


@dataclass(frozen=True)
class QualitySettings:
    seeds: int = 8  # samples per prompt
    steps: int = 20  # DDIM steps
    cfg_scale: float = 5.0
    seed: int = 5000  # first sampling seed
    multiplier: float = 1.0  # LoRA weight
    sets: tuple[str, ...] = ("trigger", "class", "unrelated")  # a subset samples less (`evaluate` needs all three)

    def prompt_sets(self) -> dict[str, list[tuple[str, dict]]]:
        """{set name: [(prompt, targets)]}; targets name the classifier heads a sample must read."""
        trig = TRIGGER
        composed = [(f"{trig}, {bg}", {"background": bg}) for bg in BACKGROUNDS] + [(f"{trig}, hat", {"hat": True})]
        every = {
            "trigger": [(trig, {})] + composed,
            "class": [("bear", {})] + [(f"bear, {bg}", {}) for bg in BACKGROUNDS[:2]],
            "unrelated": [(p, {}) for p in UNRELATED_PROMPTS],
        }
        return {k: every[k] for k in self.sets}


@dataclass
class QualityReport:
    fidelity: float
    composability: float
    prior_agreement: float
    prior_leak: float
    bleed_agreement: float
    bleed_pixel_change: float
    base_fidelity: float
    base_prior_leak: float
    n_images: int
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"fidelity {self.fidelity:.2f} (base {self.base_fidelity:.2f}) | composability {self.composability:.2f}"
                f" | prior: agreement {self.prior_agreement:.2f}, leak {self.prior_leak:.2f}"
                f" (base {self.base_prior_leak:.2f}) | bleed: agreement {self.bleed_agreement:.2f}, "
                f"pixel change {self.bleed_pixel_change:.3f}")


def _flat(prompt_sets: dict, settings: QualitySettings):
    prompts, seeds, sets, targets = [], [], [], []
    for name, pairs in prompt_sets.items():
        for j, (p, t) in enumerate(pairs):
            for s in range(settings.seeds):
                prompts.append(p)
                # the same seed for every prompt of a set, so "usu bear, forest" and "usu bear, sky" share noise
                seeds.append(settings.seed + s)
                sets.append(name)
                targets.append(t)
    return prompts, seeds, sets, targets


@torch.no_grad()
def sample_and_read(bundle, prompts, seeds, settings: QualitySettings, classifier):
    from lorakit.toyworld.evaluate import sample_images

    imgs = sample_images(bundle, prompts, seeds, steps=settings.steps, cfg_scale=settings.cfg_scale)
    return imgs, classifier.predict(imgs, value_range=(-1, 1))


def base_readings(base_path: str | Path, settings: QualitySettings) -> tuple:
    """The base model's samples of the metric prompts and their classifier readings, on one thread (the figures are
    then those of a one-thread run): what QualityEvaluator samples first, as a function another process can run."""
    import torch

    from lorakit.models.loading import load_bundle
    from lorakit.toyworld.classifier import load_classifier

    torch.set_num_threads(1)
    prompts, seeds, _sets, _targets = _flat(settings.prompt_sets(), settings)
    bundle = load_bundle(base_path, family="sd1", dtype="fp32")
    return sample_and_read(bundle, prompts, seeds, settings, load_classifier())


def _matches(pred: dict, i: int, targets: dict) -> bool:
    return all(pred[h]["labels"][i] == want for h, want in targets.items())


def _agreement(pa: dict, pb: dict, idx: list[int]) -> float:
    return float(np.mean([np.mean([pa[h]["labels"][i] == pb[h]["labels"][i] for h in COMPARED_HEADS]) for i in idx]))


def score(base_pred: dict, lora_pred: dict, base_imgs: torch.Tensor, lora_imgs: torch.Tensor, sets: list[str],
          targets: list[dict], prompts: list[str]) -> dict:
    """The report's numbers from classifier readings of base and LoRA samples (same prompts and seeds, in order)."""
    idx = {name: [i for i, s in enumerate(sets) if s == name] for name in ("trigger", "class", "unrelated")}
    char_l, char_b = lora_pred["character"]["labels"], base_pred["character"]["labels"]
    composed = [i for i in idx["trigger"] if targets[i]]
    pixel = (lora_imgs[idx["unrelated"]] - base_imgs[idx["unrelated"]]).abs().mean().item() / 2  # [-1,1] -> 0-1
    per_prompt = {}
    for i, p in enumerate(prompts):
        r = per_prompt.setdefault(p, {"n": 0, "character": 0, "base_character": 0, "target": 0})
        r["n"] += 1
        r["character"] += int(char_l[i])
        r["base_character"] += int(char_b[i])
        r["target"] += int(_matches(lora_pred, i, targets[i]))
    return {
        "fidelity": float(np.mean([char_l[i] for i in idx["trigger"]])),
        "base_fidelity": float(np.mean([char_b[i] for i in idx["trigger"]])),
        "composability": float(np.mean([char_l[i] and _matches(lora_pred, i, targets[i]) for i in composed])),
        "prior_agreement": _agreement(lora_pred, base_pred, idx["class"]),
        "prior_leak": float(np.mean([char_l[i] for i in idx["class"]])),
        "base_prior_leak": float(np.mean([char_b[i] for i in idx["class"]])),
        "bleed_agreement": _agreement(lora_pred, base_pred, idx["unrelated"]),
        "bleed_pixel_change": pixel,
        "details": {"per_prompt": per_prompt},
    }


class QualityEvaluator:
    """Samples the base model once, then scores any number of LoRA files against it."""

    def __init__(self, base_path: str | Path | None = None, settings: QualitySettings | None = None, bundle=None,
                 base_readings: tuple | None = None):
        """`base_readings`: (images, classifier readings) of the base model for these settings, made elsewhere
        (`base_readings()` in another process while the LoRA trains); sampled here when None."""
        from lorakit.models.loading import load_bundle
        from lorakit.toyworld.classifier import load_classifier
        from lorakit.toyworld.pretrain import default_base_path

        self.settings = settings or QualitySettings()
        self.bundle = bundle if bundle is not None else load_bundle(base_path or default_base_path(), family="sd1",
                                                                    dtype="fp32")
        self.classifier = load_classifier()
        self.prompts, self.seeds, self.sets, self.targets = _flat(self.settings.prompt_sets(), self.settings)
        if base_readings is None:
            base_readings = sample_and_read(self.bundle, self.prompts, self.seeds, self.settings, self.classifier)
        self.base_imgs, self.base_pred = base_readings

    def lora_images(self, lora_path: str | Path, prompts=None, seeds=None) -> torch.Tensor:
        from lorakit.adapters.network import load_network

        net = load_network(self.bundle, lora_path, multiplier=self.settings.multiplier)
        try:
            from lorakit.toyworld.evaluate import sample_images

            return sample_images(self.bundle, list(prompts or self.prompts), list(seeds or self.seeds),
                                 steps=self.settings.steps, cfg_scale=self.settings.cfg_scale)
        finally:
            net.remove()

    def evaluate(self, lora_path: str | Path) -> QualityReport:
        imgs = self.lora_images(lora_path)
        pred = self.classifier.predict(imgs, value_range=(-1, 1))
        s = score(self.base_pred, pred, self.base_imgs, imgs, self.sets, self.targets, self.prompts)
        return QualityReport(n_images=2 * len(self.prompts), settings=asdict(self.settings), **s)


def write_report_json(report: QualityReport, path: str | Path) -> None:
    from lorakit.utils.atomic import write_text_atomic

    write_text_atomic(Path(path), json.dumps(report.as_dict(), indent=1, sort_keys=True) + "\n")
