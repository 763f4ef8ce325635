"""LoRA / LoCon (sd-scripts networks.lora, LyCORIS "lora"/"locon"), with optional Tucker `lora_mid` and DoRA.

delta W = (alpha / rank) * up @ down. Linear: down (r, in), up (out, r). Conv: down has the base kernel, stride and
padding (r, in, kh, kw); up is 1x1 (out, r, 1, 1). Tucker (LyCORIS use_tucker, 3x3 only): down 1x1, mid (r, r, kh, kw)
with the base stride/padding, up 1x1; delta = einsum(mid, up, down).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import AdapterModule, alpha_or_rank, kaiming_, layer_kind, rescale_kept
from lorakit.models.dnn_linear import DnnLinear, dnn_pays, fp32_linear
from lorakit.models.dtypes import compute_dtype


class LoRAModule(AdapterModule):
    algo = "lora"

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, use_tucker: bool = False, weight_decompose: bool = False,
                 wd_on_out: bool = False, **_ignored):
        super().__init__(lora_name, org_module, multiplier)
        kind = layer_kind(org_module)
        self.lora_dim = int(lora_dim)
        r = self.lora_dim
        self.tucker = False
        if kind == "linear":
            self.lora_down = nn.Linear(org_module.in_features, r, bias=False)
            self.lora_up = nn.Linear(r, org_module.out_features, bias=False)
        else:
            cin, cout, k = org_module.in_channels, org_module.out_channels, org_module.kernel_size
            kw = dict(stride=org_module.stride, padding=org_module.padding, dilation=org_module.dilation)
            if org_module.groups != 1:
                raise TypeError(f"{lora_name}: grouped convolutions are not supported")
            if use_tucker and kind == "conv":
                self.tucker = True
                self.lora_down = nn.Conv2d(cin, r, 1, bias=False)
                self.lora_mid = nn.Conv2d(r, r, k, bias=False, **kw)
            else:
                self.lora_down = nn.Conv2d(cin, r, k, bias=False, **kw)
            self.lora_up = nn.Conv2d(r, cout, 1, bias=False)
        # a 1x1 convolution with stride 1 and no padding is a matrix product over the channel axis
        self._pointwise = kind == "conv1x1" and not self.tucker and tuple(org_module.stride) == (1, 1) \
            and tuple(org_module.padding) == (0, 0) and tuple(org_module.dilation) == (1, 1)
        alpha = alpha_or_rank(alpha, r)
        self.scale = alpha / r
        self.register_buffer("alpha", torch.tensor(alpha))
        self._alpha_f = alpha
        kaiming_(self.lora_down.weight)
        if self.tucker:
            kaiming_(self.lora_mid.weight)
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        if weight_decompose:
            self._init_dora(wd_on_out)

    @property
    def rank(self) -> int:
        return self.lora_dim

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, w: dict[str, torch.Tensor]) -> "LoRAModule":
        down, up = w["lora_down.weight"], w["lora_up.weight"]
        mod = cls(lora_name, org_module, lora_dim=down.shape[0], alpha=w.get("alpha"), use_tucker="lora_mid.weight" in w)
        mod._check("lora_down.weight", down, mod.lora_down.weight)
        mod._check("lora_up.weight", up, mod.lora_up.weight)
        with torch.no_grad():
            mod.lora_down.weight.copy_(down.reshape(mod.lora_down.weight.shape))
            mod.lora_up.weight.copy_(up.reshape(mod.lora_up.weight.shape))
            if mod.tucker:
                mod.lora_mid.weight.copy_(w["lora_mid.weight"])
        if "alpha" not in w:
            mod.alpha.fill_(float(down.shape[0]))  # old files without alpha: sd-scripts uses alpha = rank
        if "dora_scale" in w:
            mod._init_dora(False, w["dora_scale"])
        return mod

    def _check(self, key: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if got.numel() != want.numel():
            raise ValueError(f"{self.lora_name}.{key}: shape {tuple(got.shape)} does not fit the model layer "
                             f"{tuple(self.shape)} (expected {tuple(want.shape)})")

    def up_weight(self) -> torch.Tensor:
        """The up factor as it acts (SplitLoRAModule keeps only its diagonal blocks)."""
        return self.lora_up.weight

    def delta_weight(self) -> torch.Tensor:
        up = self.up_weight().float().flatten(1)
        if self.tucker:
            down = self.lora_down.weight.float().flatten(1)
            d = torch.einsum("ijkl,oi,jn->onkl", self.lora_mid.weight.float(), up, down)
            return d.reshape(self.shape) * self.scale
        # the scale on the small factor: a full-size pass fewer (DoRA builds this change twice a step)
        return ((up * self.scale) @ self.lora_down.weight.float().flatten(1)).reshape(self.shape)

    @property
    def full_size_change(self) -> bool:
        return self.wd  # DoRA needs the whole weight; plain LoRA runs on the rank-r activations

    def delta_backward(self, g: torch.Tensor):
        if self.tucker:
            return super().delta_backward(g)
        up, down = self.lora_up.weight, self.lora_down.weight
        g2 = g.reshape(self.shape[0], -1)
        return [(up, (g2 @ down.float().flatten(1).t()).mul_(self.scale)),
                (down, (up.float().flatten(1).t() @ g2).mul_(self.scale))]

    def plus_parameters(self):
        return [self.lora_up.weight]

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.wd:
            return super().forward_fused(x)
        org = self.org_module
        if self.is_conv or self.tucker or type(org) not in (nn.Linear, DnnLinear) or (self.training and (
                self.dropout or self.rank_dropout or self.module_dropout)):
            return None
        return lora_linear(x, org.weight, org.bias, self.lora_down.weight, self.up_weight(),
                           self.scale * self.multiplier * self.module_weight)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.wd:
            return super().forward_delta(x)
        training = self.training
        if training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        if self._pointwise and not (training and (self.dropout or self.rank_dropout)) and x.dim() == 4 \
                and x.is_contiguous():
            return LoRAPointwise.apply(x, self.lora_down.weight, self.up_weight(),
                                       self.scale * self.multiplier * self.module_weight)
        # compute in the activations' dtype: casting the small factors costs nothing, casting x (an activation)
        # to fp32 would copy it, and under autocast it would be cast back again
        dt = compute_dtype(x)
        down = self.lora_down.weight
        lx = self._low_rank_op(x, down if down.dtype == dt else down.to(dt), self.lora_down)
        if self.tucker:
            mid = self.lora_mid.weight
            lx = self._low_rank_op(lx, mid if mid.dtype == dt else mid.to(dt), self.lora_mid)
        scale = self.scale
        if training:
            if self.dropout:
                lx = F.dropout(lx, p=self.dropout)
            if self.rank_dropout:  # one draw per sample of the batch, over the rank channels
                mask = (torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout).to(lx.dtype)
                if self.rank_dropout_rescale == "expected":
                    scale = scale / (1.0 - self.rank_dropout)  # sd-scripts: as if the rank were smaller
                else:
                    mask = rescale_kept(mask, self.rank_dropout, self.rank_dropout_rescale)
                mask = mask.view(lx.size(0), self.lora_dim, 1, 1) if self.is_conv \
                    else mask.view(lx.size(0), *([1] * (lx.dim() - 2)), self.lora_dim)
                lx = lx * mask
        # the scale goes into the (out x r) up weight, not over the (tokens x out) output
        up = self.up_weight() * (scale * self.multiplier * self.module_weight)
        return self._low_rank_op(lx, up.to(dt), self.lora_up)

    @staticmethod
    def _low_rank_op(x: torch.Tensor, weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
        return F.linear(x, weight)


class SplitLoRAModule(LoRAModule):
    """sd-scripts' FLUX `split_qkv`: one LoRA of rank r per part of a fused layer (q, k, v of `img_attn.qkv`; q, k,
    v and the MLP input of a single block's `linear1`), each part with its own down (r, in) and up (part, r).

    Stored as what sd-scripts saves (networks/lora_flux.py, LoRANetwork.state_dict): one LoRA of rank k r whose down
    is the parts' downs stacked and whose up is block-diagonal, so every loader reads it as a plain LoRA. The up's
    off-diagonal blocks never act (the forward keeps only the diagonal blocks, so they get no gradient and are saved
    as zeros). One difference, on purpose: sd-scripts trains each part at alpha / r but saves the module's alpha
    unchanged, so loaders, dividing by the file's rank k r, apply a third (a quarter for linear1) of what was trained
    (sd-scripts issue #2204). Here the file's alpha is k alpha, and the file acts as trained."""

    def __init__(self, lora_name: str, org_module: nn.Module, parts: tuple[int, ...], multiplier: float = 1.0,
                 lora_dim: int = 4, alpha: float | None = 1.0, **kw):
        if kw.get("weight_decompose") or kw.get("use_tucker"):
            raise ValueError("split_qkv is plain LoRA only (no DoRA, no Tucker)")
        if sum(parts) != org_module.out_features:
            raise ValueError(f"{lora_name}: parts {parts} do not add up to {org_module.out_features} outputs")
        k, r = len(parts), int(lora_dim)
        super().__init__(lora_name, org_module, multiplier, k * r, k * alpha_or_rank(alpha, r), **kw)
        self.parts, self.part_rank = tuple(parts), r
        self._register_state_dict_hook(_save_diagonal_up)  # runs after the children (lora_up) wrote theirs

    def up_weight(self) -> torch.Tensor:
        up, rows, r = self.lora_up.weight, 0, self.part_rank
        blocks = []
        for j, p in enumerate(self.parts):
            blocks.append(up[rows:rows + p, j * r:(j + 1) * r])
            rows += p
        return torch.block_diag(*blocks)

    def delta_backward(self, g: torch.Tensor):
        (up, g_up), down_pair = super().delta_backward(g)
        keep = torch.block_diag(*[torch.ones(p, self.part_rank, dtype=torch.bool, device=g.device) for p in self.parts])
        return [(up, g_up * keep), down_pair]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        up = state_dict.get(prefix + "lora_up.weight")
        if up is not None and tuple(up.shape) == tuple(self.lora_up.weight.shape):
            rows, r, off = 0, self.part_rank, up.clone()
            for j, p in enumerate(self.parts):
                off[rows:rows + p, j * r:(j + 1) * r] = 0
                rows += p
            if off.abs().max() > 0:
                from lorakit.errors import UserError

                raise UserError(f"{self.lora_name}: these weights are one LoRA over the whole fused layer (its up is "
                                "not block-diagonal), not split_qkv's LoRA per part; load them without "
                                "network_args split_qkv=True.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _save_diagonal_up(module: SplitLoRAModule, state_dict, prefix, _local_metadata):
    """The up as it acts: the off-diagonal blocks saved as exact zeros."""
    up = module.up_weight()
    state_dict[prefix + "lora_up.weight"] = up.detach()


def lora_linear(x, weight, bias, down, up, scale):
    """y = x W^T + b + s (x D^T) U^T for a frozen Linear W with LoRA factors D (r, in), U (out, r), as two autograd
    nodes: `_LoRADown` (the rank-r activations, keeping x for the down factor's gradient) and `_LoRALinear` (the
    frozen product with the rank-r term added in, and every gradient but the down factor's).

    Why two: under non-reentrant gradient checkpointing (diffusers' default) the backward recomputes a checkpointed
    block only up to the last tensor any node saved, and a custom node saves when its forward has returned. With one
    node saving x, the block's last LoRA layer (a transformer block's `ff.net.2`) redid its full frozen product for
    nothing, where a frozen layer's own op saves before computing and is skipped (1.4 GFLOP a block at SD1.5's
    512 px, 13 at SDXL's 1024 px; measured, bf16 with checkpointing: SDXL 1024 px 39.3 -> 37.8 s a step, SD1.5
    256 px 1.31-1.34 -> 1.23-1.25 s; benchmarks/bench_train.py). Here x is saved by the cheap down
    product and `_LoRALinear` saves no tensor through the autograd machinery at all (see there), so the
    recomputation stops before the frozen product."""
    dt = compute_dtype(x)
    x = _cast(x, dt)  # once, as an autograd op, for both nodes (an fp32 activation under bf16 autocast)
    if not torch.is_grad_enabled():  # sampling: the same products without the nodes' bookkeeping
        return _base_plus_rank_r(x, fp32_linear(x.reshape(-1, x.shape[-1]), _cast(down, dt)), weight, bias, up, scale)
    lx = _LoRADown.apply(x, down)
    return _LoRALinear.apply(x, lx, weight, bias, down, up, scale)


def _base_plus_rank_r(x, lx, weight, bias, up, scale):
    """x W^T + b, then s lx U^T added into it in place (one addmm, the scale as its alpha)."""
    dt = x.dtype
    y = fp32_linear(x, _cast(weight, dt), None if bias is None else _cast(bias, dt))
    y.view(-1, y.shape[-1]).addmm_(lx, _cast(up, dt).t(), alpha=scale)
    return y


class _LoRADown(torch.autograd.Function):
    """lx = x D^T in the compute dtype, tokens flattened to rows: (tokens, r). x's gradient through this node is
    left to `_LoRALinear`, which adds it into the frozen layer's in one product."""

    @staticmethod
    def forward(ctx, x, down):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2)
        return fp32_linear(x2, _cast(down, x.dtype))

    @staticmethod
    def backward(ctx, glx):
        (x2,) = ctx.saved_tensors
        gdown = _rank_product(glx, x2, 1.0) if ctx.needs_input_grad[1] else None
        return None, gdown


class _LoRALinear(torch.autograd.Function):
    """y = x W^T + b + s lx U^T with lx = x D^T from `_LoRADown`: the rank-r product is added into the base output
    by one in-place addmm and the scale rides on the GEMMs' alpha; backward accumulates the LoRA's input gradient
    into the base's with another addmm - no full-size elementwise pass. Its float32 products go through oneDNN where
    that is faster (models.dnn_linear), like the frozen layers around it.

    Saves nothing through `save_for_backward` (why: `lora_linear`): it keeps as attributes the frozen weight as
    stored (a parameter: held anyway; an fp8 base is cast again in backward, not kept cast), the factors as
    parameters (cast again in backward: a few microseconds, and under checkpointing no cast copy is held) and lx
    (tokens x r: what the unfused form keeps too; under checkpointing it is kept instead of recomputed, ~1% of the
    activations the checkpoint frees). The factors' gradients are returned in the compute dtype: autograd casts
    them to the parameters' dtype (one op fewer each on the Python side, which is most of a rank-16 layer's cost at
    SD's sizes on a CPU)."""

    @staticmethod
    def forward(ctx, x, lx, weight, bias, down, up, scale):
        y = _base_plus_rank_r(x, lx, weight, bias, up, scale)
        ctx.scale, ctx.dt, ctx.x_shape = scale, x.dtype, x.shape
        ctx.lx, ctx.weight, ctx.down, ctx.up = lx, weight, down, up
        return y

    @staticmethod
    def backward(ctx, gy):
        dt, s = ctx.dt, ctx.scale
        g2 = _cast(gy, dt).reshape(-1, gy.shape[-1])
        glx = fp32_linear(g2, _cast(ctx.up, dt).t())  # lx's gradient, (tokens, r)
        if s != 1.0:
            glx.mul_(s)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = fp32_linear(g2, _cast(ctx.weight, dt).t()).addmm_(glx, _cast(ctx.down, dt)).view(ctx.x_shape)
        gup = _rank_product(ctx.lx, g2, s).t() if ctx.needs_input_grad[5] else None
        return gx, glx, None, None, None, gup, None


class LoRAPointwise(torch.autograd.Function):
    """s U (D x) for a 1x1 convolution's LoRA (D (r, in, 1, 1), U (out, r, 1, 1)) as matrix products on x's
    (batch, channels, positions) view: what two chained 1x1 convolutions compute, without the convolution's per-call
    weight reorder and its backward's separate weight- and input-gradient passes (SD's proj_in/proj_out: 1.55 ->
    1.1 ms forward + backward a layer at 32x32 in bf16). The frozen convolution stays the layer's own. Saves x (the
    convolution keeps it too) and the rank-r activations."""

    @staticmethod
    def forward(ctx, x, down, up, scale):
        dt = compute_dtype(x)
        x = x if x.dtype == dt else x.to(dt)
        n, c, h, w = x.shape
        d = _cast(down, dt).reshape(down.shape[0], c)
        u = _cast(up, dt).reshape(up.shape[0], -1)
        x3 = x.view(n, c, h * w)
        lx = _left_mm(d, x3)  # (n, r, positions)
        out = _left_mm(u, lx, scale)
        ctx.scale = scale
        ctx.save_for_backward(x, lx, d, u)
        return out.view(n, u.shape[0], h, w)

    @staticmethod
    def backward(ctx, gy):
        x, lx, d, u = ctx.saved_tensors
        s = ctx.scale
        n, c, h, w = x.shape
        g3 = _cast(gy, x.dtype).reshape(n, -1, h * w)
        glx = _left_mm(u.t(), g3)  # (n, r, positions), unscaled
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _left_mm(d.t(), glx, s).view(n, c, h, w)
        x3 = x.view(n, c, h * w)
        gdown = gup = None
        if ctx.needs_input_grad[1]:
            gdown = _batch_summed(glx, x3, s).view(-1, c, 1, 1)
        if ctx.needs_input_grad[2]:
            gup = _batch_summed(g3, lx, s).view(u.shape[0], -1, 1, 1)
        return gx, gdown, gup, None


def _cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dt else t.to(dt)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s (a @ b) with the scale as the GEMM's alpha (no separate pass)."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=s)


def _rank_product(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s a^T b for a (tokens, r) and b (tokens, k): a factor's gradient, (r, k). In float32 on an x86 CPU through
    oneDNN with the rank as the product's rows (1024 tokens x 2560: 0.2 ms; MKL 0.8, oneDNN with the rank as columns
    1.5)."""
    if dnn_pays(b, a):
        return fp32_linear(a.t(), b.t()).mul_(s)
    return _scaled_mm(a.t(), b, s)


def _left_mm(a: torch.Tensor, b: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """s a @ b_i for each b_i of the batch (n, q, k): one 2-D GEMM when n is 1 (a batched one costs more there)."""
    if b.shape[0] == 1:
        return _scaled_mm(a, b[0], s).unsqueeze(0)
    out = torch.matmul(a, b)
    return out.mul_(s) if s != 1.0 else out


def _batch_summed(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s sum_i a_i b_i^T over the batch of (n, p, k) and (n, q, k): one GEMM when n is 1."""
    if a.shape[0] == 1:
        return _scaled_mm(a[0], b[0].t(), s)
    return torch.matmul(a, b.transpose(1, 2)).sum(0).mul_(s)


class DyLoRAModule(LoRAModule):
    """DyLoRA (sd-scripts networks.dylora): each training step picks a rank b (a multiple of `unit`); the forward
    uses ranks [0, b + unit), only the newest `unit` ranks get gradients, and the output is scaled by
    sqrt(dim / (b + unit)) as sd-scripts does. Outside training it is a plain LoRA of the full rank, and the file
    holds plain lora_down/lora_up/alpha (any lower rank is a prefix: `lora resize` can cut it)."""

    algo = "dylora"
    full_size_change = False

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1.0, unit: int = 1, **kw):
        kw.pop("use_tucker", None)
        kw.pop("weight_decompose", None)
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, **kw)
        self.unit = int(unit)
        if self.lora_dim % self.unit:
            raise ValueError(f"DyLoRA: network_dim {self.lora_dim} must be a multiple of unit {self.unit}")

    def forward_delta(self, x):
        if not self.training:
            return super().forward_delta(x)
        if self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        b = int(torch.randint(0, self.lora_dim // self.unit, ())) * self.unit
        r = b + self.unit
        down, up = self.lora_down.weight, self.lora_up.weight
        down = torch.cat([down[:b].detach(), down[b:r]], 0)
        up = torch.cat([up[:, :b].detach(), up[:, b:r]], 1)
        dtype = down.dtype
        x = x if x.dtype == dtype else x.to(dtype)
        if self.is_conv:
            lx = F.conv2d(x, down, None, **self._conv_kw)
            lx = F.dropout(lx, p=self.dropout) if self.dropout else lx
            out = F.conv2d(lx, up)
        else:
            lx = F.linear(x, down)
            lx = F.dropout(lx, p=self.dropout) if self.dropout else lx
            out = F.linear(lx, up)
        return out * (self.scale * (self.lora_dim / r) ** 0.5 * self.multiplier * self.module_weight)
