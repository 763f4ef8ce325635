"""The training forward of adapters whose change is a full-size weight (LoHa, LoKr, DoRA, full): the weight change is
built from the small factors, used once, and dropped; backward builds it again.

Plain autograd through `op(x, delta_weight())` keeps every intermediate of the delta alive until backward: LoHa's two
full-size products and their Hadamard product, LoKr's Kronecker product, DoRA's re-normalised weight, and the delta
itself (saved by the linear/conv for the input gradient) - several copies of every targeted weight, 3x LoRA's peak
memory on SD1.5. Here autograd keeps only the layer input `x` (which LoRA keeps too) and the factors; backward spends
one more small matmul per factor product to rebuild the change, the same trade LyCORIS' weight functions make, and
each algorithm's `delta_backward` writes the chain rule out so that no more than ~3 full-size tensors of ONE layer
exist at a time (e.g. 3 x 118 MB for SD1.5's largest 3x3 conv, 2560 -> 1280).

The forms (AdapterModule._rebuilt): "change", op(x, change), added to the base layer's output by the host; the whole
layer as "merged", one op with W + change (float32), or "sum", base(x) + op(x, change) (half precision: see
AdapterModule.whole_layer_form).
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch

from lorakit.models.dnn_linear import fp32_linear
from lorakit.models.dtypes import compute_dtype

# Freed blocks of a few to a few tens of MB stay in glibc's heap (its mmap threshold rises to 32 MB once big blocks
# are freed) and keep counting as resident memory: the rebuilt weights, freed between activations, left SD1.5 LoHa
# and DoRA runs 0.8 GB above their live tensors. Handing them back after each layer that built a large one keeps
# the peak at LoRA's, for ~1% of the step time (measured; a fixed low mmap threshold instead costs 16%).
_TRIM_BYTES = 16 << 20
try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _malloc_trim = None


def release_freed_memory(adapter, x: torch.Tensor) -> None:
    if _malloc_trim is not None and x.device.type == "cpu" and math.prod(adapter.shape) * 4 >= _TRIM_BYTES:
        _malloc_trim(0)


def rebuilt_delta(x, adapter, multiplier: float, keep, form: str, params) -> torch.Tensor:
    """adapter.rebuilt_op(x, multiplier, keep, form) for training: autograd keeps x and the parameters, never a
    full-size tensor. `keep` is the rank-dropout mask, drawn once in forward and replayed in backward.

    Two nodes, as LoRA's Linear (adapters.lora.lora_linear) and for the same reason: under non-reentrant gradient
    checkpointing (diffusers' kind) backward recomputes a block only up to the last tensor a node saved, and a custom
    node saves when its forward has returned. One node saving x made a block's last LoHa/LoKr/DoRA layer (a
    transformer block's ff.net.2, a resnet's conv2 under conv_dim) rebuild its weight and redo its full-size op in
    the recomputation for nothing. Here `_SaveInput` saves x and computes nothing; `_RebuiltOp` runs the op and saves
    no tensor (the input gradient needs only x's shape), and hands its output gradient to `_SaveInput`'s backward,
    which computes the weight gradient there, where x is. In "sum" form the base op runs inside `_RebuiltOp` too:
    as a node of its own it saves its tensors after the change's op has run, which the recomputation would redo."""
    link = _Link()
    token = _SaveInput.apply(x, adapter, multiplier, keep, link, *params)
    return _RebuiltOp.apply(x, token, adapter, multiplier, keep, form, link)


class _Link:
    """What one layer's two nodes hand each other: in forward x in the compute dtype (cast once), in backward the
    output gradient and DoRA's (W + dW, norm), built once for both (`_SaveInput`'s backward runs right after
    `_RebuiltOp`'s: the token is its only way back)."""

    __slots__ = ("x", "gy", "dora")

    def __init__(self):
        self.x = self.gy = self.dora = None


class _SaveInput(torch.autograd.Function):
    """Saves x; its output is a scalar token for `_RebuiltOp`, whose backward leaves gy in the link. Backward: the
    weight gradient g^T x, then each parameter's through the algorithm's chain rule (`change_backward`)."""

    @staticmethod
    def forward(ctx, x, adapter, multiplier, keep, link, *params):
        # under autocast the op runs in its dtype: x is kept in it (an fp32 activation saved for backward would
        # double what the bf16 run keeps; the base layer casts the same way)
        dt = compute_dtype(x)
        link.x = x = x if x.dtype == dt else x.to(dt)
        ctx.save_for_backward(x)
        # the parameters as passed, to give each its gradient: not matched through saved tensors, which under
        # non-reentrant checkpointing come back as other objects (matched by identity, no UNet adapter got one)
        ctx.adapter, ctx.multiplier, ctx.keep, ctx.link, ctx.params = adapter, multiplier, keep, link, params
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        (x,) = ctx.saved_tensors
        a, link = ctx.adapter, ctx.link
        gy, dora = link.gy, link.dora
        link.gy = link.dora = None
        has_bias = a.delta_bias() is not None
        with torch.no_grad():
            gw, gb = _weight_grad(a, x, gy, has_bias)
            del gy
            pairs = a.change_backward(gw.float(), ctx.multiplier, ctx.keep, dora)
            del dora, gw
            if has_bias:
                pairs.append((a.diff_b, gb.float() * ctx.multiplier))
        by_id = {id(p): g.to(p.dtype).reshape(p.shape) for p, g in pairs}
        del pairs
        release_freed_memory(a, x)
        return (None, None, None, None, None,
                *[by_id.get(id(p)) if p.requires_grad else None for p in ctx.params])


class _RebuiltOp(torch.autograd.Function):
    """The op with the rebuilt weight. Keeps x's shape and dtype, never x (see `rebuilt_delta`). Backward: the input
    gradient g W', and gy to the link."""

    @staticmethod
    def forward(ctx, x, token, adapter, multiplier, keep, form, link):
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        x, link.x = link.x, None  # in the compute dtype
        y = adapter.rebuilt_op(x, multiplier, keep, form)  # forward runs without grad: weights built in place
        ctx.adapter, ctx.multiplier, ctx.keep, ctx.form, ctx.link = adapter, multiplier, keep, form, link
        ctx.dt = x.dtype
        release_freed_memory(adapter, x)
        return y

    @staticmethod
    def backward(ctx, gy):
        a, link = ctx.adapter, ctx.link
        gx = None
        with torch.no_grad():
            link.dora = a.dora_state(ctx.keep) if a.wd else None
            if ctx.needs_input_grad[0]:
                g = gy.to(ctx.dt)
                w, _ = a.layer_weights(ctx.multiplier, ctx.keep, ctx.form == "merged", link.dora)
                gx = _input_grad(a, ctx.x_shape, g, w.to(ctx.dt))
                del w
                if ctx.form == "sum":  # the base layer's input gradient, added in x's dtype as autograd adds the
                    # two nodes' (float32 under autocast: each rounded to the compute dtype, not their sum)
                    base = _input_grad(a, ctx.x_shape, g, a.org_module.weight.to(ctx.dt))
                    gx = base.to(ctx.x_dtype).add_(gx.to(ctx.x_dtype))
        link.gy = gy
        return gx, gy.new_zeros(()), None, None, None, None, None


def _input_grad(adapter, x_shape, gy, weight):
    if adapter.is_conv:
        kw = adapter._conv_kw
        # the input's values are not read for its gradient: a zero-stride stand-in of its shape (torch's own
        # nn.grad.conv2d_input passes the same)
        return torch.ops.aten.convolution_backward(
            gy, gy.new_empty(1).expand(x_shape), weight, None, list(kw["stride"]), list(kw["padding"]),
            list(kw["dilation"]), False, [0, 0], kw["groups"], [True, False, False])[0]
    return fp32_linear(gy, weight.t())  # g W


def _weight_grad(adapter, x, gy, need_bias: bool):
    gy = gy.to(x.dtype)
    if adapter.is_conv:
        kw = adapter._conv_kw
        _, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, _shape_only(adapter, x),
            [adapter.shape[0]] if need_bias else None, list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]),
            False, [0, 0], kw["groups"], [False, True, need_bias])
        return gw, gb
    g2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
    # g^T x; in float32 through oneDNN with both as transposed views (1024 tokens, 320 -> 2560: 8.0 -> 5.0 ms)
    return fp32_linear(g2.t(), x2.t()), (g2.sum(0) if need_bias else None)


def _shape_only(adapter, x):
    # convolution_backward reads only the weight's shape when the input gradient is not asked for; an expanded
    # scalar has that shape without allocating it
    return torch.zeros((), dtype=x.dtype, device=x.device).expand(adapter.shape)
