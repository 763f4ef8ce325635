"""Learning-rate schedules with sd-scripts' names and diffusers' formulas, stepped once per optimizer step.

Each schedule is a multiplier f(step) of every group's base lr (so UNet/TE/LoRA+ ratios stay fixed).
`LRScheduler.state_dict()` holds the step count and base lrs: a resumed run continues the curve exactly.

    sched = create_scheduler(optimizer, "cosine_with_restarts", total_steps=1000, warmup=0.05, num_cycles=4)
    ... optimizer.step(); sched.step()
"""

from __future__ import annotations

import ast
import importlib
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from lorakit.errors import UserError

SCHEDULER_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                   "adafactor", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


def resolve_steps(value: int | float | str | None, total_steps: int) -> int:
    """Warmup/decay given as steps (int), a ratio of the run (float < 1) or "N%" -> steps (int(ratio * total),
    as sd-scripts rounds)."""
    if value is None:
        return 0
    if isinstance(value, str):
        from lorakit.options import parse_int_or_ratio

        value = parse_int_or_ratio(value)
    if isinstance(value, float):
        if value >= 1:
            return int(value)
        return int(value * total_steps)
    return int(value)


def multiplier_fn(name: str, total_steps: int, warmup_steps: int = 0, *, num_cycles: int = 1, power: float = 1.0,
                  lr_end_ratio: float = 1e-7, timescale: Optional[int] = None, min_lr_ratio: Optional[float] = None,
                  decay_steps: int = 0) -> Callable[[int], float]:
    """f(step) for the named schedule (diffusers / transformers definitions).

    `lr_end_ratio` is polynomial's lr_end / lr_init (diffusers: lr_end 1e-7 over the base lr).
    """
    W, T = int(warmup_steps), int(total_steps)

    def warm(step: int) -> Optional[float]:
        return step / max(1, W) if step < W else None

    def progress(step: int) -> float:
        return (step - W) / max(1, T - W)

    if name == "constant":
        return lambda step: 1.0
    if name == "constant_with_warmup":
        return lambda step: warm(step) if step < W else 1.0
    if name == "linear":
        return lambda step: warm(step) if step < W else max(0.0, (T - step) / max(1, T - W))
    if name == "cosine":
        return lambda step: warm(step) if step < W else max(0.0, 0.5 * (1 + math.cos(math.pi * 0.5 * 2 * progress(step))))
    if name == "cosine_with_restarts":
        def f(step):
            if step < W:
                return warm(step)
            p = progress(step)
            if p >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1 + math.cos(math.pi * ((num_cycles * p) % 1.0))))
        return f
    if name == "polynomial":
        def f(step):
            if step < W:
                return warm(step)
            if step > T:
                return lr_end_ratio
            remaining = 1 - (step - W) / max(1, T - W)
            return (1 - lr_end_ratio) * remaining**power + lr_end_ratio
        return f
    if name == "inverse_sqrt":
        ts = timescale if timescale is not None else (W or 10_000)

        def f(step):
            if step < W:
                return warm(step)
            return 1.0 / math.sqrt((step + ts - W) / ts)
        return f
    if name == "cosine_with_min_lr":
        floor = min_lr_ratio or 0.0

        def f(step):
            if step < W:
                return warm(step)
            c = 0.5 * (1 + math.cos(math.pi * (num_cycles / 2) * 2 * progress(step)))
            return max(0.0, c * (1 - floor) + floor)
        return f
    if name == "warmup_stable_decay":
        floor = min_lr_ratio or 0.0
        D = int(decay_steps)
        S = T - W - D

        def f(step):
            if step < W:
                return warm(step)
            if step < W + S:
                return 1.0
            if step < W + S + D:
                p = (step - W - S) / max(1, D)
                c = 0.5 * (1 + math.cos(math.pi * (num_cycles / 2) * 2 * p))
                return (1 - floor) * c + floor
            return floor
        return f
    raise UserError(f"Unknown --lr_scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}.")


