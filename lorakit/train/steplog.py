"""What a run reports: TensorBoard scalars, `on_event` events (the GUI's progress), the progress bar or, without
one, a step line every N steps, and the summary at the end. Only the main process reports.

Every log line of a run goes through `Console`, which prints it above the progress bar (tqdm clears the bar, the
line is printed, the bar is drawn again), so "saved ..." or a note never lands inside the bar.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


class Console:
    """A log function that never breaks a tqdm bar: the line is written while the bars are cleared."""

    def __init__(self, log: Callable[..., None]):
        self.log = log

    def __call__(self, msg, *a, **k) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode():
            self.log(msg, *a, **k)


def format_duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 03 min."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def default_log_every(max_steps: int) -> int:
    """About 20 step lines a run, at least every 100 steps."""
    return max(1, min(100, max_steps // 20))


@dataclass(frozen=True)
class LogOptions:
    logging_dir: Optional[str]
    log_prefix: Optional[str]


class StepLogger:
    """Events: {"event": "start", "max_steps", "num_epochs", "step"}, {"event": "step", "step", "max_steps", "epoch",
    "loss", "loss_avg", "lr": {group: lr}, "effective_lr": {group: d*lr} (adaptive optimizers only)},
    {"event": "saving"/"saved", "path"}, {"event": "sampling", "step", "prompts"} and {"event": "sample", "paths",
    "step"}. While a save or previews run the bar says so; without a bar (--no_progress) a line every `log_every`
    steps gives loss, lr, it/s and the time left."""

    def __init__(self, o: LogOptions, *, is_main: bool, progress: bool, on_event: Optional[Callable[[dict], None]],
                 adaptive: bool, log: Optional[Callable[[str], None]] = None, log_every: Optional[int] = None):
        self.is_main, self.progress, self.on_event, self.adaptive = is_main, progress, on_event, adaptive
        self.log = log or (lambda *_a, **_k: None)
        self.log_every = log_every
        self.losses: list[float] = []  # loss of every optimizer step of this run
        self._recent: list[float] = []
        self.o = o
        self._bar = None
        self._status = False  # the bar shows "saving ..."/"sampling ..." instead of "steps"
        self._writer = None
        self.tensorboard_dir: Optional[Path] = None
        self._t0 = self._t_end = None
        self._first_step = 0
        self._num_epochs = 0
        self._mark = (0, 0.0)  # (step, time) of the last step line: it/s over the lines' interval

    def emit(self, event: str, **kw) -> None:
        if event in ("saving", "sampling") and self._bar is not None:
            what = Path(kw["path"]).name if event == "saving" else f"{kw.get('prompts', '')} previews"
            self._bar.set_description_str(f"{event} {what}")
            self._status = True
        elif event in ("saved", "sample") and self._bar is not None:
            self._bar.set_description_str("steps")
            self._status = False
        if self.on_event is not None and self.is_main:
            self.on_event({"event": event, **kw})

    def start(self, step: int, max_steps: int, num_epochs: int) -> None:
        if self.o.logging_dir and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard_dir = Path(self.o.logging_dir) / f"{self.o.log_prefix or ''}" \
                f"{time.strftime('%Y%m%d%H%M%S')}" / "network_train"
            self._writer = SummaryWriter(str(self.tensorboard_dir))
        self.emit("start", max_steps=max_steps, num_epochs=num_epochs, step=step)
        self._t0, self._first_step, self._num_epochs = time.time(), step, num_epochs
        self._mark = (step, self._t0)
        if self.log_every is None:
            self.log_every = default_log_every(max_steps)
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=step, desc="steps", smoothing=0, dynamic_ncols=True)

    def step(self, step: int, max_steps: int, epoch: int, loss: float, optim, extra: dict) -> None:
        """One optimizer step: `extra` holds scalars of the step's weight maintenance (max-norm)."""
        from lorakit.train.optimizers import effective_lrs

        logs = {"loss/current": loss, **extra}
        self.losses.append(loss)
        self._recent = (self._recent + [loss])[-100:]
        logs["loss/average"] = sum(self._recent) / len(self._recent)
        names = [g.get("name", str(i)) for i, g in enumerate(optim.optimizer.param_groups)]
        for nm, lr, elr in zip(names, optim.scheduler.get_last_lr(), effective_lrs(optim.optimizer)):
            logs[f"lr/{nm}"] = lr
            if self.adaptive:
                logs[f"lr/d*lr/{nm}"] = elr
        if self._writer is not None:
            for key, v in logs.items():
                self._writer.add_scalar(key, v, step)
        lrs = {k[3:]: v for k, v in logs.items() if k.startswith("lr/") and not k.startswith("lr/d*lr/")}
        effective = {k[8:]: v for k, v in logs.items() if k.startswith("lr/d*lr/")}
        self.emit("step", step=step, max_steps=max_steps, epoch=epoch, loss=loss, loss_avg=logs["loss/average"],
                  lr=lrs, effective_lr=effective)
        if self._bar is not None:
            if self._status:  # a state save ends without a "saved" event
                self._bar.set_description_str("steps")
                self._status = False
            self._bar.update(1)
            self._bar.set_postfix(epoch=epoch, loss=f"{logs['loss/average']:.4f}")
        elif self.is_main and (step % self.log_every == 0 or step == max_steps or step == self._first_step + 1):
            self.log(self._step_line(step, max_steps, epoch, loss, logs["loss/average"], effective or lrs))

    def _step_line(self, step, max_steps, epoch, loss, avg, lrs: dict) -> str:
        now = time.time()
        last_step, last_t = self._mark
        rate = (step - last_step) / (now - last_t) if now > last_t and step > last_step else 0.0
        self._mark = (step, now)
        eta = format_duration((max_steps - step) / rate) if rate > 0 else "?"
        values = list(dict.fromkeys(f"{v:.2e}" for v in lrs.values()))
        lr = values[0] if len(values) == 1 else ", ".join(f"{k} {v:.2e}" for k, v in lrs.items())
        return (f"step {step}/{max_steps} (epoch {epoch}/{self._num_epochs}): loss {loss:.4f} (average {avg:.4f}), "
                f"lr {lr}, {rate:.2f} it/s, ETA {eta}")

    def validation(self, step: int, epoch: int, kind: str, loss: float, loss_ema: Optional[float] = None) -> None:
        """A validation loss (lorakit.train.validation): kind "step" or "epoch", TensorBoard names as sd-scripts'
        (divergence = validation - the training loss's running average); event {"event": "validation", "step",
        "epoch", "kind", "loss", "loss_ema" (EMA weights, or None)}."""
        avg = sum(self._recent) / len(self._recent) if self._recent else loss
        logs = {f"loss/validation/{kind}_average": loss, f"loss/validation/{kind}_divergence": loss - avg}
        if loss_ema is not None:
            logs[f"loss/validation_ema/{kind}_average"] = loss_ema
        if self._writer is not None:
            for key, v in logs.items():
                self._writer.add_scalar(key, v, step)
        self.emit("validation", step=step, epoch=epoch, kind=kind, loss=loss, loss_ema=loss_ema)
        if self.is_main:
            self.log(f"validation loss {loss:.4f} at step {step}" + (f" (EMA weights {loss_ema:.4f})"
                                                                     if loss_ema is not None else ""))

    def loop_seconds(self) -> float:
        """Seconds from the first step to close() (the training itself, previews and saves included)."""
        if self._t0 is None:
            return 0.0
        return (self._t_end or time.time()) - self._t0

    def close(self) -> None:
        self._t_end = time.time()
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


