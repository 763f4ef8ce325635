"""An exponential moving average (EMA) of the trained weights (--ema_decay; a lorakit addition).

After every `--ema_update_every`-th optimizer step (n = updates so far, counting this one):
    decay_n = min(ema_decay, (1 + n) / (10 + n))   with --ema_warmup, else ema_decay
    ema    <- decay_n * ema + (1 - decay_n) * weights
The average starts from the weights the run starts with and is kept in float32 beside the network (a LoRA is small).
It is saved as `{name}-ema.safetensors` beside every LoRA file (or as the LoRA itself, --ema_save_as lora), held in
state folders so --resume continues it exactly, scored by the validation loss, and optionally used for previews.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from lorakit.train.previews import Previews


@dataclass(frozen=True)
class EmaOptions:
    ema_decay: Optional[float]
    ema_warmup: bool
    ema_update_every: int
    ema_save_as: str
    ema_samples: bool


def ema_decay_at(decay: float, n: int, warmup: bool) -> float:
    """The decay of update n (1-based)."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


class Ema:
    """The moving average of a module's trainable parameters."""

    def __init__(self, module: torch.nn.Module, decay: float, *, warmup: bool = False, update_every: int = 1):
        self.decay, self.warmup, self.update_every = float(decay), bool(warmup), max(1, int(update_every))
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based): update every `update_every` steps."""
        if step % self.update_every:
            return
        self.updates += 1
        keep = ema_decay_at(self.decay, self.updates, self.warmup)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - keep)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The module holds the EMA weights inside the block and its own (bit-exact) weights again after it."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.shadow[name].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "update_every": self.update_every,
                "updates": self.updates, "params": {k: v.detach().cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        params = state["params"]
        if set(params) != set(self.shadow):
            raise ValueError("EMA state of another network")
        for k, v in params.items():
            self.shadow[k].copy_(v.to(self.shadow[k].device, torch.float32))
        self.updates = int(state["updates"])

    def describe(self) -> str:
        """The EMA settings and progress, for the saved file's metadata (`lorakit.ema`)."""
        return json.dumps({"decay": self.decay, "warmup": self.warmup, "update_every": self.update_every,
                           "updates": self.updates})


def make_ema(o: EmaOptions, network, run) -> Optional[Ema]:
    """The run's EMA (None without --ema_decay), continued from a resumed state when it holds one."""
    resumed = (run.resume.extra or {}).get("ema") if run.resume is not None else None
    if o.ema_decay is None:
        if resumed is not None:
            run.log("note: the resumed state holds an EMA of the weights but --ema_decay is not set; the EMA stops here.")
        return None
    ema = Ema(network, o.ema_decay, warmup=o.ema_warmup, update_every=o.ema_update_every)
    if resumed is not None:
        try:
            ema.load_state_dict(resumed)
        except (KeyError, ValueError, RuntimeError):
            run.log("note: the resumed state's EMA does not fit this network; the EMA restarts from the current weights.")
        else:
            if float(resumed.get("decay", o.ema_decay)) != float(o.ema_decay):
                run.log(f"note: the state's EMA used decay {resumed.get('decay')}; continuing it with {o.ema_decay}.")
    elif run.resume is not None:
        run.log("note: the resumed state holds no EMA (it was saved without --ema_decay); the EMA starts from the "
                "resumed weights.")
    return ema


class EmaPreviews(Previews):
    """Previews rendered with the EMA weights (--ema_samples)."""

    def __init__(self, *args, ema: Ema, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema = ema

    def _render(self, epoch, step) -> None:
        with self.ema.swapped():
            super()._render(epoch, step)


def previews_for(o: EmaOptions, ema: Optional[Ema], *args, **kwargs) -> Previews:
    """The run's Previews: with the EMA weights when --ema_samples asks and an EMA exists."""
    if o.ema_samples and ema is not None:
        return EmaPreviews(*args, ema=ema, **kwargs)
    return Previews(*args, **kwargs)


__all__ = ["EmaOptions", "Ema", "ema_decay_at", "make_ema", "EmaPreviews", "previews_for"]
