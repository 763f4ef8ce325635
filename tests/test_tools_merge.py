"""LoRA merge into a model (applied at r == merged at r, block weights, saved checkpoint and its metadata) and LoRAs
into one LoRA (concat exact, svd at full rank ~ exact)."""

import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lorakit.adapters import create_network, load_network
from lorakit.models.tiny import tiny_bundle
from lorakit.tools.lora_merge import (LoraSpec, merge_into_bundle, merge_into_model, merge_lora_files,
                                      parse_block_weights)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machine is shared: several threads per process slow tiny models down by 100x
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base():
    return tiny_bundle("sd1", seed=0)


def _random_lora(bundle, path, dim, alpha, conv_dim=None, seed=0, te=True):
    args = {"conv_dim": str(conv_dim), "conv_alpha": "1"} if conv_dim else None
    net = create_network(bundle, "networks.lora", dim, alpha, args, train_text_encoder=te)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net.save_weights(path, precision="fp32")
    return path


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    a = _random_lora(base, d / "a.safetensors", 4, 2, conv_dim=2, seed=1)
    b = _random_lora(base, d / "b.safetensors", 8, 8, seed=2)
    return a, b


def _inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 5, 32, generator=g),
            torch.randint(0, 1000, (1, 12), generator=g))


def _outputs(bundle):
    x, t, ctx, ids = _inputs()
    with torch.no_grad():
        u = bundle.unet(x, t, encoder_hidden_states=ctx).sample
        te = bundle.text_encoders[0](ids).last_hidden_state
    return u, te


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def delta(sd, name):
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    scale = float(sd[f"{name}.alpha"]) / down.shape[0]
    if down.dim() == 4:
        return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
    return (up @ down) * scale


def test_applied_equals_merged(base, loras):
    a, b = loras
    applied = copy.deepcopy(base)
    na = load_network(applied, a, multiplier=0.7)
    nb = load_network(applied, b, multiplier=-0.4)
    want_u, want_te = _outputs(applied)
    na.remove()
    nb.remove()
    merged = copy.deepcopy(base)
    recs = merge_into_bundle(merged, [LoraSpec(a, 0.7), LoraSpec(b, -0.4)])
    got_u, got_te = _outputs(merged)
    base_u, _ = _outputs(base)
    assert (want_u - base_u).abs().max() > 1e-3  # the LoRAs do change the output
    torch.testing.assert_close(got_u, want_u, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_te, want_te, rtol=1e-4, atol=1e-4)
    assert recs[0]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()


def test_block_weights_in_model_merge(base, loras):
    a, _ = loras
    merged = copy.deepcopy(base)
    merge_into_bundle(merged, [LoraSpec(a, 1.0, "IN04-IN07:0,OUT03:0.5")])
    mods_b = dict(base.unet.named_modules())
    mods_m = dict(merged.unet.named_modules())
    sd, _ = _read(a)
    in04 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # IN04: weight 0
    in01 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # IN01: weight 1
    out03 = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # OUT03: weight 0.5
    assert torch.equal(mods_m[in04].weight, mods_b[in04].weight)
    for path, w in ((in01, 1.0), (out03, 0.5)):
        d = delta(sd, "lora_unet_" + path.replace(".", "_")).float()
        torch.testing.assert_close(mods_m[path].weight, mods_b[path].weight + w * d, rtol=1e-5, atol=1e-6)
    assert parse_block_weights("OUTD")["OUT03"] == 1.0 and parse_block_weights("OUTD")["IN04"] == 0.0


def test_merge_into_checkpoint_file(base, loras, tmp_path):
    from lorakit.cli.main import main
    from lorakit.models.loading import load_bundle
    from lorakit.models.saving import save_single_file

    a, b = loras
    ckpt = tmp_path / "base.safetensors"
    save_single_file(base, ckpt)
    out = tmp_path / "merged.safetensors"
    rc = main(["lora", "merge", "--model", str(ckpt), "--models", str(a), str(b), "--ratios", "0.5", "1",
               "--save_to", str(out)])
    assert rc == 0
    reloaded = load_bundle(out)
    ref = copy.deepcopy(base)
    na, nb = load_network(ref, a, multiplier=0.5), load_network(ref, b, multiplier=1.0)
    want_u, _ = _outputs(ref)
    torch.testing.assert_close(_outputs(reloaded)[0], want_u, rtol=1e-4, atol=1e-4)
    na.remove()
    nb.remove()
    merge_into_bundle(ref, [LoraSpec(a, 0.5), LoraSpec(b, 1.0)])
    # text encoder compared by weights: a loaded TE's position_ids buffer is left on the meta device (models layer)
    for want_m, got_m in ((ref.text_encoders[0], reloaded.text_encoders[0]), (ref.unet, reloaded.unet)):
        got_sd = got_m.state_dict()
        for k, v in want_m.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(got_sd[k], v, rtol=1e-5, atol=1e-6)
    _, md = _read(out)
    recs = json.loads(md["lorakit.merged_loras"])
    assert [(r["name"], r["ratio"]) for r in recs] == [("a", 0.5), ("b", 1.0)]
    assert recs[1]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()


