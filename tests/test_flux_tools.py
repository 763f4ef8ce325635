"""`lorakit lora merge|extract|filter` on tiny FLUX.1 files: the deltas they write against the sums, differences and
block selections they promise, with FLUX's block names (D00..D18 double, S00..S37 single)."""

from __future__ import annotations

import pytest
import torch

from lorakit.adapters.network import create_network, load_network
from lorakit.cli.main import main
from lorakit.models.tiny import tiny_bundle


def _lora(path, seed, te=True):
    net = create_network(tiny_bundle("flux-dev", seed=0), "networks.lora", 2, 1, train_text_encoder=te)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.save_weights(str(path), precision=None)
    return {n: m.delta_weight().detach() for n, m in net.named_children()}


def _deltas(path):
    return {n: m.delta_weight().detach() for n, m in load_network(tiny_bundle("flux-dev", seed=0), str(path))
            .named_children()}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux_tools")
    return d, _lora(d / "a.safetensors", 1), _lora(d / "b.safetensors", 2, te=False)


def test_merge_concat_and_svd_are_the_sum(two):
    d, a, b = two
    assert main(["lora", "merge", str(d / "a.safetensors"), str(d / "b.safetensors"), "--ratios", "1", "0.5",
                 "--mode", "concat", "--save_to", str(d / "cat.safetensors")]) == 0
    assert main(["lora", "merge", str(d / "a.safetensors"), str(d / "b.safetensors"), "--ratios", "1", "0.5",
                 "--new_rank", "4", "--save_to", str(d / "svd.safetensors")]) == 0
    for out in ("cat", "svd"):
        got = _deltas(d / f"{out}.safetensors")
        assert got.keys() == a.keys()  # b has no CLIP-L modules: a's alone there
        for n, want in a.items():
            want = want + 0.5 * b[n] if n in b else want
            assert torch.allclose(got[n], want, atol=1e-5), (out, n)


def test_merge_block_weights_use_flux_blocks(two):
    d, a, b = two
    assert main(["lora", "merge", str(d / "a.safetensors"), "--block_weights", "D00-D18:0,S05:0.5", "--mode", "concat",
                 "--save_to", str(d / "bw.safetensors")]) == 0
    got = _deltas(d / "bw.safetensors")
    assert not any(n.startswith("lora_unet_double_") for n in got)
    assert torch.allclose(got["lora_unet_single_blocks_5_linear1"], 0.5 * a["lora_unet_single_blocks_5_linear1"],
                          atol=1e-6)
    assert torch.allclose(got["lora_unet_single_blocks_6_linear1"], a["lora_unet_single_blocks_6_linear1"], atol=1e-6)


def test_merge_into_the_model_adds_the_delta(two):
    from lorakit.models.loading import load_bundle
    from lorakit.models.saving import save_single_file

    d, a, _ = two
    save_single_file(tiny_bundle("flux-dev", seed=0), d / "base.safetensors")
    assert main(["lora", "merge", str(d / "a.safetensors"), "--ratios", "0.8", "--model", str(d / "base.safetensors"),
                 "--save_to", str(d / "merged.safetensors")]) == 0
    base, merged = tiny_bundle("flux-dev", seed=0), load_bundle(d / "merged.safetensors")
    for path, name in (("double_blocks.3.img_attn.qkv", "lora_unet_double_blocks_3_img_attn_qkv"),
                       ("single_blocks.20.linear1", "lora_unet_single_blocks_20_linear1")):
        w0, w1 = (m.unet.get_submodule(path).weight for m in (base, merged))
        assert torch.allclose(w1, w0 + 0.8 * a[name], atol=1e-5)


def test_extract_recovers_a_low_rank_change(tmp_path):
    from lorakit.models.saving import save_single_file

    base, tuned = tiny_bundle("flux-dev", seed=0), tiny_bundle("flux-dev", seed=0)
    g = torch.Generator().manual_seed(5)
    change = {}
    with torch.no_grad():
        for path in ("double_blocks.2.txt_mlp.0", "single_blocks.30.linear2"):
            w = tuned.unet.get_submodule(path).weight
            change[path] = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.02
            w.add_(change[path])
    save_single_file(base, tmp_path / "base.safetensors")
    save_single_file(tuned, tmp_path / "tuned.safetensors")
    assert main(["lora", "extract", "--model_org", str(tmp_path / "base.safetensors"), "--model_tuned",
                 str(tmp_path / "tuned.safetensors"), "--dim", "4", "--clamp_quantile", "1",
                 "--save_to", str(tmp_path / "ex.safetensors")]) == 0
    got = _deltas(tmp_path / "ex.safetensors")
    assert len(got) == 304 and not any(n.startswith("lora_te") for n in got)  # the text encoders did not change
    assert torch.allclose(got["lora_unet_double_blocks_2_txt_mlp_0"], change["double_blocks.2.txt_mlp.0"], atol=1e-4)
    assert torch.allclose(got["lora_unet_single_blocks_30_linear2"], change["single_blocks.30.linear2"], atol=1e-4)
    assert got["lora_unet_single_blocks_29_linear2"].abs().max() < 1e-5


def test_filter_keeps_drops_and_scales_flux_blocks(two):
    d, a, _ = two
    assert main(["lora", "filter", str(d / "a.safetensors"), "--keep", "D00-05,S10,TE",
                 "--save_to", str(d / "keep.safetensors")]) == 0
    kept = _deltas(d / "keep.safetensors")
    want = {n for n in a if n.startswith("lora_te1_")} | {n for n in a if any(
        n.startswith(f"lora_unet_double_blocks_{i}_") for i in range(6))} | {
        n for n in a if n.startswith("lora_unet_single_blocks_10_")}
    assert set(kept) == want
    assert main(["lora", "filter", str(d / "a.safetensors"), "--drop", "TE", "--scale", "S00-S37:0.5,D18:0",
                 "--save_to", str(d / "scaled.safetensors")]) == 0
    scaled = _deltas(d / "scaled.safetensors")
    assert not any(n.startswith(("lora_te", "lora_unet_double_blocks_18_")) for n in scaled)
    assert torch.allclose(scaled["lora_unet_single_blocks_0_linear2"], 0.5 * a["lora_unet_single_blocks_0_linear2"],
                          atol=1e-6)
    assert torch.equal(scaled["lora_unet_double_blocks_0_img_mlp_0"], a["lora_unet_double_blocks_0_img_mlp_0"])
    assert main(["lora", "filter", str(d / "a.safetensors"), "--keep", "D00-S03",
                 "--save_to", str(d / "x.safetensors")]) == 0  # a range across both kinds, in lora info's order
    assert main(["lora", "filter", str(d / "a.safetensors"), "--keep", "D19", "--save_to", str(d / "y.safetensors")]) \
        == 2
