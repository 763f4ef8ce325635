import random

import pytest

from lorakit.errors import UserError
from lorakit.generate.lbw import (
    BLOCKS_26,
    DEFAULT_PRESETS,
    block_of_lora_name,
    block_weight,
    elemental_weight,
    expand_to_26,
    load_preset_file,
    parse_block_selector,
    parse_elemental,
    parse_preset_text,
    parse_weight_values,
    resolve_lbw,
)

ALL26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
LORA17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
          "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]


def test_block_lists():
    assert BLOCKS_26 == ALL26


def nonzero(mapping):
    return {k for k, v in mapping.items() if v != 0}


@pytest.mark.parametrize(
    "preset,blocks",
    [
        ("NONE", set()),
        ("ALL", set(LORA17)),
        ("INS", {"BASE", "IN01", "IN02", "IN04"}),
        ("IND", {"BASE", "IN05", "IN07", "IN08"}),
        ("INALL", {"BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"}),
        ("MIDD", {"BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"}),
        ("OUTD", {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"}),
        ("OUTS", {"BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"}),
        ("OUTALL", {"BASE"} | {f"OUT{i:02d}" for i in range(3, 12)}),
    ],
)
def test_default_presets(preset, blocks):
    w = resolve_lbw(preset)
    assert list(w) == ALL26
    assert nonzero(w) == blocks
    assert all(w[b] == 1.0 for b in blocks)


def test_all05_and_csv_forms():
    w = resolve_lbw("ALL0.5")
    assert {w[b] for b in LORA17} == {0.5}
    assert {w[b] for b in set(ALL26) - set(LORA17)} == {0.0}
    csv26 = ",".join(str(i) for i in range(26))
    assert list(resolve_lbw(csv26).values()) == [float(i) for i in range(26)]


def test_expand_sdxl_vectors():
    v12 = [float(i + 1) for i in range(12)]
    w = dict(zip(ALL26, expand_to_26(v12)))
    names12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
    assert {k: v for k, v in w.items() if v} == dict(zip(names12, v12))
    v20 = [float(i + 1) for i in range(20)]
    w = dict(zip(ALL26, expand_to_26(v20)))
    names20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
    assert {k: v for k, v in w.items() if v} == dict(zip(names20, v20))
    with pytest.raises(UserError):
        expand_to_26([1.0] * 5)


def test_random_and_x_values():
    rng = random.Random(3)
    ref = random.Random(3)
    vals = parse_weight_values("R,U,X,X+0.25,X-0.5,0.3", x=0.8, rng=rng)
    r = round(ref.random(), 3)
    u = round(ref.uniform(-0.5, 1.5), 3)
    assert vals == pytest.approx([r, u, 0.8, 1.05, 0.3, 0.3])
    assert 0 <= vals[0] <= 1 and -0.5 <= vals[1] <= 1.5
    with pytest.raises(UserError):
        parse_weight_values("1,Y")
    with pytest.raises(UserError):
        parse_weight_values("X*2")
    # X defaults to 1
    assert resolve_lbw("X," * 16 + "X-1")["OUT11"] == 0.0


def test_unknown_preset_lists_valid_names():
    with pytest.raises(UserError) as ei:
        resolve_lbw("NCNF")
    msg = str(ei.value)
    assert "NCNF" in msg
    for name in DEFAULT_PRESETS:
        assert name in msg
    with pytest.raises(UserError, match="values"):
        resolve_lbw("1,0,1")


def test_user_preset_file(tmp_path):
    f = tmp_path / "lbwpresets.txt"
    f.write_text(
        "# my presets\n\nNCNF:1,1,1,1,1,0,0,0,1,1,1,1,0,0,0,1,1\nHALF:" + ",".join(["0.5"] * 26) + "\n",
        encoding="utf-8",
    )
    presets = {**DEFAULT_PRESETS, **load_preset_file(f)}
    w = resolve_lbw("NCNF", presets)
    zero17 = {"IN07", "IN08", "M00", "OUT07", "OUT08", "OUT09"}  # positions 6-8 and 13-15
    assert nonzero(w) == set(LORA17) - zero17
    assert set(resolve_lbw("HALF", presets).values()) == {0.5}
    with pytest.raises(UserError, match="NCNF"):
        resolve_lbw("NOPE", presets)


@pytest.mark.parametrize("text", ["NOCOLON 1,2", "BAD:1,2,3", "BAD:" + ",".join(["q"] * 17)])
def test_bad_preset_lines(text):
    with pytest.raises(UserError, match="line 1"):
        parse_preset_text(text)


def test_missing_preset_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_preset_file(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "name,block",
    [
        # SD1/SD2 diffusers-style kohya names
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "IN01"),
        ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", "IN02"),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", "IN03"),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "IN04"),
        ("lora_unet_down_blocks_1_resnets_1_conv1", "IN05"),
        ("lora_unet_down_blocks_1_downsamplers_0_conv", "IN06"),
        ("lora_unet_down_blocks_2_attentions_1_proj_out", "IN08"),
        ("lora_unet_down_blocks_3_resnets_0_conv2", "IN10"),
        ("lora_unet_down_blocks_3_resnets_1_conv2", "IN11"),
        ("lora_unet_mid_block_attentions_0_proj_in", "M00"),
        ("lora_unet_mid_block_resnets_1_conv1", "M00"),
        ("lora_unet_up_blocks_0_resnets_2_conv1", "OUT02"),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", "OUT02"),
        ("lora_unet_up_blocks_1_attentions_0_proj_in", "OUT03"),
        ("lora_unet_up_blocks_1_attentions_2_proj_in", "OUT05"),
        ("lora_unet_up_blocks_2_upsamplers_0_conv", "OUT08"),
        ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", "OUT11"),
        # full keys and dotted names
        ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight", "IN04"),
        ("unet.up_blocks.1.attentions.1.proj_out.lora_A.weight", "OUT04"),
        # SDXL SAI-style names
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "IN04"),
        ("lora_unet_input_blocks_8_1_proj_in", "IN08"),
        ("lora_unet_middle_block_1_transformer_blocks_3_attn2_to_v", "M00"),
        ("lora_unet_output_blocks_0_1_proj_out", "OUT00"),
        ("lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj", "OUT05"),
        ("lora_unet_output_blocks_11_0_skip_connection", "OUT11"),
        # text encoders
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "BASE"),
        ("lora_te1_text_model_encoder_layers_11_mlp_fc1", "BASE"),
        ("lora_te2_text_model_encoder_layers_31_mlp_fc2.alpha", "BASE"),
        # conv_in is input block 0
        ("lora_unet_conv_in", "IN00"),
    ],
)
def test_block_of_lora_name(name, block):
    assert block_of_lora_name(name) == block


