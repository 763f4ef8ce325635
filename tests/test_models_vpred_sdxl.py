"""v-prediction SDXL (NoobAI-XL v-pred and other v-pred fine-tunes): detected from the `v_pred` marker key, ModelSpec
or --v_parameterization; zero-terminal-SNR from the `ztsnr` key; trained and sampled on that schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_train_common import dataset, one_thread, options, read_lora, run, tiny  # noqa: F401

XL_KEYS = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
           "conditioner.embedders.1.model.token_embedding.weight", "model.diffusion_model.input_blocks.0.0.weight"}


def _detect(keys, metadata=None, **flags):
    from lorakit.models.detect import detect_ldm_family

    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    return detect_ldm_family("x.safetensors", set(keys), shapes.get, metadata or {}, **flags)[0].name


def test_detection():
    from lorakit.models.detect import declares_zero_terminal_snr, family_from_diffusers_config, lora_metadata_families

    assert _detect(XL_KEYS) == "sdxl"
    assert _detect(XL_KEYS | {"v_pred"}) == "sdxl-v"  # NoobAI-XL v-pred / ComfyUI's CheckpointSave marker
    assert _detect(XL_KEYS, {"modelspec.prediction_type": "v"}) == "sdxl-v"
    assert _detect(XL_KEYS, v_parameterization=True) == "sdxl-v"
    assert declares_zero_terminal_snr(XL_KEYS | {"ztsnr"}) and not declares_zero_terminal_snr(XL_KEYS)
    unet = {"addition_embed_type": "text_time", "cross_attention_dim": 2048, "in_channels": 4}
    assert family_from_diffusers_config(unet, {"prediction_type": "v_prediction"}, "f").name == "sdxl-v"
    assert family_from_diffusers_config(unet, {}, "f").name == "sdxl"
    md = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.prediction_type": "v"}
    assert lora_metadata_families(md)[0] == {"sdxl-v"}
    from lorakit.models.families import family_from_flags, get_family

    assert family_from_flags(sdxl=True, v_parameterization=True).name == "sdxl-v"
    v, e = get_family("sdxl-v"), get_family("sdxl")
    assert v.shares_weights_with(e) and v.prediction_type == "v_prediction" and e.prediction_type == "epsilon"
    # a v-pred SDXL LoRA is an SDXL LoRA to every UI: same version string and architecture as sd-scripts writes
    assert (v.base_model_version, v.modelspec_architecture) == (e.base_model_version, e.modelspec_architecture)


def _ztsnr_sqrt_abar(T=1000):
    """Lin et al. 2023, algorithm 1, written out: scaled-linear betas, sqrt(abar) shifted to end at 0 and scaled to
    keep its first value."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2
    s = np.sqrt(np.cumprod(1 - betas))
    return (s - s[-1]) * s[0] / (s[0] - s[-1])


def _saved_vpred(tmp_path):
    from lorakit.models.loading import with_schedule
    from lorakit.models.saving import save_single_file

    bundle = with_schedule(tiny("sdxl"), v_prediction=True, zero_terminal_snr=True)
    path = tmp_path / "noob_vpred.safetensors"
    save_single_file(bundle, path)
    return path


def test_save_and_load_keep_the_markers_and_schedule(tmp_path):
    from safetensors import safe_open

    from lorakit.models.loading import load_bundle, plan_model

    path = _saved_vpred(tmp_path)
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
    assert {"v_pred", "ztsnr"} <= keys
    assert plan_model(path).family.name == "sdxl-v"
    b = load_bundle(path)
    assert b.family.name == "sdxl-v" and b.info.get("zero_terminal_snr")
    sched = b.noise_scheduler
    assert sched.config.prediction_type == "v_prediction" and sched.config.timestep_spacing == "trailing"
    want = _ztsnr_sqrt_abar()
    assert np.allclose(np.sqrt(sched.alphas_cumprod.double().numpy()), want, atol=2e-6)
    assert float(sched.alphas_cumprod[-1]) == 0.0


def test_sampling_starts_from_pure_noise(tmp_path):
    from lorakit.generate.pipeline import GenerationSettings, Generator
    from lorakit.generate.samplers import make_scheduler
    from lorakit.models.loading import load_bundle

    b = load_bundle(_saved_vpred(tmp_path))
    for name in ("DDIM", "Euler", "DPM++ 2M"):
        s = make_scheduler(name, b.noise_scheduler.config)
        s.set_timesteps(4)
        assert int(s.timesteps[0]) == 999, name  # trailing: the first step sees SNR 0, as the model was trained
        assert s.config.prediction_type == "v_prediction" and s.config.rescale_betas_zero_snr
    with Generator(b) as gen:
        out = gen(GenerationSettings(prompt="zq", steps=3, sampler="DDIM", width=64, height=64, seed=1), decode=False)
    assert out.latents is not None and torch.isfinite(out.latents).all()


def test_training_uses_v_and_the_declared_schedule(tmp_path, monkeypatch):
    from lorakit.models.loading import load_bundle
    from lorakit.train import trainer as T

    seen = []
    orig = T._batch_loss

    def spy(bundle, batch, maths, *a):
        seen.append((maths.prediction, maths.alphas_cumprod.clone()))
        return orig(bundle, batch, maths, *a)

    monkeypatch.setattr(T, "_batch_loss", spy)
    path = _saved_vpred(tmp_path)
    data = dataset(tmp_path, n_train=1)
    result = run(options(tmp_path, data, "--pretrained_model_name_or_path", str(path), "--max_train_steps", "1",
                         "--resolution", "64"), bundle=load_bundle(path), predict_memory=False)
    pred, ac = seen[0]
    assert pred == "v_prediction"
    assert np.allclose(np.sqrt(ac.double().numpy()), _ztsnr_sqrt_abar(), atol=2e-6) and float(ac[-1]) == 0.0
    _, md = read_lora(result.final_lora)
    assert md["modelspec.prediction_type"] == "v" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["ss_zero_terminal_snr"] == "True"  # the schedule trained on, though no flag asked for it


def test_v_parameterization_flag_on_a_plain_sdxl(tmp_path):
    result = run(options(tmp_path, dataset(tmp_path, n_train=1), "--v_parameterization", "--max_train_steps", "1"),
                 family="sdxl", predict_memory=False)
    _, md = read_lora(result.final_lora)
    assert md["modelspec.prediction_type"] == "v" and md["ss_zero_terminal_snr"] == "False"
