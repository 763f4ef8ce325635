"""lorakit lora filter: keep/drop blocks by readable names, scale blocks exactly, metadata note."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.errors import UserError
from lorakit.tools.lora_filter import filter_lora, filter_state_dict

MODS = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "BASE",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01",
    "lora_unet_down_blocks_1_attentions_0_proj_in": "IN04",
    "lora_unet_down_blocks_2_attentions_1_proj_in": "IN08",
    "lora_unet_mid_block_attentions_0_proj_in": "M00",
    "lora_unet_up_blocks_1_attentions_0_proj_in": "OUT03",
    "lora_unet_up_blocks_2_attentions_0_proj_in": "OUT06",
    "lora_unet_up_blocks_3_attentions_2_proj_in": "OUT11",
}
SDXL_MODS = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "BASE",
    "lora_unet_input_blocks_4_1_proj_in": "IN04",
    "lora_unet_middle_block_1_proj_in": "M00",
    "lora_unet_output_blocks_3_1_proj_in": "OUT03",
    "lora_unet_output_blocks_7_1_proj_in": "OUT07",
}


def _sd(names):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for n in names:
        sd[f"{n}.lora_down.weight"] = torch.randn(2, 8, generator=g)
        sd[f"{n}.lora_up.weight"] = torch.randn(8, 2, generator=g)
        sd[f"{n}.alpha"] = torch.tensor(1.0)
    return sd


def _blocks(sd, mods):
    return {mods[k.split(".")[0]] for k in sd}


def test_keep_ranges():
    out, rep = filter_state_dict(_sd(MODS), keep="IN04-IN07,OUT03-OUT06")
    assert _blocks(out, MODS) == {"IN04", "OUT03", "OUT06"}
    out, _ = filter_state_dict(_sd(MODS), keep="IN04-07,MID,TE")
    assert _blocks(out, MODS) == {"IN04", "M00", "BASE"}
    out, _ = filter_state_dict(_sd(SDXL_MODS), keep="IN04-IN08,OUT03-OUT06")
    assert _blocks(out, SDXL_MODS) == {"IN04", "OUT03"}


def test_drop():
    out, rep = filter_state_dict(_sd(MODS), drop="TE,MID")
    assert _blocks(out, MODS) == set(MODS.values()) - {"BASE", "M00"}
    assert len(rep.dropped) == 2


def test_scale_is_exact_and_zero_drops():
    sd = _sd(MODS)
    out, _ = filter_state_dict(sd, scale="IN04:0.5,OUT03-OUT06:-2,TE:0")
    for n, block in MODS.items():
        if block == "BASE":
            assert f"{n}.lora_up.weight" not in out
            continue
        f = {"IN04": 0.5, "OUT03": -2.0, "OUT06": -2.0}.get(block, 1.0)
        want = f * sd[f"{n}.lora_up.weight"] @ sd[f"{n}.lora_down.weight"]
        torch.testing.assert_close(out[f"{n}.lora_up.weight"] @ out[f"{n}.lora_down.weight"], want)


def test_loha_scale_scales_the_delta():
    g = torch.Generator().manual_seed(1)
    n = "lora_unet_down_blocks_1_attentions_0_proj_in"
    w = {f"{n}.{k}": torch.randn(*s, generator=g) for k, s in
         (("hada_w1_a", (8, 2)), ("hada_w1_b", (2, 8)), ("hada_w2_a", (8, 2)), ("hada_w2_b", (2, 8)))}
    w[f"{n}.alpha"] = torch.tensor(2.0)

    def d(x):
        return (x[f"{n}.hada_w1_a"] @ x[f"{n}.hada_w1_b"]) * (x[f"{n}.hada_w2_a"] @ x[f"{n}.hada_w2_b"])

    out, _ = filter_state_dict(w, scale="IN04:0.25")
    torch.testing.assert_close(d(out), 0.25 * d(w))


def test_errors():
    with pytest.raises(UserError):
        filter_state_dict(_sd(MODS), keep="IN99")
    with pytest.raises(UserError):
        filter_state_dict(_sd(MODS), keep="IN00")  # nothing left
    with pytest.raises(UserError):
        filter_state_dict(_sd(MODS))


def test_file_and_cli(tmp_path):
    from lorakit.cli.main import main

    src = tmp_path / "in.safetensors"
    save_file({k: v.half() if not k.endswith("alpha") else v for k, v in _sd(MODS).items()}, str(src),
              metadata={"ss_output_name": "in", "ss_training_comment": "orig"})
    out = tmp_path / "out.safetensors"
    assert main(["lora", "filter", str(src), "--keep", "IN04-IN07,OUT03-OUT06", "--save_to", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        md = dict(f.metadata())
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype in (torch.float16, torch.float32)
    assert md["ss_output_name"] == "out"
    assert md["ss_training_comment"].startswith("filtered (keep IN04-IN07,OUT03-OUT06)")
    assert len(keys) == 9
    filter_lora(src, tmp_path / "o2.safetensors", drop="TE", log=None)
