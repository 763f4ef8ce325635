"""Interop with a real client: diffusers' `load_lora_weights` consumes every key of our SD1 and SDXL files (tiny
models, with and without conv layers), logs no unexpected/unused keys, and its UNet and text-encoder outputs equal
ours with the LoRA applied (tolerance 1e-5)."""

import copy
import io
import logging

import pytest
import torch

from lorakit.adapters import create_network, load_network
from lorakit.models.tiny import tiny_bundle

torch.set_num_threads(1)  # tiny tensors: extra threads only contend on the shared test machine

pytest.importorskip("peft")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def bundle(request):
    return tiny_bundle(request.param, seed=0)


def _pipeline(b):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tes = [copy.deepcopy(t) for t in b.text_encoders]
    unet = copy.deepcopy(b.unet)
    if b.family.name == "sdxl":
        return StableDiffusionXLPipeline(vae=b.vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=b.tokenizers[0],
                                         tokenizer_2=b.tokenizers[1], unet=unet, scheduler=b.noise_scheduler)
    return StableDiffusionPipeline(vae=b.vae, text_encoder=tes[0], tokenizer=b.tokenizers[0], unet=unet,
                                   scheduler=b.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _unet_inputs(b):
    g = torch.Generator().manual_seed(0)
    u = b.unet
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, u.config.cross_attention_dim, generator=g)
    kw = {}
    if b.family.name == "sdxl":
        kw = dict(added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                                     "time_ids": torch.randn(1, 6, generator=g)})
    return (x, torch.tensor([10]), ctx), kw


def test_diffusers_consumes_every_key_and_agrees(bundle, tmp_path):
    # conv_dim: attention layers plus every ResNet/down/upsampler layer, the widest key set networks.lora writes
    b = bundle
    args = {"conv_dim": "4", "conv_alpha": "2"}
    net = create_network(b, "networks.lora", 4, 2, args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path / f"{b.family.name}.safetensors"
    net.save_weights(path, precision="fp32")
    n_unet, n_te = len(net.unet_adapters), len(net.te_adapters)

    pipe = _pipeline(b)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        pipe.load_lora_weights(str(path))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    text = log.getvalue().lower()
    assert not any(w in text for w in ("unexpected", "unused", "not found", "ignored")), text

    # every module in the file became a PEFT LoRA layer
    def lora_layers(m):
        return sum(1 for _, mod in m.named_modules() if hasattr(mod, "lora_A") and len(mod.lora_A) > 0)
    assert lora_layers(pipe.unet) == n_unet
    te_layers = lora_layers(pipe.text_encoder) + (lora_layers(pipe.text_encoder_2) if b.family.name == "sdxl" else 0)
    assert te_layers == n_te

    inputs, kw = _unet_inputs(b)
    ids = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_out = b.unet(*inputs, **kw).sample
        base_te = b.text_encoders[0](ids)[0]
        theirs = pipe.unet(*inputs, **kw).sample
        theirs_te = pipe.text_encoder(ids)[0]
        ours_net = load_network(b, path)
        try:
            ours = b.unet(*inputs, **kw).sample
            ours_te = b.text_encoders[0](ids)[0]
        finally:
            ours_net.remove()
    assert (ours - base_out).abs().max() > 1e-3  # the LoRA does something
    assert (ours_te - base_te).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs_te, ours_te, rtol=1e-5, atol=1e-5)
