"""UNet-only / TE-only / both train only their own parameters; refused option combinations."""

import pytest
import torch

from lorakit.errors import UserError
from test_train_common import dataset, one_thread, options, read_lora, run, tiny  # noqa: F401


def _base_snapshot(bundle):
    return {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in bundle.components().items()}


@pytest.mark.parametrize("flag,unet,te", [("--network_train_unet_only", True, False),
                                          ("--network_train_text_encoder_only", False, True), (None, True, True)])
def test_each_side_trains_only_its_own_parameters(tmp_path, flag, unet, te):
    data = dataset(tmp_path, n_train=1)
    bundle = tiny("sd1")
    before = _base_snapshot(bundle)
    args = ["--max_train_steps", "2", "--learning_rate", "1e-2"] + ([flag] if flag else [])
    result = run(options(tmp_path, data, *args), bundle=bundle)
    tensors, md = read_lora(result.final_lora)
    has_unet = any(k.startswith("lora_unet_") for k in tensors)
    has_te = any(k.startswith("lora_te_") for k in tensors)
    assert (has_unet, has_te) == (unet, te)
    # lora_up starts at zero: a trained side has non-zero up weights
    ups = {side: max(float(v.abs().max()) for k, v in tensors.items() if k.startswith(side) and "lora_up" in k)
           for side in ("lora_unet_", "lora_te_") if any(k.startswith(side) for k in tensors)}
    assert all(v > 0 for v in ups.values())
    # the base model never changes
    after = _base_snapshot(bundle)
    for comp in before:
        for k in before[comp]:
            assert torch.equal(before[comp][k], after[comp][k].to(before[comp][k].dtype)), (comp, k)


def test_refusals(tmp_path):
    data = dataset(tmp_path, n_train=1)
    with pytest.raises(UserError, match="exclude each other"):
        run(options(tmp_path, data, "--network_train_unet_only", "--network_train_text_encoder_only"))
    with pytest.raises(UserError, match="mixed_precision"):
        run(options(tmp_path, data, "--fp8_base"))
    with pytest.raises(UserError, match="network_train_unet_only"):
        run(options(tmp_path, data, "--cache_text_encoder_outputs"))
    with pytest.raises(UserError, match="different learning rates"):
        run(options(tmp_path, data, "--optimizer_type", "DAdaptAdam", "--learning_rate", "1",
                    "--text_encoder_lr", "0.5"))


def test_latent_and_text_encoder_caches(tmp_path):
    data = dataset(tmp_path, n_train=2, sizes=((64, 64), (128, 64)))
    args = ["--max_train_steps", "2", "--cache_latents_to_disk", "--cache_text_encoder_outputs",
            "--network_train_unet_only", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128"]
    result = run(options(tmp_path, data, *args))
    npz = sorted(p.name for p in (tmp_path / "train").glob("*/*.npz"))
    assert npz == ["000_0064x0064_sd.npz", "001_0128x0064_sd.npz"]  # sd-scripts' cache file names
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    with pytest.raises(UserError, match="color_aug"):
        run(options(tmp_path, data, *args, "--color_aug"))
