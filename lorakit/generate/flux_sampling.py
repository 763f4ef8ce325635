"""FLUX.1 sampling, as BFL's reference code does it: Euler steps along the flow from pure noise (t = 1) to the image
(t = 0), x <- x + (t_next - t) v(x, t). dev reads a distilled guidance value instead of running classifier-free
guidance twice; its schedule is shifted towards noise by the image size (mu from 0.5 at 256 tokens to 1.15 at 4096,
t' = e^mu / (e^mu + 1/t - 1)); schnell samples the plain linear schedule in a few (1-4) steps.
"""

from __future__ import annotations

from typing import Callable

import torch

from lorakit.train.flow import flux_mu, time_shift


def flux_timesteps(steps: int, image_seq_len: int, shift: bool) -> list[float]:
    """steps + 1 times from 1 down to 0 (BFL's get_schedule)."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        t = time_shift(flux_mu(image_seq_len), t)
    return [float(x) for x in t]


def euler_flow(velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, timesteps: list[float],
               progress=None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from timesteps[0] to timesteps[-1] with Euler steps (float32 state)."""
    x = x.float()
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        x = x + (t_next - t) * velocity(x, t).float()
        if progress is not None:
            progress(i + 1, len(timesteps) - 1)
    return x


def flux_velocity(bundle, hidden: torch.Tensor, pooled: torch.Tensor, guidance: float, height: int, width: int,
                  device) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """v(x, t) of the bundle's transformer for packed latents x [B, L, 64] of a height x width latent."""
    from lorakit.models.flux import image_ids, text_ids

    unet = bundle.unet
    dtype = next(unet.parameters()).dtype
    b = hidden.shape[0]
    img_ids, txt_ids = image_ids(b, height, width, device), text_ids(b, hidden.shape[1], device)
    g = torch.full((b,), float(guidance), device=device) if bundle.family.guidance_embed else None
    ctx, vec = hidden.to(device, dtype), pooled.to(device, dtype)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        ts = torch.full((b,), float(t), device=device, dtype=dtype)
        return unet(x.to(dtype), img_ids, ctx, txt_ids, ts, vec, g)

    return velocity
