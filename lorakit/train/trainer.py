"""`lorakit train`: `train(opts)` runs the stages of lorakit.train.stages in order, then the loop.

Options are resolved and frozen once (`options.normalize`); each stage reads the few options it declares and
returns a small value; the loop (lorakit.train.loop) hands saving to a Checkpointer, previews to Previews and
reporting to a StepLogger, each told the step it acts at.

Exact resume: batches are a pure function of (seed, epoch, batch index) in the dataset layer, noise comes from
explicit generators, and a state folder holds weights, optimizer, scheduler and every RNG at an optimizer-step
boundary, so stopping and resuming gives the same weights as never stopping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lorakit import options as O
from lorakit.errors import UserError
from lorakit.models.conditioning import encode_captions as encode_text  # noqa: F401  (the old name)
from lorakit.models.loading import ModelPlan
from lorakit.train import stages as S
from lorakit.train.checkpointer import Checkpointer, SaveOptions, lora_name
from lorakit.train.checks import check_options  # noqa: F401  (the GUI's form check)
from lorakit.train.loop import LossOptions, Loop, LoopOptions, NoiseOptions, StepMaths, run_loop
from lorakit.train.loop import apply_max_norm  # noqa: F401
from lorakit.train.loop import batch_loss as _batch_loss  # looked up when train() runs: tests wrap it
from lorakit.train.metadata import read_metadata, run_metadata
from lorakit.train.optimizers import is_adaptive
from lorakit.train.previews import PreviewOptions, Previews
from lorakit.train.stages import DEFAULT_OUTPUT_NAME, picked as pick  # noqa: F401
from lorakit.train.steplog import LogOptions, StepLogger


@dataclass
class TrainResult:
    output_dir: Path
    final_lora: Optional[Path]
    saved: list[Path] = field(default_factory=list)  # LoRA files written (epoch/step/final)
    states: list[Path] = field(default_factory=list)  # state folders written
    samples: list[Path] = field(default_factory=list)
    global_step: int = 0
    epoch: int = 0
    losses: list[float] = field(default_factory=list)  # loss of every optimizer step of this run
    interrupted: bool = False
    metadata: dict = field(default_factory=dict)
    network: Any = None  # the trained Network, still applied to the bundle


def effective_clip_skip(family, clip_skip: Optional[int]) -> int:
    """Layer from the end that sd-scripts' --clip_skip reads (the family's rule)."""
    return family.train_clip_layer(clip_skip)


def train(opts, *, bundle=None, progress: bool = True, log: Callable[[str], None] = print,
          stop_after_step: Optional[int] = None, on_event: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """Train a LoRA with resolved options. `bundle` skips model loading (tests, demo); `stop_after_step` acts like
    Ctrl-C after that many optimizer steps (tests). `on_event(dict)` gets the StepLogger's events (the GUI's
    progress): start, step, saved, sample."""
    opts = O.normalize(opts)
    run = S.set_up_run(pick(S.RunOptions, opts), log, progress)
    plan = S.plan_base_model(pick(S.LoadOptions, opts)) if bundle is None else ModelPlan.of(bundle)
    S.report_options(opts, plan.family, run)
    data = S.load_data(S.dataset_configs(opts, plan.family, run.log), pick(S.DataOptions, opts), run)
    # checks that need no model (preflight, memory estimates) go here: nothing is loaded yet
    if bundle is None:
        bundle = S.load_base_model(pick(S.LoadOptions, opts), run.log)
    if bundle.family != plan.family:  # an SD2 file whose weights said v-prediction: its default resolution
        data = S.load_data(S.dataset_configs(opts, bundle.family, run.log), pick(S.DataOptions, opts), run)
    model = S.prepare_model(pick(S.ModelOptions, opts), run, bundle)
    net = S.build_network(pick(S.NetworkOptions, opts), run, model)
    inputs = S.prepare_inputs(pick(S.InputOptions, opts), run, model, data)
    optim = S.build_optimizer(pick(S.OptimizerOptions, opts), run, net, data.max_steps)
    start = S.restore(run, net, optim)

    steplog = StepLogger(pick(LogOptions, opts), is_main=run.is_main, progress=run.progress, on_event=on_event,
                         adaptive=is_adaptive(optim.info.name))
    ckpt = Checkpointer(run, net.network, optim, pick(SaveOptions, opts), every_n_epochs=data.save_every_n_epochs,
                        num_epochs=data.num_epochs, max_steps=data.max_steps,
                        metadata=run_metadata(opts, run, data, net, optim),
                        options_record=_options_record(opts, run, data, net), emit=steplog.emit)
    previews = Previews(pick(PreviewOptions, opts), run, model.bundle, net.network, optim.optimizer, steplog.emit)
    maths = StepMaths(model.alphas_cumprod, model.prediction, pick(NoiseOptions, opts), pick(LossOptions, opts),
                      opts.clip_skip, opts.max_token_length, net.train_te, run.device, run.weight_dtype)
    loop = Loop(model.bundle, net.network, optim, data, maths, inputs, run.streams.noise, run.rank, run.world,
                pick(LoopOptions, opts), batch_loss=_batch_loss)

    run.log(f"training: {data.group.num_train_images} images (with repeats), {data.batches_per_epoch} batches per "
            f"epoch, {data.num_epochs} epochs, {data.max_steps} steps, batch {opts.train_batch_size} x accumulation "
            f"{data.accum}, seed {run.seed}")
    steplog.start(start.step, data.max_steps, data.num_epochs)
    previews.at_start(start.step)
    end = run_loop(loop, start, ckpt, steplog, previews, stop_after_step)
    steplog.close()
    return _finish(end, run, data, net, ckpt, steplog, previews)


def _options_record(opts, run, data, net) -> dict:
    """The options as this run used them (train_state.json): with the values the run settled itself."""
    resolution = opts.resolution
    if resolution is None and not opts.dataset_config:
        resolution = str(data.configs[0].resolution[0])  # the family's, as a command-line dataset got it
    used = dataclasses.replace(opts, seed=run.seed, resolution=resolution, network_dim=net.dim,
                               save_every_n_epochs=data.save_every_n_epochs)
    return O.given_values(used)


def _finish(end, run, data, net, ckpt, steplog, previews) -> TrainResult:
    """After the loop: the NaN report, the interrupted result, or the final save."""
    result = TrainResult(run.out_dir, None, saved=ckpt.saved, states=ckpt.states, samples=previews.samples,
                         global_step=end.step, epoch=min(end.epoch, data.num_epochs), losses=steplog.losses,
                         network=net.network)
    if end.stop == "nan":
        last = ckpt.saved[-1] if ckpt.saved else None
        stem = lora_name(run.name, step=end.step)
        kept = ckpt.save_lora(stem, step=end.step, epoch=end.epoch) if end.step > 0 else None
        raise UserError(
            f"the loss became NaN/inf at step {end.step + 1} (epoch {end.epoch}); training stopped before the weights "
            f"were touched. Last good LoRA: {kept or last or 'none (no step completed)'}. Usual causes: fp16 overflow "
            f"(use --mixed_precision bf16, or --no_half_vae for SDXL), a learning rate too high, or a broken image.")
    if end.stop == "interrupt":
        result.interrupted = True
        result.final_lora = ckpt.saved[-1]
        run.log(f"stopped at step {end.step}; continue with --resume {ckpt.states[-1]}")
        return result
    result.final_lora = ckpt.save_final(end.step, result.epoch, end.epoch)
    result.metadata = read_metadata(result.final_lora) if run.is_main else {}
    return result
