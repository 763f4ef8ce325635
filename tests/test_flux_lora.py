"""FLUX.1 LoRA files: kohya's module names (sd-scripts' networks.lora_flux) on the full-size model, ModelSpec
flux-1-dev/lora, `lorakit lora info`, and files other trainers name differently (OneTrainer's lora_te2_ T5)."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.adapters.network import create_network, load_network
from lorakit.errors import UserError
from lorakit.models.tiny import tiny_bundle

DOUBLE = ["img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
          "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]  # every Linear of a double block
SINGLE = ["linear1", "linear2", "modulation_lin"]
CLIP = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
T5 = ["layer_0_SelfAttention_q", "layer_0_SelfAttention_k", "layer_0_SelfAttention_v", "layer_0_SelfAttention_o",
      "layer_1_DenseReluDense_wi_0", "layer_1_DenseReluDense_wi_1", "layer_1_DenseReluDense_wo"]


def expected_names(t5: bool) -> set[str]:
    """sd-scripts' names from the structure: 19 double and 38 single blocks, 12 CLIP-L layers, 24 T5 blocks."""
    names = {f"lora_unet_double_blocks_{i}_{m}" for i in range(19) for m in DOUBLE}
    names |= {f"lora_unet_single_blocks_{i}_{m}" for i in range(38) for m in SINGLE}
    names |= {f"lora_te1_text_model_encoder_layers_{i}_{m}" for i in range(12) for m in CLIP}
    if t5:
        names |= {f"lora_te3_encoder_block_{i}_{m}" for i in range(24) for m in T5}
    return names


@pytest.fixture(scope="module")
def meta_dev():
    from lorakit.models.meta import meta_bundle

    return meta_bundle("flux-dev", components=("unet", "text_encoders"))


def test_full_size_names_match_the_block_structure(meta_dev):
    plain = create_network(meta_dev, "networks.lora", 4, 1)
    assert set(plain.names()) == expected_names(t5=False)
    assert len(plain.unet_adapters) == 19 * 10 + 38 * 3 == 304  # sd-scripts logs 304 modules for FLUX
    with_t5 = create_network(meta_dev, "networks.lora", 4, 1, {"train_t5xxl": "True"})
    assert set(with_t5.names()) == expected_names(t5=True)
    qkv = dict(with_t5.named_children())["lora_unet_double_blocks_0_img_attn_qkv"]
    assert tuple(qkv.lora_up.weight.shape) == (3 * 3072, 4)  # one LoRA over the fused q, k, v
    single = create_network(meta_dev, "networks.lora", 4, 1, {"train_blocks": "single"}, train_text_encoder=False)
    assert {n.split("_blocks_")[0] for n in single.names()} == {"lora_unet_single"}


def test_flux_network_args_are_checked():
    sd1 = tiny_bundle("sd1")
    with pytest.raises(UserError, match="train_t5xxl.*only FLUX"):
        create_network(sd1, "networks.lora", 4, 1, {"train_t5xxl": "True"})
    dev = tiny_bundle("flux-dev")
    with pytest.raises(UserError, match="train_blocks='middle'"):
        create_network(dev, "networks.lora", 4, 1, {"train_blocks": "middle"})
    with pytest.raises(UserError, match="no down/mid/up"):
        create_network(dev, "networks.lora", 4, 1, {"down_lr_weight": "0,1"})


def _trained_like(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_file_metadata_info_and_reload(tmp_path):
    from lorakit.adapters.info import format_text, summarize

    dev = tiny_bundle("flux-dev", seed=2)
    net = create_network(dev, "networks.lora", 2, 1, {"train_t5xxl": "True"})
    _trained_like(net)
    path = tmp_path / "flux_lora.safetensors"
    md = net.save_weights(path)
    assert md["modelspec.architecture"] == "flux-1-dev/lora"
    assert md["ss_base_model_version"] == "flux1" and "modelspec.prediction_type" not in md
    info = summarize(path)
    assert info["family"] == "flux-dev" and info["modules"] == len(expected_names(t5=True))
    assert info["blocks_present"][:2] == ["BASE", "D00"] and info["blocks_present"][-1] == "S37"
    assert "FLUX.1-dev" in format_text(info)
    x = _denoiser_output(dev)
    loaded = load_network(dev, path)
    assert len(loaded.names()) == len(net.names())
    changed = _denoiser_output(dev)
    loaded.remove()
    assert not torch.allclose(x, changed) and torch.allclose(x, _denoiser_output(dev))
    with pytest.raises(UserError, match="FLUX.1-dev"):  # a FLUX LoRA on an SD model: the family is named
        load_network(tiny_bundle("sd1"), path)


def test_onetrainer_t5_prefix_is_read_as_sd_scripts(tmp_path):
    """OneTrainer names FLUX's T5 lora_te2_ (ComfyUI maps both): the same tensors act on the same T5 layers."""
    from safetensors.torch import load_file, save_file

    dev = tiny_bundle("flux-dev", seed=2)
    net = create_network(dev, "networks.lora", 2, 1, {"train_t5xxl": "True"})
    _trained_like(net, seed=1)
    net.save_weights(tmp_path / "kohya.safetensors")
    sd = load_file(str(tmp_path / "kohya.safetensors"))
    renamed = {k.replace("lora_te3_", "lora_te2_"): v for k, v in sd.items()}
    save_file(renamed, str(tmp_path / "onetrainer.safetensors"), metadata={"modelspec.architecture": "flux-1-dev/lora"})
    ids = torch.tensor([[5, 6, 7, 1]])
    outs = []
    for name in ("kohya", "onetrainer"):
        n = load_network(dev, tmp_path / f"{name}.safetensors")
        with torch.no_grad():
            outs.append(dev.text_encoders[1](ids).last_hidden_state)
        n.remove()
    with torch.no_grad():
        plain = dev.text_encoders[1](ids).last_hidden_state
    assert torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], plain)


