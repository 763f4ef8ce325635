"""FLUX.1 LoRA training: the flow-matching maths against its definitions (and diffusers' scheduler), the options
FLUX accepts or refuses, and a tiny FLUX model that learns from `lorakit train`."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorakit import options as O
from lorakit.errors import UserError
from lorakit.train.flow import (FlowObjective, FlowOptions, apply_prediction_type, flow_target, flux_mu, noisy_latents,
                                sample_sigmas, shift_sigmas, time_shift)
from test_train_common import make_images, one_thread  # noqa: F401


def _opts(sampling="sigma", scale=1.0, shift=3.0, kind="raw", **kw) -> FlowOptions:
    base = dict(timestep_sampling=sampling, sigmoid_scale=scale, discrete_flow_shift=shift, model_prediction_type=kind,
                guidance_scale=1.0, t5xxl_max_token_length=8, apply_t5_attn_mask=False, ip_noise_gamma=None,
                ip_noise_gamma_random_strength=False, tokenizer_cache_dir=None)
    return FlowOptions(**{**base, **kw})


def test_sigma_sampling_is_the_shifted_training_schedule_of_diffusers():
    """sd-scripts' default: an index into FlowMatchEulerDiscreteScheduler(shift)'s 1000 training sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    got = sample_sigmas(_opts("sigma"), 64, (8, 8), torch.Generator().manual_seed(5))
    index = (torch.rand(64, generator=torch.Generator().manual_seed(5)) * 1000).long()
    assert torch.allclose(got, sched.sigmas[index].float(), atol=1e-6)


def test_other_samplings_follow_their_formulas():
    z = torch.randn(8, generator=torch.Generator().manual_seed(2))
    draw = lambda o: sample_sigmas(o, 8, (32, 64), torch.Generator().manual_seed(2))  # noqa: E731
    assert torch.allclose(draw(_opts("sigmoid", scale=2.0)), torch.sigmoid(2.0 * z))
    assert torch.allclose(draw(_opts("shift", shift=3.1582)), shift_sigmas(torch.sigmoid(z), 3.1582))
    mu = 0.5 + 0.65 * (16 * 32 - 256) / 3840  # 32x64 latents: 512 packed tokens
    assert flux_mu(512) == pytest.approx(mu) and (flux_mu(256), flux_mu(4096)) == (0.5, pytest.approx(1.15))
    expected = math.exp(mu) / (math.exp(mu) + 1 / torch.sigmoid(z) - 1)
    assert torch.allclose(draw(_opts("flux_shift")), expected)
    u = draw(_opts("uniform"))
    assert ((u > 0) & (u < 1)).all()
    assert shift_sigmas(torch.tensor(0.5), 3.0) == pytest.approx(0.75)  # k s / (1 + (k - 1) s)
    assert time_shift(0.0, torch.tensor(0.3)) == pytest.approx(0.3)  # mu = 0 moves nothing


