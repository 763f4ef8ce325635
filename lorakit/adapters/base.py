"""The interface every adapter algorithm shares, and the cheap forward hook that applies adapters to a base layer.

An adapter wraps one base Linear/Conv2d. It never becomes a child of that layer (so the base model's state dict stays
clean); the network owns it. Its `state_dict()` keys are exactly the kohya/LyCORIS parameter names.

Shared interface:
- `delta_weight()`: the scaled weight change at multiplier 1 (float32, shape of the base weight) for additive
  algorithms; `delta_bias()` likewise (None for most).
- `new_weight(W, m)`: the base weight after applying the adapter at multiplier m (DoRA/OFT/IA3 are not additive,
  so merging and the unmerged forward both go through this).
- `forward_delta(x)`: what the adapter adds to the base layer's output, at the current multiplier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def layer_kind(module: nn.Module) -> str:
    """"linear", "conv1x1" or "conv" (any other kernel)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    raise TypeError(f"adapters apply to Linear and Conv2d layers, not {type(module).__name__}")


class AdapterModule(nn.Module):
    algo = "base"
    additive = True  # the change is W + m * delta (False for DoRA-style, OFT, IA3)

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0):
        super().__init__()
        self.lora_name = lora_name
        self._org = [org_module]  # a list keeps it out of this module's children and state dict
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self.shape = tuple(org_module.weight.shape)
        if self.is_conv:
            self._conv_kw = dict(stride=org_module.stride, padding=org_module.padding, dilation=org_module.dilation,
                                 groups=org_module.groups)
        self.multiplier = float(multiplier)
        self.module_weight = 1.0  # per-module factor (LoRA Block Weight); effective = multiplier * module_weight
        self.enabled = True
        self.dropout = None
        self.rank_dropout = None
        self.module_dropout = None
        self.wd = False  # weight decomposition (DoRA)
        self.wd_on_out = False

    # ---- identity -------------------------------------------------------------------------------------------------
    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def effective_multiplier(self) -> float:
        return self.multiplier * self.module_weight

    @property
    def rank(self) -> int | None:
        return None

    @property
    def alpha_value(self) -> float | None:
        a = getattr(self, "alpha", None)
        if a is None:
            return None
        return getattr(self, "_alpha_f", None) if a.device.type == "meta" else float(a)

    # ---- maths ----------------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        return None

    def new_weight(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        """The merged base weight (float32) at `multiplier`."""
        w = weight.float()
        d = self.delta_weight().to(w.device).reshape(w.shape)
        if not self.wd:
            return w + multiplier * d
        # DoRA (A1111/ComfyUI convention): W' = dora_scale * (W + dW) / ||W + dW||, then W + m * (W' - W)
        merged = w + d
        decomposed = merged * (self.dora_scale.float().to(w.device) / self._wd_norm(merged))
        return w + multiplier * (decomposed - w)

    def weight_change(self, multiplier: float) -> torch.Tensor:
        w = self.org_module.weight
        if self.additive and not self.wd:
            return multiplier * self.delta_weight().reshape(w.shape)
        return self.new_weight(w, multiplier) - w.float()

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, weight, bias, **self._conv_kw)
        return F.linear(x, weight, bias)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Generic path: output of the layer with the weight change; subclasses with a cheaper path override it."""
        m = self.effective_multiplier
        if self.module_dropout and self.training and torch.rand(()) < self.module_dropout:
            return None
        dw = self.weight_change(m)
        db = self.delta_bias()
        if db is not None:
            db = (db * m).to(x.dtype)
        return self._op(x, dw.to(x.dtype), db)

    # ---- DoRA -----------------------------------------------------------------------------------------------------
    def _init_dora(self, wd_on_out: bool, dora_scale: torch.Tensor | None = None) -> None:
        self.wd = True
        if dora_scale is not None:
            # the file decides the axis: (out, 1, ...) is per output row, (1, in, ...) per input column
            wd_on_out = dora_scale.shape[0] == self.shape[0]  # ComfyUI's rule
            scale = dora_scale.detach().float().clone()
        else:
            w = self.org_module.weight.detach().float()
            scale = self._wd_norm(w, wd_on_out)
        self.wd_on_out = wd_on_out
        self.dora_scale = nn.Parameter(scale.reshape(self._wd_shape(wd_on_out)))

    def _wd_shape(self, on_out: bool) -> tuple[int, ...]:
        ones = [1] * (len(self.shape) - 2)
        return (self.shape[0], 1, *ones) if on_out else (1, self.shape[1], *ones)

    def _wd_norm(self, w: torch.Tensor, on_out: bool | None = None) -> torch.Tensor:
        on_out = self.wd_on_out if on_out is None else on_out
        if on_out:
            n = w.reshape(w.shape[0], -1).norm(dim=1)
        else:
            n = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        return n.reshape(self._wd_shape(on_out)) + torch.finfo(torch.float32).eps

    # ---- helpers --------------------------------------------------------------------------------------------------
    def plus_parameters(self) -> list[nn.Parameter]:
        """The "B"/output-side parameters LoRA+ trains at a higher learning rate."""
        return []


def alpha_or_rank(alpha, rank: int) -> float:
    """sd-scripts: alpha None or 0 means alpha = rank (scale 1)."""
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha.detach().float())
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def kaiming_(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


# ---- the forward hook ---------------------------------------------------------------------------------------------
class _Host:
    """Replaces a base layer's forward: base output plus the deltas of every adapter attached, in order.

    One host per layer lets several LoRAs stack and be removed in any order. Per call it costs one loop over the
    (usually one) attached adapters."""

    __slots__ = ("orig_forward", "adapters", "had_instance_forward")

    def __init__(self, module: nn.Module):
        self.had_instance_forward = "forward" in module.__dict__
        self.orig_forward = module.forward
        self.adapters: list[AdapterModule] = []

    def __call__(self, x, *args, **kwargs):
        y = self.orig_forward(x, *args, **kwargs)
        for a in self.adapters:
            if a.enabled:
                d = a.forward_delta(x)
                if d is not None:
                    y = y + d.to(y.dtype)
        return y


def attach(adapter: AdapterModule) -> None:
    module = adapter.org_module
    host = module.__dict__.get("_lorakit_host")
    if host is None:
        host = _Host(module)
        module.__dict__["_lorakit_host"] = host
        module.forward = host
    if adapter not in host.adapters:
        host.adapters.append(adapter)


def detach(adapter: AdapterModule) -> None:
    module = adapter.org_module
    host = module.__dict__.get("_lorakit_host")
    if host is None:
        return
    host.adapters = [a for a in host.adapters if a is not adapter]
    if not host.adapters:
        del module.__dict__["_lorakit_host"]
        if host.had_instance_forward:
            module.forward = host.orig_forward
        else:
            del module.forward


def attached_adapters(module: nn.Module) -> list[AdapterModule]:
    host = module.__dict__.get("_lorakit_host")
    return list(host.adapters) if host else []
