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

from lorakit.adapters.recompute import rebuilt_delta
from lorakit.models.dnn_linear import fp32_linear
from lorakit.models.dtypes import compute_dtype


def layer_kind(module: nn.Module) -> str:
    """"linear", "conv1x1" or "conv" (any other kernel)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    raise TypeError(f"adapters apply to Linear and Conv2d layers, not {type(module).__name__}")


def rescale_kept(keep: torch.Tensor, p: float, how: str | None) -> torch.Tensor:
    """A 0/1 rank-dropout mask (last dim: the dropped axis) rescaled as `AdapterModule.rank_dropout_rescale` says.
    "mean" of a draw that kept nothing stays 0 (LyCORIS would divide 0 by 0)."""
    if how == "expected":
        return keep / (1.0 - p)
    if how == "mean":
        share = keep.mean(dim=-1, keepdim=True)
        return keep / torch.where(share > 0, share, torch.ones_like(share))
    return keep


class AdapterModule(nn.Module):
    algo = "base"
    additive = True  # the change is W + m * delta (False for DoRA-style, OFT, IA3)
    rank_dropout_on_weight = False  # rank dropout masks rows of the delta weight (LoHa, LoKr), not activations
    # What rank dropout does to the kept part: None leaves it (LyCORIS's default), "mean" divides by the share kept
    # in this draw (LyCORIS's rank_dropout_scale=True), "expected" by 1 - p (sd-scripts' networks.lora).
    rank_dropout_rescale: str | None = None

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
        self.wd_detach_norm = False

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

    def rank_keep(self) -> torch.Tensor | None:
        """The rank-dropout mask of this training forward (kept output rows, rescaled as `rank_dropout_rescale`
        says), or None. Drawn once per forward so the low-memory backward can rebuild exactly the same delta. DoRA
        builds the whole weight, so its LoRA masks rows too (LyCORIS does the same)."""
        if not (self.training and self.rank_dropout and (self.rank_dropout_on_weight or self.wd)):
            return None
        device = next(self.parameters()).device
        keep = (torch.rand(self.shape[0], device=device) > self.rank_dropout).float()
        return rescale_kept(keep, self.rank_dropout, self.rank_dropout_rescale)

    def masked_delta(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        d = self.delta_weight()
        return d if keep is None else d * keep.to(d.dtype).view(-1, *([1] * (d.dim() - 1)))

    def new_weight(self, weight: torch.Tensor, multiplier: float, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The merged base weight (float32) at `multiplier` (`keep`: a rank-dropout mask, training only)."""
        w = weight.float()
        d = self.masked_delta(keep).to(w.device).reshape(w.shape)
        if not self.wd:
            return w + multiplier * d
        # DoRA (A1111/ComfyUI convention): W' = dora_scale * (W + dW) / ||W + dW||, then W + m * (W' - W)
        merged = w + d
        norm = self._wd_norm(merged)
        if self.wd_detach_norm:  # the DoRA paper's section 4.3: the norm is a constant for the gradient
            norm = norm.detach()
        decomposed = merged * (self.dora_scale.float().to(w.device) / norm)
        return w + multiplier * (decomposed - w)

    def weight_change(self, multiplier: float, keep: torch.Tensor | None = None) -> torch.Tensor:
        w = self.org_module.weight
        if self.additive and not self.wd:
            return multiplier * self.masked_delta(keep).reshape(w.shape)
        return self.new_weight(w, multiplier, keep) - w.float()

    def bias_change(self, multiplier: float) -> torch.Tensor | None:
        db = self.delta_bias()
        return None if db is None else db * multiplier

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's op with another weight. Outside autograd (the rebuilt-delta forward, inference) float32
        Linear products go through oneDNN where that is faster (models.dnn_linear), which has no backward."""
        if self.is_conv:
            return F.conv2d(x, weight, bias, **self._conv_kw)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return F.linear(x, weight, bias)
        return fp32_linear(x, weight, bias)

    # ---- training and unmerged inference: the weight change rebuilt from the factors, never kept ----------------
    full_size_change = True  # the forward builds a full-size weight change (False: LoRA's low-rank activations path)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output change, base(x) + this = the adapted layer. Training goes through `rebuilt_delta`
        (keeps x and the factors, never the full-size change); subclasses with a low-rank path override this."""
        return self._rebuilt(x, "change")

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole adapted layer as one autograd node, or None when base(x) + forward_delta(x) must be used. One
        node saves x once for both ops, and under gradient checkpointing lets the recomputation stop before either
        op (adapters.recompute.rebuilt_delta)."""
        if not self.full_size_change:
            return None
        return self._rebuilt(x, self.whole_layer_form(x))

    def whole_layer_form(self, x: torch.Tensor) -> str:
        """"merged": one op with W + change - two full-size ops fewer per layer in forward and backward (LoHa/LoKr/
        DoRA on 3x3 convs cost as much as the convs themselves) - where the op runs in float32; W + change would
        round the change away in a half-precision weight (under autocast too, whatever x's dtype), so there "sum":
        the base op plus the change's op."""
        exact = compute_dtype(x) == torch.float32 and self.org_module.weight.dtype == torch.float32
        return "merged" if exact else "sum"

    def _rebuilt(self, x: torch.Tensor, form: str) -> torch.Tensor | None:
        """The layer in `form`: "change" (the output change only), "merged" or "sum" (the whole layer)."""
        m = self.effective_multiplier
        if self.module_dropout and self.training and torch.rand(()) < self.module_dropout:
            return None if form == "change" else self.base_forward(x)
        keep = self.rank_keep()
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return rebuilt_delta(x, self, m, keep, form, params)
        with torch.no_grad():
            return self.rebuilt_op(x, m, keep, form)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.org_module._lorakit_host.orig_forward(x)

    def rebuilt_op(self, x: torch.Tensor, multiplier: float, keep: torch.Tensor | None, form: str,
                   dora=None) -> torch.Tensor:
        """The layer's output in `form` (see `_rebuilt`), under no_grad; the weights are built and dropped."""
        w, b = self.layer_weights(multiplier, keep, form == "merged", dora)
        y = self._op(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        del w, b
        if form == "sum":
            base = self.base_forward(x)
            y = base.add_(y.to(base.dtype))
        return y

    def layer_weights(self, multiplier: float, keep: torch.Tensor | None, fused: bool, dora=None):
        """(weight, bias) of the op `rebuilt_op` runs: the change (bypass) or W + change (fused), built in place
        (call under no_grad): at most two full-size tensors alive. `dora`: a `dora_state` to build from (kept)."""
        b = self.bias_change(multiplier)
        org = self.org_module
        if fused and org.bias is not None:
            b = org.bias.float() if b is None else b + org.bias
        if self.wd:
            v, n = dora if dora is not None else self.dora_state(keep)
            c = self.dora_scale.float() / n
            # change = m (V c - W); fused: W + change = m V c + (1 - m) W
            w = torch.mul(v, c * multiplier) if dora is not None else v.mul_(c * multiplier)
            off = (1.0 - multiplier) if fused else -multiplier
            return (w.add_(org.weight, alpha=off) if off else w), b
        w = self.lean_change(multiplier, keep)
        return (w.add_(org.weight) if fused else w), b

    def lean_change(self, multiplier: float, keep: torch.Tensor | None = None) -> torch.Tensor:
        """weight_change() with in-place ops (no autograd): a fresh float32 tensor of the weight's shape."""
        if not self.additive or self.wd:  # IA3, OFT (load only), DoRA (layer_weights): the plain formula
            return self.weight_change(multiplier, keep)
        d = self._fresh_delta(keep)
        return d if multiplier == 1.0 else d.mul_(multiplier)  # training's 1.0: a full-size pass fewer

    def _fresh_delta(self, keep: torch.Tensor | None) -> torch.Tensor:
        d = self.delta_weight()
        if any(d is p for p in self.parameters()):
            d = d.clone()
        d = d.reshape(self.shape)
        return d if keep is None else d.mul_(keep.view(-1, *([1] * (d.dim() - 1))))

    def dora_state(self, keep: torch.Tensor | None):
        """(V, n): V = W + dW (fresh float32) and n = ||V|| + eps along the DoRA axis."""
        v = self._fresh_delta(keep).add_(self.org_module.weight)
        return v, self._wd_norm(v)

    def change_backward(self, g: torch.Tensor, multiplier: float, keep: torch.Tensor | None, dora=None):
        """Given g = dLoss/d(weight change) (float32, consumed), the (parameter, gradient) pairs, keeping at most two
        more full-size tensors alive. The chain rule of `weight_change` written out: DoRA's normalisation here, each
        algorithm's delta in its own `delta_backward`."""
        g = g.reshape(self.shape)
        if multiplier != 1.0:  # training's 1.0: a full-size pass fewer
            g = g.mul_(multiplier)
        extra = []
        if self.wd:
            g, gs = self._dora_backward(g, *(dora if dora is not None else self.dora_state(keep)))
            extra.append((self.dora_scale, gs))
        if keep is not None:
            g.mul_(keep.view(-1, *([1] * (g.dim() - 1))))
        return self.delta_backward(g) + extra

    def _dora_backward(self, g: torch.Tensor, v: torch.Tensor, n: torch.Tensor):
        """change = m (V c - W) with V = W + dW, c = s / n, n = ||V|| + eps along the DoRA axis; g is already m x the
        change's gradient. Returns (dLoss/dV, dLoss/ds)."""
        s = self.dora_scale.float()
        gc = _sum_products(g, v, self.wd_on_out)  # dLoss/dc, the shape of s
        gv = g.mul_(s / n)
        if not self.wd_detach_norm:  # dn/dV = V / ||V||
            gv.addcmul_(v, -gc * s / (n * n * (n - torch.finfo(torch.float32).eps)))
        return gv, gc / n

    def delta_backward(self, g: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gradient) pairs from g = dLoss/d(delta_weight()). This generic form rebuilds the delta with
        autograd (its intermediates live only inside this call); algorithms override it with the explicit maths."""
        params = [p for p in self.parameters() if p.requires_grad and p is not getattr(self, "dora_scale", None)
                  and p is not getattr(self, "diff_b", None)]
        with torch.enable_grad():
            d = self.delta_weight()
        grads = torch.autograd.grad(d, params, g.reshape(d.shape), allow_unused=True)
        return [(p, gr) for p, gr in zip(params, grads) if gr is not None]

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
        if not on_out and w.device.type == "cpu" and not (torch.is_grad_enabled() and w.requires_grad):
            n = _column_norms(w)
        else:
            keep_dim = 0 if on_out else 1
            # reduce over the other axes in place: a transpose + reshape would copy the whole weight
            n = torch.linalg.vector_norm(w, dim=[d for d in range(w.dim()) if d != keep_dim], keepdim=True)
        return n + torch.finfo(torch.float32).eps

    # ---- helpers --------------------------------------------------------------------------------------------------
    def plus_parameters(self) -> list[nn.Parameter]:
        """The "B"/output-side parameters LoRA+ trains at a higher learning rate."""
        return []


def alpha_or_rank(alpha, rank: int) -> float:
    """sd-scripts: alpha None or 0 means alpha = rank (scale 1)."""
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha.detach().float())
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def _column_norms(w: torch.Tensor, chunk_elems: int = 1 << 18) -> torch.Tensor:
    """||w[:, j, ...]|| for each input column j, shaped like a per-column dora_scale. torch's vector_norm over the
    leading axis reads the weight with a stride (CPU, 10240 x 1280 float32: 14.7 ms; DoRA takes this norm two or
    three times a layer and step); sums of squares over blocks of rows that stay in cache: 1.7 ms. CPU only: on a
    GPU the loop's launches would cost more than the strided read."""
    w3 = w.reshape(w.shape[0], w.shape[1], -1)
    step = max(1, chunk_elems // max(1, w3[0].numel()))
    acc = torch.zeros(w3.shape[1:], dtype=w.dtype, device=w.device)
    for i in range(0, w3.shape[0], step):
        acc.add_(w3[i:i + step].square().sum(0))
    return acc.sum(-1).sqrt_().reshape(1, w.shape[1], *([1] * (w.dim() - 2)))


def _sum_products(g: torch.Tensor, v: torch.Tensor, on_out: bool, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """sum(g * v) over every axis but the DoRA one (rows when on_out, else input columns), shaped like dora_scale,
    in row chunks so the product never exists at full size."""
    rows = g.shape[0]
    step = max(1, chunk_elems // max(1, g[0].numel()))
    parts = []
    for i in range(0, rows, step):
        prod = g[i:i + step] * v[i:i + step]
        parts.append(prod.flatten(1).sum(1) if on_out else prod.sum(dim=[d for d in range(prod.dim()) if d != 1]))
    if on_out:
        return torch.cat(parts).reshape(rows, *([1] * (g.dim() - 1)))
    return torch.stack(parts).sum(0).reshape(1, g.shape[1], *([1] * (g.dim() - 2)))


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
        if len(self.adapters) == 1 and not args and not kwargs and self.adapters[0].enabled:
            y = self.adapters[0].forward_fused(x)  # the whole layer as one node where the adapter has one
            if y is not None:
                return y
        # the changes before the base output: under non-reentrant gradient checkpointing backward recomputes a block
        # only up to its last saved tensor, and the base layer's op saves before it computes, so a block ending in an
        # adapted layer (a resnet's conv2 under LoCon) skips its base product; computed after the changes' products,
        # whose tensors are saved later, the base product would be redone for nothing
        deltas = [d for d in (a.forward_delta(x) for a in self.adapters if a.enabled) if d is not None]
        y = self.orig_forward(x, *args, **kwargs)
        for d in deltas:
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
