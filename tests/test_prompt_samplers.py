"""Sampler names -> diffusers schedulers, built offline from an SD1.5-style scheduler config."""

import pytest

from lorakit.errors import UserError
from lorakit.generate.samplers import SAMPLERS, make_scheduler, resolve_sampler, sampler_names

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# name -> (class, {config key: expected value}); from the diffusers "A1111/k-diffusion" table.
EXPECTED = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    # sd-scripts sample names
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def _needs_scipy(name):
    return resolve_sampler(name).scheduler_class == "LMSDiscreteScheduler"


def test_every_name_builds_offline():
    try:
        import scipy  # noqa: F401

        have_scipy = True
    except ImportError:
        have_scipy = False
    for s in SAMPLERS:  # aliases resolve to the same spec, so one build per spec covers them
        for alias in s.aliases:
            assert resolve_sampler(alias) is s
    for name in sampler_names():
        if _needs_scipy(name) and not have_scipy:
            with pytest.raises(UserError, match="scipy"):
                make_scheduler(name, SD15_SCHEDULER)
            continue
        sch = make_scheduler(name, SD15_SCHEDULER)
        assert type(sch).__name__ == resolve_sampler(name).scheduler_class
        assert sch.config.beta_schedule == "scaled_linear" and sch.config.beta_end == 0.012
        sch.set_timesteps(8)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mapping(name):
    cls, cfg = EXPECTED[name]
    sch = make_scheduler(name, SD15_SCHEDULER)
    assert type(sch).__name__ == cls
    for k, v in cfg.items():
        assert sch.config[k] == v, k


def test_names_are_case_insensitive():
    assert resolve_sampler("euler A").name == "Euler a"
    assert resolve_sampler(" dpm++  2m karras ").name == "DPM++ 2M Karras"


def test_sigma_switches_from_base_config_are_reset():
    base = dict(SD15_SCHEDULER, use_karras_sigmas=True)
    assert make_scheduler("DPM++ 2M", base).config.use_karras_sigmas is False


def test_schedule_type():
    assert make_scheduler("DPM++ 2M", SD15_SCHEDULER, schedule_type="Karras").config.use_karras_sigmas is True
    assert make_scheduler("Euler", SD15_SCHEDULER, schedule_type="SGM Uniform").config.timestep_spacing == "trailing"
    assert make_scheduler("DPM++ 2M Karras", SD15_SCHEDULER, schedule_type="Automatic").config.use_karras_sigmas
    with pytest.raises(UserError, match="cannot use"):
        make_scheduler("DDIM", SD15_SCHEDULER, schedule_type="Karras")
    with pytest.raises(UserError, match="Unknown schedule type"):
        make_scheduler("Euler", SD15_SCHEDULER, schedule_type="wobbly")


def test_unknown_sampler_lists_names():
    with pytest.raises(UserError) as ei:
        make_scheduler("Euler b", SD15_SCHEDULER)
    assert "Euler a" in str(ei.value) and "DPM++ 2M Karras" in str(ei.value)
