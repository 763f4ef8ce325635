"""The training loop: epochs of batches, gradient accumulation across processes, one optimizer step at a time.

`run_loop` reads top to bottom; saving, previews and reporting are the Checkpointer's, the Previews' and the
StepLogger's, each told the step it acts at. The loss of one batch is `batch_loss` (pure maths over the batch).
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from lorakit.errors import UserError
from lorakit.models.conditioning import added_cond_kwargs, encode_captions
from lorakit.train import losses, noise as N
from lorakit.train.optimizers import clip_grad_norm
from lorakit.train.stages import autocast


# ================================================================================================ one batch ========
@dataclass(frozen=True)
class NoiseOptions:  # what noise.noisy_latents_from_options reads
    noise_offset: Optional[float]
    noise_offset_random_strength: bool
    adaptive_noise_scale: Optional[float]
    multires_noise_iterations: Optional[int]
    multires_noise_discount: float
    ip_noise_gamma: Optional[float]
    ip_noise_gamma_random_strength: bool
    min_timestep: Optional[int]
    max_timestep: Optional[int]


@dataclass(frozen=True)
class LossOptions:  # what losses.loss_from_options reads
    loss_type: str
    huber_schedule: str
    huber_c: float
    huber_scale: float
    min_snr_gamma: Optional[float]
    scale_v_pred_loss_like_noise_pred: bool
    v_pred_like_loss: Optional[float]
    debiased_estimation_loss: bool


@dataclass(frozen=True)
class StepMaths:
    """Everything one batch's loss needs besides the batch, fixed for the run."""

    alphas_cumprod: torch.Tensor
    prediction: str  # "epsilon" or "v_prediction"
    noise: NoiseOptions
    loss: LossOptions
    clip_skip: Optional[int]  # sd-scripts' --clip_skip
    max_token_length: Optional[int]
    train_te: bool  # encode text with gradients
    device: torch.device
    weight_dtype: torch.dtype
    objective: Any = None  # a flow model's objective (train.flow.FlowObjective); None: the DDPM loss below


def batch_loss(bundle, batch, maths: StepMaths, noise_gen, encode_latents, te_cache) -> torch.Tensor:
    """One batch: latents -> noise -> UNet prediction -> weighted loss (a scalar)."""
    if maths.objective is not None:
        return maths.objective.batch_loss(bundle, batch, maths, noise_gen, encode_latents, te_cache)
    device = maths.device
    if batch["latents"] is not None:
        latents = batch["latents"].to(device, torch.float32)
    else:
        latents = encode_latents(batch["images"]).to(device)
    hidden, pooled = batch_conditioning(bundle, batch, maths, te_cache)
    noise, noisy, timesteps = N.noisy_latents_from_options(latents, maths.alphas_cumprod, noise_gen, maths.noise)
    return predict_loss(bundle, batch, maths, latents, hidden, pooled, noise, noisy, timesteps)


def batch_conditioning(bundle, batch, maths: StepMaths, te_cache, grad: Optional[bool] = None):
    """(hidden states on the device, pooled or None) of the batch's captions; with gradients when the text encoder
    trains (unless `grad` says otherwise)."""
    if te_cache is not None:
        cond = te_cache.get(batch["captions"])
        hidden, pooled = (cond if isinstance(cond, tuple) else (cond, None))
    else:
        with torch.set_grad_enabled(maths.train_te if grad is None else grad):
            hidden, pooled = encode_captions(bundle, batch["captions"], maths.clip_skip, maths.max_token_length)
    return hidden.to(maths.device), pooled


def predict_loss(bundle, batch, maths: StepMaths, latents, hidden, pooled, noise, noisy, timesteps) -> torch.Tensor:
    """The UNet's prediction for noisy latents and its weighted loss against the target (a scalar)."""
    device = maths.device
    extra = added_cond_kwargs(bundle.family, pooled, batch.get("original_sizes_hw"), batch.get("crop_top_lefts"),
                              batch.get("target_sizes_hw"), dtype=hidden.dtype, device=device)
    pred = bundle.unet(noisy.to(maths.weight_dtype), timesteps, hidden.to(maths.weight_dtype), **extra).sample
    target = N.training_target(latents, noise, timesteps, maths.alphas_cumprod, maths.prediction)
    # the mask is None unless a subset has alpha_mask or conditioning_data_dir masks: then sd-scripts applies it too
    mask = batch.get("alpha_masks")
    return losses.loss_from_options(pred.float(), target.float(), timesteps, maths.alphas_cumprod, maths.loss,
                                    v_prediction=maths.prediction == "v_prediction", mask=mask,
                                    sample_weights=batch["loss_weights"].to(device))


