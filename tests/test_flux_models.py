"""FLUX.1 as a model family: full-size structure on the meta device, our BFL-layout transformer against diffusers'
FluxTransformer2DModel, and every file layout users keep FLUX in (ComfyUI all-in-one, BFL's bare transformer with
clip_l / t5xxl / ae files beside it, fp8/bf16/fp16, diffusers folders)."""

from __future__ import annotations

import json
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import UserError
from lorakit.models.families import get_family
from lorakit.models.flux import FluxParams, FluxTransformer, image_ids, pack_latents, text_ids, unpack_latents
from lorakit.models.flux_keys import diffusers_to_bfl
from lorakit.models.loading import load_bundle
from lorakit.models.saving import ldm_state_dict, save_single_file
from lorakit.models.tiny import tiny_bundle

U = "model.diffusion_model."


@pytest.fixture(scope="module")
def dev():
    return tiny_bundle("flux-dev", seed=3)


def _same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=atol), k


def _tiny_widths(bundle) -> dict[str, str]:
    """The metadata key with which our files carry non-standard widths (a real FLUX file needs none)."""
    from lorakit.models.saving import checkpoint_metadata

    return {k: v for k, v in checkpoint_metadata(bundle, "tiny").items() if k == "lorakit.configs"}


def test_full_size_parameter_counts_on_meta():
    """diffusers' FluxTransformer2DModel counts (dev has the guidance embedder: 2 Linear(256/3072, 3072) more) and
    transformers' T5EncoderModel with untied input embeddings."""
    from lorakit.models.bundle import build_t5_encoder, count_parameters
    from lorakit.models.meta import meta_bundle

    dev, schnell = (meta_bundle(f, components=("unet",)).unet for f in ("flux-dev", "flux-schnell"))
    assert count_parameters(dev) == 11_901_408_320
    assert count_parameters(schnell) == 11_891_178_560
    assert count_parameters(dev) - count_parameters(schnell) == (256 * 3072 + 3072) + (3072 * 3072 + 3072)
    with torch.device("meta"):
        t5 = build_t5_encoder(get_family("flux-dev").config("text_encoder_2"))
    assert count_parameters(t5) == 4_893_906_944
    assert (len(dev.double_blocks), len(dev.single_blocks)) == (19, 38)
    assert tuple(dev.double_blocks[0].img_attn.qkv.weight.shape) == (3 * 3072, 3072)  # fused, as kohya names it
    assert tuple(dev.single_blocks[0].linear1.weight.shape) == (3 * 3072 + 4 * 3072, 3072)


