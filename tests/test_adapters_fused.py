"""LoRA's fused Linear op (one autograd node, addmm into the base output) equals base(x) + up(down(x)) * scale, in
float32 and under bf16 autocast, for outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.adapters.base import attach, detach
from lorakit.adapters.loha import LoHaModule
from lorakit.adapters.lokr import LoKrModule
from lorakit.adapters.lora import LoRAModule


def _setup(dtype=torch.float32):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80).to(dtype).requires_grad_(False)
    a = LoRAModule("lora_unet_x", layer, lora_dim=6, alpha=3.0)
    with torch.no_grad():
        a.lora_up.weight.normal_(0, 0.1)
    a.multiplier, a.module_weight = 0.8, 0.5
    return layer, a.train()


def _run(layer, a, x, fused: bool, autocast=None):
    attach(a)
    if not fused:
        a.forward_fused = lambda x: None  # instance attribute: this adapter only
    try:
        with autocast or torch.autocast("cpu", enabled=False):
            y = layer(x)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        params = [a.lora_down.weight, a.lora_up.weight]
        grads = torch.autograd.grad(y, ([x] if x.requires_grad else []) + params, gy)
    finally:
        detach(a)
        a.__dict__.pop("forward_fused", None)
    return y, grads


@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_equals_unfused_fp32(x_grad):
    layer, a = _setup()
    x = torch.randn(3, 7, 48).requires_grad_(x_grad)
    y1, g1 = _run(layer, a, x, fused=True)
    y2, g2 = _run(layer, a, x, fused=False)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    assert y1.grad_fn is not None and "LoRALinear" in type(y1.grad_fn).__name__


def test_fused_under_bf16_autocast_with_bf16_base():
    layer, a = _setup(torch.bfloat16)
    x = torch.randn(2, 9, 48, dtype=torch.bfloat16).requires_grad_(True)
    y1, g1 = _run(layer, a, x, True, torch.autocast("cpu", dtype=torch.bfloat16))
    y2, g2 = _run(layer, a, x, False, torch.autocast("cpu", dtype=torch.bfloat16))
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2, rtol=2e-2, atol=2e-2)
    for u, v in zip(g1, g2):
        assert u.dtype == v.dtype
        torch.testing.assert_close(u.float(), v.float(), rtol=3e-2, atol=3e-2)


def test_dropouts_use_the_unfused_path():
    layer, a = _setup()
    a.dropout = 0.5
    assert a.forward_fused(torch.randn(2, 48)) is None
    a.eval()  # dropouts only act in training
    assert a.forward_fused(torch.randn(2, 48)) is not None


def _pointwise_setup(cin, cout, rank, dtype=torch.float32, **conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(cin, cout, 1, **conv).to(dtype).requires_grad_(False)
    a = LoRAModule("lora_unet_proj", layer, lora_dim=rank, alpha=rank / 2)
    with torch.no_grad():
        a.lora_up.weight.normal_(0, 0.1)
    a.multiplier, a.module_weight = 0.8, 0.5
    return layer, a.train()


def _pointwise_reference(layer, a, x, autocast=None):
    """Today's maths written out: the base convolution plus two chained 1x1 convolutions, scaled."""
    s = a.scale * a.multiplier * a.module_weight
    with autocast or torch.autocast("cpu", enabled=False):
        y = layer._conv_forward(x, layer.weight, layer.bias)
        y = y + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a.lora_down.weight), a.lora_up.weight) * s
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    params = [a.lora_down.weight, a.lora_up.weight]
    return y, torch.autograd.grad(y, ([x] if x.requires_grad else []) + params, gy)


@pytest.mark.parametrize("batch,x_grad,size", [(1, True, "tiny"), (3, True, "tiny"), (2, False, "tiny"),
                                               (1, True, "full")])
