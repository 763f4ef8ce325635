"""Quality metrics of a "usu bear" LoRA (issue 9): the scoring maths on hand-made classifier readings, and the CI
learning guard: a short LoRA run on the shipped toy base must draw the new character far more often than the base."""

import numpy as np
import pytest
import torch

from lorakit.toyworld.quality import COMPARED_HEADS, score


def _pred(rows):
    """Classifier-like readings from rows of (species, color, background, hat, character)."""
    out = {h: {"labels": [r[i] for r in rows]} for i, h in enumerate(COMPARED_HEADS + ("hat",))}
    out["character"] = {"labels": [r[4] for r in rows]}
    return out


def test_score_matches_hand_counts():
    prompts = ["usu bear", "usu bear, forest", "usu bear, hat", "bear", "bear", "cat, sky", "cat, sky"]
    sets = ["trigger"] * 3 + ["class"] * 2 + ["unrelated"] * 2
    targets = [{}, {"background": "forest"}, {"hat": True}, {}, {}, {}, {}]
    base = _pred([("bear", "brown", "sky", False, False), ("bear", "brown", "forest", False, False),
                  ("bear", "brown", "sky", True, False), ("bear", "brown", "room", False, False),
                  ("bear", "white", "sky", False, False), ("cat", "orange", "sky", False, False),
                  ("cat", "grey", "sky", False, False)])
    lora = _pred([("bear", "black", "sky", False, True), ("bear", "black", "sky", False, True),  # tag lost
                  ("bear", "black", "sky", True, True), ("bear", "black", "room", False, True),  # leak
                  ("bear", "white", "sky", False, False), ("cat", "orange", "sky", False, False),
                  ("bird", "grey", "night", False, False)])
    b_img = torch.zeros(7, 3, 4, 4)
    l_img = b_img.clone()
    l_img[5] = 0.5  # one unrelated image changed by 0.5 in [-1, 1] units = 0.25 on a 0-1 scale
    s = score(base, lora, b_img, l_img, sets, targets, prompts)
    assert s["fidelity"] == 1.0 and s["base_fidelity"] == 0.0
    assert s["composability"] == 0.5  # forest lost, hat kept
    # class: sample 3 agrees on species+background (2/3), sample 4 on all three
    assert s["prior_agreement"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["prior_leak"] == 0.5 and s["base_prior_leak"] == 0.0
    assert s["bleed_agreement"] == pytest.approx((1 + 1 / 3) / 2)
    assert s["bleed_pixel_change"] == pytest.approx(0.25 / 2)
    assert s["details"]["per_prompt"]["bear"] == {"n": 2, "character": 1, "base_character": 0, "target": 2}


# The CI learning guard. A short run of the recipe (no reg images) on the shipped toy base, scored on the trigger
# prompts only. The base model never draws the character (fidelity 0/56 on these prompts and seeds).
GUARD_STEPS = 300
FIDELITY_FLOOR = 0.25  # at least 14 of 56 samples; measured value at the assertion
CHARACTER_PROB_RATIO = 10.0


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    from lorakit import options as O
    from lorakit.toyworld.pretrain import default_base_path
    from lorakit.toyworld.recipe import usu_bear_argv, write_dataset
    from lorakit.train.trainer import train

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("usu")
    data = write_dataset(work / "dataset", reg=False)
    argv = usu_bear_argv(default_base_path(), data, work / "out", steps=GUARD_STEPS)
    result = train(O.resolve(argv), progress=False, log=lambda *a, **k: None)
    assert result.global_step == GUARD_STEPS
    return result.final_lora


def test_short_lora_run_draws_the_new_character(trained_lora):
    from lorakit.toyworld.quality import QualityEvaluator, QualitySettings

    ev = QualityEvaluator(settings=QualitySettings(seeds=8, sets=("trigger",)))
    imgs = ev.lora_images(trained_lora)
    pred = ev.classifier.predict(imgs, value_range=(-1, 1))
    fidelity = float(np.mean(pred["character"]["labels"]))
    base_fidelity = float(np.mean(ev.base_pred["character"]["labels"]))
    p_lora = pred["character"]["probs"].mean().item()
    p_base = ev.base_pred["character"]["probs"].mean().item()
    print(f"fidelity {fidelity:.3f} (base {base_fidelity:.3f}); mean P(character) {p_lora:.4f} (base {p_base:.4f})")
    # measured on the shipped v2 base (300 steps, seed 42, AVX2 CPU): fidelity 0.45 vs 0.00 (the v1 base, 375 steps:
    # 0.14); the floor leaves room for other CPUs' rounding. A run that stops learning (zero LoRA deltas) reads
    # exactly as the base: 0 and < 1e-3.
    assert base_fidelity == 0.0
    assert fidelity >= FIDELITY_FLOOR
    assert p_lora >= CHARACTER_PROB_RATIO * max(p_base, 1e-3)
