"""FLUX.1 generation: BFL's schedules, the Euler flow sampler against exact straight-line flows, and the Generator
on a tiny model (distilled guidance, LoRA tags, infotext, refusals)."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import UserError
from lorakit.generate.flux_sampling import euler_flow, flux_timesteps
from lorakit.generate.pipeline import GenerationSettings, Generator
from lorakit.models.tiny import tiny_bundle


def test_schedules():
    assert flux_timesteps(4, 4096, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])  # schnell
    dev = flux_timesteps(4, 4096, shift=True)  # 1024x1024: mu = 1.15
    mu = 1.15
    assert dev[0] == 1.0 and dev[-1] == 0.0
    assert dev[2] == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / 0.5 - 1))
    assert all(a > b for a, b in zip(dev, dev[1:])) and dev[2] > 0.5  # shifted towards noise


@pytest.mark.parametrize("shift", [False, True])
def test_euler_is_exact_on_a_straight_flow(shift):
    """x_t = (1 - t) x0 + t n has the constant velocity n - x0: Euler lands on x0 whatever the steps."""
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    out = euler_flow(lambda x, t: (x - x0) / t, n, flux_timesteps(3, 256, shift))
    assert torch.allclose(out, x0, atol=1e-5)


@pytest.fixture(scope="module")
def schnell():
    return tiny_bundle("flux-schnell", seed=1)


def _settings(**kw) -> GenerationSettings:
    base = dict(prompt="zq shape", steps=2, width=64, height=64, sampler="Euler", cfg_scale=1.0, seed=5)
    return GenerationSettings(**{**base, **kw})


def test_generator_samples_flux_with_loras(schnell, tmp_path):
    from lorakit.adapters.network import create_network

    gen = Generator(schnell, lora_dir=tmp_path)
    first = gen(_settings())
    assert first.images[0].size == (64, 64) and first.latents.shape == (1, 16, 8, 8)
    assert torch.equal(gen(_settings(), decode=False).latents, first.latents)  # the seed fixes the image
    assert "Sampler: Euler" in first.infotexts[0] and "Distilled CFG" not in first.infotexts[0]  # schnell: none
    net = create_network(schnell, "networks.lora", 2, 1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    net.save_weights(tmp_path / "zq.safetensors")
    with_lora = gen(_settings(prompt="zq shape <lora:zq:1>"), decode=False)
    assert not torch.allclose(with_lora.latents, first.latents)
    gen.close()
    assert torch.equal(gen(_settings(), decode=False).latents, first.latents)  # weights restored


def test_dev_reads_distilled_guidance_and_refuses_what_it_does_not_do():
    dev = Generator(tiny_bundle("flux-dev", seed=2))
    a = dev(_settings(distilled_cfg_scale=3.5), decode=False)
    b = dev(_settings(distilled_cfg_scale=1.0), decode=False)
    assert not torch.allclose(a.latents, b.latents)
    assert "Distilled CFG Scale: 3.5" in a.infotexts[0]
    for bad, match in ((dict(negative_prompt="blurry"), "--negative_prompt"), (dict(cfg_scale=7.0), "--cfg_scale 7"),
                       (dict(sampler="DPM++ 2M"), "--sampler"), (dict(width=72), "multiples of 16")):
        with pytest.raises(UserError, match=match):
            dev(_settings(**bad), decode=False)


def test_training_previews_use_the_flow_sampler(schnell, tmp_path):
    """sd-scripts' sample prompts on FLUX: no CFG (scale 1) unless asked, Euler along the flow."""
    from lorakit.generate.pipeline import generate_samples
    from lorakit.generate.sample_prompts import SamplePrompt

    paths = generate_samples(schnell, [SamplePrompt(prompt="zq", width=64, height=64, steps=2, seed=1)], tmp_path,
                             sampler="ddim")
    from PIL import Image

    text = Image.open(paths[0]).info["parameters"]
    assert "Sampler: Euler" in text and "CFG scale: 1" in text