def test_pointwise_conv_lora_equals_two_convolutions(batch, x_grad, size):
    """A 1x1 convolution's LoRA runs as matrix products over the channel axis (LoRAPointwise); outputs and every
    gradient equal the two-convolution form to float32 rounding, tiny and at SD1.5's proj_in size (320 ch, 32x32)."""
    cin, cout, rank, hw = (24, 40, 4, 5) if size == "tiny" else (320, 320, 16, 32)
    layer, a = _pointwise_setup(cin, cout, rank)
    x = torch.randn(batch, cin, hw, hw).requires_grad_(x_grad)
    y1, g1 = _run(layer, a, x, fused=True)
    assert "LoRAPointwise" in repr(y1.grad_fn.next_functions)
    y2, g2 = _pointwise_reference(layer, a, x)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    for u, v in zip(g1, g2):  # to 2e-6 of each gradient's scale: sums over 1024 positions round in another order
        assert u.dtype == v.dtype == torch.float32
        torch.testing.assert_close(u, v, rtol=0, atol=2e-6 * float(v.abs().max()))


def test_pointwise_conv_lora_under_bf16_autocast():
    layer, a = _pointwise_setup(24, 40, 4, torch.bfloat16)
    x = torch.randn(2, 24, 6, 6, dtype=torch.bfloat16).requires_grad_(True)
    ac = torch.autocast("cpu", dtype=torch.bfloat16)
    y1, g1 = _run(layer, a, x, True, ac)
    y2, g2 = _pointwise_reference(layer, a, x, torch.autocast("cpu", dtype=torch.bfloat16))
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2, rtol=2e-2, atol=2e-2)
    for u, v in zip(g1, g2):
        assert u.dtype == v.dtype
        torch.testing.assert_close(u.float(), v.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("conv", [dict(stride=2), dict(padding=1)])
def test_strided_or_padded_1x1_and_channels_last_use_convolutions(conv):
    layer, a = _pointwise_setup(8, 8, 2, **conv)
    assert not a._pointwise
    y, _ = _run(layer, a, torch.randn(1, 8, 6, 6), fused=True)
    assert "LoRAPointwise" not in repr(y.grad_fn.next_functions)
    layer, a = _pointwise_setup(8, 8, 2)
    x = torch.randn(1, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_(True)
    y1, g1 = _run(layer, a, x, fused=True)
    assert "LoRAPointwise" not in repr(y1.grad_fn.next_functions)
    y2, g2 = _pointwise_reference(layer, a, x)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)


class _CountProducts(TorchDispatchMode):
    """Counts the products (matrix products, or ops whose name holds `kind`) whose output has a given shape (a
    layer's full-size output; for matrix products also flattened to 2-D), and with `weight` only those taking it
    as their second operand."""

    def __init__(self, shape, kind: str | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        self.shape, self.kind, self.n = tuple(shape), kind, 0
        self.weight_ptr = None if weight is None else weight.data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        product = self.kind in name if self.kind else ("mm" in name or "linear" in name)
        if self.weight_ptr is not None:
            product = product and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                and args[1].data_ptr() == self.weight_ptr
        if product and isinstance(out, torch.Tensor) and (tuple(out.shape) == self.shape or (
                len(self.shape) == 3 and tuple(out.shape) == (self.shape[0] * self.shape[1], self.shape[2]))):
            self.n += 1
        return out


def _lora(name, layer):
    a = LoRAModule(name, layer, lora_dim=4, alpha=2.0)
    with torch.no_grad():
        a.lora_up.weight.normal_(0, 0.1)
    return a


def _lycoris(algo):
    """A maker of `algo`'s adapter (rank 4) with every factor moved off its zero initialisation."""
    cls, kw = {"loha": (LoHaModule, {}), "lokr": (LoKrModule, {"factor": 4}),
               "dora": (LoRAModule, {"weight_decompose": True})}[algo]

    def make(name, layer):
        a = cls(name, layer, lora_dim=4, alpha=2.0, **kw)
        with torch.no_grad():
            for p in a.parameters():
                p.add_(torch.randn(p.shape) * 0.05)
        return a
    return make


def _adapted(layers, make=_lora):
    """An adapter (default: LoRA rank 4, a non-zero up) attached to each layer; the adapters and their parameters."""
    ads = [make(f"lora_unet_{i}", m).train() for i, m in enumerate(layers)]
    for a in ads:
        attach(a)
    return ads, [p for a in ads for p in a.parameters() if p.requires_grad]


def _plain_and_checkpointed(block, x, params, counter, autocast=None):
    """block(x)'s gradients without and with non-reentrant checkpointing (diffusers' kind), each backward counted by
    a fresh `counter()`; asserts that neither backward ran the counted product and that both give the same bits."""
    from torch.utils.checkpoint import checkpoint

    grads = []
    for gc in (False, True):
        with autocast or torch.autocast("cpu", enabled=False):
            y = checkpoint(block, x, use_reentrant=False) if gc else block(x)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        count = counter()
        with count:
            grads.append(torch.autograd.grad(y, [x] + params, gy))
        assert count.n == 0, f"the last layer's product ran {count.n} time(s) in backward (checkpointed: {gc})"
    for u, v in zip(*grads):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,last", [(torch.float32, "lora"), (torch.bfloat16, "lora"),
                                        (torch.float32, "frozen"), (torch.bfloat16, "frozen")])