# ================================================================================================ the loop =========
@dataclass(frozen=True)
class LoopOptions:
    max_grad_norm: Optional[float]
    scale_weight_norms: Optional[float]
    max_data_loader_n_workers: int


@dataclass(frozen=True)
class Loop:
    """What the loop reads; fixed for the run (the modules and optimizer inside change, the references do not)."""

    bundle: Any
    network: Any
    optim: Any  # stages.Optim
    data: Any  # stages.Data
    maths: StepMaths
    inputs: Any  # stages.Inputs
    noise_gen: torch.Generator
    rank: int
    world: int
    o: LoopOptions
    batch_loss: Callable = batch_loss
    ema: Any = None  # ema.Ema: updated after each optimizer step
    validator: Any = None  # validation.Validator: scores held-out images after steps and epochs


@dataclass(frozen=True)
class LoopEnd:
    step: int  # optimizer steps done
    epoch: int  # the epoch in progress when the loop ended (num_epochs + 1 after a complete run)
    stop: Optional[str]  # None, "nan" (a loss), "nan_weights" (the weights after an update) or "interrupt"


def run_loop(loop: Loop, start, ckpt, steplog, previews, stop_after_step: Optional[int] = None,
             guard=None) -> LoopEnd:
    from lorakit.train.guard import WeightGuard

    data = loop.data
    guard = guard or WeightGuard(loop.optim.trainable, loop.network.named_parameters)
    from lorakit.eval.training import attach as attach_eval

    attach_eval(loop, ckpt)  # --eval_every_n_epochs/_steps: the Checkpointer's saves get scored (off: nothing)
    step, epoch, first_batch, stop = start.step, start.epoch, start.batch, None
    loop.network.train()
    with Interrupt() as interrupt:
        while epoch <= data.num_epochs and step < data.max_steps and stop is None:
            n_batches = data.group.num_batches(epoch)
            k = first_batch
            batches = _Batches(loop, epoch, first_batch)
            while k < n_batches and step < data.max_steps:
                chunk = list(range(k, min(n_batches, k + data.accum * loop.world)))
                loss = _accumulate(loop, batches, chunk, step)
                if _any_process(loss is None, loop):  # a NaN on any process stops every process
                    stop = "nan"
                    break
                if step == start.step:
                    check_first_gradients(loop.network, steplog.log)
                _optimizer_step(loop)
                extra = _after_optimizer_step(loop, guard)
                if _any_process(guard.bad_names is not None, loop):  # restored to the last finite weights
                    stop = "nan_weights"
                    break
                step, k = step + 1, chunk[-1] + 1
                resume_at = (epoch, k) if k < n_batches else (epoch + 1, 0)
                if loop.ema is not None:  # averages the weights as they are after this step's maintenance
                    loop.ema.after_step(step)
                steplog.step(step, data.max_steps, epoch, loss, loop.optim, extra)
                if loop.validator is not None:
                    loop.validator.after_step(step, epoch)
                ckpt.after_step(step, epoch, resume_at)
                previews.after_step(step)
                # stop together, or the others would wait forever in the next all-reduce
                if _any_process(interrupt.requested or (stop_after_step is not None and step >= stop_after_step), loop):
                    stop = "interrupt"
                    ckpt.save_stop(step, epoch, resume_at)
                    break
            batches.close()
            if stop:
                break
            if k >= n_batches or step >= data.max_steps:  # the epoch is done
                if loop.validator is not None:
                    loop.validator.after_epoch(step, epoch)
                ckpt.after_epoch(step, epoch)
                previews.after_epoch(step, epoch)
                epoch, first_batch = epoch + 1, 0
    return LoopEnd(step, epoch, stop)


def _accumulate(loop: Loop, batches, chunk: list[int], step: int) -> Optional[float]:
    """Forward and backward this process's batches of one optimizer step (`chunk` spans every process); the mean
    loss, or None when a loss is NaN/inf (then no gradient of that batch is kept)."""
    total = 0.0
    scaler = loop.optim.scaler
    for bk in chunk[loop.rank::loop.world]:
        batch = batches.get(bk, step)
        if loop.data.multipliers:
            loop.network.set_multiplier(loop.data.multipliers[batch["dataset_index"]])
        with autocast(loop.maths.device, loop.maths.weight_dtype):
            loss = loop.batch_loss(loop.bundle, batch, loop.maths, loop.noise_gen, loop.inputs.encode_latents,
                                   loop.inputs.te_cache)
        if not torch.isfinite(loss):
            return None
        if not loss.requires_grad:
            if any(getattr(a, "module_dropout", None) for a in loop.network.adapters):
                total += loss.item() / len(chunk)  # module dropout left every adapter out of this batch
                continue
            # otherwise only a bug does this (see check_first_gradients): say so, not autograd's error
            raise UserError("A step's loss depends on no trained parameter: no adapter is on its path, so this run "
                            "would train nothing. This is a lorakit bug: please report it with your command line.")
        scaled = loss / len(chunk)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.item() / len(chunk)
    return total


