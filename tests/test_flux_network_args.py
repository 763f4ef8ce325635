"""sd-scripts' FLUX LoRA network args (networks/lora_flux.py): split_qkv, train_double/single_block_indices, the
per-kind ranks (img_attn_dim ... single_mod_dim) and in_dims, each honoured: module names and ranks written here from
the rules, split_qkv's maths against per-part LoRAs, its file layout and alpha, and the refusals."""

from __future__ import annotations

import pytest
import torch

from lorakit.adapters.network import create_network, load_network
from lorakit.errors import UserError
from lorakit.models.tiny import tiny_bundle

DOUBLE = ["img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
          "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
SINGLE = ["linear1", "linear2", "modulation_lin"]


@pytest.fixture(scope="module")
def dev():
    return tiny_bundle("flux-dev", seed=0)


def _ranks(bundle, args, dim=4):
    net = create_network(bundle, "networks.lora", dim, 1, args, train_text_encoder=False)
    return {n: m.rank for n, m in net.named_children()}


def test_block_indices_select_blocks(dev):
    got = _ranks(dev, {"train_double_block_indices": "0,2-3", "train_single_block_indices": "none"})
    assert set(got) == {f"lora_unet_double_blocks_{i}_{m}" for i in (0, 2, 3) for m in DOUBLE}
    got = _ranks(dev, {"train_double_block_indices": "none", "train_single_block_indices": "all"})
    assert set(got) == {f"lora_unet_single_blocks_{i}_{m}" for i in range(38) for m in SINGLE}
    got = _ranks(dev, {"train_single_block_indices": "37"})  # the double blocks keep their LoRA
    assert len(got) == 19 * 10 + 3


def test_kind_ranks_and_in_dims(dev):
    args = {"train_double_block_indices": "1", "train_single_block_indices": "5", "img_attn_dim": "8",
            "txt_mlp_dim": "0", "single_dim": "6", "single_mod_dim": "2", "in_dims": "[3,0,5,2,0]"}
    want = {"img_mod_lin": 4, "img_attn_qkv": 8, "img_attn_proj": 8, "img_mlp_0": 4, "img_mlp_2": 4, "txt_mod_lin": 4,
            "txt_attn_qkv": 4, "txt_attn_proj": 4}  # txt_mlp_* rank 0: none
    expected = {f"lora_unet_double_blocks_1_{k}": v for k, v in want.items()}
    expected |= {"lora_unet_single_blocks_5_linear1": 6, "lora_unet_single_blocks_5_linear2": 6,
                 "lora_unet_single_blocks_5_modulation_lin": 2, "lora_unet_img_in": 3,
                 "lora_unet_vector_in_in_layer": 5, "lora_unet_vector_in_out_layer": 5,
                 "lora_unet_guidance_in_in_layer": 2, "lora_unet_guidance_in_out_layer": 2}
    assert _ranks(dev, args) == expected
    schnell = tiny_bundle("flux-schnell")  # no guidance embedder: no LoRA for it
    assert "lora_unet_guidance_in_in_layer" not in _ranks(schnell, {"in_dims": "[0,0,0,4,0]", "train_blocks":
                                                                    "single"})


def test_file_of_in_dims_loads_back(dev, tmp_path):
    net = create_network(dev, "networks.lora", 2, 1, {"in_dims": "[2,2,0,0,2]", "train_blocks": "single"},
                         train_text_encoder=False)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "in.safetensors"
    net.save_weights(str(path))
    loaded = load_network(tiny_bundle("flux-dev", seed=0), str(path))
    assert set(loaded.names()) == set(net.names()) and "lora_unet_time_in_out_layer" in set(loaded.names())


@pytest.mark.parametrize("args, match", [
    ({"train_double_block_indices": "3-19"}, "3-19 is outside 0-18"),
    ({"train_single_block_indices": "a"}, "use all, none, or indices"),
    ({"in_dims": "[4,4]"}, "give 5 ranks"),
    ({"single_dim": "-1"}, "cannot be negative"),
    ({"split_qkv": "True", "dora_wd": "True"}, None),  # DoRA + split: refused by the module (ValueError)
])
def test_bad_values_are_refused(dev, args, match):
    if match is None:
        with pytest.raises((UserError, ValueError)):
            create_network(dev, "networks.lora", 4, 1, args, train_text_encoder=False)
        return
    with pytest.raises(UserError, match=match):
        create_network(dev, "networks.lora", 4, 1, args, train_text_encoder=False)


def test_flux_args_are_refused_elsewhere():
    with pytest.raises(UserError, match="split_qkv: sd-scripts' FLUX.1 LoRA arguments; this model is Stable"):
        create_network(tiny_bundle("sd1"), "networks.lora", 4, 1, {"split_qkv": "True"})
    with pytest.raises(UserError, match="split_qkv=True splits plain LoRA"):
        create_network(tiny_bundle("flux-dev"), "networks.loha", 4, 1, {"split_qkv": "True"})


# ---- split_qkv ---------------------------------------------------------------------------------------------------
def _split_net(bundle, dim=2, alpha=1.0):
    net = create_network(bundle, "networks.lora", dim, alpha, {"split_qkv": "True", "train_double_block_indices": "0",
                                                                "train_single_block_indices": "0"},
                         train_text_encoder=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def test_split_qkv_is_one_lora_per_part(dev):
    net = _split_net(dev, dim=2, alpha=1.0)
    mods = dict(net.named_children())
    hidden = dev.unet.params.hidden_size
    for name, parts in (("lora_unet_double_blocks_0_img_attn_qkv", [hidden] * 3),
                        ("lora_unet_single_blocks_0_linear1", [hidden] * 3 + [4 * hidden])):
        m = mods[name]
        assert m.rank == 2 * len(parts) and float(m.alpha) == len(parts) * 1.0  # saved: rank k r, alpha k alpha
        down, up = m.lora_down.weight, m.lora_up.weight
        # each part: its own down rows and its own block of the up, at the part's scale alpha / r
        want = torch.cat([up[sum(parts[:j]):sum(parts[:j + 1]), 2 * j:2 * j + 2] @ down[2 * j:2 * j + 2]
                          for j in range(len(parts))]) * (1.0 / 2)
        assert torch.allclose(m.delta_weight(), want, atol=1e-7)
        x = torch.randn(3, m.shape[1])
        base = m.org_module(x)
        assert torch.allclose(base + m.forward_delta(x), base + x @ want.t(), atol=1e-6)
    # and the plain modules of the same blocks stay plain
    assert type(mods["lora_unet_double_blocks_0_img_attn_proj"]).__name__ == "LoRAModule"


def test_split_qkv_gradients_stay_in_the_parts(dev):
    net = _split_net(dev)
    m = dict(net.named_children())["lora_unet_double_blocks_0_txt_attn_qkv"]
    x = torch.randn(4, m.shape[1])
    m.forward_delta(x).square().sum().backward()
    g, hidden = m.lora_up.weight.grad, m.shape[0] // 3
    for j in range(3):
        for c in range(3):
            block = g[j * hidden:(j + 1) * hidden, 2 * c:2 * c + 2]
            assert (block.abs().sum() > 0) == (j == c), (j, c)


def test_split_qkv_file_is_sd_scripts_layout_and_acts_as_trained(dev, tmp_path):
    from safetensors.torch import load_file

    net = _split_net(dev, dim=2, alpha=1.0)
    path = tmp_path / "split.safetensors"
    net.save_weights(str(path), precision=None)  # fp32: the comparison below is exact up to rounding
    sd = load_file(str(path))
    hidden = dev.unet.params.hidden_size
    up = sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    down = sd["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    assert tuple(up.shape) == (7 * hidden, 8) and tuple(down.shape) == (8, hidden)
    assert up[:hidden, 2:].abs().sum() == 0 and up[3 * hidden:, :6].abs().sum() == 0  # block-diagonal
    assert float(sd["lora_unet_single_blocks_0_linear1.alpha"]) == 4.0
    # a plain loader (as ComfyUI: alpha / rank of the file) gives the trained change
    loaded = dict(load_network(tiny_bundle("flux-dev", seed=0), str(path)).named_children())
    for name, m in net.named_children():
        assert torch.allclose(loaded[name].delta_weight(), m.delta_weight(), atol=1e-7), name
    # resuming into a split network restores it; a fused LoRA that is not block-diagonal is refused
    again = _split_net(tiny_bundle("flux-dev", seed=0))
    again.load_state_dict(net.state_dict())
    assert all(torch.equal(a.delta_weight(), b.delta_weight()) for a, b in zip(again.adapters, net.adapters))
    plain = create_network(dev, "networks.lora", 6, 3, {"train_double_block_indices": "0",
                                                        "train_single_block_indices": "none", "train_blocks": "double"},
                           train_text_encoder=False)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.1)
    wrong = {k: v for k, v in plain.state_dict().items() if "img_attn_qkv" in k}
    with pytest.raises(UserError, match="not block-diagonal"):
        again.load_state_dict(wrong, strict=False)


def test_split_qkv_trains_from_the_cli(tmp_path):
    from safetensors.torch import load_file

    from lorakit import options as O
    from lorakit.models.saving import save_single_file
    from lorakit.train.trainer import train
    from test_train_common import make_images

    model = save_single_file(tiny_bundle("flux-dev", seed=0), tmp_path / "m.safetensors")
    make_images(tmp_path / "data" / "1_zq", 2, sizes=((64, 64),))
    ns = O.resolve(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tmp_path / "data"),
                    "--output_dir", str(tmp_path / "o"), "--resolution", "64", "--network_dim", "2",
                    "--network_alpha", "1", "--max_train_steps", "2", "--learning_rate", "1e-2", "--seed", "1",
                    "--t5xxl_max_token_length", "8", "--network_train_unet_only", "--max_data_loader_n_workers", "0",
                    "--network_args", "split_qkv=True", "train_double_block_indices=0-1", "single_dim=4",
                    "train_single_block_indices=2"])
    res = train(ns, progress=False, log=lambda *a: None, predict_memory=False)
    sd = load_file(str(res.final_lora))
    names = {k.split(".")[0] for k in sd}
    assert names == {f"lora_unet_double_blocks_{i}_{m}" for i in (0, 1) for m in DOUBLE} | {
        f"lora_unet_single_blocks_2_{m}" for m in SINGLE}
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 6
    assert sd["lora_unet_single_blocks_2_linear1.lora_down.weight"].shape[0] == 16  # single_dim 4, 4 parts
    assert float(sd["lora_unet_single_blocks_2_linear1.alpha"]) == 4.0
    assert sd["lora_unet_single_blocks_2_linear2.lora_down.weight"].shape[0] == 4
    up = sd["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"]
    assert up.abs().sum() > 0 and up[:up.shape[0] // 3, 2:].abs().sum() == 0  # trained, still block-diagonal


def _lr_of(net, unet_lr=1e-3):
    """Each module's learning rate from the optimizer groups the trainer builds."""
    lrs = {}
    for g in net.trainable_param_groups(unet_lr=unet_lr, default_lr=1e-3):
        for p in g["params"]:
            lrs[id(p)] = g["lr"]
    return {name: lrs[id(next(m.parameters()))] for name, m in net.named_children()}


def test_block_lr_weight_groups_scale_flux_blocks(dev):
    """block_lr_weight on FLUX: named groups scale those blocks' rate, the rest keep 1, factor 0 leaves a block out
    (as sd-scripts' zero lr weights do) while the embedders outside every block keep theirs."""
    net = create_network(dev, "networks.lora", 4, 1, {"block_lr_weight": "D00-D02:0.5;S37:2;D05:0",
                                                      "in_dims": "[2,0,0,0,0]"}, train_text_encoder=False)
    lrs = _lr_of(net)
    assert lrs["lora_unet_double_blocks_0_img_attn_qkv"] == pytest.approx(5e-4)
    assert lrs["lora_unet_double_blocks_2_txt_mlp_2"] == pytest.approx(5e-4)
    assert lrs["lora_unet_double_blocks_3_txt_mlp_2"] == pytest.approx(1e-3)
    assert lrs["lora_unet_single_blocks_37_linear1"] == pytest.approx(2e-3)
    assert lrs["lora_unet_img_in"] == pytest.approx(1e-3)
    assert not any(n.startswith("lora_unet_double_blocks_5_") for n in lrs)
    assert len(lrs) == 18 * 10 + 38 * 3 + 1
    # the same as one number per block (D00..D18, S00..S37), and with per-kind ranks
    vec = ["0.5"] * 3 + ["1"] * 2 + ["0"] + ["1"] * 13 + ["1"] * 37 + ["2"]
    net2 = create_network(dev, "networks.lora", 4, 1, {"block_lr_weight": ",".join(vec), "in_dims": "[2,0,0,0,0]",
                                                       "single_dim": "8"}, train_text_encoder=False)
    assert _lr_of(net2) == lrs
    assert dict(net2.named_children())["lora_unet_single_blocks_0_linear1"].rank == 8


def test_block_lr_weight_moves_each_block_by_its_factor(dev):
    """One AdamW step moves every weight by about lr (its first update is lr * g/|g|): a block at factor 0.5 moves
    half as far as one at 1 — the factor reaches the optimizer, not only the group names."""
    torch.manual_seed(0)
    net = create_network(dev, "networks.lora", 4, 1, {"block_lr_weight": "D01:0.5"}, train_text_encoder=False)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.AdamW(net.trainable_param_groups(unet_lr=1e-3, default_lr=1e-3), weight_decay=0)
    loss = sum((p * torch.randn_like(p)).sum() for p in net.parameters())
    loss.backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().mean().item() for n, p in net.named_parameters()}
    half = moved["lora_unet_double_blocks_1_img_mlp_0.lora_up.weight"]
    full = moved["lora_unet_double_blocks_2_img_mlp_0.lora_up.weight"]
    assert full == pytest.approx(1e-3, rel=1e-3) and half == pytest.approx(5e-4, rel=1e-3)


