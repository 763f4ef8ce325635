"""Module selection and kohya names on full-size SD1.5 / SD2 / SDXL (meta device), compared with name lists written
here from the architecture (sd-scripts networks.lora rules), plus block-wise options and network_args checks."""

import math

import pytest
import torch

from lorakit.adapters import create_network
from lorakit.adapters.blocks import SD_SCHEME, SDXL_SCHEME, block_lr_weights, parse_block_selector
from lorakit.errors import UserError
from lorakit.models.meta import meta_bundle

torch.set_num_threads(1)  # tiny tensors: extra threads only contend on the shared test machine

TB = ["attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k", "attn2_to_v",
      "attn2_to_out_0", "ff_net_0_proj", "ff_net_2"]
TE = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


def attention(prefix, n_tb):
    names = [f"{prefix}_proj_in", f"{prefix}_proj_out"]
    names += [f"{prefix}_transformer_blocks_{k}_{s}" for k in range(n_tb) for s in TB]
    return names


def te_names(prefix, layers):
    return [f"{prefix}_text_model_encoder_layers_{i}_{s}" for i in range(layers) for s in TE]


def sd1_unet_names(conv):
    u = "lora_unet_"
    names = []
    for i in range(3):
        for j in range(2):
            names += attention(f"{u}down_blocks_{i}_attentions_{j}", 1)
    names += attention(f"{u}mid_block_attentions_0", 1)
    for i in range(1, 4):
        for j in range(3):
            names += attention(f"{u}up_blocks_{i}_attentions_{j}", 1)
    if conv:
        ch = [320, 640, 1280, 1280]
        for i in range(4):
            for j in range(2):
                p = f"{u}down_blocks_{i}_resnets_{j}"
                names += [f"{p}_conv1", f"{p}_conv2", f"{p}_time_emb_proj"]
                cin = (ch[i - 1] if i else 320) if j == 0 else ch[i]
                if cin != ch[i]:
                    names.append(f"{p}_conv_shortcut")
            if i < 3:
                names.append(f"{u}down_blocks_{i}_downsamplers_0_conv")
        for j in range(2):
            names += [f"{u}mid_block_resnets_{j}_{s}" for s in ("conv1", "conv2", "time_emb_proj")]
        for i in range(4):
            for j in range(3):  # every up resnet sees concatenated skips: channels change, 1x1 shortcut
                names += [f"{u}up_blocks_{i}_resnets_{j}_{s}" for s in ("conv1", "conv2", "time_emb_proj",
                                                                          "conv_shortcut")]
            if i < 3:
                names.append(f"{u}up_blocks_{i}_upsamplers_0_conv")
    return names


def sdxl_unet_names(conv):
    u = "lora_unet_"
    names = []
    for n, tb in ((4, 2), (5, 2), (7, 10), (8, 10)):
        names += attention(f"{u}input_blocks_{n}_1", tb)
    names += attention(f"{u}middle_block_1", 10)
    for n in range(6):
        names += attention(f"{u}output_blocks_{n}_1", 10 if n < 3 else 2)
    if conv:
        def res(p, skip):
            return [f"{p}_in_layers_2", f"{p}_out_layers_3", f"{p}_emb_layers_1"] + ([f"{p}_skip_connection"] if skip
                                                                                      else [])
        for n in (1, 2, 4, 5, 7, 8):
            names += res(f"{u}input_blocks_{n}_0", n in (4, 7))
        names += [f"{u}input_blocks_3_0_op", f"{u}input_blocks_6_0_op"]
        names += res(f"{u}middle_block_0", False) + res(f"{u}middle_block_2", False)
        for n in range(9):
            names += res(f"{u}output_blocks_{n}_0", True)
        names += [f"{u}output_blocks_2_2_conv", f"{u}output_blocks_5_2_conv"]
    return names


@pytest.fixture(scope="module")
def sd1():
    return meta_bundle("sd1", components=("unet", "text_encoders"))


@pytest.fixture(scope="module")
def sdxl():
    return meta_bundle("sdxl", components=("unet", "text_encoders"))