def test_concat_equals_sum_of_deltas(loras, tmp_path):
    a, b = loras
    out = tmp_path / "cat.safetensors"
    rep = merge_lora_files([LoraSpec(a, 0.7), LoraSpec(b, -0.3)], out, mode="concat", log=None)
    sa, sb = _read(a)[0], _read(b)[0]
    so, md = _read(out)
    names = {k.split(".")[0] for k in list(sa) + list(sb)}
    assert {k.split(".")[0] for k in so} == names
    for n in names:
        want = sum(c * delta(s, n) for s, c in ((sa, 0.7), (sb, -0.3)) if f"{n}.alpha" in s)
        got = delta(so, n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        ranks = sum(s[f"{n}.lora_down.weight"].shape[0] for s in (sa, sb) if f"{n}.alpha" in s)
        assert so[f"{n}.lora_down.weight"].shape[0] == ranks
    assert md["ss_network_dim"] == "Dynamic"  # 12 where both exist, 4 or 2 where only a has the module
    assert rep.modules == len(names)


def test_svd_merge_full_rank_and_cut(loras, tmp_path):
    a, b = loras
    sa, sb = _read(a)[0], _read(b)[0]
    out = tmp_path / "svd.safetensors"
    merge_lora_files([LoraSpec(a, 1.0), LoraSpec(b, 0.5)], out, mode="svd", new_rank=12, new_conv_rank=2, log=None)
    so, md = _read(out)
    for n in {k.split(".")[0] for k in so}:
        want = sum(c * delta(s, n) for s, c in ((sa, 1.0), (sb, 0.5)) if f"{n}.alpha" in s)
        torch.testing.assert_close(delta(so, n), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    out2 = tmp_path / "svd4.safetensors"
    rep = merge_lora_files([LoraSpec(a, 1.0), LoraSpec(b, 0.5)], out2, mode="svd", new_rank=4, log=None)
    so2, md2 = _read(out2)
    assert md2["ss_network_dim"] == "4"
    assert max(v.shape[0] for k, v in so2.items() if k.endswith("lora_down.weight")) == 4
    assert 0 < rep.resize.total_fro_retained < 1
    n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    want = (delta(sa, n) + 0.5 * delta(sb, n)).float()
    U, S, Vh = torch.linalg.svd(want, full_matrices=False)
    torch.testing.assert_close(delta(so2, n).float(), (U[:, :4] * S[:4]) @ Vh[:4], rtol=1e-4, atol=1e-5)


def test_loha_applied_equals_merged(base, tmp_path):
    net = create_network(base, "networks.loha", 2, 1, None)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / "loha.safetensors"
    net.save_weights(path, precision="fp32")
    applied = copy.deepcopy(base)
    n = load_network(applied, path, multiplier=0.6)
    want = _outputs(applied)
    n.remove()
    merged = copy.deepcopy(base)
    merge_into_bundle(merged, [LoraSpec(path, 0.6)])
    for g_, w_ in zip(_outputs(merged), want):
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-4)


def test_merge_into_diffusers_folder(base, loras, tmp_path):
    from lorakit.models.saving import save_single_file

    a, _ = loras
    ckpt = tmp_path / "base.safetensors"
    save_single_file(base, ckpt)
    out = tmp_path / "merged_folder"
    merge_into_model(ckpt, [LoraSpec(a, 0.3, "TE:0")], out, save_precision="fp16", log=None)
    assert (out / "model_index.json").exists()
    rec = json.loads((out / "lorakit_merged_loras.json").read_text())["merged_loras"][0]
    assert rec["ratio"] == 0.3 and rec["block_weights"] == "TE:0"
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    # loaded with diffusers/transformers directly: load_bundle cannot tell a tiny folder's family
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    te = CLIPTextModel.from_pretrained(out / "text_encoder")
    ref = copy.deepcopy(base)
    merge_into_bundle(ref, [LoraSpec(a, 0.3, "TE:0")])
    want_sd = ref.unet.state_dict()
    assert not torch.equal(want_sd["down_blocks.0.attentions.0.proj_in.weight"],
                           base.unet.state_dict()["down_blocks.0.attentions.0.proj_in.weight"])
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v.float(), want_sd[k].half().float(), rtol=0, atol=0)
    te_b, te_g = base.text_encoders[0].state_dict(), {k: v.float() for k, v in te.state_dict().items()}
    for k, v in te_b.items():  # TE weight 0: unchanged (up to fp16)
        if v.is_floating_point():
            torch.testing.assert_close(te_g[k], v.half().float(), rtol=0, atol=0)


def test_lora_merge_block_weights_and_metadata(loras, tmp_path):
    a, b = loras
    out = tmp_path / "bw.safetensors"
    merge_lora_files([LoraSpec(a, 1.0, "TE:0,IN01:0.5"), LoraSpec(b, 1.0, "TE:0")], out, mode="concat", log=None)
    so, md = _read(out)
    sa, sb = _read(a)[0], _read(b)[0]
    assert not any(k.startswith("lora_te") for k in so)
    n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # IN01
    torch.testing.assert_close(delta(so, n), 0.5 * delta(sa, n) + delta(sb, n), rtol=1e-5, atol=1e-6)
    recs = json.loads(md["lorakit.merged_loras"])
    assert recs[0]["block_weights"] == "TE:0,IN01:0.5" and recs[1]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()
    assert md["ss_output_name"] == "bw" and md["ss_base_model_version"] == "sd_v1"
    assert md["modelspec.merged_from"] == "a, b"
