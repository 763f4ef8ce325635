"""LoHa, LoKr, DoRA and full adapters train through `rebuilt_delta`: the same outputs and gradients as plain autograd
through op(x, W_change) (the maths before the low-memory path), while autograd keeps no full-size tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.base import AdapterModule, attach
from lorakit.adapters.loha import LoHaModule
from lorakit.adapters.lokr import LoKrModule
from lorakit.adapters.lora import LoRAModule
from lorakit.adapters.others import FullModule


def _layer(kind: str, size: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(*((24, 40) if size == "tiny" else (1280, 5120)))
    if kind == "conv1x1":
        return nn.Conv2d(*((12, 20) if size == "tiny" else (640, 1280)), 1)
    return nn.Conv2d(*((8, 12) if size == "tiny" else (640, 640)), 3, padding=1)


def _input(layer: nn.Module, size: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 7 if size == "tiny" else 64, layer.in_features, generator=g)
    hw = 5 if size == "tiny" else 16
    return torch.randn(2, layer.in_channels, hw, hw, generator=g)


CASES = {
    "loha": (LoHaModule, {}),
    "loha_tucker": (LoHaModule, {"use_tucker": True}),
    "loha_dora": (LoHaModule, {"weight_decompose": True}),
    "lokr": (LoKrModule, {"factor": 4}),
    "lokr_both": (LoKrModule, {"factor": 4, "decompose_both": True, "lora_dim": 2}),
    "lokr_full": (LoKrModule, {"factor": 4, "full_matrix": True}),
    "lokr_dora_out": (LoKrModule, {"factor": 4, "weight_decompose": True, "wd_on_out": True}),
    "dora": (LoRAModule, {"weight_decompose": True}),
    "dora_out": (LoRAModule, {"weight_decompose": True, "wd_on_out": True}),
    "full": (FullModule, {}),
}


def _adapter(case: str, layer: nn.Module) -> nn.Module:
    cls, kw = CASES[case]
    kw = {"lora_dim": 4, "alpha": 2.0, **kw}
    torch.manual_seed(2)
    a = cls("lora_unet_test", layer, **kw)
    with torch.no_grad():  # move every factor off its zero init so all gradients are non-trivial
        for p in a.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    a.multiplier = 0.7
    return a


def _reference(a, layer, x):
    """The maths before the low-memory path: plain autograd through the full-size weight change."""
    dw = a.weight_change(a.effective_multiplier)
    db = a.bias_change(a.effective_multiplier)
    return layer(x) + a._op(x, dw.to(x.dtype), None if db is None else db.to(x.dtype))


def _grads(a, x, out):
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in a.parameters() if p.requires_grad]
    return torch.autograd.grad(out, [x] + params, gy)


@pytest.mark.parametrize("form", ["merged", "sum", "change"])
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_gradients_equal_plain_autograd(case, kind, form, monkeypatch):
    """Each form of the layer (AdapterModule._rebuilt), in float32 here: "merged" (float32's own), "sum" (one
    node with the base op, what half precision uses) and "change" (the host adds the base output: stacked adapters)."""
    if form == "change":
        monkeypatch.setattr(AdapterModule, "forward_fused", lambda self, x: None)
    elif form == "sum":
        monkeypatch.setattr(AdapterModule, "whole_layer_form", lambda self, x: "sum")
    if case == "loha_tucker" and kind != "conv":
        pytest.skip("Tucker applies to 3x3 convolutions")
    layer = _layer(kind, "tiny").requires_grad_(False)
    a = _adapter(case, layer).train()
    x = _input(layer, "tiny").requires_grad_(True)
    ref = _reference(a, layer, x)
    want = _grads(a, x, ref)
    attach(a)
    out = layer(x)
    got = _grads(a, x, out)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("case", ["loha", "lokr", "dora", "full"])
def test_whole_layer_under_autocast_equals_base_plus_change(case, kind, weights):
    """Under bf16 autocast an adapted layer is one node ("sum": the base op and the change's op) and gives the bits
    the host's base(x) + change gives (outputs and every gradient, x's included) - with float32 weights too, where
    W + change in one op would round the change into a bf16 weight."""
    layer = _layer(kind, "tiny").requires_grad_(False).to(weights)
    a = _adapter(case, layer).train()
    x = _input(layer, "tiny").requires_grad_(True)
    attach(a)
    results = []
    for host_adds in (False, True):
        if host_adds:
            a.forward_fused = lambda x: None  # instance attribute: the host's base + change
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert ("RebuiltOp" in type(out.grad_fn).__name__) != host_adds
        results.append((out, _grads(a, x, out.float())))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("case", ["loha", "lokr", "dora", "loha_dora"])
def test_full_size_layers(case, kind):
    layer = _layer(kind, "full").requires_grad_(False)
    a = _adapter(case, layer).train()
    x = _input(layer, "full").requires_grad_(True)
    want = _grads(a, x, _reference(a, layer, x))
    attach(a)
    got = _grads(a, x, layer(x))
    for g, w in zip(got, want):
        scale = w.abs().max().item()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * max(1.0, scale))


def _saved_bytes(fn, layer) -> int:
    """Bytes of distinct new storages autograd keeps for backward while `fn` builds its graph (the frozen layer's
    own weight, which the base linear keeps for the input gradient, is no copy and does not count)."""
    seen = {}
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("case", ["loha", "lokr", "dora", "full"])
def test_backward_keeps_no_full_size_tensor(case):
    layer = _layer("linear", "full").requires_grad_(False)
    a = _adapter(case, layer).train()
    x = _input(layer, "full").requires_grad_(True)
    weight_bytes = layer.weight.numel() * 4
    _, old = _saved_bytes(lambda: _reference(a, layer, x), layer)
    attach(a)
    _, new = _saved_bytes(lambda: layer(x), layer)
    own = sum(p.numel() * 4 for p in a.parameters())  # the factors themselves (full: the diff is the parameter)
    assert old >= weight_bytes  # the plain path keeps at least one full copy of the weight change
    assert new <= x.numel() * 4 + own + 4096


def test_rank_dropout_mask_is_replayed_in_backward():
    layer = _layer("linear", "tiny").requires_grad_(False)
    a = _adapter("loha", layer).train()
    a.rank_dropout = 0.5
    x = _input(layer, "tiny").requires_grad_(True)
    torch.manual_seed(5)
    keep = a.rank_keep()
    ref = layer(x) + a._op(x, a.weight_change(a.effective_multiplier, keep))
    want = _grads(a, x, ref)
    attach(a)
    torch.manual_seed(5)
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert 0 < int(keep.sum()) < keep.numel()
    for g, w in zip(_grads(a, x, out), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["loha", "lokr", "dora"])
@pytest.mark.parametrize("how", [None, "mean", "expected"])
def test_rank_dropout_rescale_on_weight_rows(case, how):
    """LoHa, LoKr and DoRA drop rows of the weight change (DoRA's LoRA did not drop at all before): the kept rows
    are left (LyCORIS), divided by the share kept (rank_dropout_scale=True) or by 1 - p (networks.lora)."""
    layer = _layer("linear", "tiny").requires_grad_(False)
    a = _adapter(case, layer).train()
    a.rank_dropout, a.rank_dropout_rescale = 0.5, how
    torch.manual_seed(7)
    raw = (torch.rand(a.shape[0]) > 0.5).float()
    want = {None: raw, "mean": raw / raw.mean(), "expected": raw * 2.0}[how]
    torch.manual_seed(7)
    keep = a.rank_keep()
    torch.testing.assert_close(keep, want, rtol=0, atol=0)
    x = _input(layer, "tiny")
    ref = layer(x) + a._op(x, a.weight_change(a.effective_multiplier, want))
    attach(a)
    torch.manual_seed(7)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-6)


def test_rank_dropout_rescale_of_lora_activations():
    """LoRA drops rank channels per sample: `mean` divides each sample's kept channels by its share kept."""
    layer = _layer("linear", "tiny").requires_grad_(False)
    a = LoRAModule("lora_unet_test", layer, lora_dim=8, alpha=4.0, rank_dropout=0.5).train()
    with torch.no_grad():
        a.lora_up.weight.normal_(0, 0.1)
    x = _input(layer, "tiny")
    down, up = a.lora_down.weight, a.lora_up.weight
    for how in (None, "mean", "expected"):
        a.rank_dropout_rescale = how
        torch.manual_seed(3)
        mask = (torch.rand(x.shape[0], 8) > 0.5).float()
        assert 0 < mask.sum() < mask.numel()
        m = {None: mask, "mean": mask / mask.mean(dim=1, keepdim=True), "expected": mask * 2.0}[how]
        ref = (x @ down.t() * m[:, None, :]) @ up.t() * (a.scale * a.multiplier)
        torch.manual_seed(3)
        torch.testing.assert_close(a.forward_delta(x), ref, rtol=1e-5, atol=1e-6)


def test_detached_dora_norm_same_forward_and_paper_gradient():
    """dora_detach_norm: forward unchanged; the gradient is that of W' = s (W + dW) / c with c = ||W + dW|| fixed."""
    layer = _layer("linear", "tiny").requires_grad_(False)
    a = _adapter("dora", layer).train()
    a.wd_detach_norm = True
    x = _input(layer, "tiny")
    attach(a)
    out = layer(x)
    down, up, s = a.lora_down.weight, a.lora_up.weight, a.dora_scale
    m = a.effective_multiplier
    merged = layer.weight + a.scale * up @ down
    c = merged.norm(dim=0, keepdim=True).detach() + torch.finfo(torch.float32).eps
    ref = F.linear(x, layer.weight + m * (s * merged / c - layer.weight), layer.bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, [down, up, s], gy)
    want = torch.autograd.grad(ref, [down, up, s], gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_inference_path_builds_no_graph():
    layer = _layer("linear", "tiny").requires_grad_(False)
    a = _adapter("loha", layer).eval()
    attach(a)
    with torch.no_grad():
        y = layer(_input(layer, "tiny"))
    assert y.grad_fn is None


def test_network_args_choose_the_rank_dropout_rescale_of_each_tool():
    from lorakit.adapters.network import parse_network_args
    from lorakit.errors import UserError
    from lorakit.models.families import get_family

    fam = get_family("sd1")

    def rescale(module, **args):
        return parse_network_args(fam, module, 4, 1, {k: str(v) for k, v in args.items()}).rank_dropout_rescale

    assert rescale("networks.lora", rank_dropout=0.1) == "expected"
    assert rescale("lycoris.kohya", algo="loha", rank_dropout=0.1) is None
    assert rescale("lycoris.kohya", algo="loha", rank_dropout=0.1, rank_dropout_scale=True) == "mean"
    with pytest.raises(UserError, match="rank_dropout_scale is a LyCORIS argument"):
        rescale("networks.lora", rank_dropout=0.1, rank_dropout_scale=True)
    with pytest.raises(UserError, match="rank_dropout is not set"):
        rescale("lycoris.kohya", algo="lokr", rank_dropout_scale=True)
    with pytest.raises(UserError, match="use_scalar is not supported"):
        rescale("lycoris.kohya", algo="locon", use_scalar=True)
    assert rescale("lycoris.kohya", algo="locon", use_scalar=False) is None


@pytest.mark.parametrize("shape", [(7, 5), (1000, 3), (3, 700), (6, 4, 3, 3), (300, 20, 3, 3)])
def test_column_norms_equal_torchs_vector_norm(shape):
    """DoRA's per-input-column norm on a CPU (blocks of rows, `base._column_norms`) is torch's vector_norm over every
    axis but 1, within float32 rounding, for Linear and convolution weights of several row counts."""
    from lorakit.adapters.base import _column_norms

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    want = torch.linalg.vector_norm(w, dim=[d for d in range(w.dim()) if d != 1], keepdim=True)
    got = _column_norms(w, chunk_elems=64)  # several blocks even for the small shapes
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
