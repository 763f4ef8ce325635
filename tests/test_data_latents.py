import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lorakit.data.config import build_dataset_configs
from lorakit.data.dataset import DatasetGroup
from lorakit.data.latents import (TextEncoderCache, cache_latents, group_static_captions, latents_npz_path,
                                  load_latents_npz)
from lorakit.errors import UserError
from test_data_dataset import torch_calls_in_other_threads
from test_train_common import one_thread  # noqa: F401


def img(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


class Encoder:
    """A VAE stand-in: 8x8 average pooling, RGB + their mean = 4 channels; counts images encoded."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, px):
        self.calls += 1
        self.images += px.shape[0]
        p = F.avg_pool2d(px, 8)
        return torch.cat([p, p.mean(1, keepdim=True)], 1)


def group_for(root, **kw):
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 64), (80, 80)]):
        if not (root / "train" / "2_cat" / f"i{i}.png").exists():
            img(root / "train" / "2_cat" / f"i{i}.png", w, h, seed=i)
    a = {"train_data_dir": str(root / "train"), "resolution": "64", "enable_bucket": True, "min_bucket_reso": 64,
         "max_bucket_reso": 128, "bucket_reso_steps": 64}
    a.update(kw)
    return DatasetGroup.build(build_dataset_configs(a), seed=5, scan_cache=False)


def test_memory_cache_matches_pixels(tmp_path):
    g = group_for(tmp_path, flip_aug=True)
    raw = [g.get_batch(1, k) for k in range(len(g))]
    enc = Encoder()
    with torch_calls_in_other_threads() as seen:  # the decoding threads make no tensor (DatasetGroup.iter_batches)
        stats = cache_latents(g, enc, batch_size=2, num_workers=2)
        cached = [b for _, b in g.iter_batches(1, num_workers=2)]
    assert not seen
    assert stats == {"encoded": 4, "reused": 0, "skipped": 0}
    assert all(torch.equal(b["latents"], g.get_batch(1, k)["latents"]) for k, b in enumerate(cached))
    assert enc.images == 8  # plus flipped copies
    for k, b0 in enumerate(raw):
        b = g.get_batch(1, k)
        assert b["images"] is None and b["paths"] == b0["paths"] and b["flipped"] == b0["flipped"]
        torch.testing.assert_close(b["latents"], Encoder()(b0["images"]))
        assert b["original_sizes_hw"].tolist() == b0["original_sizes_hw"].tolist()
        assert b["crop_top_lefts"].tolist() == b0["crop_top_lefts"].tolist()


def test_disk_cache_names_keys_reuse_and_rebuild(tmp_path):
    g = group_for(tmp_path, flip_aug=True)
    enc = Encoder()
    cache_latents(g, enc, suffix="sdxl", to_disk=True, batch_size=3, vae_id="tiny")
    d = tmp_path / "train" / "2_cat"
    f = d / "i1_0096x0064_sdxl.npz"
    assert f.exists() and latents_npz_path(d / "i1.png", (96, 64), "sdxl") == f
    with np.load(f) as z:
        assert {"latents", "original_size", "crop_ltrb", "latents_flipped"} <= set(z.files)
        assert z["latents"].shape == (4, 8, 8) and z["original_size"].tolist() == [96, 64]
    # second start: everything reused
    g2 = group_for(tmp_path, flip_aug=True)
    enc2 = Encoder()
    assert cache_latents(g2, enc2, suffix="sdxl", to_disk=True, vae_id="tiny")["reused"] == 4 and enc2.calls == 0
    b = g2.get_batch(1, 0)
    assert b["latents"].shape[1] == 4
    # changed image -> rebuilt; other VAE -> rebuilt
    img(d / "i0.png", 64, 64, seed=99)
    os.utime(d / "i0.png", ns=(1, 10**19))
    g3 = group_for(tmp_path, flip_aug=True)
    s = cache_latents(g3, Encoder(), suffix="sdxl", to_disk=True, vae_id="tiny")
    assert (s["encoded"], s["reused"]) == (1, 3)
    s = cache_latents(group_for(tmp_path, flip_aug=True), Encoder(), suffix="sdxl", to_disk=True, vae_id="other")
    assert s["encoded"] == 4
    # a file written without flipped latents does not serve flip_aug
    lat, _, osz, crop, _ = load_latents_npz(f)
    np.savez(f, latents=lat, original_size=np.array(osz), crop_ltrb=np.array(crop))
    s = cache_latents(group_for(tmp_path, flip_aug=True), Encoder(), suffix="sdxl", to_disk=True, vae_id="other")
    assert s["encoded"] == 1


def test_refused_with_augmentation(tmp_path):
    with pytest.raises(UserError, match="color_aug"):
        cache_latents(group_for(tmp_path, color_aug=True), Encoder())
    with pytest.raises(UserError, match="random_crop"):
        cache_latents(group_for(tmp_path, random_crop=True), Encoder())


def test_tiny_diffusers_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=64).eval()

    def encode(px):
        return vae.encode(px).latent_dist.mode() * 0.18215

    g = group_for(tmp_path, alpha_mask=True)
    cache_latents(g, encode, suffix="sd", to_disk=True, batch_size=4)
    f = tmp_path / "train" / "2_cat" / "i3_0080x0080_sd.npz"
    with np.load(f) as z:
        assert z["latents"].shape == (4, 8, 8) and z["alpha_mask"].shape == (64, 64)
    b = g.get_batch(1, 0)
    assert b["latents"].shape[1:] == (4, 8, 8) and b["alpha_masks"].shape[1:] == (64, 64)


def test_text_encoder_cache(tmp_path):
    calls = []

    def encode(caps):
        calls.append(list(caps))
        n = torch.tensor([[float(len(c))] for c in caps])
        return {"hidden": n.repeat(1, 3), "pooled": n * 2}

    c = TextEncoderCache(encode, cache_dir=tmp_path / "te", batch_size=2, key_prefix="sd1 clip_skip=2")
    out = c.get(["ab", "abc", "ab"])
    assert out["hidden"].shape == (3, 3) and out["pooled"][:, 0].tolist() == [4.0, 6.0, 4.0]
    assert sum(len(x) for x in calls) == 2
    c2 = TextEncoderCache(encode, cache_dir=tmp_path / "te", key_prefix="sd1 clip_skip=2")
    c2.get(["abc"])
    assert sum(len(x) for x in calls) == 2  # from disk
    c3 = TextEncoderCache(lambda caps: torch.ones(len(caps), 2), key_prefix="other")
    assert c3.get(["x", "y"]).shape == (2, 2)


def test_static_captions_for_te_cache(tmp_path):
    g = group_for(tmp_path, caption_prefix="pre")
    assert group_static_captions(g) == ["pre cat"]
    with pytest.raises(UserError, match="shuffle_caption"):
        group_static_captions(group_for(tmp_path, shuffle_caption=True))


# ---- the VAE posterior memo of uncached runs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd1():
    from lorakit.models.tiny import tiny_bundle

    return tiny_bundle("sd1", seed=0)


def _counting_encoder(bundle):
    calls = []
    handle = bundle.vae.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, handle


def test_posterior_memo_draws_what_re_encoding_draws(tiny_sd1, one_thread):
    """With the memo, each step's latents are bitwise what a fresh per-image encode with the same generator gives:
    the posterior N(mean, std) of the diffusers VAE, one fresh draw per image per call - while the encoder runs
    once per distinct image."""
    from lorakit.train.stages import vae_encoder

    vae = tiny_sd1.vae
    px = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    calls, handle = _counting_encoder(tiny_sd1)
    try:
        g = torch.Generator().manual_seed(7)
        enc = vae_encoder(tiny_sd1, g, torch.float32, memo_bytes=1 << 20)
        got = [enc(px), enc(px), enc(px[:1])]
    finally:
        handle.remove()
    assert calls == [1, 1]  # two images, each encoded once, alone
    ref_g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        dists = [vae.encode(px[i:i + 1]).latent_dist for i in range(2)]
    mean = torch.cat([d.mean for d in dists])
    std = torch.cat([d.std for d in dists])
    scale = tiny_sd1.latent_scale
    for out, n in zip(got, (2, 2, 1)):
        eps = torch.randn(mean[:n].shape, generator=ref_g)
        assert torch.equal(out, (mean[:n] + std[:n] * eps) * scale)
    assert not torch.equal(got[0], got[1])  # a fresh draw each call, not a frozen latent
    assert (enc.memo.hits, enc.memo.misses) == (3, 2)


def test_half_precision_vae_encodes_channels_last_within_its_rounding(one_thread):
    """A bf16 VAE encodes channels-last (faster on oneDNN's bf16 convolutions): the same posterior as the fp32 VAE to
    bf16's rounding - no further from it than a bf16 encode in the old layout - and latents in the plain layout (a
    channels-last latent would carry its layout into the UNet). An fp32 VAE keeps its layout and its bits."""
    from lorakit.models.tiny import tiny_bundle
    from lorakit.train.stages import vae_encoder

    px = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    fp32 = tiny_bundle("sd1", seed=0)
    want = vae_encoder(fp32, torch.Generator().manual_seed(5), torch.float32)(px)
    assert all(p.is_contiguous() for p in fp32.vae.parameters())  # fp32: untouched
    half = tiny_bundle("sd1", seed=0)
    half.vae.to(torch.bfloat16)
    with torch.no_grad():
        old = half.vae.encode(px.to(torch.bfloat16)).latent_dist  # bf16 in the layout it had
    eps = torch.randn(old.mean.shape, generator=torch.Generator().manual_seed(5))
    old_z = (old.mean.float() + old.std.float() * eps) * half.latent_scale
    got = vae_encoder(half, torch.Generator().manual_seed(5), torch.bfloat16)(px)
    convs = [m.weight for m in half.vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert got.is_contiguous() and got.dtype == torch.float32
    err, old_err = [float((z - want).norm() / want.norm()) for z in (got, old_z)]
    assert err < 2e-2 and err <= 1.5 * old_err + 1e-3, (err, old_err)


def test_posterior_memo_misses_changed_pixels_and_stays_in_budget(tiny_sd1, one_thread):
    from lorakit.data.latents import PosteriorMemo
    from lorakit.train.stages import vae_encoder

    px = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    entry = 2 * 4 * 8 * 8 * 4  # mean + std of a 4x8x8 latent in fp32
    enc = vae_encoder(tiny_sd1, torch.Generator().manual_seed(0), torch.float32, memo_bytes=2 * entry)
    calls, handle = _counting_encoder(tiny_sd1)
    try:
        enc(px)
        enc(px.flip(-1))  # a flipped (augmented) image is another image
        enc(px + 1e-3)
        enc(px)  # the oldest went when the third arrived: encoded again
    finally:
        handle.remove()
    assert len(calls) == 4 and len(enc.memo) == 2 and enc.memo.bytes == 2 * entry
    memo = PosteriorMemo(entry - 1)  # an entry larger than the budget is not kept
    memo.put(b"k", torch.zeros(4, 8, 8), torch.zeros(4, 8, 8))
    assert len(memo) == 0 and memo.bytes == 0


def test_uncached_run_encodes_each_image_once_and_says_so(tmp_path):
    """A 3-epoch run on 2 images without --cache_latents: 2 encodes, 4 reuses, and the log says it."""
    from test_train_common import dataset, options, run

    lines = []
    data = dataset(tmp_path, n_train=2)
    result = run(options(tmp_path, data, "--max_train_epochs", "3"), log=lines.append)
    assert result.global_step == 6
    assert any("VAE encoder: 2 images encoded, their posteriors reused 4 times" in line for line in lines), lines


def test_frozen_text_encoder_outputs_are_remembered_and_equal_fresh_ones(tmp_path):
    """UNet-only without --cache_text_encoder_outputs: each distinct caption is encoded once (alone) and reused -
    the same tensors a fresh encode gives; a run that trains the text encoder encodes every step."""
    from test_train_common import dataset, options, run, tiny

    from lorakit.models.conditioning import encode_captions
    from lorakit.train import stages

    seen = {}
    real = stages.prepare_inputs

    def spy(*a, **k):
        seen["inputs"] = real(*a, **k)
        return seen["inputs"]

    lines = []
    data = dataset(tmp_path, n_train=2)
    bundle = tiny("sd1")
    stages.prepare_inputs = spy
    try:
        run(options(tmp_path, data, "--max_train_epochs", "3", "--network_train_unet_only", "--clip_skip", "2"),
            bundle=bundle, log=lines.append)
        memo = seen["inputs"].te_cache
        assert any("text encoder (frozen): 2 captions encoded, 4 reused" in line for line in lines), lines
        caption = "zq shape, tag1, color1, extra"
        with torch.no_grad():
            fresh, _ = encode_captions(bundle, [caption], 2, None)
            assert torch.equal(memo.get([caption]), fresh)
        run(options(tmp_path / "te", data, "--max_train_epochs", "1"), log=lines.append)
        assert seen["inputs"].te_cache is None
    finally:
        stages.prepare_inputs = real


def test_text_memo_keeps_to_its_budget():
    calls = []

    def encode(caps):
        calls.append(list(caps))
        return torch.ones(len(caps), 10)  # 40 bytes a caption

    memo = TextEncoderCache(encode, batch_size=1, max_bytes=100)
    for caps in (["a", "b"], ["a"], ["c"], ["b"]):  # "b" was the least recently used when "c" came
        memo.get(caps)
    assert calls == [["a"], ["b"], ["c"], ["b"]] and (memo.hits, memo.misses) == (1, 4)
    assert len(memo.mem) == 2 and memo.bytes == 80
