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
from lorakit.models.bundle import import_model_libraries
from lorakit.models.loading import ModelPlan
from lorakit.train import memory as M
from lorakit.train import preflight as P
from lorakit.train import stages as S
from lorakit.train.checkpointer import Checkpointer, SaveOptions, lora_name
from lorakit.train import validation as V
from lorakit.train.checks import check_options  # noqa: F401  (the GUI's form check)
from lorakit.train.ema import EmaOptions, make_ema, previews_for
from lorakit.train.guard import WeightGuard
from lorakit.train.loop import LossOptions, Loop, LoopOptions, NoiseOptions, StepMaths, run_loop
from lorakit.train.loop import apply_max_norm  # noqa: F401
from lorakit.train.loop import batch_loss as _batch_loss  # looked up when train() runs: tests wrap it
from lorakit.train.metadata import ModelFileHashes, read_metadata, run_metadata
from lorakit.train.optimizers import is_adaptive
from lorakit.train.previews import PreviewOptions, Previews  # noqa: F401
from lorakit.train.stages import DEFAULT_OUTPUT_NAME, picked as pick  # noqa: F401
from lorakit.train.steplog import Console, LogOptions, StepLogger, run_summary
from lorakit.utils.collector import garbage_collected, resume_collector


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
    memory: Any = None  # the memory prediction (train.memory.MemoryEstimate), when it was made
    validation: list = field(default_factory=list)  # validation losses: {"step", "epoch", "kind", "loss"[, "loss_ema"]}
    saved_ema: list[Path] = field(default_factory=list)  # EMA weights saved beside the LoRA files


def effective_clip_skip(family, clip_skip: Optional[int]) -> int:
    """Layer from the end that sd-scripts' --clip_skip reads (the family's rule)."""
    return family.train_clip_layer(clip_skip)


