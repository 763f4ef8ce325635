"""lorakit lora resize: exact at full rank, top singular vectors at a cut, dynamic ranks by their definitions,
metadata and hashes, LoHa expansion."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.tools.lora_resize import dynamic_rank, resize_lora, resize_state_dict

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
C1 = "lora_unet_down_blocks_0_attentions_0_proj_in"
C3 = "lora_unet_down_blocks_0_resnets_0_conv1"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machine is shared: several threads per process slow tiny models down by 100x
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _lora(gen, name, out, inn, r, alpha, k=None):
    if k is None:
        down, up = torch.randn(r, inn, generator=gen), torch.randn(out, r, generator=gen)
    else:
        down, up = torch.randn(r, inn, k, k, generator=gen), torch.randn(out, r, 1, 1, generator=gen)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(float(alpha))}


def delta(sd, name):
    """The reference delta: (alpha/rank) up @ down; a 3x3 conv through the conv2d identity from the format notes."""
    down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
    scale = float(sd[f"{name}.alpha"]) / down.shape[0]
    if down.dim() == 4:
        return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
    return (up @ down) * scale


@pytest.fixture
def sample_sd():
    g = torch.Generator().manual_seed(0)
    sd = {}
    sd.update(_lora(g, LIN, 40, 24, 8, 4))
    sd.update(_lora(g, C1, 32, 16, 8, 8, k=1))
    sd.update(_lora(g, C3, 16, 12, 6, 3, k=3))
    return sd


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_full_rank_reproduces_every_delta(tmp_path, sample_sd):
    src = tmp_path / "in.safetensors"
    save_file(sample_sd, str(src), metadata={"ss_network_dim": "8", "ss_network_alpha": "4"})
    out = tmp_path / "out.safetensors"
    rep = resize_lora(src, out, new_rank=8, new_conv_rank=6, save_precision="float", log=None)
    sd, _ = _read(out)
    for name in (LIN, C1, C3):
        want = delta(sample_sd, name)
        got = delta(sd, name)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert rep.total_fro_retained == pytest.approx(1.0, abs=1e-6)


def test_rank_cut_keeps_top_singular_vectors(sample_sd):
    out, rep = resize_state_dict(sample_sd, new_rank=3, new_conv_rank=2)
    for name, k in ((LIN, 3), (C1, 3), (C3, 2)):
        d = delta(sample_sd, name)
        mat = d.reshape(d.shape[0], -1)
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        got = delta(out, name).reshape(d.shape[0], -1)
        assert out[f"{name}.lora_down.weight"].shape[0] == k
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-4 * best.abs().max().item())
        down = out[f"{name}.lora_down.weight"].reshape(k, -1)
        # the rows of down span exactly the top-k right singular vectors
        torch.testing.assert_close((down @ Vh[:k].T).abs(), torch.eye(k), atol=1e-4, rtol=0)
        # the scale is kept: alpha' = (alpha / rank) * k
        old = sample_sd[f"{name}.alpha"].item() / sample_sd[f"{name}.lora_down.weight"].shape[0]
        assert out[f"{name}.alpha"].item() == pytest.approx(old * k)
        fro = (S[:k].pow(2).sum() / S.pow(2).sum()).sqrt().item()
        assert next(m for m in rep.modules if m.name == name).fro_retained == pytest.approx(fro, rel=1e-4)


def _known(s, out=30, inn=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, len(s), generator=g))
    V, _ = torch.linalg.qr(torch.randn(inn, len(s), generator=g))
    s = torch.tensor(s)
    return {f"{LIN}.lora_up.weight": U * s, f"{LIN}.lora_down.weight": V.T.contiguous(),
            f"{LIN}.alpha": torch.tensor(float(len(s)))}


def _expected(s, method, p):
    """Ranks by the definitions, written out plainly."""
    if method == "sv_ratio":
        return max(1, sum(1 for v in s if v >= s[0] / p))
    vals = [v * v for v in s] if method == "sv_fro" else list(s)
    total = sum(vals)
    acc = 0.0
    for k, v in enumerate(vals, 1):
        acc += v
        frac = (acc / total) ** 0.5 if method == "sv_fro" else acc / total
        if frac >= p:
            return k
    return len(s)


SV = [10.0, 5.0, 2.0, 1.0, 0.5, 0.1]


@pytest.mark.parametrize("method,param", [("sv_ratio", 4.5), ("sv_ratio", 12.0), ("sv_ratio", 1.0),
                                          ("sv_fro", 0.9), ("sv_fro", 0.99), ("sv_fro", 0.999),
                                          ("sv_cumulative", 0.5), ("sv_cumulative", 0.9), ("sv_cumulative", 0.99)])
def test_dynamic_methods_choose_the_defined_rank(method, param):
    want = _expected(SV, method, param)
    out, rep = resize_state_dict(_known(SV), new_rank=6, dynamic_method=method, dynamic_param=param)
    assert out[f"{LIN}.lora_down.weight"].shape[0] == want
    assert rep.modules[0].new_rank == want
    assert dynamic_rank(torch.tensor(SV), method, param) == want


def test_dynamic_rank_is_capped_by_new_rank():
    out, _ = resize_state_dict(_known(SV), new_rank=2, dynamic_method="sv_cumulative", dynamic_param=0.99)
    assert out[f"{LIN}.lora_down.weight"].shape[0] == 2


def test_expected_ranks_are_not_trivial():
    # guard: the parametrised cases above really distinguish ranks
    assert [_expected(SV, "sv_ratio", 4.5), _expected(SV, "sv_fro", 0.9), _expected(SV, "sv_fro", 0.99),
            _expected(SV, "sv_cumulative", 0.9)] == [2, 2, 3, 3]


def test_metadata_and_hashes(tmp_path, sample_sd):
    src = tmp_path / "orig.safetensors"
    save_file(sample_sd, str(src), metadata={"ss_network_dim": "8", "ss_network_alpha": "4", "ss_output_name": "orig",
                                              "ss_training_comment": "hello", "ss_base_model_version": "sd_v1",
                                              "sshs_model_hash": "stale"})
    out = tmp_path / "small.safetensors"
    resize_lora(src, out, new_rank=4, save_precision="fp16", log=None)
    sd, md = _read(out)
    assert md["ss_network_dim"] == "4"
    assert md["ss_output_name"] == "small"
    assert md["ss_training_comment"].startswith("dimension is resized from 8 to 4")
    assert md["ss_training_comment"].endswith("hello")
    assert sd[f"{LIN}.lora_up.weight"].dtype == torch.float16
    assert sd[f"{LIN}.alpha"].dtype == torch.float32  # the scale is not rounded
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert md["ss_network_alpha"] in ("Dynamic", "2")  # LIN: 4/8*4 = 2; C1: 8/8*4 = 4 -> not uniform
    out2 = tmp_path / "dyn.safetensors"
    resize_lora(src, out2, new_rank=8, dynamic_method="sv_fro", dynamic_param=0.9, log=None)
    _, md2 = _read(out2)
    assert md2["ss_network_dim"] == "Dynamic" and md2["ss_network_alpha"] == "Dynamic"
    assert "sv_fro" in md2["ss_training_comment"]
    assert json.loads(md2["ss_network_args"])["conv_dim"] == "Dynamic"


def test_loha_is_expanded_then_factorised():
    from lorakit.adapters import create_network
    from lorakit.models.tiny import tiny_bundle

    bundle = tiny_bundle("sd1")
    net = create_network(bundle, "networks.loha", 2, 1, None, train_text_encoder=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    out, rep = resize_state_dict(sd, new_rank=4, bundle=bundle)  # Hadamard of two rank-2 products: rank <= 4
    names = {k.split(".")[0] for k in sd}
    assert {m.name for m in rep.modules} == names
    for name in list(names)[:20]:
        w = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
        want = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * (w["alpha"] / 2)
        got = delta(out, name).reshape(want.shape[0], -1)
        torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_cli_resize(tmp_path, sample_sd):
    from lorakit.cli.main import main

    src = tmp_path / "in.safetensors"
    save_file(sample_sd, str(src))
    out = tmp_path / "out.safetensors"
    assert main(["lora", "resize", str(src), "--new_rank", "2", "--save_to", str(out), "--verbose"]) == 0
    sd, md = _read(out)
    assert sd[f"{LIN}.lora_down.weight"].shape[0] == 2
    assert main(["lora", "resize", str(src), "--new_rank", "2", "--save_to", str(tmp_path / "x.ckpt")]) == 2


def test_dora_needs_the_base_and_expands_exactly():
    from lorakit.adapters import create_network
    from lorakit.errors import UserError
    from lorakit.models.tiny import tiny_bundle

    bundle = tiny_bundle("sd1")
    net = create_network(bundle, "networks.lora", 2, 2, {"dora_wd": "true"}, train_unet=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n_, p in net.named_parameters():
            if "dora_scale" not in n_:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UserError, match="base_model"):
        resize_state_dict(sd, new_rank=32)
    out, _ = resize_state_dict(sd, new_rank=32, bundle=bundle)  # TE width 32: full rank
    from lorakit.adapters.targets import module_map

    layers = module_map(bundle)
    for name in [k.split(".")[0] for k in sd if k.endswith("dora_scale")][:6]:
        W = layers[name].module.weight.detach().double()
        up, down = sd[f"{name}.lora_up.weight"].double(), sd[f"{name}.lora_down.weight"].double()
        merged = W + up @ down * (float(sd[f"{name}.alpha"]) / 2)
        want = sd[f"{name}.dora_scale"].double() * merged / merged.norm(dim=0, keepdim=True) - W
        torch.testing.assert_close(delta(out, name).double(), want, rtol=1e-4, atol=1e-5)
