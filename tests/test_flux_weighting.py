"""--weighting_scheme on FLUX (sd-scripts' SD3 schemes): the draws and loss weights against their formulas, where
each scheme acts (sigma sampling / sigma_scaled loss), the refusals where it would not, and the metadata."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lorakit import options as O
from lorakit.errors import UserError
from lorakit.train.flow import FlowObjective, FlowOptions, density_draws, loss_weighting, sample_sigmas, shift_sigmas


def _opts(**kw) -> FlowOptions:
    base = dict(timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0, model_prediction_type="raw",
                guidance_scale=1.0, t5xxl_max_token_length=8, apply_t5_attn_mask=False, ip_noise_gamma=None,
                ip_noise_gamma_random_strength=False, tokenizer_cache_dir=None)
    return FlowOptions(**{**base, **kw})


def test_density_draws_follow_the_sd3_formulas():
    z = torch.randn(64, generator=torch.Generator().manual_seed(4))
    u = torch.rand(64, generator=torch.Generator().manual_seed(4))
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert torch.allclose(density_draws("logit_normal", 64, g(), 0.5, 2.0), 1 / (1 + torch.exp(-(0.5 + 2.0 * z))))
    want = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    assert torch.allclose(density_draws("mode", 64, g(), mode_scale=1.29), want)
    assert torch.equal(density_draws("uniform", 64, g()), u) and torch.equal(density_draws("cosmap", 64, g()), u)


def test_sigma_sampling_reads_the_scheme_draws():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    got = sample_sigmas(_opts(weighting_scheme="logit_normal", logit_mean=-0.5, logit_std=1.5), 64, (8, 8),
                        torch.Generator().manual_seed(7))
    z = torch.randn(64, generator=torch.Generator().manual_seed(7))
    index = (torch.sigmoid(-0.5 + 1.5 * z) * 1000).long()
    assert torch.allclose(got, sched.sigmas[index].float(), atol=1e-6)
    plain = sample_sigmas(_opts(), 64, (8, 8), torch.Generator().manual_seed(7))
    assert not torch.allclose(got, plain)
    assert torch.allclose(shift_sigmas(torch.tensor(1.0), 3.0), torch.tensor(1.0))


def test_loss_weights_follow_the_formulas():
    s = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(loss_weighting("sigma_sqrt", s), 1 / s ** 2)
    assert torch.allclose(loss_weighting("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
    assert loss_weighting("logit_normal", s) is None and loss_weighting("uniform", s) is None


def test_the_loss_is_weighted_per_sample():
    """loss_at with sigma_scaled and sigma_sqrt = the unweighted per-sample losses times sigma^-2, then the mean."""
    from lorakit.models.tiny import tiny_bundle

    bundle = tiny_bundle("flux-schnell")
    maths = SimpleNamespace(device=torch.device("cpu"), weight_dtype=torch.float32, train_te=False,
                            loss=SimpleNamespace(loss_type="l2", huber_c=0.1, huber_scale=1.0))
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    sig = torch.tensor([0.3, 0.8])
    batch = {"captions": ["a", "b"], "loss_weights": torch.ones(2), "alpha_masks": None}

    def loss(scheme, per_sample=False):
        obj = FlowObjective(_opts(model_prediction_type="sigma_scaled", weighting_scheme=scheme), bundle.family)
        with torch.no_grad():
            cond = obj.conditioning(bundle, batch, maths, None)
            if per_sample:
                return [float(obj.loss_at(bundle, {**batch, "captions": [c], "loss_weights": torch.ones(1)}, maths,
                                          lat[i:i + 1], tuple(x[i:i + 1] if x is not None else None for x in cond),
                                          noise[i:i + 1], sig[i:i + 1],
                                          (1 - sig[i]) * lat[i:i + 1] + sig[i] * noise[i:i + 1]))
                        for i, c in enumerate(batch["captions"])]
            return float(obj.loss_at(bundle, batch, maths, lat, cond, noise, sig,
                                     (1 - sig.view(-1, 1, 1, 1)) * lat + sig.view(-1, 1, 1, 1) * noise))

    each = loss("uniform", per_sample=True)
    assert loss("uniform") == pytest.approx(sum(each) / 2, rel=1e-5)
    assert loss("sigma_sqrt") == pytest.approx((each[0] / 0.09 + each[1] / 0.64) / 2, rel=1e-5)


def test_schemes_are_refused_where_they_change_nothing():
    from lorakit.models.tiny import tiny_bundle
    from lorakit.train.checks import check_options

    flux, sd1 = tiny_bundle("flux-dev").family, tiny_bundle("sd1").family
    ns = lambda *a: O.resolve(["--pretrained_model_name_or_path", "m", "--model_prediction_type", "raw", *a])  # noqa
    assert check_options(ns("--weighting_scheme", "logit_normal", "--logit_std", "2"), flux) == []
    with pytest.raises(UserError, match="shapes the draws of --timestep_sampling sigma"):
        check_options(ns("--weighting_scheme", "mode", "--timestep_sampling", "shift"), flux)
    with pytest.raises(UserError, match="weights the loss of --model_prediction_type sigma_scaled"):
        check_options(ns("--weighting_scheme", "cosmap"), flux)
    with pytest.raises(UserError, match="--mode_scale is a parameter of --weighting_scheme mode"):
        check_options(ns("--weighting_scheme", "logit_normal", "--mode_scale", "1.0"), flux)
    with pytest.raises(UserError, match="--weighting_scheme.*FLUX.1 options"):
        check_options(O.resolve(["--pretrained_model_name_or_path", "m", "--weighting_scheme", "mode"]), sd1)


def test_metadata_records_the_scheme():
    from lorakit.train.metadata import flow_metadata

    md = flow_metadata(O.normalize(O.resolve(["--weighting_scheme", "logit_normal", "--logit_mean", "0.5"])))
    assert (md["ss_weighting_scheme"], md["ss_logit_mean"], md["ss_logit_std"], md["ss_mode_scale"]) == \
        ("logit_normal", "0.5", "1.0", "1.29")
