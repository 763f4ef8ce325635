"""Validation loss on held-out images (sd-scripts' --validation_split and friends).

The images `validation_split` holds out (lorakit.data.dataset.split_validation) are scored at fixed points of the run:
every `--validate_every_n_epochs` epochs (every epoch by default) and every `--validate_every_n_steps` steps. Each
score is the run's loss (loss type, min-SNR weighting, masks...) averaged over the held-out batches and sd-scripts'
four fixed timesteps (linspace(min_t, max_t, 6)[1:-1]: 200, 400, 600, 800), with noise drawn from generators keyed by
(validation seed, batch, timestep) and latents encoded once with a fixed VAE draw. So the same weights always score
the same, scores are comparable across steps and across runs with the same split, and validating never moves the
training's random streams (its batches, noise and dropout continue exactly as without validation).

The noise is plain Gaussian noise: noise_offset, multires noise and ip_noise_gamma are training augmentations and
would only add variance to the curve. With EMA on, the EMA weights are scored too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from lorakit.errors import UserError

NUM_TIMESTEPS = 4  # sd-scripts' NUM_VALIDATION_TIMESTEPS


@dataclass(frozen=True)
class ValidationOptions:
    validate_every_n_steps: Optional[int]
    validate_every_n_epochs: Optional[int]
    max_validation_steps: Optional[int]
    validation_seed: Optional[int]
    min_timestep: Optional[int]
    max_timestep: Optional[int]


def validation_timesteps(min_timestep: Optional[int], max_timestep: Optional[int],
                         num_train_timesteps: int = 1000) -> list[int]:
    """sd-scripts' fixed validation timesteps: the inner points of linspace(min, max, NUM_TIMESTEPS + 2)."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    return [int(t) for t in np.linspace(lo, hi, NUM_TIMESTEPS + 2, dtype=int)[1:-1]]


def noise_seed(seed: int, batch: int, timestep_index: int) -> int:
    """The seed of the noise of one validation batch at one timestep (independent of everything else)."""
    return int(np.random.SeedSequence([int(seed) % (1 << 64), 1117, int(batch), int(timestep_index)])
               .generate_state(1, dtype=np.uint64)[0] % (1 << 63))


@dataclass(frozen=True)
class ValidationPlan:
    """What will be validated, known before the model loads."""

    group: Any  # DatasetGroup of the held-out images
    batches: int  # batches scored per validation
    seed: int
    o: ValidationOptions


def plan_validation(o: ValidationOptions, validation_group, run_seed: int) -> Optional[ValidationPlan]:
    """The ValidationPlan, or None without held-out images; options asking for a validation without a split are an
    error (they would silently do nothing)."""
    asked = [f"--{name}" for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
                                      "validation_seed") if getattr(o, name) is not None]
    if validation_group is None or validation_group.num_train_images == 0:
        if asked:
            raise UserError(f"{', '.join(asked)} set but no image is held out for validation: add --validation_split "
                            "(e.g. 0.1; or validation_split = 0.1 in a [[datasets]] of --dataset_config), or remove "
                            f"{'it' if len(asked) == 1 else 'them'}. A subset needs at least 2 images to hold one out.")
        return None
    cfg_seed = next((d.config.validation_seed for d in validation_group.datasets
                     if d.config.validation_seed is not None), None)
    seed = cfg_seed if cfg_seed is not None else (o.validation_seed if o.validation_seed is not None else run_seed)
    n = validation_group.num_batches(1)
    batches = min(n, o.max_validation_steps) if o.max_validation_steps else n
    return ValidationPlan(validation_group, batches, int(seed), o)


