"""Shared helpers of the training tests (tiny models, generated datasets), plus checks of the small pieces the
training loop is built from (text conditioning, checkpointing, max-norm)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lorakit import options as O


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models are dominated by per-op overhead: extra threads only contend on a shared machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@functools.lru_cache(maxsize=None)
def _tiny(family: str):
    from lorakit.models.tiny import tiny_bundle

    return tiny_bundle(family, seed=0)


def tiny(family: str = "sd1"):
    """A fresh copy of a cached tiny model (training attaches adapters to it)."""
    return copy.deepcopy(_tiny(family))


def make_images(folder: Path, n: int, sizes=((64, 64),), captions=None, seed: int = 0) -> None:
    """n images of coloured shapes on a gradient, with .txt captions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        base = rng.integers(0, 255, 3)
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[:] = base
        arr[:, :, 0] = np.linspace(base[0] // 2, 255, w, dtype=np.uint8)[None, :]
        img = Image.fromarray(arr)
        d = ImageDraw.Draw(img)
        c = tuple(int(x) for x in rng.integers(0, 255, 3))
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        d.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=c)
        img.save(folder / f"{i:03d}.png")
        cap = captions[i % len(captions)] if captions else f"zq shape, tag{i}, color{i % 3}, extra"
        (folder / f"{i:03d}.txt").write_text(cap, encoding="utf-8")


def dataset(tmp: Path, n_train=2, n_reg=0, sizes=((64, 64),), repeats=1, captions=None) -> dict:
    train = tmp / "train"
    make_images(train / f"{repeats}_zq shape", n_train, sizes, captions)
    out = {"train_data_dir": str(train)}
    if n_reg:
        make_images(tmp / "reg" / "1_shape", n_reg, sizes, ["shape"], seed=1)
        out["reg_data_dir"] = str(tmp / "reg")
    return out


def options(tmp: Path, data: dict, *extra: str):
    argv = ["--output_dir", str(tmp / "out"), "--resolution", "64", "--network_dim", "4", "--network_alpha", "4",
            "--seed", "3", "--max_data_loader_n_workers", "1"]
    for k, v in data.items():
        argv += [f"--{k}", v]
    return O.resolve(argv + list(extra))


def run(opts, family="sd1", **kw):
    from lorakit.train.trainer import train

    kw.setdefault("predict_memory", False)  # its own tests: tests/test_train_memory.py
    kw.setdefault("log", lambda *a: None)
    return train(opts, bundle=kw.pop("bundle", None) or tiny(family), progress=False, **kw)


def read_lora(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata())


# ---- pieces of the loop -----------------------------------------------------------------------------------------
def test_clip_skip_mapping():
    from lorakit.models.families import get_family
    from lorakit.train.trainer import effective_clip_skip

    sd1, sd2, xl = get_family("sd1"), get_family("sd2"), get_family("sdxl")
    assert effective_clip_skip(sd1, None) == 1 and effective_clip_skip(sd1, 2) == 2
    # sd-scripts' SD2 text encoder has 23 layers (ours 24): its clip_skip N reads our layer -(N+1)
    assert effective_clip_skip(sd2, None) == 2 and effective_clip_skip(sd2, 1) == 2 and effective_clip_skip(sd2, 2) == 3
    assert effective_clip_skip(xl, None) == 2 and effective_clip_skip(xl, 1) == 2


def test_encode_text_layers_and_long_prompts():
    from lorakit.train.trainer import encode_text

    b = _tiny("sd1")
    te = b.text_encoders[0]
    caps = ["a photo of zq", "b"]
    with torch.no_grad():
        h1, pooled = encode_text(b, caps, None, None)
        ids = b.tokenizers[0](caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        assert pooled is None and h1.shape == (2, 77, 32)
        assert torch.allclose(h1, out.last_hidden_state, atol=1e-6)
        h2, _ = encode_text(b, caps, 2, None)
        norm = getattr(te, "text_model", te).final_layer_norm
        assert torch.allclose(h2, norm(out.hidden_states[-2]), atol=1e-6)
        h3, _ = encode_text(b, caps, None, 150)
    assert h3.shape == (2, 152, 32)  # BOS + 2 x 75 + EOS
    assert torch.allclose(h3[:, :76], h1[:, :76], atol=1e-5)  # the first window is the plain encoding


def test_encode_text_sdxl_concat_and_pooled():
    from lorakit.train.trainer import encode_text

    b = _tiny("sdxl")
    with torch.no_grad():
        h, pooled = encode_text(b, ["zq"], None, None)
        outs = [te(tok(["zq"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids,
                   output_hidden_states=True) for te, tok in zip(b.text_encoders, b.tokenizers)]
    want = torch.cat([outs[0].hidden_states[-2], outs[1].hidden_states[-2]], dim=-1)  # no final norm on SDXL
    assert torch.allclose(h, want, atol=1e-6)
    assert torch.allclose(pooled, outs[1].text_embeds, atol=1e-6)


@pytest.mark.parametrize("module,args", [
    ("networks.lora", {}),
    ("networks.lora", {"conv_dim": "4", "conv_alpha": "2"}),
    ("lycoris.kohya", {"algo": "loha", "conv_dim": "4", "conv_alpha": "2"}),
    ("lycoris.kohya", {"algo": "lokr", "conv_dim": "4", "conv_alpha": "2"}),
    ("lycoris.kohya", {"algo": "locon", "conv_dim": "4", "conv_alpha": "2", "dora_wd": "True"}),
    ("lycoris.kohya", {"algo": "full"}),
], ids=["lora", "locon", "loha", "lokr", "dora", "full"])
def test_gradient_checkpointing_gives_same_grads(module, args):
    """The whole tiny UNet with diffusers' gradient checkpointing: every adapter parameter gets the gradient it gets
    without (LoHa/LoKr/DoRA/full once got none at all under checkpointing: their node matched gradients to
    parameters by the identity of its saved tensors, which checkpointing replaces)."""
    from lorakit.adapters.network import create_network

    grads = []
    for ckpt in (False, True):
        b = tiny("sd1")
        torch.manual_seed(0)
        net = create_network(b, module, 4, 4, args)
        net.apply_to(b)
        with torch.no_grad():  # every factor off its zero initialisation: every gradient non-trivial
            for p in net.parameters():
                p.add_(torch.randn(p.shape) * 0.05)
        if ckpt:
            b.unet.enable_gradient_checkpointing()
            b.unet.train()
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        h = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
        b.unet(x, torch.tensor([500]), h).sample.square().mean().backward()
        params = [p for a in net.unet_adapters for p in a.parameters()]
        assert all(p.grad is not None for p in params), f"checkpointing {ckpt}: parameters without a gradient"
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_apply_max_norm():
    from lorakit.adapters.network import create_network
    from lorakit.train.trainer import apply_max_norm

    b = tiny("sd1")
    net = create_network(b, "networks.lora", 4, 4, {})
    for a in net.adapters:
        torch.nn.init.normal_(a.lora_up.weight, std=1.0)
    before = [float(a.delta_weight().detach().norm()) for a in net.adapters]
    n, mean, mx = apply_max_norm(net, 0.5)
    after = [float(a.delta_weight().detach().norm()) for a in net.adapters]
    assert n == sum(x > 0.5 for x in before)
    for x, y in zip(before, after):
        assert y == pytest.approx(min(x, 0.5), rel=1e-4)
    assert mx == pytest.approx(max(after), rel=1e-4)
