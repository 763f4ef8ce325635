"""Adapter maths on plain layers: each delta against a formula written here (LyCORIS / A1111 / ComfyUI semantics),
unmerged forward == merged forward, multipliers, stacking and removal. Tolerance: 1e-5 relative (float32)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import base
from lorakit.adapters.loha import LoHaModule
from lorakit.adapters.lokr import LoKrModule, factorization
from lorakit.adapters.lora import DyLoRAModule, LoRAModule
from lorakit.adapters.network import Network, detect_algo, group_by_module
from lorakit.adapters.others import FullModule, IA3Module, OFTModule

torch.set_num_threads(1)  # tiny tensors: extra threads only contend on the shared test machine

TOL = dict(rtol=1e-5, atol=1e-5)


def layers():
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(24, 36),
        "conv1x1": nn.Conv2d(12, 20, 1),
        "conv3x3": nn.Conv2d(12, 16, 3, padding=1),
        "conv3x3s2": nn.Conv2d(8, 16, 3, stride=2, padding=1),
    }


def x_for(layer):
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 5, layer.in_features, generator=g)
    return torch.randn(2, layer.in_channels, 9, 9, generator=g)


def randomize(mod, seed=3, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return mod


def run_layer(layer, weight, x, bias=None):
    b = layer.bias if bias is None else bias
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, b, layer.stride, layer.padding)
    return F.linear(x, weight, b)


def check_unmerged_equals_merged(layer, adapter, multiplier=0.7):
    x = x_for(layer)
    adapter.eval()
    adapter.multiplier = multiplier
    ref = layer(x)
    base.attach(adapter)
    unmerged = layer(x)
    net = Network(_FakeFamily(), [adapter])
    net.merge_into()  # detaches, writes the weights
    merged = layer(x)
    net.unmerge()
    restored = layer(x)
    torch.testing.assert_close(unmerged, merged, **TOL)
    torch.testing.assert_close(restored, ref)
    assert "forward" not in layer.__dict__
    return unmerged - ref


class _FakeFamily:
    name = "sd1"
    lora_unet_style = "diffusers"


# ---- LoRA -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "conv3x3s2"])
def test_lora_delta_and_merge(kind):
    layer = layers()[kind]
    a = randomize(LoRAModule("lora_unet_x", layer, lora_dim=4, alpha=2.0))
    down, up = a.lora_down.weight.detach(), a.lora_up.weight.detach()
    if kind == "linear":
        expected = (up @ down) * 0.5
    elif kind == "conv1x1":
        expected = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None] * 0.5
    else:  # the sd-scripts merge formula for a kxk down and 1x1 up
        expected = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * 0.5
    torch.testing.assert_close(a.delta_weight(), expected, **TOL)
    delta_out = check_unmerged_equals_merged(layer, a, 0.7)
    w = layer.weight.detach()
    torch.testing.assert_close(delta_out, run_layer(layer, w + 0.7 * expected, x_for(layer)) - layer(x_for(layer)),
                               **TOL)


def test_lora_alpha_zero_means_rank():
    a = LoRAModule("n", nn.Linear(8, 8), lora_dim=4, alpha=0)
    assert float(a.alpha) == 4 and a.scale == 1.0


def test_lora_tucker_mid():
    layer = layers()["conv3x3s2"]
    a = randomize(LoRAModule("n", layer, lora_dim=3, alpha=3, use_tucker=True))
    assert a.tucker and a.lora_mid.weight.shape == (3, 3, 3, 3)
    down = a.lora_down.weight.detach()[:, :, 0, 0]  # (r, in)
    up = a.lora_up.weight.detach()[:, :, 0, 0]  # (out, r)
    mid = a.lora_mid.weight.detach()
    expected = torch.zeros(layer.weight.shape)
    for o in range(expected.shape[0]):
        for n_ in range(expected.shape[1]):
            expected[o, n_] = sum(up[o, i] * mid[i, j] * down[j, n_] for i in range(3) for j in range(3))
    torch.testing.assert_close(a.delta_weight(), expected, **TOL)
    check_unmerged_equals_merged(layer, a)


def test_lora_dropouts_only_in_training():
    layer = nn.Linear(16, 16)
    a = randomize(LoRAModule("n", layer, lora_dim=8, alpha=8, dropout=0.5, rank_dropout=0.5, module_dropout=0.0))
    x = torch.randn(4, 3, 16)
    a.eval()
    e1, e2 = a.forward_delta(x), a.forward_delta(x)
    torch.testing.assert_close(e1, e2)
    a.train()
    torch.manual_seed(0)
    t1 = a.forward_delta(x)
    assert not torch.allclose(t1, e1)
    a.module_dropout = 1.0
    assert a.forward_delta(x) is None


# ---- LoHa -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,tucker", [("linear", False), ("conv1x1", False), ("conv3x3", False), ("conv3x3", True)])
def test_loha_formula(kind, tucker):
    layer = layers()[kind]
    a = randomize(LoHaModule("n", layer, lora_dim=4, alpha=2.0, use_tucker=tucker))
    g = {k: v.detach() for k, v in a.named_parameters()}
    if tucker:
        def rebuild(t, wa, wb):  # W[p, q, k, l] = sum_ij t[i, j, k, l] wa[i, p] wb[j, q]
            return (t[:, :, None, None] * wa[:, None, :, None, None, None] * wb[None, :, None, :, None, None]
                    ).sum((0, 1))
        w1 = rebuild(g["hada_t1"], g["hada_w1_a"], g["hada_w1_b"])
        w2 = rebuild(g["hada_t2"], g["hada_w2_a"], g["hada_w2_b"])
    else:
        w1 = (g["hada_w1_a"] @ g["hada_w1_b"]).reshape(layer.weight.shape)
        w2 = (g["hada_w2_a"] @ g["hada_w2_b"]).reshape(layer.weight.shape)
    torch.testing.assert_close(a.delta_weight(), w1 * w2 * (2.0 / 4), **TOL)
    check_unmerged_equals_merged(layer, a)


def test_loha_starts_at_zero():
    a = LoHaModule("n", nn.Linear(8, 8), lora_dim=4)
    assert float(a.delta_weight().detach().abs().max()) == 0.0


# ---- LoKr -----------------------------------------------------------------------------------------------------------
def test_factorization_matches_lycoris_table():
    # examples from LyCORIS' docstring (its 360 -> (8, 45) row is stale: its own loop, which files follow, reaches
    # (18, 20), the divisor pair with the smallest sum)
    assert factorization(128, -1) == (8, 16)
    assert factorization(250, -1) == (10, 25)
    assert factorization(360, -1) == (18, 20)
    assert factorization(1024, -1) == (32, 32)
    assert factorization(128, 4) == (4, 32)
    assert factorization(360, 8) == (8, 45)
    assert factorization(127, 8) == (1, 127)


def kron(a, b):  # independent Kronecker product for 2-D or 4-D (kernel taken from b)
    if a.dim() == 2 and b.dim() == 2:
        return torch.einsum("ij,kl->ikjl", a, b).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])
    out = torch.einsum("ij,klmn->ikjlmn", a, b)
    return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:])


@pytest.mark.parametrize("kind,kw", [("linear", {}), ("linear", {"decompose_both": True, "factor": 4}),
                                     ("linear", {"full_matrix": True}), ("conv3x3", {}),
                                     ("conv3x3", {"use_tucker": True}), ("conv1x1", {"factor": 4})])
def test_lokr_formula(kind, kw):
    layer = nn.Linear(64, 96) if kind == "linear" else layers()[kind]
    a = randomize(LoKrModule("n", layer, lora_dim=2, alpha=1.0, **kw))
    g = {k: v.detach() for k, v in a.named_parameters()}
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
    elif "lokr_t2" in g:
        w2 = torch.einsum("ijkl,ip,jq->pqkl", g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
    else:
        w2 = g["lokr_w2_a"] @ g["lokr_w2_b"]
        if kind != "linear":
            w2 = w2.reshape(w2.shape[0], -1, *layer.weight.shape[2:])
    scale = 1.0 if ("lokr_w2" in g and "lokr_w1" in g) else 1.0 / 2
    expected = kron(w1, w2).reshape(layer.weight.shape) * scale
    torch.testing.assert_close(a.delta_weight(), expected, **TOL)
    check_unmerged_equals_merged(layer, a)


# ---- DoRA -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule, LoKrModule])
@pytest.mark.parametrize("on_out", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_dora(cls, on_out, kind):
    layer = nn.Linear(16, 24) if kind == "linear" else layers()[kind]
    a = cls("n", layer, lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=on_out)
    w = layer.weight.detach().clone()
    # dora_scale starts as the norm of W: per input column (A1111's axis) unless wd_on_output
    if on_out:
        norm0 = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        norm0 = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, -1, *([1] * (w.dim() - 2)))
    torch.testing.assert_close(a.dora_scale.detach(), norm0)
    randomize(a, scale=0.3)
    dw = a.delta_weight()
    merged = w + dw
    if on_out:
        n = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        n = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(1, -1, *([1] * (w.dim() - 2)))
    decomposed = a.dora_scale.detach() * merged / n
    for m in (1.0, 0.6):
        torch.testing.assert_close(a.new_weight(w, m), w + m * (decomposed - w), **TOL)
    check_unmerged_equals_merged(layer, a, 0.6)


def test_dora_axis_from_file_shape():
    layer = nn.Linear(16, 24)
    per_in = LoRAModule.from_weights("n", layer, {"lora_down.weight": torch.randn(4, 16), "lora_up.weight":
                                                  torch.randn(24, 4), "alpha": torch.tensor(4.0),
                                                  "dora_scale": torch.rand(1, 16)})
    per_out = LoRAModule.from_weights("n", layer, {"lora_down.weight": torch.randn(4, 16), "lora_up.weight":
                                                   torch.randn(24, 4), "alpha": torch.tensor(4.0),
                                                   "dora_scale": torch.rand(24, 1)})
    assert not per_in.wd_on_out and per_out.wd_on_out


# ---- DyLoRA, full ---------------------------------------------------------------------------------------------------
def test_dylora_eval_is_plain_lora_and_training_truncates():
    layer = nn.Linear(16, 16)
    a = randomize(DyLoRAModule("n", layer, lora_dim=8, alpha=4, unit=2))
    check_unmerged_equals_merged(layer, a, 1.0)
    a.train()
    x = torch.randn(3, 16)
    torch.manual_seed(5)
    out = a.forward_delta(x)
    torch.manual_seed(5)
    b = int(torch.randint(0, 4, ())) * 2
    r = b + 2
    expected = x @ a.lora_down.weight[:r].T @ a.lora_up.weight[:, :r].T * (4 / 8) * math.sqrt(8 / r)
    torch.testing.assert_close(out, expected, **TOL)
    out.sum().backward()
    g = a.lora_down.weight.grad
    assert g[:b].abs().sum() == 0 and g[r:].abs().sum() == 0
    with pytest.raises(ValueError):
        DyLoRAModule("n", layer, lora_dim=6, unit=4)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_full_diff(kind):
    layer = layers()[kind]
    a = randomize(FullModule("n", layer))
    torch.testing.assert_close(a.delta_weight(), a.diff.detach())
    x = x_for(layer)
    a.eval()
    ref = layer(x)
    base.attach(a)
    got = layer(x)
    base.detach(a)
    exp = run_layer(layer, layer.weight + 0.999 * 0 + a.diff, x, layer.bias + a.diff_b)
    torch.testing.assert_close(got, exp.detach(), **TOL)
    check_unmerged_equals_merged(layer, a)
    assert not torch.allclose(got, ref)


# ---- load-only: IA3, OFT --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3(on_input):
    layer = nn.Linear(12, 10)
    v = torch.rand(12 if on_input else 10)
    a = IA3Module.from_weights("n", layer, {"weight": v, "on_input": torch.tensor(on_input)})
    w = layer.weight.detach()
    scaled = w * (v[None, :] if on_input else v[:, None])
    torch.testing.assert_close(a.new_weight(w, 0.5), w + 0.5 * scaled)
    check_unmerged_equals_merged(layer, a, 0.5)


def test_oft_kohya_blocks():
    layer = nn.Linear(6, 8)
    blocks = torch.randn(2, 4, 4) * 0.1
    a = OFTModule.from_weights("n", layer, {"oft_blocks": blocks, "alpha": torch.tensor(1e-3)})
    w = layer.weight.detach()
    q = blocks - blocks.transpose(1, 2)
    limit = 1e-3 * 8
    if q.norm() > limit:
        q = q * limit / q.norm()
    eye = torch.eye(4)
    r = torch.stack([(eye + q[k]) @ torch.inverse(eye - q[k]) for k in range(2)])
    expected = torch.cat([r[k].T @ w[4 * k:4 * k + 4] for k in range(2)])
    torch.testing.assert_close(a.new_weight(w, 1.0), expected, **TOL)
    # R is orthogonal: row-block norms are kept
    torch.testing.assert_close(a.new_weight(w, 1.0).norm(), w.norm(), **TOL)
    check_unmerged_equals_merged(layer, a, 1.0)


# ---- hooks ----------------------------------------------------------------------------------------------------------
def test_stacking_and_removal_in_any_order():
    layer = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    ref = layer(x)
    a = randomize(LoRAModule("a", layer, lora_dim=2, alpha=2), seed=1).eval()
    b = randomize(LoRAModule("b", layer, lora_dim=2, alpha=2), seed=2).eval()
    base.attach(a)
    base.attach(b)
    both = layer(x)
    expected = ref + F.linear(x, a.delta_weight()) + F.linear(x, b.delta_weight())
    torch.testing.assert_close(both, expected, **TOL)
    a.multiplier = 0.0  # run-time multiplier change
    torch.testing.assert_close(layer(x), ref + F.linear(x, b.delta_weight()), **TOL)
    base.detach(a)
    assert base.attached_adapters(layer) == [b]
    base.detach(b)
    assert "forward" not in layer.__dict__
    torch.testing.assert_close(layer(x), ref)


def test_detect_algo_names():
    assert detect_algo("n", {"lora_down.weight": 0, "lora_up.weight": 0}) is LoRAModule
    assert detect_algo("n", {"hada_w1_a": 0}) is LoHaModule
    assert detect_algo("n", {"lokr_w1": 0}) is LoKrModule
    assert group_by_module({"a.lora_up.weight": 1, "a.alpha": 2}) == {"a": {"lora_up.weight": 1, "alpha": 2}}


def test_training_gradients_flow_through_the_hook():
    layer = nn.Linear(8, 8).requires_grad_(False)
    a = LoRAModule("n", layer, lora_dim=4, alpha=4, rank_dropout=0.25, module_dropout=0.0)
    base.attach(a)
    a.train()
    layer(torch.randn(3, 8)).pow(2).sum().backward()
    base.detach(a)
    assert a.lora_up.weight.grad is not None and a.lora_up.weight.grad.abs().sum() > 0
    assert layer.weight.grad is None
