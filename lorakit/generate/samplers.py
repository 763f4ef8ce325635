"""Sampler names (A1111 and sd-scripts) mapped onto diffusers schedulers.

The mapping follows the diffusers scheduler overview table ("A1111/k-diffusion -> Diffusers"):
DPM++ 2M = DPMSolverMultistepScheduler, "Karras" = ``use_karras_sigmas=True``, DPM++ SDE = DPMSolverSinglestep,
DPM2 = KDPM2Discrete, DPM2 a = KDPM2AncestralDiscrete, Euler a = EulerAncestralDiscrete, LMS = LMSDiscrete, ...
Entries marked ``approximate`` have no exact diffusers port (A1111's DPM++ SDE / 2S a are stochastic k-diffusion
samplers; diffusers' exact DPMSolverSDEScheduler needs the optional ``torchsde`` package).

A1111 1.9+ writes the schedule separately ("Sampler: DPM++ 2M, Schedule type: Karras"); ``make_scheduler``
accepts that as ``schedule_type``. Names match case-insensitively.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from lorakit.errors import UserError

__all__ = ["SamplerSpec", "SAMPLERS", "SCHEDULE_TYPES", "sampler_names", "resolve_sampler", "make_scheduler"]

_SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    scheduler_class: str
    kwargs: dict = field(default_factory=dict)
    approximate: bool = False
    aliases: tuple[str, ...] = ()


def _s(name, cls, aliases=(), approximate=False, **kwargs) -> SamplerSpec:
    return SamplerSpec(name, cls, dict(kwargs), approximate, tuple(aliases))


_DPM_2M = dict(algorithm_type="dpmsolver++", solver_order=2)
_DPM_2M_SDE = dict(algorithm_type="sde-dpmsolver++", solver_order=2)
_DPM_SINGLE = dict(algorithm_type="dpmsolver++", solver_order=2)
_KARRAS = dict(use_karras_sigmas=True)

SAMPLERS: list[SamplerSpec] = [
    # A1111 names (k-diffusion aliases in `aliases`).
    _s("Euler a", "EulerAncestralDiscreteScheduler", ("k_euler_a", "k_euler_ancestral", "euler_a")),
    _s("Euler", "EulerDiscreteScheduler", ("k_euler", "euler")),
    _s("LMS", "LMSDiscreteScheduler", ("k_lms", "lms")),
    _s("LMS Karras", "LMSDiscreteScheduler", ("k_lms_ka",), **_KARRAS),
    _s("Heun", "HeunDiscreteScheduler", ("k_heun", "heun")),
    _s("DPM2", "KDPM2DiscreteScheduler", ("k_dpm_2", "dpm_2")),
    _s("DPM2 Karras", "KDPM2DiscreteScheduler", ("k_dpm_2_ka",), **_KARRAS),
    _s("DPM2 a", "KDPM2AncestralDiscreteScheduler", ("k_dpm_2_a", "dpm_2_a")),
    _s("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", ("k_dpm_2_a_ka",), **_KARRAS),
    _s("DPM++ 2M", "DPMSolverMultistepScheduler", ("k_dpmpp_2m", "dpmsolver++"), **_DPM_2M),
    _s("DPM++ 2M Karras", "DPMSolverMultistepScheduler", ("k_dpmpp_2m_ka",), **_DPM_2M, **_KARRAS),
    _s("DPM++ 2M SDE", "DPMSolverMultistepScheduler", ("k_dpmpp_2m_sde",), **_DPM_2M_SDE),
    _s("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", ("k_dpmpp_2m_sde_ka",), **_DPM_2M_SDE, **_KARRAS),
    _s("DPM++ SDE", "DPMSolverSinglestepScheduler", ("k_dpmpp_sde",), approximate=True, **_DPM_SINGLE),
    _s("DPM++ SDE Karras", "DPMSolverSinglestepScheduler", ("k_dpmpp_sde_ka",), approximate=True,
       **_DPM_SINGLE, **_KARRAS),
    _s("DPM++ 2S a", "DPMSolverSinglestepScheduler", ("k_dpmpp_2s_a",), approximate=True, **_DPM_SINGLE),
    _s("DPM++ 2S a Karras", "DPMSolverSinglestepScheduler", ("k_dpmpp_2s_a_ka",), approximate=True,
       **_DPM_SINGLE, **_KARRAS),
    _s("DDIM", "DDIMScheduler", ("ddim",)),
    _s("PLMS", "PNDMScheduler", ("pndm",), skip_prk_steps=True),
    _s("UniPC", "UniPCMultistepScheduler", ("unipc",)),
    _s("LCM", "LCMScheduler", ("lcm",)),
    # sd-scripts sample names without an A1111 twin.
    _s("dpmsolver", "DPMSolverMultistepScheduler", (), algorithm_type="dpmsolver", solver_order=2,
       final_sigmas_type="sigma_min"),  # diffusers refuses the default "zero" for this algorithm
    _s("dpmsingle", "DPMSolverSinglestepScheduler", ()),
    _s("ddpm", "DDPMScheduler", ()),
]

# A1111 "Schedule type" values -> extra scheduler kwargs (None: keep the sampler's default).
SCHEDULE_TYPES: dict[str, dict | None] = {
    "automatic": None,
    "uniform": None,
    "normal": None,
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "sgm uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
}


def _key(name: str) -> str:
    return " ".join(name.strip().lower().split())


_LOOKUP: dict[str, SamplerSpec] = {}
for _spec in SAMPLERS:
    for _n in (_spec.name, *_spec.aliases):
        _LOOKUP.setdefault(_key(_n), _spec)


def sampler_names() -> list[str]:
    """Canonical sampler names."""
    return [s.name for s in SAMPLERS]


def resolve_sampler(name: str) -> SamplerSpec:
    spec = _LOOKUP.get(_key(name))
    if spec is None:
        raise UserError(f"Unknown sampler {name!r}. Samplers: {', '.join(sampler_names())}.")
    return spec


def _accepted_params(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def make_scheduler(name: str, base_scheduler_config: dict, schedule_type: str | None = None):
    """Build the diffusers scheduler for ``name`` from a model's scheduler config (``scheduler.config``).

    The model's betas, prediction type and timestep settings are kept; the sampler's own settings override them,
    and Karras/exponential/beta sigma switches the sampler does not use are turned off.
    """
    import diffusers

    spec = resolve_sampler(name)
    cls = getattr(diffusers, spec.scheduler_class)
    if "dummy" in getattr(cls, "__module__", ""):
        # diffusers exports a placeholder when an optional backend (scipy for LMS) is missing.
        try:
            cls()
        except ImportError as e:
            raise UserError(
                f"Sampler {spec.name!r} ({spec.scheduler_class}) needs a package that is not installed: "
                f"{' '.join(str(e).split())} Choose another sampler or install it."
            ) from None
    accepted = _accepted_params(cls)

    kwargs = {k: False for k in _SIGMA_KEYS if k in accepted}
    kwargs.update(spec.kwargs)
    if schedule_type is not None:
        st = _key(schedule_type)
        if st not in SCHEDULE_TYPES:
            raise UserError(
                f"Unknown schedule type {schedule_type!r}. Schedule types: "
                f"{', '.join(k.title() if k != 'sgm uniform' else 'SGM Uniform' for k in SCHEDULE_TYPES)}."
            )
        extra = SCHEDULE_TYPES[st]
        if extra:
            missing = [k for k in extra if k not in accepted]
            if missing:
                raise UserError(
                    f"Sampler {spec.name!r} cannot use schedule type {schedule_type!r} "
                    f"({spec.scheduler_class} has no {', '.join(missing)})."
                )
            kwargs = {k: (False if k in _SIGMA_KEYS else v) for k, v in kwargs.items()}
            kwargs.update(extra)
    unknown = [k for k in spec.kwargs if k not in accepted]
    if unknown:  # a diffusers upgrade renamed something: fail loudly rather than silently sample differently
        raise RuntimeError(f"{spec.scheduler_class} does not accept {unknown}")

    config = {k: v for k, v in dict(base_scheduler_config).items() if not k.startswith("_")}
    config.update(kwargs)
    return cls.from_config(config)
