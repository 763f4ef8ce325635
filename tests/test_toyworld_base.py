"""The shipped toy base model (issue 9) loads as an SD1 checkpoint and follows prompts, read by the classifier."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lorakit.toyworld.pretrain import default_base_path
from lorakit.toyworld.world import BACKGROUNDS, SPECIES

BASE = default_base_path()

# Measured on the shipped weights (v2: 5,967 UNet steps; DDIM 20 steps, CFG 5, 120 prompts "species, colour,
# background"): species 0.91, colour 1.00, background 0.96 vs chance 0.20 / 0.14 / 0.20 (unconditional samples: 0.21 /
# 0.14 / 0.18). With this test's 20 prompts and 12 DDIM steps they read background 0.90, species 1.00; the floors
# keep a margin for other CPUs' rounding and sit far above chance (v1, the previous base, read 0.80 and 0.25).
BACKGROUND_FLOOR = 0.75
SPECIES_FLOOR = 0.6


@pytest.fixture(scope="module")
def bundle():
    from lorakit.models.loading import load_bundle

    torch.set_num_threads(1)
    return load_bundle(BASE, family="sd1", dtype="fp32")


def test_shipped_file_is_small_fp16_sd1_with_configs():
    assert BASE.stat().st_size < 14 * 2**20  # 13.0 MiB: the 49,408 x 64 token embedding is 6.3 MB
    with safe_open(str(BASE), framework="pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
        dtypes = {fh.get_tensor(k).dtype for k in keys[:50]}
    assert dtypes == {torch.float16}
    assert meta["lorakit.family"] == "sd1"
    # SD1 single-file layout: LDM UNet, VAE and the text encoder under their usual prefixes
    assert any(k.startswith("model.diffusion_model.input_blocks.11.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.11.") for k in keys)
    info = json.loads(meta["lorakit.toy_base"])
    assert info["unet"]["steps"] > 0 and info["vae"]["steps"] > 0


def test_loads_as_sd1_with_unit_variance_latent_scale(bundle):
    assert bundle.family.name == "sd1"
    assert bundle.configs["unet"]["block_out_channels"] == [16, 32, 64, 64]
    assert len(bundle.configs["unet"]["down_block_types"]) == 4 and bundle.configs["unet"]["layers_per_block"] == 2
    assert bundle.text_encoders[0].config.num_hidden_layers == 12
    assert bundle.latent_scale != 0.18215  # set from the trained VAE's latent std
    # 64 px -> 16x16 latents, so the UNet's four levels work at 16, 8, 4 and 2 latent pixels (SD at 512 px: 64 ... 8)
    assert bundle.configs["unet"]["sample_size"] == 16
    latent = bundle.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latent.shape == (1, 4, 16, 16)


def test_samples_follow_species_and_background_prompts(bundle):
    from lorakit.toyworld.classifier import load_classifier
    from lorakit.toyworld.evaluate import sample_images

    # every species four times, backgrounds rotating, with the other tag set too, so both heads are scored on every image
    prompts, targets = [], []
    for r in range(4):
        for i, sp in enumerate(SPECIES):
            bg = BACKGROUNDS[(i + r) % len(BACKGROUNDS)]
            prompts.append(f"{sp}, {bg}")
            targets.append((sp, bg))
    imgs = sample_images(bundle, prompts, [1000 + i for i in range(len(prompts))], steps=12, cfg_scale=5.0)
    assert imgs.shape == (len(prompts), 3, 64, 64)
    pred = load_classifier().predict(imgs, value_range=(-1, 1))
    bg_acc = np.mean([p == t[1] for p, t in zip(pred["background"]["labels"], targets)])
    sp_acc = np.mean([p == t[0] for p, t in zip(pred["species"]["labels"], targets)])
    print(f"background {bg_acc:.2f} species {sp_acc:.2f}")
    assert bg_acc >= BACKGROUND_FLOOR, (bg_acc, pred["background"]["labels"])
    assert sp_acc >= SPECIES_FLOOR, (sp_acc, pred["species"]["labels"])


def test_training_captions_never_show_the_held_out_character():
    from lorakit.toyworld.pretrain import training_caption
    from lorakit.toyworld.world import is_held_out, pretraining_sample

    rng = np.random.default_rng(0)
    for i in range(200):
        _, cap, attrs = pretraining_sample(i)
        assert not is_held_out(attrs)
        text = training_caption(attrs, rng)
        assert "usu" not in text and "crescent" not in text
        assert not (attrs["species"] == "bear" and "black fur" in text)
        assert set(t for t in text.split(", ") if t) <= set(cap.split(", "))


def test_word_reaction_separates_a_known_tag_from_an_unseen_word(bundle):
    """The diagnostic behind docs/quality.md's leak analysis: a colour tag the base was trained on moves its noise
    prediction many times more than a word it never saw (v2 base: "black" 0.046, "usu" 0.004, "zq" 0.003)."""
    from lorakit.toyworld.evaluate import word_reaction

    r = word_reaction(bundle, ["black", "zq"], n=8)
    assert r["black"] > 4 * r["zq"] > 0
    assert word_reaction(bundle, ["black"], n=8) == {"black": r["black"]}  # a function of (base, words, settings)
    with pytest.raises(ValueError, match="multiple of 4"):
        word_reaction(bundle, ["black"], n=6)