@pytest.mark.parametrize("args, match", [
    ({"block_lr_weight": "1,1"}, "2 values given, this model needs 57"),
    ({"block_lr_weight": "D00-D02"}, "not a list of numbers"),
    ({"block_lr_weight": "D00-D02:x"}, "is not SELECTOR:factor"),
    ({"block_lr_weight": "Q07:1"}, "unknown block"),
    ({"block_lr_weight": "D00:-1"}, "cannot be negative"),
    ({"block_lr_weight": "TE:0.5"}, "--text_encoder_lr"),
])
def test_bad_block_lr_weight_is_refused(dev, args, match):
    with pytest.raises(UserError, match=match):
        create_network(dev, "networks.lora", 4, 1, args)


def test_block_lr_weight_on_sd_and_not_with_down_lr_weight():
    sd1 = tiny_bundle("sd1", seed=0)
    net = create_network(sd1, "networks.lora", 4, 1, {"block_lr_weight": "OUT03-OUT06:0.25"}, train_text_encoder=False)
    lrs = _lr_of(net)
    out03 = [v for k, v in lrs.items() if "up_blocks_1_attentions_0" in k]  # OUT03
    assert out03 and out03 == pytest.approx([2.5e-4] * len(out03))
    down = [v for k, v in lrs.items() if "down_blocks" in k]
    assert down and down == pytest.approx([1e-3] * len(down))
    with pytest.raises(UserError, match="use one of them"):
        create_network(sd1, "networks.lora", 4, 1, {"block_lr_weight": "MID:0", "down_lr_weight": "sine"})