def test_checkpoint_recomputation_stops_before_the_last_product(dtype, last):
    """Non-reentrant gradient checkpointing recomputes a block in backward only up to the last tensor saved. A block
    whose last layer is a LoRA Linear (a transformer block's ff.net.2) or a frozen oneDNN Linear must not compute
    that layer's full-size product again: nothing saved needs it. Gradients equal the uncheckpointed ones."""
    from lorakit.models.dnn_linear import use_dnn_linears

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 96)).to(dtype).requires_grad_(False)
    use_dnn_linears(block)
    ads, params = _adapted([block[0], block[2]] if last == "lora" else [block[0]])
    x = torch.randn(2, 5, 48, dtype=dtype, requires_grad=True)
    try:
        _plain_and_checkpointed(block, x, params, lambda: _CountProducts((2, 5, 96)),
                                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16))
    finally:
        for a in ads:
            detach(a)


def test_checkpoint_recomputation_skips_a_locon_blocks_last_convolution():
    """The same for a LoCon on a block's last 3x3 convolution (a resnet's conv2): the adapter's change is computed
    before the base output, so backward's recomputation stops before the base convolution (the change's rank-r
    products still run: they come first). Gradients equal the uncheckpointed ones bit for bit."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.SiLU(), nn.Conv2d(12, 16, 3, padding=1))
    ads, params = _adapted(list(block.requires_grad_(False))[0::2])
    try:
        _plain_and_checkpointed(block, torch.randn(1, 8, 6, 6, requires_grad=True), params,
                                lambda: _CountProducts((1, 16, 6, 6), "convolution", weight=block[2].weight))
    finally:
        for a in ads:
            detach(a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32_fused", "bf16_bypass"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_checkpoint_recomputation_skips_a_rebuilt_layers_op(algo, kind, dtype):
    """The same for LoHa, LoKr and DoRA (`rebuilt_delta`) on a block's last Linear or 3x3 convolution, in float32
    (one op with W + change) and under bf16 autocast (base op plus the change's op): backward's recomputation stops
    before the layer's full-size op - the rebuilt one and the base one. Gradients equal the uncheckpointed ones."""
    torch.manual_seed(0)
    if kind == "linear":
        block = nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 96))
        x, out = torch.randn(2, 5, 48), (2, 5, 96)
    else:
        block = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.SiLU(), nn.Conv2d(12, 16, 3, padding=1))
        x, out = torch.randn(1, 8, 6, 6), (1, 16, 6, 6)
    block = block.to(dtype).requires_grad_(False)
    ads, params = _adapted([block[0], block[2]], _lycoris(algo))
    try:
        _plain_and_checkpointed(block, x.to(dtype).requires_grad_(True), params,
                                lambda: _CountProducts(out, None if kind == "linear" else "convolution"),
                                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16))
    finally:
        for a in ads:
            detach(a)
