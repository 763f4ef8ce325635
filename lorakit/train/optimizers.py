"""Optimizer factory: sd-scripts' `--optimizer_type` names (case-insensitive) and `--optimizer_args` literals.

    opt = create_optimizer("DAdaptLion", param_groups, lr=1.0, optimizer_args=["betas=0.9,0.999", "d0=1e-06"])
    opt.optimizer.step(); effective_lrs(opt.optimizer)  # d*lr per group for D-Adaptation/Prodigy

Param groups carry their own lr and a "name" (unet, text_encoder1, text_encoder2, unet_plus, ...) so logs can name
them; `make_param_groups` builds them from per-component parameters, block lr multipliers and the LoRA+ ratio.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from lorakit.errors import UserError

# canonical names, keyed by lower case (what the user typed, case-insensitive)
_BUILTIN = {n.lower(): n for n in [
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit", "PagedLion8bit",
    "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdamPreprint", "DAdaptAdam", "DAdaptLion", "DAdaptAdan",
    "DAdaptAdanIP", "DAdaptSGD", "DAdaptAdaGrad", "Prodigy", "AdaFactor", "RAdamScheduleFree", "AdamWScheduleFree",
    "SGDScheduleFree",
]}
OPTIMIZER_NAMES = sorted(set(_BUILTIN.values()), key=str.lower)

# optimizers whose param groups must all share one lr (or 0): they raise mid-run otherwise
_SINGLE_LR = {"dadaptation", "dadaptadampreprint", "dadaptadam", "dadaptlion", "dadaptsgd", "prodigy"}


@dataclass
class OptimizerInfo:
    optimizer: torch.optim.Optimizer
    name: str  # canonical name, e.g. "AdamW8bit"
    class_path: str  # "module.Class", what sd-scripts writes in ss_optimizer
    kwargs: dict[str, Any] = field(default_factory=dict)
    relative_step_adafactor: bool = False  # AdaFactor computing its own lr (use the "adafactor" schedule)

    @property
    def metadata_string(self) -> str:
        """ss_optimizer: 'module.Class(k=v,...)' like sd-scripts."""
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return self.class_path + (f"({args})" if args else "")

    @property
    def is_schedule_free(self) -> bool:
        return self.name.lower().endswith("schedulefree")

    @property
    def is_adaptive(self) -> bool:
        return is_adaptive(self.name)


def is_adaptive(optimizer_type: str) -> bool:
    """D-Adaptation and Prodigy: the lr is a multiplier of an estimated step size d."""
    t = (optimizer_type or "").lower()
    return t.startswith("dadapt") or t == "prodigy"


def parse_optimizer_args(items: Sequence[str] | None, flag: str = "--optimizer_args") -> dict[str, Any]:
    """["weight_decay=0.01", "betas=0.9,0.999", "decouple=True"] -> {"weight_decay": 0.01, "betas": (0.9, 0.999), ...}.

    Values are Python literals (ast.literal_eval), as in sd-scripts; a bare word that is not a literal stays a string.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{flag} item {item!r} is not key=value (e.g. weight_decay=0.01).")
        key, text = item.split("=", 1)
        key, text = key.strip(), text.strip()
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if text.replace("_", "").isalnum() and not text[:1].isdigit():
                value = text  # e.g. decoupling=foo; sd-scripts would fail, a string is what was meant
            else:
                raise UserError(f"{flag}: the value of {key!r} ({text!r}) is not a Python literal "
                                f"(numbers, True/False, None, 'strings', tuples like 0.9,0.999).") from None
        out[key] = value
    return out


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("8-bit and paged optimizers need bitsandbytes: pip install bitsandbytes "
                        "(or choose AdamW / Lion).") from None
    return bnb


def bnb_available_on(device: torch.device | str) -> bool:
    """Whether bitsandbytes' 8-bit optimizers step on this device (recent versions also run on CPU)."""
    try:
        bnb = _bnb()
        p = torch.nn.Parameter(torch.ones(4096, device=device))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        return True
    except Exception:
        return False