def test_parts_outside_blocks_keep_weight_one():
    assert block_of_lora_name("lora_unet_time_embedding_linear_1") is None
    assert block_of_lora_name("lora_unet_conv_out") is None
    w = resolve_lbw("NONE")
    assert block_weight("lora_unet_time_embedding_linear_1", w) == 1.0
    assert block_weight("lora_unet_down_blocks_1_attentions_0_proj_in", w) == 0.0
    assert block_weight("lora_te_text_model_encoder_layers_0_mlp_fc1", resolve_lbw("OUTD")) == 1.0


@pytest.mark.parametrize(
    "text,blocks",
    [
        ("IN04-IN07,OUT03-OUT06", {"IN04", "IN05", "IN06", "IN07", "OUT03", "OUT04", "OUT05", "OUT06"}),
        ("IN04-07, OUT03-06", {"IN04", "IN05", "IN06", "IN07", "OUT03", "OUT04", "OUT05", "OUT06"}),
        ("MID", {"M00"}),
        ("m00", {"M00"}),
        ("TE", {"BASE"}),
        ("BASE,in4", {"BASE", "IN04"}),
        ("IN10-OUT01", {"IN10", "IN11", "M00", "OUT00", "OUT01"}),
        ("OUT01-IN11", {"IN11", "M00", "OUT00", "OUT01"}),
        ("ALL", set(ALL26)),
    ],
)
def test_block_selector(text, blocks):
    assert parse_block_selector(text) == blocks


@pytest.mark.parametrize("text", ["IN12", "OUT3X", "FOO", "", "IN04-XX"])
def test_block_selector_errors_list_valid_names(text):
    with pytest.raises(UserError) as ei:
        parse_block_selector(text)
    if text:
        assert "IN00..IN11" in str(ei.value)


def test_elemental_rules():
    rules = parse_elemental("IN05-OUT05:attn:0, OUT03:NOT ff:0.5")
    base = 1.0
    assert elemental_weight("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q", rules, base) == 0.0
    assert elemental_weight("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_2", rules, base) == 1.0
    assert elemental_weight("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", rules, base) == 1.0
    # OUT03 is in both rules: the later one wins for non-ff modules
    assert elemental_weight("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", rules, base) == 0.5
    assert elemental_weight("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", rules, base) == 1.0
    with pytest.raises(UserError):
        parse_elemental("IN05:attn")


def test_weights_for_tag():
    from lorakit.generate.extra_networks import parse_extra_networks
    from lorakit.generate.lbw import DEFAULT_ELEMENTAL_PRESETS, weights_for_tag

    _, (plain, legacy, named) = parse_extra_networks(
        "<lora:a:1><lora:m4_carbine:0.8:OUTD><lora:b:1:lbw=X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X,X-0.5:x=0.6>"
    )
    assert weights_for_tag(plain) is None
    assert nonzero(weights_for_tag(legacy)) == {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"}
    w = weights_for_tag(named)
    assert w["IN01"] == pytest.approx(0.6) and w["OUT11"] == pytest.approx(0.1) and w["IN00"] == 0.0
    _, (bad,) = parse_extra_networks("<lora:m4_carbine:0.8:NCNF>")
    with pytest.raises(UserError, match="<lora:m4_carbine:0.8:NCNF>"):
        weights_for_tag(bad)
    rules = parse_elemental("ATTNDEEPOFF", DEFAULT_ELEMENTAL_PRESETS)
    assert elemental_weight("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", rules, 1.0) == 0.0
