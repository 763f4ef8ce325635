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