def resolve_optimizer_class(optimizer_type: str) -> tuple[str, type, dict[str, Any]]:
    """Name -> (canonical name, class, default kwargs it needs). Unknown plain names are looked up in torch.optim,
    dotted ones imported as module.Class."""
    raw = (optimizer_type or "AdamW").strip()
    t = raw.lower()
    canon = _BUILTIN.get(t)
    if canon is None:
        if "." in raw:
            mod_name, cls_name = raw.rsplit(".", 1)
            try:
                mod = importlib.import_module(mod_name)
            except ImportError as exc:
                raise UserError(f"--optimizer_type {raw}: cannot import module {mod_name!r} ({exc}).") from None
            cls = getattr(mod, cls_name, None)
            if cls is None:
                raise UserError(f"--optimizer_type {raw}: module {mod_name!r} has no {cls_name!r}.")
            return raw, cls, {}
        cls = getattr(torch.optim, raw, None)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            return raw, cls, {}
        import difflib

        hint = difflib.get_close_matches(t, list(_BUILTIN), n=1)
        raise UserError(f"Unknown --optimizer_type {raw!r}" + (f"; did you mean {_BUILTIN[hint[0]]!r}?" if hint else "")
                        + f" Known: {', '.join(OPTIMIZER_NAMES)}, any torch.optim class, or module.Class.")
    if t == "adamw":
        return canon, torch.optim.AdamW, {}
    if t == "sgdnesterov":
        return canon, torch.optim.SGD, {"nesterov": True, "momentum": 0.9}
    if t == "lion":
        try:
            import lion_pytorch
        except ImportError:
            raise UserError("--optimizer_type Lion needs lion-pytorch: pip install lion-pytorch") from None
        return canon, lion_pytorch.Lion, {}
    if t.endswith("8bit") or t.startswith("paged"):
        bnb = _bnb()
        cls_name = {"sgdnesterov8bit": "SGD8bit"}.get(t, canon)
        cls = getattr(bnb.optim, cls_name, None)
        if cls is None:
            raise UserError(f"This bitsandbytes has no {cls_name}; upgrade it (pip install -U bitsandbytes).")
        extra = {"nesterov": True, "momentum": 0.9} if t == "sgdnesterov8bit" else {}
        return canon, cls, extra
    if t.startswith("dadapt"):
        try:
            import dadaptation
            import dadaptation.experimental as experimental
        except ImportError:
            raise UserError(f"--optimizer_type {canon} needs dadaptation: pip install dadaptation") from None
        cls = {
            "dadaptation": experimental.DAdaptAdamPreprint, "dadaptadampreprint": experimental.DAdaptAdamPreprint,
            "dadaptadam": dadaptation.DAdaptAdam, "dadaptlion": dadaptation.DAdaptLion,
            "dadaptadan": dadaptation.DAdaptAdan, "dadaptadanip": experimental.DAdaptAdanIP,
            "dadaptsgd": dadaptation.DAdaptSGD, "dadaptadagrad": dadaptation.DAdaptAdaGrad,
        }[t]
        return canon, cls, {}
    if t == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise UserError("--optimizer_type Prodigy needs prodigyopt: pip install prodigyopt") from None
        return canon, prodigyopt.Prodigy, {}
    if t == "adafactor":
        from transformers.optimization import Adafactor

        return canon, Adafactor, {}
    if t.endswith("schedulefree"):
        try:
            import schedulefree
        except ImportError:
            raise UserError(f"--optimizer_type {canon} needs schedulefree: pip install schedulefree") from None
        return canon, getattr(schedulefree, canon), {}
    raise AssertionError(t)