def train(opts, *, bundle=None, progress: bool = True, log: Callable[[str], None] = print,
          stop_after_step: Optional[int] = None, on_event: Optional[Callable[[dict], None]] = None,
          predict_memory: bool = True, log_every: Optional[int] = None) -> TrainResult:
    """Train a LoRA with resolved options. `bundle` skips model loading (tests, demo); `stop_after_step` acts like
    Ctrl-C after that many optimizer steps (tests). `on_event(dict)` gets the StepLogger's events (the GUI's
    progress): start, step, saved, sample. `predict_memory=False` skips the memory prediction (a traced step, ~3 s;
    tests of other things). `log_every`: without a progress bar, a step line (loss, lr, it/s, ETA) every N steps
    (default: about 20 lines a run). Log lines go above the progress bar, never into it.

    Sets torch's CPU thread count for the process when --num_cpu_threads_per_process (--num_threads) is given or
    a resumed state recorded one (the step's float sums depend on it; see _use_threads)."""
    opts = O.normalize(opts)
    out_folder = P.check_before_run(opts)  # values, inputs and outputs: before any file is opened or loaded
    run = S.set_up_run(pick(S.RunOptions, opts), Console(log), progress)
    _use_threads(opts.num_cpu_threads_per_process, run)
    plan = S.plan_base_model(pick(S.LoadOptions, opts)) if bundle is None else ModelPlan.of(bundle)
    hashes = None if opts.estimate_memory else ModelFileHashes(opts)  # ~1.3 s of sha256, beside the start-up
    S.report_options(opts, plan.family, run)
    S.check_network_args(pick(S.NetworkOptions, opts), plan.family)
    S.check_blocks_to_swap(opts.blocks_to_swap, plan.family, plan.configs)
    data = S.load_data(S.dataset_configs(opts, plan.family, run.log), pick(S.DataOptions, opts), run)
    S.check_embedding_words(opts.train_embedding, data)
    steps_per_epoch = -(-data.batches_per_epoch // (data.accum * run.world))
    # disk space for the save schedule, optimizer and scheduler (the network args: check_network_args above)
    for note in P.check_before_load(opts, out_folder, steps_per_epoch):
        run.log("note: " + note)
    # checks that need no model (preflight, memory estimates) go here: nothing is loaded yet
    import_model_libraries()  # lasting objects, imported before the window below so that it does not scan them
    with garbage_collected():  # the traced steps' garbage: freed now, not frozen with the model
        memory = M.check_memory(opts, run, plan, data) if predict_memory else None
    if memory is not None and memory.options is not opts:  # --auto_fit changed them
        opts = memory.options
        run = dataclasses.replace(run, weight_dtype=M.training_dtype(opts.mixed_precision))
        if memory.rescan:
            data = S.load_data(S.dataset_configs(opts, plan.family, run.log), pick(S.DataOptions, opts), run)
    if opts.estimate_memory:
        run.log(M.estimate_report(memory))
        return TrainResult(run.out_dir, None, memory=memory.estimate if memory else None)
    V.plan_validation(pick(V.ValidationOptions, opts), data.validation, run.seed)  # refused before loading
    if bundle is None:
        bundle = S.load_base_model(pick(S.LoadOptions, opts), run.log)
    if bundle.family != plan.family:  # an SD2 file whose weights said v-prediction: its default resolution
        data = S.load_data(S.dataset_configs(opts, bundle.family, run.log), pick(S.DataOptions, opts), run)
    model = S.prepare_model(pick(S.ModelOptions, opts), run, bundle)
    net = S.build_network(pick(S.NetworkOptions, opts), run, model)
    inputs = S.prepare_inputs(pick(S.InputOptions, opts), run, model, data, net.train_te)
    S.place_denoiser(pick(S.DenoiserOptions, opts), run, model)
    optim = S.build_optimizer(pick(S.OptimizerOptions, opts), run, net, data.max_steps)
    start = S.restore(run, net, optim)
    ema = make_ema(pick(EmaOptions, opts), net.network, run)

    steplog = StepLogger(pick(LogOptions, opts), is_main=run.is_main, progress=run.progress, on_event=on_event,
                         adaptive=is_adaptive(optim.info.name), log=run.log, log_every=log_every)
    ckpt = Checkpointer(run, net.network, optim, pick(SaveOptions, opts), every_n_epochs=data.save_every_n_epochs,
                        num_epochs=data.num_epochs, max_steps=data.max_steps,
                        metadata=run_metadata(opts, run, data, net, optim, model, hashes),
                        options_record=_options_record(opts, run, data, net), emit=steplog.emit, ema=ema,
                        ema_save_as=opts.ema_save_as)
    previews = previews_for(pick(EmaOptions, opts), ema, pick(PreviewOptions, opts), run, model.bundle, net.network,
                            optim.optimizer, steplog.emit)
    maths = StepMaths(model.alphas_cumprod, model.prediction, pick(NoiseOptions, opts), pick(LossOptions, opts),
                      opts.clip_skip, opts.max_token_length, net.train_te, run.device, run.weight_dtype,
                      objective=model.objective)
    vplan = V.plan_validation(pick(V.ValidationOptions, opts), data.validation, run.seed)
    validator = V.Validator(vplan, model, net.network, inputs, maths, run, optim, steplog, multipliers=data.multipliers,
                            ema=ema) if vplan is not None else None
    loop = Loop(model.bundle, net.network, optim, data, maths, inputs, run.streams.noise, run.rank, run.world,
                pick(LoopOptions, opts), batch_loss=_batch_loss, ema=ema, validator=validator)

    run.log(f"training: {data.group.num_train_images} images (with repeats), {data.batches_per_epoch} batches per "
            f"epoch, {data.num_epochs} epochs, {data.max_steps} steps, batch {opts.train_batch_size} x accumulation "
            f"{data.accum}, seed {run.seed}")
    steplog.start(start.step, data.max_steps, data.num_epochs)
    previews.at_start(start.step)
    guard = WeightGuard(optim.trainable, net.network.named_parameters)
    resume_collector()  # the model and everything built so far live for the run: frozen, out of the collector's scans
    with _warnings_above_the_bar(run.progress):
        end = run_loop(loop, start, ckpt, steplog, previews, stop_after_step, guard=guard)
    steplog.close()
    for line in inputs.reuse_lines():
        run.log(line)
    if memory is not None:
        run.log(M.peak_report(run.device, memory.estimate))
    result = _finish(end, run, data, net, ckpt, steplog, previews, guard, opts.logging_dir)
    result.memory = memory.estimate if memory is not None else None
    result.validation = validator.history if validator is not None else []
    result.saved_ema = list(ckpt.saved_ema)
    return result


def _options_record(opts, run, data, net) -> dict:
    """The options as this run used them (train_state.json): with the values the run settled itself."""
    resolution = opts.resolution
    if resolution is None and not opts.dataset_config:
        resolution = str(data.configs[0].resolution[0])  # the family's, as a command-line dataset got it
    used = dataclasses.replace(opts, seed=run.seed, resolution=resolution, network_dim=net.dim,
                               save_every_n_epochs=data.save_every_n_epochs)
    return O.given_values(used)


def _warnings_above_the_bar(progress: bool):
    """While the bar is shown, warnings of the data layer (a skipped image, ...) that go through `logging` are
    written above it like the run's own lines (tqdm.write), not into it."""
    import contextlib

    if not progress:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _use_threads(asked: Optional[int], run) -> None:
    """CPU threads of this run. MKL/oneDNN split a reduction by thread count, so the float sums of a step (and the
    weights after it) depend on it: a resumed run takes the saved count unless --num_threads says otherwise."""
    import torch

    saved = run.resume.counters.get("num_threads") if run.resume is not None else None
    saved = int(saved) if saved else None
    if asked:
        torch.set_num_threads(int(asked))
        if saved and saved != int(asked):
            run.log(f"note: the state was saved by a run with {saved} CPU threads and this one uses {asked} "
                    "(--num_threads): training continues, but not bit-identical to a run that never stopped.")
    elif saved and torch.get_num_threads() != saved:
        torch.set_num_threads(saved)
        if torch.get_num_threads() == saved:
            run.log(f"note: using {saved} CPU threads like the run that saved the state, so the resumed run matches "
                    "one that never stopped (--num_threads N overrides).")
        else:
            run.log(f"warning: the state was saved with {saved} CPU threads but this process runs "
                    f"{torch.get_num_threads()}; training continues, but not bit-identical to a run that never "
                    "stopped.")


def _finish(end, run, data, net, ckpt, steplog, previews, guard, logging_dir) -> TrainResult:
    """After the loop: the NaN report, the interrupted result, or the final save; then the run's summary."""
    result = TrainResult(run.out_dir, None, saved=ckpt.saved, states=ckpt.states, samples=previews.samples,
                         global_step=end.step, epoch=min(end.epoch, data.num_epochs), losses=steplog.losses,
                         network=net.network)
    if end.stop in ("nan", "nan_weights"):
        raise _nan_stop(end, run, ckpt, guard)
    if end.stop == "interrupt":
        result.interrupted = True
        result.final_lora = ckpt.saved[-1]
    else:
        result.final_lora = ckpt.save_final(end.step, result.epoch, end.epoch)
        result.metadata = read_metadata(result.final_lora) if run.is_main else {}
    run.log(run_summary(result, started_at=run.started_at, loop_seconds=steplog.loop_seconds(),
                        max_steps=data.max_steps, num_epochs=data.num_epochs, logging_dir=logging_dir,
                        sample_dir=run.out_dir / "sample",
                        more_files=[("EMA LoRA", p) for p in getattr(ckpt, "saved_ema", [])]))
    return result


def _nan_stop(end, run, ckpt, guard) -> UserError:
    """Save the last finite weights as a LoRA (checked after writing) and say exactly what happened."""
    from lorakit.utils.finite import nonfinite_names

    kept = None
    if end.step > 0:
        kept = ckpt.save_lora(lora_name(run.name, step=end.step), step=end.step, epoch=end.epoch)
        if run.is_main:
            from safetensors.torch import load_file

            if nonfinite_names(load_file(str(kept)).items()):  # e.g. a schedule-free swap of NaN optimizer state
                kept.unlink(missing_ok=True)
                kept = None
    if kept is not None:
        saved = f"saved as {kept}"
    elif end.step > 0:
        saved = "they could not be saved finite (the optimizer state was already NaN)"
    else:
        saved = "no step had completed, so nothing was saved"
    if end.stop == "nan":
        what = (f"the loss became NaN/inf at step {end.step + 1} (epoch {end.epoch}); that step was not applied, so "
                f"the LoRA weights are those after step {end.step}: {saved}.")
    else:
        first = guard.bad_names[0] if guard.bad_names else "?"
        more = f" and {len(guard.bad_names) - 1} more" if guard.bad_names and len(guard.bad_names) > 1 else ""
        what = (f"the LoRA weights became NaN/inf at step {end.step + 1} (epoch {end.epoch}) in the optimizer update "
                f"(first in {first}{more}) although the loss was finite; they were reset to those after step "
                f"{end.step}: {saved}.")
    return UserError(f"{what} Usual causes: fp16 overflow (use --mixed_precision bf16, or --no_half_vae for SDXL), a "
                     "learning rate too high, or a broken image. Continue from an earlier --save_state folder with a "
                     "lower --learning_rate, or start again.")