@pytest.mark.parametrize("conv", [False, True])
def test_sd1_names_and_counts(sd1, conv):
    net = create_network(sd1, "networks.lora", 4, 1, {"conv_dim": "4", "conv_alpha": "1"} if conv else {})
    expected_unet = sd1_unet_names(conv)
    assert sorted(a.lora_name for a in net.unet_adapters) == sorted(expected_unet)
    assert sorted(a.lora_name for a in net.te_adapters) == sorted(te_names("lora_te", 12))
    assert (len(net.unet_adapters), len(net.te_adapters)) == ((278 if conv else 192), 72)
    if conv:  # 3x3 convs get conv_dim, time_emb_proj / 1x1 shortcut network_dim
        net2 = create_network(sd1, "networks.lora", 8, 1, {"conv_dim": "2", "conv_alpha": "1"})
        ranks = {a.lora_name: a.rank for a in net2.adapters}
        assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 2
        assert ranks["lora_unet_down_blocks_0_downsamplers_0_conv"] == 2
        assert ranks["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == 8
        assert ranks["lora_unet_mid_block_resnets_0_time_emb_proj"] == 8


@pytest.mark.parametrize("conv", [False, True])
def test_sdxl_names_and_counts(sdxl, conv):
    net = create_network(sdxl, "networks.lora", 4, 1, {"conv_dim": "4"} if conv else {})
    assert sorted(a.lora_name for a in net.unet_adapters) == sorted(sdxl_unet_names(conv))
    assert sorted(a.lora_name for a in net.te_adapters) == sorted(te_names("lora_te1", 12) + te_names("lora_te2", 32))
    assert (len(net.unet_adapters), len(net.te_adapters)) == ((788 if conv else 722), 264)


def test_sd2_te_uses_23_layers():
    b = meta_bundle("sd2", components=("unet", "text_encoders"))
    net = create_network(b, "networks.lora", 4, 1, {})
    assert sorted(a.lora_name for a in net.te_adapters) == sorted(te_names("lora_te", 23))
    assert len(net.unet_adapters) == 192


def test_lycoris_full_preset_adds_conv_and_extra_layers(sd1):
    net = create_network(sd1, "lycoris.kohya", 8, 4, {"algo": "lora"})  # conv_dim defaults to network_dim
    names = set(net.names())
    assert len(net.unet_adapters) == 278 + 4
    assert {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1"} <= names
    assert all(a.rank == 8 for a in net.adapters)
    net = create_network(sd1, "lycoris.kohya", 8, 4, {"algo": "lora", "preset": "attn-mlp"})
    assert len(net.unet_adapters) == 192


def test_block_selector_keeps_only_chosen_blocks(sd1):
    net = create_network(sd1, "networks.lora", 4, 1, {"blocks": "IN04-IN07,OUT03-06"})
    expected = []
    for i, j in ((1, 0), (1, 1), (2, 0)):
        expected += attention(f"lora_unet_down_blocks_{i}_attentions_{j}", 1)
    for i, j in ((1, 0), (1, 1), (1, 2), (2, 0)):
        expected += attention(f"lora_unet_up_blocks_{i}_attentions_{j}", 1)
    assert sorted(net.names()) == sorted(expected)
    with_te = create_network(sd1, "networks.lora", 4, 1, {"blocks": "MID,TE"})
    assert len(with_te.te_adapters) == 72 and len(with_te.unet_adapters) == 12


def test_block_selector_errors_list_valid_names():
    with pytest.raises(UserError, match="IN00.*OUT11"):
        parse_block_selector("IN04-IN07,OUT13", SD_SCHEME)
    with pytest.raises(UserError, match="OUT08"):
        parse_block_selector("FOO", SDXL_SCHEME)
    assert parse_block_selector("MID", SDXL_SCHEME) == ({10, 11, 12}, False)
    assert parse_block_selector("in4-5, te", SD_SCHEME) == ({4, 5}, True)


def test_block_dims_per_block(sd1):
    dims = [0] * 25
    dims[4], dims[5], dims[12], dims[16] = 2, 3, 5, 7  # IN04, IN05, MID, OUT03
    alphas = [1.0] * 25
    alphas[12] = 2.5
    net = create_network(sd1, "networks.lora", 4, 1, {"block_dims": ",".join(map(str, dims)),
                                                       "block_alphas": ",".join(map(str, alphas))})
    ranks = {a.lora_name: (a.rank, a.alpha_value) for a in net.unet_adapters}
    assert ranks["lora_unet_down_blocks_1_attentions_0_proj_in"] == (2, 1.0)
    assert ranks["lora_unet_down_blocks_1_attentions_1_proj_in"] == (3, 1.0)
    assert ranks["lora_unet_mid_block_attentions_0_proj_in"] == (5, 2.5)
    assert ranks["lora_unet_up_blocks_1_attentions_0_proj_in"] == (7, 1.0)
    assert len(ranks) == 12 * 4
    assert len(net.te_adapters) == 72 and all(a.rank == 4 for a in net.te_adapters)
    with pytest.raises(UserError, match="25"):
        create_network(sd1, "networks.lora", 4, 1, {"block_dims": "1,2,3"})


def test_lr_weight_presets_and_threshold():
    n = 12
    cos = [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)][::-1]
    w = block_lr_weights(SD_SCHEME, "cosine", None, "linear+0.5", 0.0)
    assert len(w) == 25
    assert w[:12] == pytest.approx(cos)
    assert w[12] == 1.0
    assert w[13:] == pytest.approx([i / 11 + 0.5 for i in range(12)])
    w = block_lr_weights(SD_SCHEME, "0,0.1,0.5", "0", None, 0.2)  # short list: filled with 1; <= 0.2 -> 0
    assert w[:4] == [0.0, 0.0, 0.5, 1.0] and w[12] == 0.0
    wx = block_lr_weights(SDXL_SCHEME, "zeros+0.3", "1,1,1", None, 0)
    assert len(wx) == 23 and wx[0] == 1.0 and wx[-1] == 1.0 and wx[1:10] == pytest.approx([0.3] * 9)
    with pytest.raises(UserError, match="cosine"):
        block_lr_weights(SD_SCHEME, "wavy", None, None)


def test_lr_weight_zero_removes_blocks_and_groups(sd1):
    net = create_network(sd1, "networks.lora", 4, 1, {"down_lr_weight": "zeros", "mid_lr_weight": "0.5",
                                                       "up_lr_weight": "1,1,1,1,1,1,0,0,0,0,0,0",
                                                       "loraplus_lr_ratio": "16"})
    assert not any("down_blocks" in a.lora_name for a in net.unet_adapters)
    assert not any(f"up_blocks_{i}" in a.lora_name for a in net.unet_adapters for i in (2, 3))
    groups = net.trainable_param_groups(unet_lr=1e-4, text_encoder_lr=[5e-5], default_lr=1e-3)
    by_name = {g["name"]: g["lr"] for g in groups}
    assert by_name["textencoder"] == 5e-5 and by_name["textencoder plus"] == pytest.approx(5e-5 * 16)
    assert by_name["unet_block12"] == pytest.approx(0.5e-4)
    assert by_name["unet_block12 plus"] == pytest.approx(0.5e-4 * 16)
    assert by_name["unet_block16"] == pytest.approx(1e-4)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == sum(1 for p in net.parameters() if p.requires_grad)


def test_sdxl_two_text_encoder_lrs(sdxl):
    net = create_network(sdxl, "networks.lora", 4, 1, {"blocks": "TE"})
    groups = net.trainable_param_groups(unet_lr=1e-4, text_encoder_lr=[1e-5, 2e-5])
    lrs = sorted(g["lr"] for g in groups)
    assert lrs == [1e-5, 2e-5]


@pytest.mark.parametrize("module,args,match", [
    ("networks.lora", {"conv_dims": "4"}, "conv_dims"),
    ("lycoris.kohya", {"algo": "foo"}, "unknown"),
    ("lycoris.kohya", {"algo": "ia3"}, "cannot train"),
    ("networks.lorax", {}, "networks.lora"),
    ("lycoris.kohya", {"preset": "nope"}, "attn-mlp"),
    ("networks.dylora", {"unit": "3"}, "multiple"),
])
def test_bad_network_args(sd1, module, args, match):
    with pytest.raises(UserError, match=match):
        create_network(sd1, module, 4, 1, args)


def test_algos_under_lycoris(sd1):
    for algo, key in (("loha", "hada_w1_a"), ("lokr", "lokr_w1"), ("full", "diff")):
        net = create_network(sd1, "lycoris.kohya", 4, 1, {"algo": algo, "preset": "attn-mlp"})
        assert len(net.adapters) == 264
        assert any(k.endswith(key) for k in net.state_dict())
    net = create_network(sd1, "lycoris.kohya", 4, 1, {"algo": "lora", "dora_wd": "True", "preset": "attn-mlp"})
    sd = net.state_dict()
    assert sum(k.endswith(".dora_scale") for k in sd) == 264
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale"].shape == (1, 768)