def check_group_lrs(name: str, param_groups: list[dict], lr: float) -> None:
    """D-Adaptation (Adam, Lion, SGD, preprint) and Prodigy accept group lrs only equal to one value or 0."""
    if name.lower() not in _SINGLE_LR:
        return
    lrs = {g.get("lr", lr) for g in param_groups} - {0.0}
    if len(lrs) > 1:
        names = ", ".join(f"{g.get('name', i)}={g.get('lr', lr)}" for i, g in enumerate(param_groups))
        raise UserError(f"{name} cannot train parameter groups with different learning rates ({names}): it "
                        f"estimates one step size for all. Give --unet_lr and --text_encoder_lr the same value (1.0 "
                        f"is usual), use block lr weights of only 0 or 1, drop LoRA+ ratios, or choose DAdaptAdan/"
                        f"DAdaptAdaGrad, which accept separate rates.")


# torch optimizers with a fused kernel: one pass over each parameter's weight, gradient and state instead of the
# for-each form's ~10 (on SD1.5's 7M LoRA parameters on a CPU, AdamW 15 ms -> 3 ms a step); same maths, other rounding
_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def _fused_default(cls: type, groups: list[dict], kwargs: dict) -> dict[str, Any]:
    """{"fused": True} when `cls` has a fused kernel for every parameter's device and dtype and the user chose
    neither fused nor foreach in --optimizer_args; else nothing (the optimizer's own default)."""
    if not (isinstance(cls, type) and issubclass(cls, _FUSABLE)) or "fused" in kwargs or "foreach" in kwargs:
        return {}
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - torch before 2.2
        return {}
    for g in groups:
        for p in g["params"]:
            if not (isinstance(p, torch.Tensor) and p.device.type in devices and p.is_floating_point()):
                return {}
    return {"fused": True}


