"""Overfitting on a tiny model: the loss falls clearly and the saved LoRA changes the model's output."""

import torch

from test_train_common import dataset, one_thread, options, read_lora, run, tiny  # noqa: F401


def fixed_eval_loss(bundle, latents, hidden, n=8):
    """Mean eps-prediction loss over n fixed (timestep, noise) draws, independent of the training RNG."""
    g = torch.Generator().manual_seed(1234)
    ac = bundle.noise_scheduler.alphas_cumprod
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            t = torch.tensor([50 + 900 * i // n])
            noise = torch.randn(latents.shape, generator=g)
            a = ac[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            pred = bundle.unet(noisy, t, hidden).sample
            total += float(((pred - noise) ** 2).mean())
    return total / n


def test_overfit_then_saved_lora_changes_output(tmp_path):
    from lorakit.adapters.network import load_network
    from lorakit.data.augment import load_image_arrays
    from lorakit.train.trainer import encode_text
    import numpy as np

    data = dataset(tmp_path, n_train=1, captions=["zq shape"])
    opts = options(tmp_path, data, "--max_train_steps", "24", "--learning_rate", "1e-2", "--network_train_unet_only")
    result = run(opts)
    L = result.losses
    assert len(L) == 24 and all(np.isfinite(L))
    first, last = sum(L[:6]) / 6, sum(L[-6:]) / 6
    assert last < 0.9 * first, (first, last)  # training loss falls by more than 10%

    # the saved file, applied to a fresh copy of the model, lowers the loss on its training image by > 15%
    bundle = tiny("sd1")
    img = next((tmp_path / "train").glob("*/*.png"))
    rgb, _ = load_image_arrays(img, False)
    px = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        latents = bundle.vae.encode(px).latent_dist.mean * bundle.latent_scale
        hidden, _ = encode_text(bundle, ["zq shape"], None, None)
    base = fixed_eval_loss(bundle, latents, hidden)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_base = bundle.unet(x, torch.tensor([300]), hidden).sample
    net = load_network(bundle, result.final_lora)
    trained = fixed_eval_loss(bundle, latents, hidden)
    with torch.no_grad():
        out_lora = bundle.unet(x, torch.tensor([300]), hidden).sample
    print(f"train loss {first:.4f} -> {last:.4f}; fixed-noise eval loss base {base:.4f} -> with LoRA {trained:.4f}")
    assert trained < 0.85 * base, (base, trained)
    assert (out_lora - out_base).abs().max() > 1e-3
    net.set_multiplier(0.0)
    with torch.no_grad():
        assert torch.allclose(bundle.unet(x, torch.tensor([300]), hidden).sample, out_base, atol=1e-5)
    tensors, md = read_lora(result.final_lora)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)  # UNet only
    assert md["ss_steps"] == "24" and md["ss_output_name"] == "last" and md["ss_base_model_version"] == "sd_v1"