def test_lora_info_cli(tmp_path, capsys):
    from lorakit.cli.main import main

    dev = tiny_bundle("flux-schnell")
    net = create_network(dev, "networks.lora", 2, 1)
    _trained_like(net)
    net.save_weights(tmp_path / "s.safetensors")
    assert main(["lora", "info", str(tmp_path / "s.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "flux-schnell" and info["modules"] == 304 + 72


def _denoiser_output(bundle) -> torch.Tensor:
    from lorakit.models.flux import image_ids, pack_latents, text_ids

    g = torch.Generator().manual_seed(0)
    img = pack_latents(torch.randn(1, 16, 4, 4, generator=g))
    txt, y = torch.randn(1, 3, 32, generator=g), torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return bundle.unet(img, image_ids(1, 4, 4), txt, text_ids(1, 3), torch.tensor([0.5]), y, torch.tensor([3.5]))


def test_diffusers_and_ai_toolkit_lora_files_act_like_on_diffusers(tmp_path):
    """A LoRA in diffusers' names (split q/k/v, proj_mlp, swapped final adaLN) changes our fused transformer exactly
    as merging it into diffusers' FluxTransformer2DModel changes that one."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from lorakit.adapters.file import to_kohya
    from lorakit.models.flux import image_ids, pack_latents, text_ids
    from lorakit.models.flux_keys import diffusers_to_bfl

    torch.manual_seed(0)
    theirs = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    dev = tiny_bundle("flux-dev")
    dev.unet.load_state_dict(diffusers_to_bfl(theirs.state_dict()))
    g = torch.Generator().manual_seed(3)
    targets = {"transformer_blocks.2.attn.to_q": 4, "transformer_blocks.2.attn.to_v": 2,  # to_k left out
               "transformer_blocks.2.attn.add_k_proj": 3, "transformer_blocks.5.ff_context.net.2": 2,
               "single_transformer_blocks.7.attn.to_k": 2, "single_transformer_blocks.7.proj_mlp": 3,
               "single_transformer_blocks.0.norm.linear": 2, "norm_out.linear": 2, "context_embedder": 2}
    sd, modules = {}, dict(theirs.named_modules())
    for name, rank in targets.items():
        lin = modules[name]
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.3
    sd["transformer.transformer_blocks.2.attn.to_q.alpha"] = torch.tensor(2.0)  # scale 0.5 on that part
    save_file(sd, str(tmp_path / "aitk.safetensors"))
    with torch.no_grad():
        for name in targets:
            scale = 0.5 if name.endswith("to_q") else 1.0  # PEFT default alpha = rank
            lin = modules[name]
            lin.weight += scale * sd[f"transformer.{name}.lora_B.weight"] @ sd[f"transformer.{name}.lora_A.weight"]
    names = {k.split(".")[0] for k in to_kohya(sd, {}, None)}
    assert "lora_unet_double_blocks_2_img_attn_qkv" in names and "lora_unet_final_layer_adaLN_modulation_1" in names
    load_network(dev, tmp_path / "aitk.safetensors")
    b, h, w = 1, 4, 6
    img, txt, y = pack_latents(torch.randn(b, 16, h, w, generator=g)), torch.randn(b, 5, 32, generator=g), \
        torch.randn(b, 32, generator=g)
    t, guide = torch.tensor([0.6]), torch.tensor([3.0])
    with torch.no_grad():
        ours = dev.unet(img, image_ids(b, h, w), txt, text_ids(b, 5), t, y, guide)
        expected = theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                          img_ids=image_ids(b, h, w)[0], txt_ids=text_ids(b, 5)[0], guidance=guide).sample
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
