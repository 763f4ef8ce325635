"""The toy base's pretraining stages (issue 18): a v2 base (three-level VAE: 64 px -> 16x16 latents) built in a few
steps, exported, then used as every user's model is: trained on with cached latents on disk, sampled from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_first_hour import cli
from test_train_common import make_images, one_thread  # noqa: F401


@pytest.fixture(scope="module")
def v2_base(tmp_path_factory):
    from lorakit.toyworld import pretrain

    work = tmp_path_factory.mktemp("toy_v2")
    torch.set_num_threads(1)
    vae = pretrain.train_vae(work, 5, batch_size=4, pool=64, open_pool=32, spec="v2", max_steps=2, log=lambda m: None)
    unet = pretrain.train_unet(work, 5, batch_size=4, pool=64, max_steps=2, log=lambda m: None)
    # the decoder-only stage (encoder frozen, so the UNet's latents stay valid); export prefers its weights
    dec = pretrain.train_vae_decoder(work, 5, batch_size=4, pool=64, open_pool=32, max_steps=2, log=lambda m: None)
    assert dec["steps"] == 2 and (work / "vae_decoder_state.pt").exists()
    out = pretrain.export_base(work, work / "base_v2.safetensors")
    return work, out, vae, unet


def test_v2_stages_stop_at_max_steps_and_export_a_16x16_latent_base(v2_base):
    from lorakit.models.loading import load_bundle

    work, path, vae, unet = v2_base
    assert vae["steps"] == 2 and unet["steps"] == 2
    assert json.loads((work / "spec.json").read_text())["name"] == "v2"
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["modelspec.resolution"] == "64x64"
    bundle = load_bundle(path, family="sd1", dtype="fp32")
    assert bundle.latent_factor == 4 and bundle.unet.config.sample_size == 16
    assert bundle.text_encoders[0].config.hidden_size == bundle.unet.config.cross_attention_dim == 64
    with torch.no_grad():
        z = bundle.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 16, 16)
    # the UNet learned on latents of this VAE, so the file's scaling factor is the one the stage measured
    assert bundle.latent_scale == pytest.approx(vae["scaling_factor"], rel=1e-3)


def test_a_work_dir_keeps_its_spec(v2_base):
    from lorakit.errors import UserError
    from lorakit.toyworld import pretrain

    work = v2_base[0]
    assert pretrain.work_spec(work).name == "v2"
    with pytest.raises(UserError, match="holds a 'v2' toy base; --spec v1 needs a new --work_dir"):
        pretrain.work_spec(work, "v1")


def test_training_on_a_4x_vae_caches_latents_on_disk_and_reuses_them(v2_base, tmp_path):
    """The disk cache's shape check and the size conditioning follow the VAE's factor (they assumed 8)."""
    path = v2_base[1]
    make_images(tmp_path / "train" / "1_zq shape", 2)
    argv = ["train", "--pretrained_model_name_or_path", path, "--train_data_dir", tmp_path / "train",
            "--output_dir", tmp_path / "out", "--output_name", "zq", "--resolution", "64", "--network_dim", "2",
            "--max_train_steps", "1", "--network_train_unet_only", "--cache_latents", "--cache_latents_to_disk",
            "--seed", "1", "--max_memory", "off"]
    rc, out, err = cli(argv)
    assert rc == 0, out + err
    assert "2 encoded, 0 reused from disk" in out, out
    npz = sorted((tmp_path / "train" / "1_zq shape").glob("*.npz"))
    assert len(npz) == 2
    with np.load(npz[0]) as f:
        assert f["latents"].shape == (4, 16, 16)
    rc, out, err = cli(argv + ["--output_name", "zq2"])
    assert rc == 0, out + err
    assert "0 encoded, 2 reused from disk" in out, out
    lora = load_file(str(tmp_path / "out" / "zq2.safetensors"))
    assert lora and all(torch.isfinite(v.float()).all() for v in lora.values())


def test_generating_from_a_v2_base_gives_the_asked_size(v2_base, tmp_path):
    from PIL import Image

    rc, out, err = cli(["generate", "--model", v2_base[1], "--prompt", "bear, sky", "--width", "64", "--height", "96",
                        "--steps", "2", "--outdir", tmp_path])
    assert rc == 0, out + err
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (64, 96)


def test_ctrl_c_in_a_stage_saves_its_state(v2_base, tmp_path):
    import shutil

    from lorakit.toyworld import pretrain

    work = tmp_path / "work"
    shutil.copytree(v2_base[0], work)

    def log(msg):
        if msg.startswith("unet step 25 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain.train_unet(work, 5, batch_size=2, pool=64, max_steps=40, log=log)
    assert torch.load(work / "unet_state.pt", weights_only=True)["step"] == 25