def create_optimizer(optimizer_type: str, params: Iterable | list[dict], lr: float,
                     optimizer_args: Sequence[str] | dict | None = None) -> OptimizerInfo:
    """Build the optimizer like sd-scripts does (same defaults: SGDNesterov momentum 0.9, AdaFactor relative_step)."""
    canon, cls, needed = resolve_optimizer_class(optimizer_type)
    kwargs = dict(optimizer_args) if isinstance(optimizer_args, dict) else parse_optimizer_args(optimizer_args)
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    shown = dict(kwargs)  # what sd-scripts records in ss_optimizer: user args + the defaults it adds to them
    if "momentum" in needed:
        shown.setdefault("momentum", needed["momentum"])
    for k, v in needed.items():
        kwargs.setdefault(k, v)
    relative = False
    if canon.lower() == "adafactor":
        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init") and not kwargs["relative_step"]:
            kwargs["relative_step"] = True
        shown["relative_step"] = kwargs["relative_step"]
        relative = bool(kwargs["relative_step"])
        if relative:  # Adafactor computes its own lr; group lrs must go
            groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
        lr_arg = None if relative else lr
    else:
        lr_arg = lr
        check_group_lrs(canon, groups, lr)
    kwargs.update(_fused_default(cls, groups, kwargs))
    try:
        opt = cls(groups, lr=lr_arg, **kwargs)
    except TypeError as exc:
        raise UserError(f"--optimizer_args for {canon}: {exc}. Check the argument names "
                        f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}).") from None
    if hasattr(opt, "train") and callable(opt.train):
        opt.train()  # schedule-free optimizers start in train mode
    return OptimizerInfo(opt, canon, f"{cls.__module__}.{cls.__name__}", shown, relative)


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """torch's clip_grad_norm_ (the same total norm and clamped coefficient, so the same gradients bit for bit) without
    its multiply of every gradient by 1.0 when nothing needs clipping and the norm is on the CPU: there reading the
    coefficient costs no device sync, and the multiply is a read and write of all gradients (1444 tensors of SDXL's
    LoRA shapes, 28M parameters: the clip 13.3 -> 5.3 ms). A NaN or inf norm multiplies, as torch does."""
    get_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_norm is None:  # pragma: no cover - torch before 2.6
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = get_norm(grads, 2.0)
    if total.device.type == "cpu" and bool(max_norm / (total + 1e-6) >= 1.0):  # torch clamps this coefficient to 1
        return
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def effective_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The step size each group really uses: d * lr for D-Adaptation/Prodigy (their "d"), else lr.

    A relative-step AdaFactor reports its internal lr of the first parameter (what transformers' schedule reads).
    """
    out = []
    for g in optimizer.param_groups:
        lr = g.get("lr")
        if "d" in g and lr is not None:
            out.append(float(g["d"]) * float(lr))
        elif lr is None or g.get("relative_step"):
            out.append(_adafactor_lr(optimizer, g))
        else:
            out.append(float(lr))
    return out


def _adafactor_lr(optimizer, group) -> float:
    try:
        p = group["params"][0]
        state = optimizer.state.get(p) or {}
        if not state:
            return 0.0
        return float(optimizer._get_lr(group, state))
    except Exception:
        return 0.0


def set_train_mode(optimizer, train: bool) -> None:
    """Schedule-free optimizers keep two weight sequences: eval() before sampling/saving, train() after."""
    fn = getattr(optimizer, "train" if train else "eval", None)
    if callable(fn):
        fn()


@dataclass
class ParamSet:
    """Trainable parameters of one component: "unet", "text_encoder1", "text_encoder2" (or "text_encoder" for SD1)."""

    component: str
    named_params: list[tuple[str, torch.nn.Parameter]]
    lr: Optional[float] = None  # None: base lr


LORAPLUS_UP_KEYS = ("lora_up", "lora_B", "hada_w2", "lokr_w2")  # the "B" side that LoRA+ speeds up


def make_param_groups(sets: Sequence[ParamSet], base_lr: float, *,
                      block_lr_weight: Optional[Callable[[str, str], float]] = None,
                      loraplus_ratio: Optional[float] = None, loraplus_unet_ratio: Optional[float] = None,
                      loraplus_te_ratio: Optional[float] = None) -> list[dict]:
    """Split parameters into optimizer groups with their own lr.

    lr = (component lr or base_lr) * block_lr_weight(component, name) [* LoRA+ ratio for up weights].
    Parameters whose weight is 0 get no group and requires_grad=False (they do not train).
    Groups are named "<component>", "<component>_block<w>" and "<...>_plus" (what the logs show).
    """
    groups: dict[tuple, dict] = {}
    for ps in sets:
        comp_lr = base_lr if ps.lr is None else ps.lr
        is_unet = ps.component.startswith("unet")
        plus = loraplus_unet_ratio if is_unet else loraplus_te_ratio
        plus = plus if plus is not None else loraplus_ratio
        for name, p in ps.named_params:
            w = 1.0 if block_lr_weight is None else float(block_lr_weight(ps.component, name))
            if w == 0.0 or comp_lr == 0.0:
                p.requires_grad_(False)
                continue
            is_plus = bool(plus) and any(k in name for k in LORAPLUS_UP_KEYS)
            lr = comp_lr * w * (plus if is_plus else 1.0)
            key = (ps.component, w, is_plus)
            g = groups.get(key)
            if g is None:
                label = ps.component + ("" if w == 1.0 else f"_block{w:g}") + ("_plus" if is_plus else "")
                g = groups[key] = {"params": [], "lr": lr, "name": label, "initial_lr_weight": w}
            g["params"].append(p)
    return list(groups.values())


__all__ = [
    "OPTIMIZER_NAMES", "OptimizerInfo", "ParamSet", "create_optimizer", "resolve_optimizer_class",
    "parse_optimizer_args", "effective_lrs", "set_train_mode", "make_param_groups", "is_adaptive",
    "check_group_lrs", "bnb_available_on", "LORAPLUS_UP_KEYS", "clip_grad_norm",
]
