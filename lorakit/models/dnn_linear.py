"""float32 matrix products of frozen Linear layers through oneDNN on x86 CPUs.

Why: torch's CPU float32 matmul calls MKL's sgemm, which on non-Intel x86 CPUs runs its AVX2 code (MKL picks its
code path by CPU vendor). On a 2-core AVX-512 AMD EPYC (Zen 5) that is 210 GFLOPS; oneDNN's float32 GEMM, which
torch already uses for its convolutions and bf16 matmuls, runs the same products at 445-470 GFLOPS, forward and
the input-gradient product alike (SD1.5 shapes, benchmarks/bench_dnn_linear.py); held to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2) it is still 10-15% faster than MKL there. In a float32 SD1.5 step the Linear layers' GEMMs
are a third of the time. torch reaches oneDNN's plain GEMM only through `mkldnn::_linear_pointwise` (inductor's
CPU linear): no autograd formula, so frozen layers get one here (x's gradient only). Same maths, other rounding.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.models.dtypes import compute_dtype


def _find_op():
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):  # a torch without the op
        return None


_LINEAR = _find_op()


def dnn_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether y = x W^T runs through oneDNN here: an x86 CPU, float32 compute, float32 weight."""
    return _LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32 \
        and weight.dtype == torch.float32 and compute_dtype(x) == torch.float32


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b without autograd (callers own the backward): oneDNN where `dnn_pays`, else torch's matmul.
    `weight` may be a transposed view (W^T for an input gradient): oneDNN reads it as it lies."""
    if dnn_pays(x, weight):
        return _LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W and b through oneDNN; backward gives x's gradient only, g W, through oneDNN too
    (W^T passed as the weight, no copy). Keeps only W, which the layer holds anyway, as an attribute rather than
    through `save_for_backward`: a custom node saves when its forward has returned, and non-reentrant gradient
    checkpointing recomputes a block up to its last saved tensor - a block ending in this layer would redo its
    product for nothing (torch's own linear saves before computing)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return _LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, gy):
        weight = ctx.weight
        return _LINEAR(gy.to(weight.dtype), weight.t(), None, "none", [], ""), None, None


class DnnLinear(nn.Linear):
    """An nn.Linear whose frozen float32 products run through oneDNN (`use_dnn_linears` swaps the class of a
    model's Linear layers: parameters, hooks and state dict keys unchanged). A trained weight or bias, another
    dtype, autocast or another device take nn.Linear's own path."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if dnn_pays(input, w) and not w.requires_grad and (b is None or not b.requires_grad):
            return _FrozenLinear.apply(input, w, b)
        return super().forward(input)


def swap_classes(module: nn.Module, plain: type, fast: type) -> int:
    """Make every submodule of exactly class `plain` a `fast` (a subclass that only changes how forward computes:
    parameters, hooks and state dict keys stay); the number changed."""
    n = 0
    for m in module.modules():
        if type(m) is plain:
            m.__class__ = fast
            n += 1
    return n


def use_dnn_linears(module: nn.Module) -> int:
    """Give every plain nn.Linear of `module` the oneDNN path (nothing where oneDNN is missing); the number changed."""
    return 0 if _LINEAR is None else swap_classes(module, nn.Linear, DnnLinear)