def test_flow_identities():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    s = torch.tensor([0.3, 0.7])
    assert torch.equal(noisy_latents(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(noisy_latents(x0, noise, torch.ones(2)), noise)
    d = (noisy_latents(x0, noise, s + 1e-2) - noisy_latents(x0, noise, s)) / 1e-2
    assert torch.allclose(d, flow_target(x0, noise), atol=1e-3)  # the target is d x_t / d sigma
    v, xt = flow_target(x0, noise), noisy_latents(x0, noise, s)
    assert torch.allclose(apply_prediction_type(v, xt, s, "sigma_scaled"), x0, atol=1e-6)  # x_t - sigma v = x0
    assert torch.equal(apply_prediction_type(v, xt, s, "additive"), v + xt)
    assert torch.equal(apply_prediction_type(v, xt, s, "raw"), v)


def test_draws_are_noise_then_sigmas_from_the_run_generator():
    obj = FlowObjective(_opts("uniform", ip_noise_gamma=0.1), SimpleNamespace(t5_max_length=512))
    lat = torch.randn(2, 16, 4, 4)
    noise, sigmas, noisy = obj.draw(lat, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    want_noise = torch.randn(lat.shape, generator=g)
    want_sigmas = torch.rand(2, generator=g)
    xi = torch.randn(lat.shape, generator=g)
    assert torch.equal(noise, want_noise) and torch.equal(sigmas, want_sigmas)
    assert torch.allclose(noisy, noisy_latents(lat, want_noise + 0.1 * xi, want_sigmas))  # input perturbation only
    assert obj.t5_length == 8


@pytest.fixture(scope="module")
def tiny_flux_file(tmp_path_factory) -> Path:
    from lorakit.models.saving import save_single_file
    from lorakit.models.tiny import tiny_bundle

    path = tmp_path_factory.mktemp("model") / "tiny_flux.safetensors"
    return save_single_file(tiny_bundle("flux-dev", seed=0), path)


def test_flux_options_are_refused_where_they_mean_nothing(tmp_path):
    from safetensors.torch import save_file

    from lorakit.models.saving import checkpoint_metadata, ldm_state_dict
    from lorakit.models.tiny import tiny_bundle
    from lorakit.train.checks import check_options
    from lorakit.train.stages import LoadOptions, load_base_model

    bundle = tiny_bundle("flux-dev")
    flux, sd1 = bundle.family, tiny_bundle("sd1").family
    ns = lambda *a: O.resolve(["--pretrained_model_name_or_path", "m", *a])  # noqa: E731
    with pytest.raises(UserError, match="--timestep_sampling.*FLUX.1 options"):
        check_options(ns("--timestep_sampling", "shift"), sd1)
    with pytest.raises(UserError, match="--min_snr_gamma has no meaning for FLUX.1"):
        check_options(ns("--min_snr_gamma", "5"), flux)
    with pytest.raises(UserError, match="huber_schedule constant"):
        check_options(ns("--loss_type", "huber"), flux)
    assert any("recommends --model_prediction_type raw" in n for n in check_options(ns(), flux))
    assert check_options(ns("--model_prediction_type", "raw", "--loss_type", "huber", "--huber_schedule", "constant"),
                         flux) == []
    # a model file without CLIP-L: training names the flag that brings it
    sd = {k: v for k, v in ldm_state_dict(bundle).items() if not k.startswith("text_encoders.clip_l.")}
    save_file(sd, str(tmp_path / "no_clip.safetensors"),
              metadata={"lorakit.configs": checkpoint_metadata(bundle, "t")["lorakit.configs"]})
    o = LoadOptions(str(tmp_path / "no_clip.safetensors"), None, False, False, False, "no", None, None, None)
    with pytest.raises(UserError, match="pass --clip_l FILE"):
        load_base_model(o, lambda *a: None)


def _fixed_noise_loss(model_file: Path, images: list[Path], lora: Path | None) -> float:
    """The flow loss of the training images at sigma 0.2/0.4/0.6/0.8 with fixed noise (raw prediction, l2)."""
    import numpy as np
    from PIL import Image

    from lorakit.adapters.network import load_network
    from lorakit.models.loading import load_bundle
    from lorakit.train.stages import vae_encoder

    bundle = load_bundle(model_file)
    if lora is not None:
        load_network(bundle, lora)
    obj = FlowObjective(_opts("uniform"), bundle.family)
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                          for p in images])
    latents = vae_encoder(bundle, torch.Generator().manual_seed(0), torch.float32)(pixels)
    batch = {"captions": [p.with_suffix(".txt").read_text() for p in images], "loss_weights": torch.ones(len(images)),
             "alpha_masks": None}
    maths = SimpleNamespace(device=torch.device("cpu"), weight_dtype=torch.float32, train_te=False,
                            loss=SimpleNamespace(loss_type="l2", huber_c=0.1, huber_scale=1.0))
    total = 0.0
    with torch.no_grad():
        cond = obj.conditioning(bundle, batch, maths, None)
        for j, s in enumerate((0.2, 0.4, 0.6, 0.8)):
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(100 + j))
            sig = torch.full((len(images),), s)
            total += float(obj.loss_at(bundle, batch, maths, latents, cond, noise, sig,
                                       noisy_latents(latents, noise, sig)))
    return total / 4


