"""Fixed-seed samples of many prompts in one batch, with the generation layer's conditioning and samplers.

`Generator` (lorakit.generate.pipeline) draws one prompt per call; an evaluation draws a few prompts x a few seeds
for the base model and every checkpoint, so this loop puts different prompts in one UNet batch. Everything else is
the generation layer's: `PromptEncoder` (A1111 chunks, emphasis, the family's clip-skip rule), `make_scheduler`
(sampler names), the per-image CPU noise generator seeded with the image's seed, classifier-free guidance on the
negative prompt. So sample (prompt, seed) is the image `lorakit generate --prompt P --seed S` draws with the same
sampler, steps, CFG and size (up to float rounding of the batched UNet/VAE).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lorakit.errors import UserError


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 20
    sampler: str = "DDIM"
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    clip_skip: int | None = None  # A1111's number; None: the family's default
    batch_size: int = 16  # images per UNet call (twice that rows with CFG)

    def check(self) -> None:
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1 (got {self.steps}).")
        for name, v in (("width", self.width), ("height", self.height)):
            if v < 64 or v % 8:
                raise UserError(f"--{name} {v}: use a multiple of 8 of at least 64 (the training resolution, e.g. "
                                "512 for SD1, 1024 for SDXL).")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1 (got {self.batch_size}).")


def _pad(ctx: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Pad a [1, L, D] conditioning with empty-prompt chunks to `length` tokens (as A1111 pads AND sub-prompts)."""
    missing = length - ctx.shape[1]
    if missing <= 0:
        return ctx
    return torch.cat([ctx, empty.to(ctx.dtype).repeat(1, missing // empty.shape[1], 1)], dim=1)


@torch.no_grad()
def sample_images(bundle, prompts: Sequence[str], seeds: Sequence[int], settings: SampleSettings,
                  encoder=None, progress=None) -> np.ndarray:
    """uint8 images (N, H, W, 3) for prompts[i] with seeds[i]. `encoder`: a PromptEncoder to reuse (its cache must
    have been cleared after the text encoder's weights changed). `progress(done, total)` after each batch."""
    from lorakit.generate.conditioning_prompt import PromptEncoder
    from lorakit.generate.samplers import make_scheduler
    from lorakit.models.conditioning import added_cond_kwargs

    settings.check()
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    enc = encoder or PromptEncoder(bundle, settings.clip_skip)
    unet = bundle.unet
    device = next(unet.parameters()).device
    udtype = next(unet.parameters()).dtype
    f = bundle.latent_factor
    shape = (unet.config.in_channels, settings.height // f, settings.width // f)
    neg = enc.encode(settings.negative_prompt)
    out = []
    for start in range(0, len(prompts), settings.batch_size):
        ps, ss = list(prompts[start:start + settings.batch_size]), list(seeds[start:start + settings.batch_size])
        encs = [neg] + [enc.encode(p) for p in dict.fromkeys(ps)]
        length = max(e.context.shape[1] for e in encs)
        empty = enc.empty().context
        by_prompt = {p: e for p, e in zip(dict.fromkeys(ps), encs[1:])}
        ctx = torch.cat([_pad(neg.context, length, empty)] * len(ps)
                        + [_pad(by_prompt[p].context, length, empty) for p in ps]).to(device, udtype)
        pooled = None
        if neg.pooled is not None:
            pooled = torch.cat([neg.pooled] * len(ps) + [by_prompt[p].pooled for p in ps]).to(device, udtype)
        rows = 2 * len(ps)
        size_hw = (settings.height, settings.width)
        extra = added_cond_kwargs(bundle.family, pooled, [size_hw] * rows, [(0, 0)] * rows, [size_hw] * rows,
                                  dtype=udtype, device=device)
        latents = _denoise(bundle, make_scheduler(settings.sampler, bundle.noise_scheduler.config), ctx, extra, ss,
                           shape, settings, device, udtype)
        out.append(decode(bundle, latents))
        if progress is not None:
            progress(min(start + settings.batch_size, len(prompts)), len(prompts))
    return np.concatenate(out) if out else np.zeros((0, settings.height, settings.width, 3), np.uint8)


def _denoise(bundle, sched, ctx, extra, seeds, shape, s: SampleSettings, device, udtype) -> torch.Tensor:
    # one CPU generator per image, seeded with its seed: the image does not depend on its batch (as in Generator)
    gens = [torch.Generator("cpu").manual_seed(int(sd)) for sd in seeds]
    latents = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(device)
    sched.set_timesteps(s.steps, device=device)
    latents = latents * sched.init_noise_sigma
    step_takes_gen = "generator" in inspect.signature(sched.step).parameters
    n = len(seeds)
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([latents, latents]), t)
        eps = bundle.unet(x.to(udtype), t, encoder_hidden_states=ctx, **extra).sample.float()
        uncond, cond = eps[:n], eps[n:]
        guided = uncond + (cond - uncond) * float(s.cfg_scale)
        kw = {"generator": gens} if step_takes_gen else {}
        latents = sched.step(guided, t, latents, **kw, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(bundle, latents: torch.Tensor, chunk: int = 8) -> np.ndarray:
    """Latents -> uint8 (N, H, W, 3); the VAE runs in float32 like the generation layer (fp16 VAEs overflow)."""
    vae = bundle.vae
    vdtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    if vdtype != torch.float32:
        vae.to(torch.float32)
    try:
        arrs = []
        for i in range(0, len(latents), chunk):
            x = vae.decode((latents[i:i + chunk].float() / bundle.latent_scale).to(device)).sample
            x = ((x.float() + 1) / 2).clamp(0, 1)
            arrs.append((x.permute(0, 2, 3, 1).cpu().numpy() * 255.0).astype(np.uint8))
    finally:
        if vdtype != torch.float32:
            vae.to(vdtype)
    return np.concatenate(arrs)
