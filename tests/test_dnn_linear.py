"""Frozen float32 Linear layers through oneDNN (models.dnn_linear): the same outputs and input gradients as
nn.Linear to float32 rounding, the route taken only where it applies, and LoRA's fused op still used on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.adapters.base import attach, detach
from lorakit.adapters.lora import LoRAModule
from lorakit.models import dnn_linear
from lorakit.models.dnn_linear import DnnLinear, fp32_linear, use_dnn_linears

needs_dnn = pytest.mark.skipif(dnn_linear._LINEAR is None, reason="oneDNN's linear is not available on this CPU")


def _pair(cin=48, cout=80, bias=True):
    torch.manual_seed(0)
    plain = nn.Linear(cin, cout, bias=bias).requires_grad_(False)
    fast = nn.Linear(cin, cout, bias=bias).requires_grad_(False)
    fast.load_state_dict(plain.state_dict())
    assert use_dnn_linears(fast) == (0 if dnn_linear._LINEAR is None else 1)
    return plain, fast


@needs_dnn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["3d", "transposed"])
def test_frozen_fp32_linear_equals_nn_linear(bias, layout):
    plain, fast = _pair(bias=bias)
    x = torch.randn(2, 7, 48) if layout == "3d" else torch.randn(48, 9).t()  # a non-contiguous input too
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = plain(x1), fast(x2)
    assert type(y2.grad_fn).__name__ == "_FrozenLinearBackward"  # the oneDNN route was taken
    gy = torch.randn(y1.shape)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)


@needs_dnn
def test_full_size_products_through_onednn():
    """SD1.5's feed-forward input layer at 256 px (1024 tokens, 320 -> 2560), forward and input gradient against
    float64."""
    torch.manual_seed(0)
    x, w, g = torch.randn(1024, 320), torch.randn(2560, 320) * 0.05, torch.randn(1024, 2560)
    ref_y, ref_g = x.double() @ w.double().t(), g.double() @ w.double()
    for got, ref in ((fp32_linear(x, w), ref_y), (fp32_linear(g, w.t()), ref_g)):
        assert float((got.double() - ref).abs().max()) <= 2e-6 * float(ref.abs().max())


def test_trained_weight_autocast_and_other_dtypes_keep_nn_linear():
    _, fast = _pair()
    fast.weight.requires_grad_(True)  # a trained layer: its weight gradient comes from nn.Linear's own backward
    y = fast(torch.randn(3, 48))
    assert "FrozenLinear" not in type(y.grad_fn).__name__
    y.sum().backward()
    assert fast.weight.grad is not None
    fast.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(torch.randn(3, 48)).dtype == torch.bfloat16  # autocast's bf16 product, as before
    fast.double()
    assert fast(torch.randn(3, 48, dtype=torch.float64)).dtype == torch.float64


def test_swap_keeps_parameters_and_state_dict_and_only_plain_linears():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.Conv2d(2, 2, 1))
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    n = use_dnn_linears(model)
    assert n == (0 if dnn_linear._LINEAR is None else 1)
    assert type(model[1]) is Custom and type(model[2]) is nn.Conv2d
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params


@needs_dnn
def test_lora_on_a_swapped_linear_keeps_its_fused_op():
    _, fast = _pair()
    a = LoRAModule("lora_unet_x", fast, lora_dim=4, alpha=2.0).train()
    attach(a)
    try:
        y = fast(torch.randn(2, 5, 48, requires_grad=True))
    finally:
        detach(a)
    assert type(y.grad_fn).__name__ == "_LoRALinearBackward"


@needs_dnn
def test_traces_under_fake_tensors():
    """The memory prediction traces a training step with fake tensors: the route must trace too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        layer = nn.Linear(48, 80).requires_grad_(False)
        use_dnn_linears(layer)
        x = torch.randn(2, 7, 48, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == (2, 7, 80) and x.grad.shape == x.shape
