"""Rectified-flow training (FLUX.1), with sd-scripts' flux_train_network.py flags and meanings.

    sigma ~ --timestep_sampling;  noisy = (1 - sigma) x0 + sigma noise;  target = noise - x0 (the velocity)
    prediction = the transformer's output, turned by --model_prediction_type:
        raw            as is
        additive       prediction + noisy
        sigma_scaled   noisy - sigma * prediction   (sd-scripts' default; its FLUX guide recommends raw)

Timestep sampling (sd-scripts' get_noisy_model_input_and_timesteps), u ~ U(0,1), z ~ N(0,1):
    sigma       the training schedule of FlowMatchEulerDiscreteScheduler(shift = --discrete_flow_shift): index
                i = floor(1000 u), sigma = shift(s) with s = (1000 - i) / 1000 and shift(s) = k s / (1 + (k - 1) s)
    uniform     u
    sigmoid     sigmoid(--sigmoid_scale z)
    shift       shift(sigmoid(--sigmoid_scale z)) with k = --discrete_flow_shift
    flux_shift  sigmoid(--sigmoid_scale z) moved by FLUX's resolution-dependent shift: mu = 0.5 + (1.15 - 0.5)
                (n - 256) / (4096 - 256) for n packed image tokens, sigma' = e^mu / (e^mu + 1/sigma - 1)
--weighting_scheme (sd-scripts' SD3 schemes, diffusers' compute_density_for_timestep_sampling / compute_loss_weighting):
    logit_normal  sigma sampling draws u = sigmoid(--logit_mean + --logit_std z) instead of u ~ U(0,1)
    mode          sigma sampling draws u' = 1 - u - s (cos^2(pi u / 2) - 1 + u), s = --mode_scale
    sigma_sqrt    the loss of each sample is weighted by sigma^-2   } only with --model_prediction_type sigma_scaled,
    cosmap        ... by 2 / (pi (1 - 2 sigma + 2 sigma^2))            } as sd-scripts applies them
    uniform/none  neither (the default)
The transformer reads t = sigma (BFL scales it by 1000 inside) and, for dev, guidance = --guidance_scale.
Every draw uses the run's noise generator (noise first, then sigmas), so a resumed run draws the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from lorakit.models.flux import image_ids, pack_latents, text_ids, unpack_latents
from lorakit.train import losses
from lorakit.train import noise as N

TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
SAMPLING_SCHEMES = ("logit_normal", "mode")  # shape the sigma sampling's draws
LOSS_SCHEMES = ("sigma_sqrt", "cosmap")  # weight the loss (sigma_scaled predictions)
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class FlowOptions:
    timestep_sampling: str
    sigmoid_scale: float
    discrete_flow_shift: float
    model_prediction_type: str
    guidance_scale: float
    t5xxl_max_token_length: Optional[int]
    apply_t5_attn_mask: bool
    ip_noise_gamma: Optional[float]
    ip_noise_gamma_random_strength: bool
    tokenizer_cache_dir: Optional[str]  # T5's tokenizer when the model files bring none (sd-scripts' layout)
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


# ---- pure maths ---------------------------------------------------------------------------------------------------
def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3/FLUX's discrete flow shift k: s -> k s / (1 + (k - 1) s) (k > 1 moves samples towards noise)."""
    return sigmas * shift / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift: linear from 0.5 at 256 tokens to 1.15 at 4096 tokens."""
    return 0.5 + (1.15 - 0.5) * (image_seq_len - 256) / (4096 - 256)


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def density_draws(scheme: str, batch: int, generator, logit_mean: float = 0.0, logit_std: float = 1.0,
                  mode_scale: float = 1.29) -> torch.Tensor:
    """u in [0, 1] per sample, distributed as the weighting scheme says (uniform for the others)."""
    like = torch.empty(0)
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * N.randn((batch,), generator, like))
    u = N.rand((batch,), generator, like)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights of sigma_sqrt and cosmap (None: no weighting)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return None


def sample_sigmas(o: FlowOptions, batch: int, latent_hw: tuple[int, int],
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """One sigma in (0, 1] per sample, float32 on the generator's device (see the module docstring)."""
    like = torch.empty(0)
    if o.timestep_sampling == "uniform":
        return N.rand((batch,), generator, like)
    if o.timestep_sampling == "sigma":
        u = density_draws(o.weighting_scheme, batch, generator, o.logit_mean, o.logit_std, o.mode_scale)
        index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        return shift_sigmas((NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS, o.discrete_flow_shift)
    sig = torch.sigmoid(o.sigmoid_scale * N.randn((batch,), generator, like))
    if o.timestep_sampling == "sigmoid":
        return sig
    if o.timestep_sampling == "shift":
        return shift_sigmas(sig, o.discrete_flow_shift)
    if o.timestep_sampling == "flux_shift":
        h, w = latent_hw
        return time_shift(flux_mu((h // 2) * (w // 2)), sig)
    raise ValueError(f"unknown timestep_sampling {o.timestep_sampling!r}; use one of {TIMESTEP_SAMPLINGS}")


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - s) * latents.float() + s * noise.float()


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise.float() - latents.float()


def apply_prediction_type(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "raw":
        return pred
    if kind == "additive":
        return pred + noisy
    if kind == "sigma_scaled":
        return noisy - sigmas.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1))) * pred
    raise ValueError(f"unknown model_prediction_type {kind!r}; use one of {PREDICTION_TYPES}")


# ---- one batch ----------------------------------------------------------------------------------------------------
class FlowObjective:
    """The loss of one batch for a flow-matching family; the loop calls `batch_loss`, validation `loss_at`."""

    def __init__(self, o: FlowOptions, family):
        from lorakit.models.tokenizer import t5_tokenizer_from_cache

        self.o = o
        self.family = family
        self.t5_length = int(o.t5xxl_max_token_length or family.t5_max_length)
        self.t5_tokenizer = t5_tokenizer_from_cache(o.tokenizer_cache_dir) if o.tokenizer_cache_dir else None

    def encode_text(self, bundle, captions: list[str]):
        """(T5 features, CLIP-L pooled) of captions; what the text-encoder cache stores."""
        from lorakit.models.conditioning import encode_t5_clip

        return encode_t5_clip(bundle, captions, self.t5_length, self.o.apply_t5_attn_mask, self.t5_tokenizer)

    def cached_text_like(self, bundle):
        """Zero tensors of the shapes the text-encoder cache holds per caption (T5 features, CLIP-L pooled): what
        the memory estimate needs, without tokenizing (a full-size T5's tokenizer may be absent until loading)."""
        t5, clip = bundle.configs["text_encoder_2"], bundle.configs["text_encoder"]
        return torch.zeros(1, self.t5_length, t5["d_model"]), torch.zeros(1, clip["hidden_size"])

    def conditioning(self, bundle, batch, maths, te_cache, grad: Optional[bool] = None):
        """(T5 features, pooled, T5 padding mask or None) of the batch's captions, on the device."""
        from lorakit.models.conditioning import t5_ids

        if te_cache is not None:
            hidden, pooled = te_cache.get(batch["captions"])
        else:
            with torch.set_grad_enabled(maths.train_te if grad is None else grad):
                hidden, pooled = self.encode_text(bundle, batch["captions"])
        mask = t5_ids(bundle, batch["captions"], self.t5_length, self.t5_tokenizer)[1] if self.o.apply_t5_attn_mask \
            else None
        return hidden.to(maths.device), pooled.to(maths.device), mask

    def draw(self, latents: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, sigmas, model input): noise first, then sigmas, then input-perturbation noise (sd-scripts' order)."""
        noise = N.randn(latents.shape, generator, latents)
        sigmas = sample_sigmas(self.o, latents.shape[0], tuple(latents.shape[-2:]), generator).to(latents.device)
        perturbed = noise
        if self.o.ip_noise_gamma:
            strength = self.o.ip_noise_gamma
            if self.o.ip_noise_gamma_random_strength:
                strength = N.rand((1,), generator, latents) * self.o.ip_noise_gamma
            perturbed = noise + strength * N.randn(latents.shape, generator, latents)
        return noise, sigmas, noisy_latents(latents, perturbed, sigmas)

    def batch_loss(self, bundle, batch, maths, noise_gen, encode_latents, te_cache) -> torch.Tensor:
        latents = batch["latents"] if batch["latents"] is not None else encode_latents(batch["images"])
        latents = latents.to(maths.device, torch.float32)
        hidden, pooled, mask = self.conditioning(bundle, batch, maths, te_cache)
        noise, sigmas, noisy = self.draw(latents, noise_gen)
        return self.loss_at(bundle, batch, maths, latents, (hidden, pooled, mask), noise, sigmas, noisy)

    def loss_at(self, bundle, batch, maths, latents, cond, noise, sigmas, noisy) -> torch.Tensor:
        """The weighted loss of the transformer's prediction at `sigmas` for `noisy` latents (a scalar)."""
        pred = self.predict(bundle, maths, noisy, sigmas, cond)
        pred = apply_prediction_type(pred.float(), noisy, sigmas, self.o.model_prediction_type)
        lo = maths.loss
        huber = lo.loss_type in ("huber", "smooth_l1")  # a constant threshold: checks refuse the timestep schedules
        c = torch.full((latents.shape[0],), lo.huber_c * lo.huber_scale) if huber else None
        loss = losses.apply_mask(losses.elementwise_loss(pred, flow_target(latents, noise), lo.loss_type, c),
                                 batch.get("alpha_masks"))
        loss = loss.mean(dim=list(range(1, loss.ndim))) * batch["loss_weights"].to(loss.device, loss.dtype)
        weights = loss_weighting(self.o.weighting_scheme, sigmas) if self.o.model_prediction_type == "sigma_scaled" \
            else None
        return (loss if weights is None else loss * weights.to(loss.device, loss.dtype)).mean()

    def predict(self, bundle, maths, noisy: torch.Tensor, sigmas: torch.Tensor, cond) -> torch.Tensor:
        """The transformer's velocity for latents [B, C, H, W] (packed into 2x2 tokens and back)."""
        hidden, pooled, mask = cond
        b, _, h, w = noisy.shape
        dev, dt = maths.device, maths.weight_dtype
        guidance = torch.full((b,), float(self.o.guidance_scale), device=dev) if self.family.guidance_embed else None
        out = bundle.unet(pack_latents(noisy).to(dt), image_ids(b, h, w, dev), hidden.to(dt),
                          text_ids(b, hidden.shape[1], dev), sigmas.to(dev, dt), pooled.to(dt), guidance, mask)
        return unpack_latents(out, h, w)
