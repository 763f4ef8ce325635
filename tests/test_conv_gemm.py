"""Frozen bf16 (and, through oneDNN, float32) convolutions at low resolution as one GEMM on the CPU (lorakit.models.conv_gemm): the same maths as
F.conv2d, taken only where it pays, and applied to the UNet of a CPU training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.models import conv_gemm as G


@pytest.mark.parametrize("n,cin,cout,k,stride,pad,hw", [
    (1, 24, 16, 3, 1, 1, 5), (2, 16, 8, 3, 2, 1, 7), (3, 12, 10, 1, 1, 0, 4), (2, 8, 6, 3, 1, 0, 6), (1, 6, 4, 3, 2, 0, 9)])
def test_gemm_is_the_convolution_and_its_input_gradient(n, cin, cout, k, stride, pad, hw):
    """In float64 both are exact sums in another order: agreement to rounding."""
    g = torch.Generator().manual_seed(n * 100 + cin)
    x = torch.randn(n, cin, hw, hw, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64, generator=g)
    b = torch.randn(cout, dtype=torch.float64, generator=g)
    for bias in (b, None):
        want = F.conv2d(x, w, bias, stride, pad)
        gy = torch.randn(want.shape, dtype=torch.float64, generator=g)
        (want_gx,) = torch.autograd.grad(want, x, gy)
        got = G.conv2d_as_gemm(x, w, bias, (stride, stride), (pad, pad))
        (got_gx,) = torch.autograd.grad(got, x, gy)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_gx, want_gx, rtol=0, atol=1e-12)


def _conv(cin, cout, k=3, dtype=torch.bfloat16):
    conv = nn.Conv2d(cin, cout, k, padding=k // 2).to(dtype).requires_grad_(False)
    with torch.no_grad():
        conv.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    return conv


def test_a_large_frozen_bf16_layer_at_low_resolution_takes_the_gemm_under_autocast():
    conv = _conv(1280, 1280)  # SD's lowest-resolution width
    plain = {k: v.clone() for k, v in conv.state_dict().items()}
    assert G.use_gemm_convs(nn.Sequential(conv)) == 1 and type(conv) is G.GemmConv2d
    assert conv.state_dict().keys() == plain.keys()
    x = torch.randn(1, 1280, 4, 4, requires_grad=True)  # fp32 activations, as after a GroupNorm under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        ref = F.conv2d(x.detach().bfloat16(), conv.weight, conv.bias, 1, 1)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__.startswith("_FrozenGemmConv")
    assert (y.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()  # bf16 rounding of two orders
    y.float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_float32_takes_the_gemm_through_onednn_where_it_is_reachable():
    """float32 layers of the same sizes take the GEMM where oneDNN's float32 GEMM is reachable (models.dnn_linear:
    torch's own float32 convolution there is im2col + MKL at AVX2 speed on non-Intel CPUs); output and input
    gradient equal the convolution's to float32 rounding (against float64)."""
    from lorakit.models import dnn_linear

    conv = _conv(2560, 1280, dtype=torch.float32)
    G.use_gemm_convs(conv)
    x = torch.randn(1, 2560, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert G.gemm_pays(conv, x, conv.weight, conv.bias) == (dnn_linear._LINEAR is not None)
    y = conv(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (gx,) = torch.autograd.grad(y, x, gy)
    x64 = x.detach().double().requires_grad_(True)
    want = F.conv2d(x64, conv.weight.double(), conv.bias.double(), 1, 1)
    (want_gx,) = torch.autograd.grad(want, x64, gy.double())
    for got, ref in ((y, want), (gx, want_gx)):
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert float((got.detach().double() - ref.detach()).abs().max()) <= 1e-5 * float(ref.detach().abs().max())


@pytest.mark.parametrize("case", ["large_input", "small_weight", "trainable", "cuda_like_meta", "float64"])
def test_elsewhere_the_convolution_stays(case):
    cin, hw, dtype = 1280, 4, torch.bfloat16
    if case == "small_weight":
        cin = 640
    dtype = torch.float64 if case == "float64" else dtype  # no oneDNN GEMM for it: the convolution
    conv = _conv(cin, 1280 if case != "small_weight" else 640, dtype=dtype)
    G.use_gemm_convs(conv)
    if case == "large_input":
        hw = 16  # 256 positions: the convolution is faster there
    if case == "trainable":
        conv.weight.requires_grad_(True)
    x = torch.randn(1, cin, hw, hw, dtype=dtype)
    if case == "cuda_like_meta":
        x = x.to("meta")
        conv = conv.to("meta")
    assert not G.gemm_pays(conv, x, conv.weight, conv.bias)


def test_a_cpu_training_run_gives_its_unet_the_gemm_path(tmp_path):
    from lorakit import options as O
    from lorakit.train import stages as S
    from test_train_common import dataset, options, tiny

    opts = O.normalize(options(tmp_path, dataset(tmp_path, n_train=1, sizes=((64, 64),))))
    run = S.set_up_run(S.picked(S.RunOptions, opts), lambda *a, **k: None, False)
    assert run.device.type == "cpu"
    model = S.prepare_model(S.picked(S.ModelOptions, opts), run, tiny("sd1"))
    convs = [m for m in model.bundle.unet.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is G.GemmConv2d for m in convs)


def test_checkpoint_recomputation_skips_a_blocks_last_gemm_convolution():
    """Under non-reentrant gradient checkpointing backward recomputes a block only up to its last saved tensor: a
    block ending in a GEMM convolution (a resnet's conv2) must not redo that product, as torch's own convolution is
    not redone. Counted: the matrix products giving the last layer's (cout, positions) output, during backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__  # oneDNN's float32 GEMM (dnn_linear) gives (positions, cout)
            if ("mm" in name or "linear" in name) and tuple(out.shape) in ((6, 25), (25, 6)):
                Count.n += 1
            return out

    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 3, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    x = torch.randn(1, 3, 5, 5, generator=g, requires_grad=True)

    def block(x):
        h = F.silu(G.conv2d_as_gemm(x, w1, None, (1, 1), (1, 1)))
        return G.conv2d_as_gemm(h, w2, None, (1, 1), (1, 1))

    grads = []
    for gc in (False, True):
        y = checkpoint(block, x, use_reentrant=False) if gc else block(x)
        assert type(y.grad_fn).__name__.startswith("_FrozenGemmConv")
        with Count():
            grads.append(torch.autograd.grad(y, x, torch.ones_like(y))[0])
        assert Count.n == 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