class LRScheduler:
    """Sets group["lr"] = base_lr * f(step); step() once per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, fn: Callable[[int], float], name: str = "custom"):
        self.optimizer = optimizer
        self.fn = fn
        self.name = name
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        m = self.fn(self.step_count)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * m

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def multiplier(self) -> float:
        return self.fn(self.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "step_count": self.step_count, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") not in (None, self.name):
            raise UserError(f"The saved state used lr scheduler {state.get('name')!r}, this run asks for "
                            f"{self.name!r}; resume with the same --lr_scheduler.")
        self.step_count = int(state["step_count"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()


class AdafactorScheduler(LRScheduler):
    """Relative-step AdaFactor sets its own lr; this only reports it (like transformers' AdafactorSchedule)."""

    def __init__(self, optimizer, initial_lr: float = 0.0):
        self.optimizer = optimizer
        self.name = "adafactor"
        self.initial_lr = initial_lr
        self.base_lrs = [initial_lr for _ in optimizer.param_groups]
        self.step_count = 0
        self.fn = lambda step: 1.0

    def _apply(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        from lorakit.train.optimizers import effective_lrs

        lrs = effective_lrs(self.optimizer)
        return [lr if lr else self.initial_lr for lr in lrs]


class TorchSchedulerWrapper(LRScheduler):
    """A `--lr_scheduler_type module.Class` scheduler (torch.optim.lr_scheduler by default)."""

    def __init__(self, optimizer, scheduler):
        self.optimizer = optimizer
        self.inner = scheduler
        self.name = type(scheduler).__name__
        self.step_count = 0
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]

    def step(self) -> None:
        self.step_count += 1
        self.inner.step()

    def state_dict(self):
        return {"name": self.name, "step_count": self.step_count, "inner": self.inner.state_dict()}

    def load_state_dict(self, state):
        self.step_count = int(state["step_count"])
        self.inner.load_state_dict(state["inner"])


def parse_scheduler_args(items: Sequence[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--lr_scheduler_args item {item!r} is not key=value.")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            raise UserError(f"--lr_scheduler_args: {v!r} is not a Python literal.") from None
    return out


def create_scheduler(optimizer: torch.optim.Optimizer, name: str = "constant", *, total_steps: int,
                     warmup: int | float | str | None = 0, num_cycles: int = 1, power: float = 1.0,
                     timescale: Optional[int] = None, min_lr_ratio: Optional[float] = None,
                     decay: int | float | str | None = 0, scheduler_type: str = "",
                     scheduler_args: Sequence[str] | None = None, schedule_free: bool = False,
                     adafactor_initial_lr: Optional[float] = None) -> LRScheduler:
    """The scheduler of a run, following sd-scripts' get_scheduler_fix (one step per optimizer step)."""
    name = (name or "constant").lower()
    warmup_steps = resolve_steps(warmup, total_steps)
    decay_steps = resolve_steps(decay, total_steps)
    kwargs = parse_scheduler_args(scheduler_args)
    if schedule_free:
        if name != "constant" or warmup_steps:
            warnings.warn("Schedule-free optimizers need no lr scheduler; --lr_scheduler/--lr_warmup_steps are "
                          "ignored (use --optimizer_args warmup_steps=N).", stacklevel=2)
        return LRScheduler(optimizer, multiplier_fn("constant", total_steps), "constant")
    if scheduler_type:
        if "." in scheduler_type:
            mod_name, cls_name = scheduler_type.rsplit(".", 1)
            mod = importlib.import_module(mod_name)
        else:
            mod, cls_name = torch.optim.lr_scheduler, scheduler_type
        cls = getattr(mod, cls_name, None)
        if cls is None:
            raise UserError(f"--lr_scheduler_type {scheduler_type!r} not found.")
        return TorchSchedulerWrapper(optimizer, cls(optimizer, **kwargs))
    if name.startswith("adafactor"):
        if ":" in name:
            adafactor_initial_lr = float(name.split(":", 1)[1])
        return AdafactorScheduler(optimizer, adafactor_initial_lr or 0.0)
    if name == "constant" and warmup_steps:
        warnings.warn(f"--lr_scheduler constant ignores --lr_warmup_steps ({warmup_steps}); use constant_with_warmup "
                      f"to warm up.", stacklevel=2)
        warmup_steps = 0
    lr_init = optimizer.defaults.get("lr") or optimizer.param_groups[0]["lr"]
    lr_end = float(kwargs.pop("lr_end", 1e-7))  # diffusers' polynomial default
    fn = multiplier_fn(name, total_steps, warmup_steps, num_cycles=num_cycles, power=power,
                       lr_end_ratio=lr_end / lr_init if lr_init else 0.0, timescale=timescale,
                       min_lr_ratio=min_lr_ratio, decay_steps=decay_steps)
    return LRScheduler(optimizer, fn, name)


def scheduler_from_options(optimizer, opts, total_steps: int, *, schedule_free: bool = False,
                           relative_step_adafactor: bool = False) -> LRScheduler:
    name = opts.lr_scheduler
    if relative_step_adafactor:
        name = "adafactor"
    return create_scheduler(
        optimizer, name, total_steps=total_steps, warmup=opts.lr_warmup_steps, num_cycles=opts.lr_scheduler_num_cycles,
        power=opts.lr_scheduler_power, timescale=opts.lr_scheduler_timescale,
        min_lr_ratio=opts.lr_scheduler_min_lr_ratio, decay=opts.lr_decay_steps,
        scheduler_type=opts.lr_scheduler_type, scheduler_args=opts.lr_scheduler_args, schedule_free=schedule_free,
        adafactor_initial_lr=opts.learning_rate)
