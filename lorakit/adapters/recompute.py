"""The training forward of adapters whose change is a full-size weight (LoHa, LoKr, DoRA, full): the weight change is
built from the small factors, used once, and dropped; backward builds it again.

Plain autograd through `op(x, delta_weight())` keeps every intermediate of the delta alive until backward: LoHa's two
full-size products and their Hadamard product, LoKr's Kronecker product, DoRA's re-normalised weight, and the delta
itself (saved by the linear/conv for the input gradient) - several copies of every targeted weight, 3x LoRA's peak
memory on SD1.5. Here autograd keeps only the layer input `x` (which LoRA keeps too) and the factors; backward spends
one more small matmul per factor product to rebuild the change, the same trade LyCORIS' weight functions make, and
each algorithm's `delta_backward` writes the chain rule out so that no more than ~3 full-size tensors of ONE layer
exist at a time (e.g. 3 x 118 MB for SD1.5's largest 3x3 conv, 2560 -> 1280).

`fused`: the op runs with W + change instead of base(x) + op(x, change) - one full-size op instead of two in forward
and backward (float32 only: see AdapterModule.forward_fused).
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


class RebuiltDelta(torch.autograd.Function):
    """y = op(x, weight, bias) where (weight, bias) = adapter.layer_weights(multiplier, keep, fused); saves x and the
    parameters, never a full-size tensor. `keep` is the rank-dropout mask, drawn once in forward and replayed."""

    @staticmethod
    def forward(ctx, x, adapter, multiplier, keep, fused, *params):
        # under autocast the op runs in its dtype: keep x in it too (an fp32 activation saved for backward would
        # double what the bf16 run keeps; the base layer casts the same way)
        dt = compute_dtype(x)
        x = x if x.dtype == dt else x.to(dt)
        with torch.no_grad():
            w, b = adapter.layer_weights(multiplier, keep, fused)
            y = adapter._op(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        ctx.adapter, ctx.multiplier, ctx.keep, ctx.fused = adapter, multiplier, keep, fused
        ctx.save_for_backward(x, *params)
        del w, b
        release_freed_memory(adapter, x)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, *params = ctx.saved_tensors
        a, m = ctx.adapter, ctx.multiplier
        has_bias = a.delta_bias() is not None
        with torch.no_grad():
            dora = a.dora_state(ctx.keep) if a.wd else None  # W + dW and its norm: built once for both uses
            gx = None
            if ctx.needs_input_grad[0]:
                w, _ = a.layer_weights(m, ctx.keep, ctx.fused, dora)
                gx = _input_grad(a, x, gy, w.to(x.dtype))
                del w
            gw, gb = _weight_grad(a, x, gy, has_bias)
            pairs = a.change_backward(gw.float(), m, ctx.keep, dora)
            del dora
            if has_bias:
                pairs.append((a.diff_b, gb.float() * m))
        by_id = {id(p): g.to(p.dtype).reshape(p.shape) for p, g in pairs}
        del pairs, gw
        release_freed_memory(a, x)
        return (gx, None, None, None, None, *[by_id.get(id(p)) if p.requires_grad else None for p in params])


def _input_grad(adapter, x, gy, weight):
    gy = gy.to(x.dtype)
    if adapter.is_conv:
        kw = adapter._conv_kw
        return torch.ops.aten.convolution_backward(
            gy, x, weight, None, list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]), False, [0, 0],
            kw["groups"], [True, False, False])[0]
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