class Validator:
    """Scores the held-out images when the options say; reports through the StepLogger (TensorBoard scalars
    loss/validation/{step,epoch}_average like sd-scripts, and a "validation" event for the GUI)."""

    def __init__(self, plan: ValidationPlan, model, network, inputs, maths, run, optim, steplog, *,
                 multipliers: Optional[list] = None, ema=None):
        from lorakit.train.stages import vae_encoder

        self.plan, self.model, self.network, self.inputs, self.maths = plan, model, network, inputs, maths
        self.run, self.optim, self.steplog, self.ema = run, optim, steplog, ema
        self.multipliers = multipliers
        steps = len(maths.alphas_cumprod) if maths.alphas_cumprod is not None else 1000  # flow: sigma = t / 1000
        self.timesteps = validation_timesteps(plan.o.min_timestep, plan.o.max_timestep, steps)
        self._latent_gen = torch.Generator()
        self._encode = vae_encoder(model.bundle, self._latent_gen, model.vae_dtype)
        self._latents: dict[int, torch.Tensor] = {}
        self.history: list[dict] = []  # every validation of this run: step, epoch, kind, loss (+ loss_ema)

    # ---- when ------------------------------------------------------------------------------------------------
    def after_step(self, step: int, epoch: int) -> None:
        every = self.plan.o.validate_every_n_steps
        if every and step % every == 0:
            self.validate(step, epoch, "step")

    def after_epoch(self, step: int, epoch: int) -> None:
        every = self.plan.o.validate_every_n_epochs or 1
        if epoch % every == 0:
            self.validate(step, epoch, "epoch")

    # ---- what ------------------------------------------------------------------------------------------------
    def validate(self, step: int, epoch: int, kind: str) -> Optional[dict]:
        if not self.run.is_main:  # every process holds the same weights; one score is enough
            return None
        last = self.history[-1] if self.history else None
        if last is not None and last["step"] == step:  # step and epoch validation at one step: same weights
            loss, ema_loss = last["loss"], last.get("loss_ema")
        else:
            loss, ema_loss = self._scores()
        record = {"step": step, "epoch": epoch, "kind": kind, "loss": loss}
        if ema_loss is not None:
            record["loss_ema"] = ema_loss
        self.history.append(record)
        self.steplog.validation(step, epoch, kind, loss, ema_loss)
        return record

    def _scores(self) -> tuple[float, Optional[float]]:
        from lorakit.train.optimizers import set_train_mode

        set_train_mode(self.optim.optimizer, False)  # schedule-free: score the averaged weights, as saved
        self.network.eval()
        try:
            with torch.random.fork_rng(devices=[]):  # nothing here may move the training's global stream
                loss = self.loss()
                ema_loss = None
                if self.ema is not None:
                    with self.ema.swapped():
                        ema_loss = self.loss()
        finally:
            self.network.train()
            set_train_mode(self.optim.optimizer, True)
        return loss, ema_loss

    @torch.no_grad()
    def loss(self) -> float:
        """The mean loss over the planned batches and the fixed timesteps (a pure function of the weights)."""
        from lorakit.train.loop import batch_conditioning
        from lorakit.train.stages import autocast

        group, total, count = self.plan.group, 0.0, 0
        for k in range(self.plan.batches):
            batch = group.get_batch(1, k, global_step=group.max_train_steps)  # full captions (no token warmup)
            if self.multipliers:
                self.network.set_multiplier(self.multipliers[group.source_indices[batch["dataset_index"]]])
            latents = self._batch_latents(k, batch)
            with autocast(self.maths.device, self.maths.weight_dtype):
                if self.maths.objective is not None:  # FLUX: (T5 features, pooled, padding mask)
                    hidden, pooled = self.maths.objective.conditioning(self.model.bundle, batch, self.maths,
                                                                       self.inputs.te_cache, grad=False), None
                else:
                    hidden, pooled = batch_conditioning(self.model.bundle, batch, self.maths, self.inputs.te_cache,
                                                        grad=False)
                for j, t in enumerate(self.timesteps):
                    gen = torch.Generator().manual_seed(noise_seed(self.plan.seed, k, j))
                    value = float(self._loss_at(batch, latents, hidden, pooled, t, gen))
                    if not math.isfinite(value):
                        raise UserError(f"the validation loss is NaN/inf at validation batch {k}, timestep {t}: the "
                                        "weights diverged (see the training loss), or a held-out image is broken.")
                    total += value
                    count += 1
        return total / max(1, count)

    def _batch_latents(self, k: int, batch) -> torch.Tensor:
        if batch["latents"] is not None:
            return batch["latents"].to(self.maths.device, torch.float32)
        if k not in self._latents:  # one fixed VAE draw per batch, kept for every later validation
            self._latent_gen.manual_seed(noise_seed(self.plan.seed, k, 1 << 20))
            self._latents[k] = self._encode(batch["images"]).to(self.maths.device)
        return self._latents[k]

    def _loss_at(self, batch, latents: torch.Tensor, hidden, pooled, timestep: int,
                 gen: torch.Generator) -> torch.Tensor:
        from lorakit.train import noise as N
        from lorakit.train.loop import predict_loss

        maths = self.maths
        noise = N.randn(latents.shape, gen, latents)
        if maths.objective is not None:  # a flow model at sigma = t / 1000; `hidden` holds its whole conditioning
            from lorakit.train.flow import noisy_latents

            sigmas = torch.full((latents.shape[0],), timestep / 1000, device=latents.device)
            return maths.objective.loss_at(self.model.bundle, batch, maths, latents, hidden, noise, sigmas,
                                           noisy_latents(latents, noise, sigmas))
        timesteps = torch.full((latents.shape[0],), int(timestep), dtype=torch.long, device=latents.device)
        noisy = N.add_noise(latents, noise, timesteps, maths.alphas_cumprod)
        return predict_loss(self.model.bundle, batch, maths, latents, hidden, pooled, noise, noisy, timesteps)


__all__ = ["ValidationOptions", "ValidationPlan", "Validator", "plan_validation", "validation_timesteps",
           "noise_seed", "NUM_TIMESTEPS"]
