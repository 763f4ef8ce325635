"""bf16 convolutions of large frozen weights at low resolution as one matrix product (im2col + GEMM) on the CPU.

Why: PyTorch's CPU convolution (oneDNN) reorders a plain weight into its blocked layout on every call, in forward and
again in backward. At Stable Diffusion's lowest resolutions (the 4x4 and 8x8 latents of a 256 px step, 8x8 of a
512 px one) with 1280-2560 channels that reorder is a large part of a bf16 convolution: 3x3 2560 -> 1280 at 4x4,
forward + backward, 14.4 ms as a convolution, 7.5 ms as unfold + one GEMM; 1280 -> 1280 at 8x8 12.3 vs 7.1 ms; a
1x1 2560 -> 1280 at 8x8 1.9 vs 1.3 ms (benchmarks/bench_conv_gemm.py, 2-core AVX-512 CPU, glibc keeping freed memory
as training runs). Prepacking each weight once would keep a second copy of every frozen convolution; a GEMM reads the
plain weight as it is. float32 layers of the same sizes take it too where oneDNN's float32 GEMM is reachable
(models.dnn_linear; x86): torch runs those convolutions as im2col + MKL's sgemm, at AVX2 speed on non-Intel CPUs
(3x3 2560 -> 1280 at 4x4 21.9 -> 11.3 ms, 1280 -> 1280 at 8x8 17.5 -> 13.5 ms). At larger inputs and for smaller
weights the convolution is as fast or faster and stays: only layers whose output has at most MAX_POSITIONS positions
(batch x height x width) and whose weight has at least MIN_CHANNEL_PAIRS input x output channels take the GEMM. Same
maths, other rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.models.dnn_linear import dnn_pays, fp32_linear, swap_classes
from lorakit.models.dtypes import compute_dtype

MAX_POSITIONS = 64
MIN_CHANNEL_PAIRS = 1280 * 1280
_DTYPES = (torch.bfloat16,)


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def gemm_pays(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dim() != 4 or conv.groups != 1:
        return False
    if weight.requires_grad or (bias is not None and bias.requires_grad):  # frozen layers only: no weight gradient
        return False
    if conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if weight.shape[0] * weight.shape[1] < MIN_CHANNEL_PAIRS:
        return False
    dt = compute_dtype(x)
    if dt not in _DTYPES and not (dt == torch.float32 and dnn_pays(x, weight)):
        return False
    (kh, kw), (sh, sw), (ph, pw) = weight.shape[2:], conv.stride, conv.padding
    positions = x.shape[0] * _out_size(x.shape[2], kh, sh, ph) * _out_size(x.shape[3], kw, sw, pw)
    return positions <= MAX_POSITIONS


def conv2d_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding) (groups 1, dilation 1, frozen weight and bias) as unfold + one
    matrix product, in the autocast dtype when autocast is on."""
    dt = compute_dtype(x)
    x = x if x.dtype == dt else x.to(dt)
    weight = weight if weight.dtype == dt else weight.to(dt)
    bias = None if bias is None else (bias if bias.dtype == dt else bias.to(dt))
    return _FrozenGemmConv.apply(x, weight, bias, tuple(stride), tuple(padding))


def _pointwise(weight: torch.Tensor, stride, padding) -> bool:
    return tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


class _FrozenGemmConv(torch.autograd.Function):
    """y = W (cout x cin k k) @ im2col(x) + b; backward gives x's gradient only (the layer is frozen), as
    fold((g^T W)^T): the weight as the product's right operand, as in forward (bf16 W^T g took twice as long).
    Keeps for backward only the frozen weight, which the layer holds anyway: neither x nor its im2col columns
    (the convolution keeps x). The weight is kept as an attribute, not through `save_for_backward`, so that gradient
    checkpointing's recomputation, which runs a block up to its last saved tensor, can stop before a block's last
    convolution (a custom node saves only when its forward has returned; see models.dnn_linear._FrozenLinear)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        n, cin, h, w = x.shape
        cout, _, kh, kw = weight.shape
        oh, ow = _out_size(h, kh, stride[0], padding[0]), _out_size(w, kw, stride[1], padding[1])
        if _pointwise(weight, stride, padding):
            cols = x.reshape(n, cin, h * w)
        else:
            cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (n, cin k k, oh ow)
        cols = cols[0] if n == 1 else cols.transpose(0, 1).reshape(cols.shape[1], n * oh * ow)
        w2 = weight.reshape(cout, -1)
        if dnn_pays(x, weight):  # float32: oneDNN's GEMM (models.dnn_linear), positions as the product's rows
            y = fp32_linear(cols.t(), w2, bias).t().contiguous()
        else:  # the bias enters the product's accumulator: one rounding, as in the convolution
            y = w2 @ cols if bias is None else torch.addmm(bias.unsqueeze(1), w2, cols)
        ctx.weight, ctx.geometry = weight, (n, cin, h, w, oh, ow, stride, padding)
        return y.view(1, cout, oh, ow) if n == 1 else y.view(cout, n, oh, ow).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, gy):
        weight, (n, cin, h, w, oh, ow, stride, padding) = ctx.weight, ctx.geometry
        cout, _, kh, kw = weight.shape
        g = gy.to(weight.dtype)
        g = g.reshape(cout, oh * ow) if n == 1 else g.transpose(0, 1).reshape(cout, n * oh * ow)
        w2 = weight.reshape(cout, -1)
        gcols = (fp32_linear(g.t(), w2.t()) if dnn_pays(g, weight) else g.t() @ w2).t()  # (cin k k, n oh ow)
        gcols = gcols.reshape(-1, n, oh * ow).transpose(0, 1)  # (n, cin k k, oh ow)
        if _pointwise(weight, stride, padding):
            gx = gcols.reshape(n, cin, h, w)
        else:
            gx = F.fold(gcols, (h, w), (kh, kw), padding=padding, stride=stride)
        return gx.contiguous(), None, None, None, None


class GemmConv2d(nn.Conv2d):
    """An nn.Conv2d that takes the GEMM where it pays (`use_gemm_convs` swaps the class of a model's convolutions:
    their parameters, hooks and state dict keys are unchanged)."""

    def _conv_forward(self, input, weight, bias):
        if gemm_pays(self, input, weight, bias):
            return conv2d_as_gemm(input, weight, bias, self.stride, self.padding)
        return super()._conv_forward(input, weight, bias)


def use_gemm_convs(module: nn.Module) -> int:
    """Give every plain nn.Conv2d of `module` the GEMM path; the number changed."""
    return swap_classes(module, nn.Conv2d, GemmConv2d)
