"""lorakit lora extract: (base, base + known low-rank delta) gives back that delta; the text encoder only when it
changed; clamping; the CLI on checkpoint files."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lorakit.models.tiny import tiny_bundle
from lorakit.tools.lora_extract import extract_from_bundles, lora_targets


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base():
    return tiny_bundle("sd1", seed=0)


def delta(sd, name):
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    scale = float(sd[f"{name}.alpha"]) / down.shape[0]
    if down.dim() == 4:
        return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
    return (up @ down) * scale


def _tune(base, rank=2, conv=False, te=False, seed=5):
    """A copy of base with a known rank-`rank` change added to every LoRA target layer."""
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    known = {}
    te_t, unet_t = lora_targets(tuned, conv)
    for t in unet_t + (te_t if te else []):
        w = t.module.weight
        a = torch.randn(w.shape[0], rank, generator=g) * 0.1
        b = torch.randn(rank, w[0].numel(), generator=g) * 0.1
        d = (a @ b).reshape(w.shape)
        with torch.no_grad():
            w.add_(d)
        known[t.lora_name] = d.double()
    return tuned, known


def test_recovers_a_known_low_rank_delta(base):
    tuned, known = _tune(base, rank=2, conv=True)
    sd, rep = extract_from_bundles(base, tuned, dim=3, conv_dim=2, clamp_quantile=1.0)
    names = {k.split(".")[0] for k in sd}
    assert names == set(known)  # every networks.lora module (with conv layers), no text encoder
    assert not rep.text_encoder_included
    for n, d in known.items():
        got = delta(sd, n)
        assert got.shape == d.shape
        torch.testing.assert_close(got, d, rtol=0, atol=1e-5)
        assert float(sd[f"{n}.alpha"]) == sd[f"{n}.lora_down.weight"].shape[0]  # alpha = rank: scale 1
    assert rep.fro_retained == pytest.approx(1.0, abs=1e-5)


def test_text_encoder_only_when_changed(base):
    tuned, known = _tune(base, rank=1, te=True, seed=6)
    sd, rep = extract_from_bundles(base, tuned, dim=2, clamp_quantile=1.0, min_diff=1e-4)
    assert rep.text_encoder_included
    te_names = [n for n in known if n.startswith("lora_te_")]
    assert len(te_names) == 72 and all(f"{n}.lora_up.weight" in sd for n in te_names)
    torch.testing.assert_close(delta(sd, te_names[0]), known[te_names[0]], rtol=0, atol=1e-5)
    # the same change under a threshold above it: UNet only
    sd2, rep2 = extract_from_bundles(base, tuned, dim=2, clamp_quantile=1.0, min_diff=10.0)
    assert not rep2.text_encoder_included and not any(k.startswith("lora_te") for k in sd2)


def test_clamp_quantile_bounds_the_factors(base):
    tuned, _ = _tune(base, rank=2, seed=7)
    sd, _ = extract_from_bundles(base, tuned, dim=2, clamp_quantile=0.9)
    n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down = sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"]
    both = torch.cat([up.flatten(), down.flatten()])
    hi = both.abs().max()
    assert (both.abs() >= hi - 1e-7).sum() >= 2  # values were cut at the quantile


def test_cli_extract_files(base, tmp_path):
    from lorakit.cli.main import main
    from lorakit.models.saving import save_single_file

    tuned, known = _tune(base, rank=2, seed=8)
    save_single_file(base, tmp_path / "org.safetensors")
    save_single_file(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "x.safetensors"
    rc = main(["lora", "extract", "--model_org", str(tmp_path / "org.safetensors"), "--model_tuned",
               str(tmp_path / "tuned.safetensors"), "--dim", "2", "--clamp_quantile", "1", "--save_to", str(out)])
    assert rc == 0
    with safe_open(str(out), framework="pt") as f:
        md = dict(f.metadata())
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert md["ss_network_dim"] == "2" and md["ss_network_alpha"] == "2.0"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_output_name"] == "x"
    assert json.loads(md["ss_network_args"]) == {}
    n = next(iter(known))
    torch.testing.assert_close(delta(sd, n), known[n], rtol=0, atol=1e-5)