def check_first_gradients(network, log: Callable[[str], None]) -> None:
    """Once, after a run's first backward: did every trainable UNet adapter get a gradient? Every UNet layer is on
    the loss's path (a text encoder's last layers are not under --clip_skip: not checked). None at all means the
    run would train nothing - stopped at step 1 instead of found after an hour (LoHa/LoKr/DoRA under gradient
    checkpointing once trained nothing in the UNet this way); some missing is logged. Adapters with module dropout
    can be left out of a step and are not counted."""
    adapters = [a for a in network.unet_adapters if not getattr(a, "module_dropout", None)
                and any(p.requires_grad for p in a.parameters())]
    missing = [a.lora_name for a in adapters if any(p.requires_grad and p.grad is None for p in a.parameters())]
    if not missing:
        return
    names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    if len(missing) == len(adapters):
        raise UserError(f"No gradient reached any of the UNet's {len(adapters)} adapters on the first step ({names}): "
                        f"this run would train nothing in the UNet, so it stops here. This is a lorakit bug: please "
                        f"report it with your command line.")
    log(f"warning: {len(missing)} of the UNet's {len(adapters)} adapters got no gradient on the first step and will "
        f"not train: {names}")


def _optimizer_step(loop: Loop) -> None:
    o = loop.optim
    if loop.world > 1:
        _all_reduce_grads(o.trainable)
    if o.scaler is not None:
        o.scaler.unscale_(o.optimizer)
    if loop.o.max_grad_norm:
        clip_grad_norm(o.trainable, loop.o.max_grad_norm)
    if o.scaler is not None:
        o.scaler.step(o.optimizer)
        o.scaler.update()
    else:
        o.optimizer.step()
    o.scheduler.step()
    o.optimizer.zero_grad(set_to_none=True)


def _after_optimizer_step(loop: Loop, guard) -> dict:
    """Weight maintenance after each optimizer step (--scale_weight_norms), then the NaN/inf guard (which restores
    the last finite weights and sets guard.bad_names when the update broke them); returns scalars to log."""
    extra = {}
    if loop.o.scale_weight_norms:
        n_scaled, mean_norm, max_norm = apply_max_norm(loop.network, loop.o.scale_weight_norms)
        extra = {"keys_scaled": n_scaled, "average_key_norm": mean_norm, "max_key_norm": max_norm}
    guard.check()
    return extra


class _Batches:
    """One epoch's batches from `first` on: prefetched in order by one process, drawn by index with several."""

    def __init__(self, loop: Loop, epoch: int, first: int):
        self.group, self.epoch = loop.data.group, epoch
        self.prefetch = self.group.iter_batches(epoch, first, num_workers=loop.o.max_data_loader_n_workers) \
            if loop.world == 1 else None

    def get(self, k: int, step: int):
        if self.prefetch is None:
            return self.group.get_batch(self.epoch, k, global_step=step)
        got, batch = next(self.prefetch)
        assert got == k, (got, k)
        return batch

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()


# ================================================================================================ helpers ==========
def _any_process(flag: bool, loop: Loop) -> bool:
    if loop.world == 1:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=loop.maths.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _all_reduce_grads(params) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


@torch.no_grad()
def apply_max_norm(network, max_norm: float) -> tuple[int, float, float]:
    """scale_weight_norms: shrink every LoRA whose delta-weight norm exceeds max_norm (both factors by sqrt of the
    ratio). Returns (modules scaled, mean norm, max norm) like sd-scripts."""
    scaled, norms = 0, []
    for a in network.adapters:
        if not (hasattr(a, "lora_down") and hasattr(a, "lora_up")):
            continue
        norm = a.delta_weight().float().norm()
        ratio = (norm.clamp(min=max_norm / 2) / max_norm).item()
        if ratio > 1:
            s = (1 / ratio) ** 0.5
            a.lora_down.weight.mul_(s)
            a.lora_up.weight.mul_(s)
            scaled += 1
            norm = norm / ratio
        norms.append(float(norm))
    if not norms:
        return 0, 0.0, 0.0
    return scaled, sum(norms) / len(norms), max(norms)


class Interrupt:
    """SIGINT/SIGTERM set a flag; the loop saves state and a LoRA at the next step boundary, then stops."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print("\nlorakit: stopping after this step (saving state and LoRA); press Ctrl-C again to quit now.",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