def test_tiny_flux_lora_trains_from_the_cli(tiny_flux_file, tmp_path, capsys):
    from safetensors import safe_open

    from lorakit.cli.main import main

    make_images(tmp_path / "data" / "1_zq shape", 3, sizes=((64, 64),))
    out = tmp_path / "out"
    rc = main(["train", "--pretrained_model_name_or_path", str(tiny_flux_file), "--train_data_dir",
               str(tmp_path / "data"), "--output_dir", str(out), "--resolution", "64", "--network_dim", "8",
               "--network_alpha", "8", "--learning_rate", "3e-3", "--max_train_steps", "40", "--seed", "1",
               "--t5xxl_max_token_length", "8", "--apply_t5_attn_mask", "--model_prediction_type", "raw",
               "--timestep_sampling", "uniform", "--guidance_scale", "1.0", "--cache_latents",
               "--cache_text_encoder_outputs", "--network_train_unet_only", "--validation_split", "0.34",
               "--validate_every_n_steps", "20", "--max_data_loader_n_workers", "0", "--no_progress",
               "--log_every_n_steps", "1"])
    log = capsys.readouterr().out
    assert rc == 0, log
    losses = [float(x) for x in re.findall(r"step \d+/40 \(epoch \d+/\d+\): loss ([\d.]+)", log)]
    assert len(losses) == 40
    assert sum(losses[-10:]) < 0.95 * sum(losses[:10]), losses  # training loss falls
    assert "validation" in log.lower()
    lora = out / "last.safetensors"
    with safe_open(str(lora), "pt") as f:
        md = f.metadata()
        assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in f.keys())
    assert md["modelspec.architecture"] == "flux-1-dev/lora" and md["ss_timestep_sampling"] == "uniform"
    assert md["ss_model_prediction_type"] == "raw" and md["ss_apply_t5_attn_mask"] == "True"
    train_images = sorted((tmp_path / "data" / "1_zq shape").glob("*.png"))
    before = _fixed_noise_loss(tiny_flux_file, train_images, None)
    after = _fixed_noise_loss(tiny_flux_file, train_images, lora)
    assert after < 0.9 * before, (before, after)  # the saved LoRA lowers the fixed-noise loss by over 10 %


def test_resumed_flux_run_matches_an_uninterrupted_one(tiny_flux_file, tmp_path):
    """Every flow draw (noise, sigmas, input perturbation) comes from the run's saved generator: exact resume."""
    from safetensors.torch import load_file

    from lorakit.train.trainer import train

    make_images(tmp_path / "data" / "1_zq", 2, sizes=((64, 64),))

    def run(out, *extra, **kw):
        ns = O.resolve(["--pretrained_model_name_or_path", str(tiny_flux_file), "--train_data_dir",
                        str(tmp_path / "data"), "--output_dir", str(tmp_path / out), "--resolution", "64",
                        "--network_dim", "2", "--learning_rate", "3e-3", "--max_train_steps", "2", "--seed", "7",
                        "--t5xxl_max_token_length", "8", "--model_prediction_type", "raw", "--timestep_sampling",
                        "flux_shift", "--ip_noise_gamma", "0.1", "--max_data_loader_n_workers", "0", *extra])
        return train(ns, progress=False, log=lambda *a: None, predict_memory=False, **kw)

    whole = run("a")
    run("b", "--save_state", "--save_every_n_steps", "1", stop_after_step=1)
    resumed = run("b", "--resume", str(sorted((tmp_path / "b").glob("*-state"))[-1]))
    assert resumed.losses == whole.losses[1:]
    wa, wb = load_file(str(whole.final_lora)), load_file(str(resumed.final_lora))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_t5_tokenizer_from_the_tokenizer_cache_dir(tmp_path):
    """A full-size T5 has no bundled tokenizer: sd-scripts' --tokenizer_cache_dir layout provides it."""
    from transformers import ByT5Tokenizer

    from lorakit.models.tiny import tiny_bundle
    from lorakit.models.tokenizer import MissingT5Tokenizer

    bundle = tiny_bundle("flux-schnell")
    expected = FlowObjective(_opts(), bundle.family).encode_text(bundle, ["zq shape"])
    bundle.tokenizers[1] = MissingT5Tokenizer(32128)  # as a full-size single file loads
    with pytest.raises(UserError, match="--tokenizer_cache_dir"):
        FlowObjective(_opts(), bundle.family).encode_text(bundle, ["zq shape"])
    ByT5Tokenizer().save_pretrained(tmp_path / "google_t5-v1_1-xxl")
    got = FlowObjective(_opts(tokenizer_cache_dir=str(tmp_path)), bundle.family).encode_text(bundle, ["zq shape"])
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(UserError, match="no T5 tokenizer there"):
        FlowObjective(_opts(tokenizer_cache_dir=str(tmp_path / "empty")), bundle.family)
