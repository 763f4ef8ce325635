"""Losses against formulas written here (sd-scripts' definitions)."""

import math

import pytest
import torch

from lorakit.train import losses as L


def sd_alphas_cumprod(T=1000):
    # scaled_linear betas of SD: linspace(sqrt(0.00085), sqrt(0.012))^2
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


AC = sd_alphas_cumprod()


def snr(t):
    a = AC.double()[t]
    return a / (1 - a)


def test_elementwise_losses():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    c = torch.tensor([0.1, 0.5])
    d = p - t
    assert torch.allclose(L.elementwise_loss(p, t, "l2"), d**2)
    assert torch.allclose(L.elementwise_loss(p, t, "l1"), d.abs())
    cc = c.view(2, 1, 1, 1)
    assert torch.allclose(L.elementwise_loss(p, t, "huber", c), 2 * cc * (torch.sqrt(d**2 + cc**2) - cc))
    assert torch.allclose(L.elementwise_loss(p, t, "smooth_l1", c), 2 * (torch.sqrt(d**2 + cc**2) - cc))
    with pytest.raises(ValueError):
        L.elementwise_loss(p, t, "l3")


def test_huber_schedules():
    ts = torch.tensor([0, 10, 500, 999])
    const = L.huber_c_for_timesteps(ts, AC, "constant", 0.1, 2.0)
    assert torch.allclose(const, torch.full((4,), 0.2))
    exp = L.huber_c_for_timesteps(ts, AC, "exponential", 0.1, 1.0)
    want = torch.tensor([math.exp(math.log(0.1) * int(t) / 1000) for t in ts])
    assert torch.allclose(exp, want.float(), atol=1e-6)
    s = L.huber_c_for_timesteps(ts, AC, "snr", 0.1)
    for i, t in enumerate(ts):
        a = float(AC[t])
        sigma = math.sqrt((1 - a) / a)
        assert float(s[i]) == pytest.approx((1 - 0.1) / (1 + sigma) ** 2 + 0.1, rel=1e-5)
    assert float(s[0]) > float(s[-1])  # small noise -> c near 1 (l2-like), large noise -> near c


def test_min_snr_weights():
    ts = torch.tensor([1, 100, 600, 990])
    w = L.min_snr_weight(ts, AC, 5.0)
    wv = L.min_snr_weight(ts, AC, 5.0, v_prediction=True)
    for i, t in enumerate(ts):
        s = float(snr(t))
        assert float(w[i]) == pytest.approx(min(s, 5) / s, rel=1e-5)
        assert float(wv[i]) == pytest.approx(min(s, 5) / (s + 1), rel=1e-5)


def test_debiased_and_v_pred_scaling():
    ts = torch.tensor([0, 50, 900])
    d = L.debiased_weight(ts, AC)
    dv = L.debiased_weight(ts, AC, v_prediction=True)
    sc = L.v_pred_scale(ts, AC)
    for i, t in enumerate(ts):
        s = min(float(snr(t)), 1000.0)
        assert float(d[i]) == pytest.approx(1 / math.sqrt(s), rel=1e-5)
        assert float(dv[i]) == pytest.approx(1 / (s + 1), rel=1e-5)
        assert float(sc[i]) == pytest.approx(s / (s + 1), rel=1e-5)


def test_full_loss_order_weights_mask():
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    ts = torch.tensor([10, 400, 800])
    weights = torch.tensor([1.0, 1.0, 0.5])  # third is a reg image with prior_loss_weight 0.5
    mask = torch.zeros(3, 8, 8)
    mask[:, :4, :] = 1.0  # top half of the image (in pixels, twice the latent size)
    got = L.diffusion_loss(p, t, ts, AC, loss_type="l2", mask=mask, sample_weights=weights, min_snr_gamma=5.0,
                           debiased_estimation_loss=True, reduce=False)
    per = ((p - t) ** 2)
    per[:, :, 2:, :] = 0
    per = per.mean(dim=(1, 2, 3)) * weights
    for i, tt in enumerate(ts):
        s = float(snr(tt))
        per[i] = per[i] * (min(s, 5) / s) * (1 / math.sqrt(min(s, 1000)))
    assert torch.allclose(got, per, rtol=1e-5)
    assert L.diffusion_loss(p, t, ts, AC).item() == pytest.approx(((p - t) ** 2).mean().item(), rel=1e-6)


def test_v_pred_like_loss_term():
    p, t = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    ts = torch.tensor([100, 700])
    got = L.diffusion_loss(p, t, ts, AC, v_pred_like_loss=0.3, reduce=False)
    for i, tt in enumerate(ts):
        s = float(snr(tt))
        assert float(got[i]) == pytest.approx(1 + 1 / (s / (s + 1)) * 0.3, rel=1e-5)


def test_zero_terminal_snr_weights_stay_finite():
    from lorakit.train.noise import zero_terminal_snr_betas, alphas_cumprod_from_betas

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = alphas_cumprod_from_betas(zero_terminal_snr_betas(betas)).float()
    ts = torch.tensor([999, 998])
    assert torch.isfinite(L.min_snr_weight(ts, ac, 5.0)).all()
    assert torch.isfinite(L.min_snr_weight(ts, ac, 5.0, v_prediction=True)).all()
    assert torch.isfinite(L.debiased_weight(ts, ac, True)).all()