def test_matches_diffusers_transformer_numerically():
    """Our module with weights mapped from a random diffusers FluxTransformer2DModel gives the same velocity: the
    architecture (RoPE, modulation, fused layers, final adaLN order) and the key map are both right."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    theirs = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                    pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ours = FluxTransformer(FluxParams(hidden_size=32, num_heads=2, depth=2, depth_single_blocks=3, axes_dim=(4, 6, 6),
                                      vec_in_dim=20, context_in_dim=24))
    ours.load_state_dict(diffusers_to_bfl(theirs.state_dict()), strict=True)
    b, h, w = 2, 8, 6
    img, iid = pack_latents(torch.randn(b, 16, h, w)), image_ids(b, h, w)
    txt, tid = torch.randn(b, 5, 24), text_ids(b, 5)
    y, t = torch.randn(b, 20), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                          img_ids=iid[0], txt_ids=tid[0], guidance=torch.tensor([3.5, 2.0])).sample
        got = ours(img, iid, txt, tid, t, y, torch.tensor([3.5, 2.0]))
        other_guidance = ours(img, iid, txt, tid, t, y, torch.tensor([1.0, 1.0]))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, other_guidance, atol=1e-3)  # dev's guidance embedding is read


def test_packing_and_position_ids():
    lat = torch.randn(2, 16, 6, 10)
    tokens = pack_latents(lat)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(tokens, 6, 10), lat)
    assert torch.equal(tokens[0, 1, :4], lat[0, 0, 0:2, 2:4].reshape(-1))  # token 1 = the 2x2 patch at column 1
    ids = image_ids(2, 6, 10)
    assert ids.shape == (2, 15, 3) and ids[0, 7].tolist() == [0.0, 1.0, 2.0]  # row 1, column 2 of a 3x5 grid


def test_all_in_one_file_round_trip_and_detection(dev, tmp_path):
    path = save_single_file(dev, tmp_path / "dev.safetensors")
    keys = set(load_file(str(path)))
    assert U + "double_blocks.0.img_attn.qkv.weight" in keys and U + "guidance_in.in_layer.weight" in keys
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight" in keys
    assert "vae.decoder.conv_in.weight" in keys
    loaded = load_bundle(path)
    assert loaded.family.name == "flux-dev" and loaded.info["ignored_keys"] == 0
    for name, module in dev.components().items():
        _same_weights(module, loaded.components()[name])
    schnell = save_single_file(tiny_bundle("flux-schnell"), tmp_path / "schnell.safetensors")
    assert load_bundle(schnell).family.name == "flux-schnell"
    once = {k: v for k, v in load_file(str(path)).items() 
            if not k.endswith("t5xxl.transformer.encoder.embed_tokens.weight")}
    save_file(once, str(tmp_path / "t5_once.safetensors"), metadata=_tiny_widths(dev))  # as transformers saves T5
    t5 = load_bundle(tmp_path / "t5_once.safetensors").text_encoders[1]
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert torch.equal(t5.shared.weight, dev.text_encoders[1].encoder.embed_tokens.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_bfl_transformer_file_with_separate_encoders_and_ae(dev, tmp_path, dtype):
    """BFL's release layout: flux1-dev.safetensors holds only the transformer, without a key prefix, in a half or
    fp8 dtype; clip_l, t5xxl (its embedding stored once, as transformers saves it) and ae come as files of their own."""
    sd = ldm_state_dict(dev)
    save_file({k[len(U):]: v.to(dtype) for k, v in sd.items() if k.startswith(U)}, str(tmp_path / "flux.safetensors"),
              metadata=_tiny_widths(dev))
    save_file({k: v.contiguous() for k, v in dev.text_encoders[0].state_dict().items()},
              str(tmp_path / "clip_l.safetensors"))
    t5 = {k: v.contiguous() for k, v in dev.text_encoders[1].state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(tmp_path / "t5xxl.safetensors"))
    save_file({k[len("vae."):]: v for k, v in sd.items() if k.startswith("vae.")}, str(tmp_path / "ae.safetensors"))

    alone = load_bundle(tmp_path / "flux.safetensors")
    assert alone.family.name == "flux-dev" and alone.vae is None and alone.text_encoders == [None, None]
    assert alone.info["text_encoders_missing"] == ["text_encoder", "text_encoder_2"]
    assert alone.info["file_dtypes"] == [{torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F8_E4M3")]
    full = load_bundle(tmp_path / "flux.safetensors", clip_l=tmp_path / "clip_l.safetensors",
                       t5xxl=tmp_path / "t5xxl.safetensors", ae=tmp_path / "ae.safetensors")
    expected = {k: v.to(dtype).float() for k, v in dev.unet.state_dict().items()}
    got = full.unet.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for a, b in zip(dev.text_encoders, full.text_encoders):
        _same_weights(a, b)
    _same_weights(dev.vae, full.vae)
    assert full.text_encoders[1].encoder.embed_tokens.weight is full.text_encoders[1].shared.weight  # held once
    assert not full.info.get("text_encoders_missing")


def test_comfyui_prefixed_transformer_and_wrong_encoder_files(dev, tmp_path):
    sd = ldm_state_dict(dev)
    save_file({k: v for k, v in sd.items() if k.startswith(U)}, str(tmp_path / "comfy.safetensors"),
              metadata=_tiny_widths(dev))
    assert load_bundle(tmp_path / "comfy.safetensors").family.name == "flux-dev"
    save_file({k: v.contiguous() for k, v in dev.text_encoders[0].state_dict().items()},
              str(tmp_path / "clip_l.safetensors"))
    with pytest.raises(UserError, match="--t5xxl .*clip_l.safetensors"):  # CLIP-L passed where T5 belongs
        load_bundle(tmp_path / "comfy.safetensors", t5xxl=tmp_path / "clip_l.safetensors")
    scaled = {k: v for k, v in sd.items() if k.startswith(U)}
    scaled[U + "double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(1)
    save_file(scaled, str(tmp_path / "scaled.safetensors"), metadata=_tiny_widths(dev))
    with pytest.raises(UserError, match="scaled-fp8"):
        load_bundle(tmp_path / "scaled.safetensors")


def test_diffusers_folder(tmp_path):
    """A FluxPipeline folder: diffusers' transformer weights mapped onto ours, T5's tokenizer from tokenizer_2."""
    from diffusers import FluxTransformer2DModel
    from transformers import ByT5Tokenizer

    src = tiny_bundle("flux-schnell", seed=1)
    torch.manual_seed(1)
    theirs = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    folder = tmp_path / "flux"
    theirs.save_pretrained(folder / "transformer")
    src.vae.save_pretrained(folder / "vae")
    src.text_encoders[0].save_pretrained(folder / "text_encoder")
    src.text_encoders[1].save_pretrained(folder / "text_encoder_2")
    ByT5Tokenizer().save_pretrained(folder / "tokenizer_2")
    src.noise_scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    loaded = load_bundle(folder)
    assert loaded.family.name == "flux-schnell"
    parts = [theirs.state_dict()[f"transformer_blocks.3.attn.add_{x}_proj.weight"] for x in "qkv"]
    assert torch.equal(loaded.unet.state_dict()["double_blocks.3.txt_attn.qkv.weight"], torch.cat(parts))
    assert loaded.tokenizers[1]("ab").input_ids == [100, 101, 1]
    _same_weights(src.vae, loaded.vae)


def test_cli_tiny_and_info_name_flux(tmp_path, capsys):
    from lorakit.cli.main import main

    out = tmp_path / "tiny_flux.safetensors"
    assert main(["model", "tiny", "--family", "flux-schnell", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["model", "info", str(out), "--no_hash", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["title"], info["prediction_type"]) == ("flux-schnell", "FLUX.1 [schnell]", "flow")
    assert (info["latent_scale"], info["latent_shift"]) == (0.3611, 0.1159)


def test_gradient_checkpointing_gives_the_same_gradients(dev):
    """The trainer's --gradient_checkpointing recomputes each block in backward: same numbers, less memory."""
    import copy

    unet = copy.deepcopy(dev.unet).train().requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    args = (pack_latents(torch.randn(1, 16, 4, 4, generator=g)), image_ids(1, 4, 4), torch.randn(1, 3, 32, generator=g),
            text_ids(1, 3), torch.tensor([0.4]), torch.randn(1, 32, generator=g), torch.tensor([2.0]))
    grads = []
    for checkpointing in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = checkpointing
        unet(*args).square().mean().backward()
        grads.append(unet.double_blocks[3].img_attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


@pytest.mark.parametrize("module,args", [("networks.lora", {}), ("lycoris.kohya", {"algo": "loha"}),
                                         ("lycoris.kohya", {"algo": "lokr"})], ids=["lora", "loha", "lokr"])
def test_gradient_checkpointing_gives_adapters_the_same_gradients(module, args):
    """FLUX checkpoints its blocks itself (non-reentrant): every adapter parameter gets the gradient it gets without
    (LoHa/LoKr once got none under checkpointing: adapters/recompute.py)."""
    from lorakit.adapters.network import create_network

    g = torch.Generator().manual_seed(1)
    args_in = (pack_latents(torch.randn(1, 16, 4, 4, generator=g)), image_ids(1, 4, 4),
               torch.randn(1, 3, 32, generator=g), text_ids(1, 3), torch.tensor([0.4]), torch.randn(1, 32, generator=g),
               torch.tensor([2.0]))
    grads = []
    for checkpointing in (False, True):
        b = tiny_bundle("flux-dev", seed=3)
        torch.manual_seed(0)
        net = create_network(b, module, 4, 4, args, train_text_encoder=False)
        net.apply_to(b)
        with torch.no_grad():  # every factor off its zero initialisation
            for p in net.parameters():
                p.add_(torch.randn(p.shape) * 0.05)
        b.unet.train().gradient_checkpointing = checkpointing
        b.unet(*args_in).square().mean().backward()
        params = [p for a in net.unet_adapters for p in a.parameters()]
        assert params and all(p.grad is not None for p in params), f"checkpointing {checkpointing}"
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