def run_summary(result, *, started_at: float, loop_seconds: float, max_steps: int, num_epochs: int,
                logging_dir: Optional[str], sample_dir: Path, more_files: tuple = ()) -> str:
    """The end of a run in a few lines: time, steps, final and average loss, every file it left, TensorBoard.
    `more_files`: (kind, path) of other files the run wrote (EMA copies, ...)."""
    import shlex

    steps = len(result.losses)
    total = time.time() - started_at
    head = "stopped" if result.interrupted else "finished"
    lines = [f"{head}: step {result.global_step} of {max_steps} (epoch {result.epoch} of {num_epochs}); "
             f"{steps} steps in {format_duration(loop_seconds)}"
             + (f" ({steps / loop_seconds:.2f} it/s)" if loop_seconds > 0 and steps else "")
             + f", {format_duration(total)} in all with loading and caching"]
    if steps:
        recent = result.losses[-min(100, steps):]
        lines.append(f"loss: final {result.losses[-1]:.4f}, average {sum(result.losses) / steps:.4f} over the run, "
                     f"{sum(recent) / len(recent):.4f} over the last {len(recent)} steps")
    files = []
    for p in result.saved:
        if p.exists() and p not in [f for _, f in files]:
            files.append(("final LoRA" if p == result.final_lora and not result.interrupted else "LoRA", p))
    files += [(kind, Path(p)) for kind, p in more_files if Path(p).exists()]
    files += [("state", p) for p in dict.fromkeys(result.states) if p.exists()]
    lines.append("files written:" if files or result.samples else "files written: none")
    lines += [f"  {kind:<10} {p}" for kind, p in files]
    samples = [p for p in result.samples if p.exists()]
    if samples:
        lines.append(f"  {'samples':<10} {sample_dir}/ ({len(samples)} images)")
    if logging_dir:
        lines.append(f"TensorBoard: tensorboard --logdir {shlex.quote(str(logging_dir))}")
    if result.interrupted and result.states:
        lines.append(f"continue with: the same command and --resume {shlex.quote(str(result.states[-1]))}")
    return "\n".join(lines)
