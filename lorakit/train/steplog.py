"""What a run reports per optimizer step: TensorBoard scalars, `on_event` events (the GUI's progress) and the
progress bar. Only the main process reports."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class LogOptions:
    logging_dir: Optional[str]
    log_prefix: Optional[str]


class StepLogger:
    """Events: {"event": "start", "max_steps", "num_epochs", "step"}, {"event": "step", "step", "max_steps", "epoch",
    "loss", "loss_avg", "lr": {group: lr}, "effective_lr": {group: d*lr} (adaptive optimizers only)},
    {"event": "saved", "path"} and {"event": "sample", "paths", "step"}."""

    def __init__(self, o: LogOptions, *, is_main: bool, progress: bool, on_event: Optional[Callable[[dict], None]],
                 adaptive: bool):
        self.is_main, self.progress, self.on_event, self.adaptive = is_main, progress, on_event, adaptive
        self.losses: list[float] = []  # loss of every optimizer step of this run
        self._recent: list[float] = []
        self.o = o
        self._bar = None
        self._writer = None

    def emit(self, event: str, **kw) -> None:
        if self.on_event is not None and self.is_main:
            self.on_event({"event": event, **kw})

    def start(self, step: int, max_steps: int, num_epochs: int) -> None:
        if self.o.logging_dir and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(self.o.logging_dir) / f"{self.o.log_prefix or ''}"
                                             f"{time.strftime('%Y%m%d%H%M%S')}" / "network_train"))
        self.emit("start", max_steps=max_steps, num_epochs=num_epochs, step=step)
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
        self.emit("step", step=step, max_steps=max_steps, epoch=epoch, loss=loss, loss_avg=logs["loss/average"],
                  lr={k[3:]: v for k, v in logs.items() if k.startswith("lr/") and not k.startswith("lr/d*lr/")},
                  effective_lr={k[8:]: v for k, v in logs.items() if k.startswith("lr/d*lr/")})
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(epoch=epoch, loss=f"{logs['loss/average']:.4f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
