"""Noise, timesteps and targets against formulas written here; generator-driven determinism."""

import math

import pytest
import torch

from lorakit.train import noise as N


def betas_sd(T=1000):
    return torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2


AC = torch.cumprod(1 - betas_sd(), 0).float()


def test_add_noise_and_velocity():
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = torch.tensor([5, 700])
    noisy = N.add_noise(x, n, t, AC)
    v = N.velocity(x, n, t, AC)
    for i in range(2):
        a = float(AC[t[i]])
        assert torch.allclose(noisy[i], math.sqrt(a) * x[i] + math.sqrt(1 - a) * n[i], atol=1e-6)
        assert torch.allclose(v[i], math.sqrt(a) * n[i] - math.sqrt(1 - a) * x[i], atol=1e-6)
    assert N.training_target(x, n, t, AC, "epsilon") is n


def test_zero_terminal_snr():
    b = betas_sd()
    nb = N.zero_terminal_snr_betas(b)
    ac_old = torch.cumprod(1 - b, 0)
    ac_new = torch.cumprod(1 - nb, 0)
    assert float(ac_new[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(ac_new[0].sqrt()) == pytest.approx(float(ac_old[0].sqrt()), rel=1e-9)
    # sqrt(abar) is an affine map of the old one: s_new = (s_old - s_T) * s_0 / (s_0 - s_T)
    s0, sT = ac_old[0].sqrt(), ac_old[-1].sqrt()
    want = (ac_old.sqrt() - sT) * s0 / (s0 - sT)
    assert torch.allclose(ac_new.sqrt(), want, atol=1e-9)


def test_timesteps_range_and_degenerate():
    g = torch.Generator().manual_seed(0)
    t = N.sample_timesteps(10000, 1000, 200, 300, g)
    assert t.min() >= 200 and t.max() < 300 and t.dtype == torch.long
    assert (N.sample_timesteps(4, 1000, 500, 500, g) == 500).all()
    t2 = N.sample_timesteps(10000, 1000, None, None, g)
    assert t2.min() >= 0 and t2.max() <= 999


def test_noise_offset_formula():
    lat = torch.randn(2, 4, 8, 8)
    base = torch.zeros_like(lat)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = N.apply_noise_offset(lat, base, 0.1, generator=g1)
    want = 0.1 * torch.randn(2, 4, 1, 1, generator=g2)
    assert torch.allclose(out, want.expand_as(out))
    # adaptive: offset = 0.1 + 0.5 * |channel mean|
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    out = N.apply_noise_offset(lat, base, 0.1, adaptive_noise_scale=0.5, generator=g1)
    off = 0.1 + 0.5 * lat.mean(dim=(2, 3), keepdim=True).abs()
    assert torch.allclose(out, off * torch.randn(2, 4, 1, 1, generator=g2), atol=1e-6)
    # random strength: U(0,1) * offset drawn first
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = N.apply_noise_offset(lat, base, 0.2, random_strength=True, generator=g1)
    s = torch.rand(1, generator=g2) * 0.2
    assert torch.allclose(out, s * torch.randn(2, 4, 1, 1, generator=g2), atol=1e-6)


def test_pyramid_noise_formula():
    base = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(9))
    out = N.pyramid_noise(base, 4, 0.5, torch.Generator().manual_seed(0))
    # level i: r ~ U(2, 4); add bilinear-upsampled N(0,1) of size (H / r^i, W / r^i) times discount^i; unit std
    g = torch.Generator().manual_seed(0)
    want = base.clone()
    for i in range(4):
        r = float(torch.rand(1, generator=g)) * 2 + 2
        h, w = max(1, int(32 / r**i)), max(1, int(32 / r**i))
        small = torch.randn(2, 4, h, w, generator=g)
        want = want + torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear") * 0.5**i
        if h == 1 or w == 1:
            break
    want = want / want.std()
    assert torch.allclose(out, want, atol=1e-5)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-5)


def test_noisy_latents_deterministic_and_ip_gamma():
    lat = torch.randn(2, 4, 8, 8)
    kw = dict(noise_offset=0.05, multires_noise_iterations=3, ip_noise_gamma=0.1, min_timestep=100, max_timestep=900)
    a = N.noisy_latents(lat, AC, torch.Generator().manual_seed(11), **kw)
    b = N.noisy_latents(lat, AC, torch.Generator().manual_seed(11), **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    noise, noisy, t = a
    assert ((t >= 100) & (t < 900)).all()
    # without ip gamma the input is exactly add_noise(latents, noise); with it, it differs
    n2, noisy2, t2 = N.noisy_latents(lat, AC, torch.Generator().manual_seed(11), min_timestep=100, max_timestep=900)
    assert torch.allclose(noisy2, N.add_noise(lat, n2, t2, AC))
    assert not torch.allclose(noisy, N.add_noise(lat, noise, t, AC))


def test_generator_state_resume():
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 4, 8, 8)
    N.noisy_latents(lat, AC, g)
    state = g.get_state()
    first = N.noisy_latents(lat, AC, g)
    g2 = torch.Generator()
    g2.set_state(state)
    again = N.noisy_latents(lat, AC, g2)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
