"""Diffusion training losses, as pure tensor functions.

Everything takes the noise schedule's `alphas_cumprod` (1-D, one value per training timestep) instead of a scheduler
object, so it is testable against formulas. Definitions follow kohya-ss/sd-scripts (train_util.conditional_loss,
get_huber_threshold_if_needed; custom_train_functions.apply_snr_weight and friends) so losses and their logs match.

Order inside one step (what `diffusion_loss` does, same as sd-scripts' process_batch):
  elementwise loss (l2/l1/huber/smooth_l1) -> * mask -> mean over C,H,W -> * per-sample weight (prior_loss_weight)
  -> min-SNR weight -> v-pred scaling -> v-pred-like term -> debiased estimation -> mean over the batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_MAX = 1000.0  # sd-scripts caps SNR here (t = 0 is near infinite) in v-pred scaling and debiased estimation
SNR_MIN = 1e-8  # a zero-terminal-SNR schedule has SNR = 0 at the last step; keep weights finite there


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t) for every training timestep."""
    a = alphas_cumprod.double()
    return (a / (1.0 - a)).float()


def snr_at(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return snr_from_alphas_cumprod(alphas_cumprod.to("cpu"))[timesteps.long().cpu()].to(timesteps.device)


def huber_c_for_timesteps(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, schedule: str = "snr",
                          huber_c: float = 0.1, huber_scale: float = 1.0) -> torch.Tensor:
    """Per-sample Huber threshold c_t.

    constant:    c * scale
    exponential: exp(-a t) * scale with a = -ln(c) / T (c_0 = scale, c_T = c * scale)
    snr:         (1 - c) / (1 + sigma_t)^2 + c, sigma_t = sqrt((1 - abar_t) / abar_t)  (sd-scripts applies no scale)
    """
    t = timesteps.long()
    if schedule == "constant":
        return torch.full(t.shape, huber_c * huber_scale, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        num_t = alphas_cumprod.shape[0]
        alpha = -math.log(huber_c) / num_t
        return torch.exp(-alpha * t.float()) * huber_scale
    if schedule == "snr":
        abar = alphas_cumprod.to("cpu").double()[t.cpu()]
        sigma = ((1.0 - abar) / abar).sqrt()
        return ((1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c).float().to(t.device)
    raise ValueError(f"unknown huber schedule {schedule!r}; choose one of {HUBER_SCHEDULES}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unreduced loss, same shape as pred.

    l2: (p-t)^2; l1: |p-t|; huber: 2c(sqrt((p-t)^2 + c^2) - c); smooth_l1: 2(sqrt((p-t)^2 + c^2) - c),
    with c one value per sample (broadcast over the other dims).
    """
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs huber_c (see huber_c_for_timesteps)")
        c = huber_c.to(pred.device, torch.float32).view(-1, *([1] * (pred.ndim - 1)))
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"unknown loss type {loss_type!r}; choose one of {LOSS_TYPES}")


def apply_mask(loss: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Multiply an unreduced (B, C, h, w) loss by a (B, H, W) or (B, 1, H, W) mask in [0, 1], area-resized to h, w."""
    if mask is None:
        return loss
    m = mask.to(loss.device, loss.dtype)
    if m.ndim == 3:
        m = m.unsqueeze(1)
    if m.shape[-2:] != loss.shape[-2:]:
        m = F.interpolate(m, size=loss.shape[-2:], mode="area")
    return loss * m


def min_snr_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                   v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma weight: min(SNR, g) / SNR for eps-prediction, min(SNR, g) / (SNR + 1) for v-prediction."""
    snr = snr_at(timesteps, alphas_cumprod)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        return clipped / (snr + 1)
    return clipped / snr.clamp_min(SNR_MIN)


def v_pred_scale(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1) with SNR capped at 1000: turns a v-pred loss into the scale of an eps-pred loss."""
    snr = snr_at(timesteps, alphas_cumprod).clamp_max(SNR_MAX)
    return snr / (snr + 1)


def debiased_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, v_prediction: bool = False) -> torch.Tensor:
    """Debiased estimation: 1 / sqrt(SNR) (eps) or 1 / (SNR + 1) (v), SNR capped at 1000."""
    snr = snr_at(timesteps, alphas_cumprod).clamp_max(SNR_MAX)
    if v_prediction:
        return 1 / (snr + 1)
    return 1 / torch.sqrt(snr.clamp_min(SNR_MIN))


def post_process_loss(loss: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                      min_snr_gamma: Optional[float] = None, v_prediction: bool = False,
                      scale_v_pred_loss_like_noise_pred: bool = False, v_pred_like_loss: Optional[float] = None,
                      debiased_estimation_loss: bool = False) -> torch.Tensor:
    """Per-sample (B,) loss -> weighted per-sample loss, in sd-scripts' order."""
    if min_snr_gamma:
        loss = loss * min_snr_weight(timesteps, alphas_cumprod, min_snr_gamma, v_prediction).to(loss.device)
    if scale_v_pred_loss_like_noise_pred:
        loss = loss * v_pred_scale(timesteps, alphas_cumprod).to(loss.device)
    if v_pred_like_loss:
        scale = v_pred_scale(timesteps, alphas_cumprod).to(loss.device)
        loss = loss + loss / scale * v_pred_like_loss
    if debiased_estimation_loss:
        loss = loss * debiased_weight(timesteps, alphas_cumprod, v_prediction).to(loss.device)
    return loss


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                   loss_type: str = "l2", huber_schedule: str = "snr", huber_c: float = 0.1, huber_scale: float = 1.0,
                   mask: Optional[torch.Tensor] = None, sample_weights: Optional[torch.Tensor] = None,
                   min_snr_gamma: Optional[float] = None, v_prediction: bool = False,
                   scale_v_pred_loss_like_noise_pred: bool = False, v_pred_like_loss: Optional[float] = None,
                   debiased_estimation_loss: bool = False, reduce: bool = True) -> torch.Tensor:
    """The whole training loss of one batch; `sample_weights` (B,) carries prior_loss_weight for reg images."""
    c = None
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c_for_timesteps(timesteps, alphas_cumprod, huber_schedule, huber_c, huber_scale)
    loss = elementwise_loss(pred, target, loss_type, c)
    loss = apply_mask(loss, mask)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.device, loss.dtype)
    loss = post_process_loss(loss, timesteps, alphas_cumprod, min_snr_gamma=min_snr_gamma, v_prediction=v_prediction,
                             scale_v_pred_loss_like_noise_pred=scale_v_pred_loss_like_noise_pred,
                             v_pred_like_loss=v_pred_like_loss, debiased_estimation_loss=debiased_estimation_loss)
    return loss.mean() if reduce else loss


def loss_from_options(pred, target, timesteps, alphas_cumprod, opts, *, v_prediction: bool, mask=None,
                      sample_weights=None) -> torch.Tensor:
    """`diffusion_loss` configured from resolved options (lorakit.options)."""
    return diffusion_loss(
        pred, target, timesteps, alphas_cumprod, loss_type=opts.loss_type, huber_schedule=opts.huber_schedule,
        huber_c=opts.huber_c, huber_scale=opts.huber_scale, mask=mask, sample_weights=sample_weights,
        min_snr_gamma=opts.min_snr_gamma, v_prediction=v_prediction,
        scale_v_pred_loss_like_noise_pred=opts.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=opts.v_pred_like_loss, debiased_estimation_loss=opts.debiased_estimation_loss)
