"""Noise, timesteps and targets of diffusion training, as pure functions.

Every random draw takes an explicit `torch.Generator`, so saving `generator.get_state()` makes a resumed run draw the
same noise as an uninterrupted one. Draws happen on the generator's device (CPU by default) and are moved to the
latents' device, so the numbers do not depend on the accelerator either.
Definitions follow kohya-ss/sd-scripts (get_noise_noisy_latents_and_timesteps, apply_noise_offset, pyramid_noise_like,
fix_noise_scheduler_betas_for_zero_terminal_snr).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _gen_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def randn(shape, generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, returned on like's device/dtype."""
    x = torch.randn(tuple(shape), generator=generator, device=_gen_device(generator), dtype=torch.float32)
    return x.to(like.device, like.dtype)


def rand(shape, generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    x = torch.rand(tuple(shape), generator=generator, device=_gen_device(generator), dtype=torch.float32)
    return x.to(like.device, like.dtype)


def apply_noise_offset(latents: torch.Tensor, noise: torch.Tensor, noise_offset: float,
                       adaptive_noise_scale: Optional[float] = None, random_strength: bool = False,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """noise + offset * N(0, 1) per sample and channel (constant over H, W).

    random_strength: offset = U(0, 1) * noise_offset (one draw per batch, like sd-scripts).
    adaptive_noise_scale: offset += scale * |mean of the latent channel|, clamped at >= 0.
    """
    if not noise_offset:
        return noise
    offset: torch.Tensor | float = noise_offset
    if random_strength:
        offset = rand((1,), generator, latents) * noise_offset
    if adaptive_noise_scale is not None:
        latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
    return noise + offset * randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents)


def pyramid_noise(noise: torch.Tensor, iterations: int = 6, discount: float = 0.3,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Multi-resolution noise: add bilinearly upsampled noise at sizes H/r^i, W/r^i (r ~ U(2, 4) per level) with
    weight discount^i, stop at 1 pixel, then rescale to unit std."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(rand((1,), generator, torch.empty(0)).item()) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        small = randn((b, c, hn, wn), generator, noise)
        out = out + F.interpolate(small.float(), size=(h, w), mode="bilinear").to(noise.dtype) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_timesteps(batch_size: int, num_train_timesteps: int, min_timestep: Optional[int] = None,
                     max_timestep: Optional[int] = None, generator: Optional[torch.Generator] = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integer timesteps in [min, max) (defaults 0 and T); min >= max gives max for every sample."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    if lo < hi:
        t = torch.randint(lo, hi, (batch_size,), generator=generator, device=_gen_device(generator))
    else:
        t = torch.full((batch_size,), hi, dtype=torch.long)
    return t.long().to(device)


def _abar(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(like.device, torch.float32)[timesteps.to(like.device).long()]
    return a.view(-1, *([1] * (like.ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = _abar(timesteps, alphas_cumprod, latents)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def velocity(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v-prediction target: sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    a = _abar(timesteps, alphas_cumprod, latents)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(latents.dtype)


def training_target(latents, noise, timesteps, alphas_cumprod, prediction_type: str) -> torch.Tensor:
    if prediction_type == "v_prediction":
        return velocity(latents, noise, timesteps, alphas_cumprod)
    if prediction_type == "epsilon":
        return noise
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so sqrt(abar) keeps its first value and reaches exactly 0 at the last step (arXiv 2305.08891)."""
    b = betas.double()
    abar_sqrt = torch.cumprod(1 - b, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1 - alphas).to(betas.dtype)


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1 - betas.double(), 0).to(betas.dtype)


def noisy_latents(latents: torch.Tensor, alphas_cumprod: torch.Tensor, generator: Optional[torch.Generator], *,
                  noise_offset: Optional[float] = None, noise_offset_random_strength: bool = False,
                  adaptive_noise_scale: Optional[float] = None, multires_noise_iterations: Optional[int] = None,
                  multires_noise_discount: float = 0.3, ip_noise_gamma: Optional[float] = None,
                  ip_noise_gamma_random_strength: bool = False, min_timestep: Optional[int] = None,
                  max_timestep: Optional[int] = None):
    """One training draw: returns (noise, noisy_latents, timesteps), in sd-scripts' order of draws.

    The loss target uses `noise` (or v from it); input perturbation (ip_noise_gamma) only perturbs the model input.
    """
    noise = randn(latents.shape, generator, latents)
    if noise_offset:
        noise = apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale, noise_offset_random_strength,
                                   generator)
    if multires_noise_iterations:
        noise = pyramid_noise(noise, multires_noise_iterations, multires_noise_discount, generator)
    timesteps = sample_timesteps(latents.shape[0], alphas_cumprod.shape[0], min_timestep, max_timestep, generator,
                                 latents.device)
    if ip_noise_gamma:
        strength: torch.Tensor | float = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            strength = rand((1,), generator, latents) * ip_noise_gamma
        noisy = add_noise(latents, noise + strength * randn(latents.shape, generator, latents), timesteps,
                          alphas_cumprod)
    else:
        noisy = add_noise(latents, noise, timesteps, alphas_cumprod)
    return noise, noisy, timesteps


def noisy_latents_from_options(latents, alphas_cumprod, generator, opts):
    return noisy_latents(
        latents, alphas_cumprod, generator, noise_offset=opts.noise_offset,
        noise_offset_random_strength=opts.noise_offset_random_strength,
        adaptive_noise_scale=opts.adaptive_noise_scale, multires_noise_iterations=opts.multires_noise_iterations,
        multires_noise_discount=opts.multires_noise_discount, ip_noise_gamma=opts.ip_noise_gamma,
        ip_noise_gamma_random_strength=opts.ip_noise_gamma_random_strength, min_timestep=opts.min_timestep,
        max_timestep=opts.max_timestep)
