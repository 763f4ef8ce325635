"""Masked loss (--masked_loss with conditioning_data_dir masks, alpha_mask): sd-scripts' semantics, checked against
maths written here: loss * mask (the mask area-resized to the latents), then the mean over every element."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.errors import UserError
from test_train_common import dataset, one_thread, options, run, tiny  # noqa: F401


# ---- the loss ---------------------------------------------------------------------------------------------------
def _pred_target(seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_masked_out_pixels_give_exactly_zero_gradient():
    from lorakit.train.losses import diffusion_loss

    pred, target = _pred_target()
    pred.requires_grad_(True)
    mask = torch.ones(2, 64, 64)
    mask[:, :, 32:] = 0  # right half of the pixels: whole latent columns 4..7
    loss = diffusion_loss(pred, target, torch.tensor([10, 500]), torch.linspace(0.99, 0.01, 1000), mask=mask)
    loss.backward()
    assert torch.all(pred.grad[..., 4:] == 0)  # exactly zero, not small
    assert torch.all(pred.grad[..., :4] != 0)
    # the same number from the formula: sum over the kept half of (p - t)^2 / (C*H*W), averaged over the batch
    d = (pred.detach() - target) ** 2
    want = (d[..., :4].sum(dim=(1, 2, 3)) / d[0].numel()).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # another target where the mask is 0 changes neither the loss nor the gradient
    other = target.clone()
    other[..., 4:] += 3.0
    p2 = pred.detach().clone().requires_grad_(True)
    loss2 = diffusion_loss(p2, other, torch.tensor([10, 500]), torch.linspace(0.99, 0.01, 1000), mask=mask)
    loss2.backward()
    assert loss2.item() == loss.item() and torch.equal(p2.grad, pred.grad)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber"])
def test_a_half_mask_halves_the_loss(loss_type):
    from lorakit.train.losses import diffusion_loss

    pred, target = _pred_target(1)
    t, ac = torch.tensor([100, 900]), torch.linspace(0.99, 0.01, 1000)
    full = diffusion_loss(pred, target, t, ac, loss_type=loss_type)
    half = diffusion_loss(pred, target, t, ac, loss_type=loss_type, mask=torch.full((2, 64, 64), 0.5))
    assert half.item() == pytest.approx(full.item() / 2, rel=1e-6)
    # and a mask that keeps half the area halves the loss of an error spread evenly over it
    even = diffusion_loss(target + 0.3, target, t, ac, loss_type=loss_type)
    left = torch.zeros(2, 64, 64)
    left[:, :, :32] = 1
    assert diffusion_loss(target + 0.3, target, t, ac, loss_type=loss_type, mask=left).item() == \
        pytest.approx(even.item() / 2, rel=1e-6)


def test_batch_loss_gradient_of_a_masked_region_is_zero():
    """The whole training step: the LoRA's gradient equals the gradient of the loss written out over the kept
    pixels only, and changing the target where the mask is 0 changes nothing."""
    from lorakit.adapters.network import create_network
    from lorakit.train.loop import LossOptions, NoiseOptions, StepMaths, batch_loss

    bundle = tiny("sd1")
    torch.manual_seed(0)
    net = create_network(bundle, "networks.lora", 4, 4, {}, train_text_encoder=False)
    net.apply_to(bundle)
    for a in net.adapters:
        torch.nn.init.normal_(a.lora_up.weight, std=0.05)
    ac = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000), 0)
    maths = StepMaths(ac, "epsilon", NoiseOptions(None, False, None, None, 0.3, None, False, 400, 401),
                      LossOptions("l2", "snr", 0.1, 1.0, None, False, None, False), None, None, False,
                      torch.device("cpu"), torch.float32)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 64, 64)
    mask[:, 24:, :] = 0  # latent rows 3..7 ignored
    batch = {"latents": latents, "images": None, "captions": ["a", "b"], "alpha_masks": mask,
             "loss_weights": torch.ones(2)}
    params = [p for p in net.parameters() if p.requires_grad]

    def grads(b, masked=True):
        for p in params:
            p.grad = None
        loss = batch_loss(bundle, b if masked else dict(b, alpha_masks=None), maths,
                          torch.Generator().manual_seed(9), None, None)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in params])

    loss, g = grads(batch)
    # by hand: same noise (same generator seed), the UNet's output, squared error over rows 0..2 / all elements
    gen = torch.Generator().manual_seed(9)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.full((2,), 400)
    a = ac[400]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    from lorakit.models.conditioning import encode_captions

    hidden, _ = encode_captions(bundle, ["a", "b"], None, None)
    for p in params:
        p.grad = None
    pred = bundle.unet(noisy, t, hidden).sample
    want = (((pred - noise) ** 2)[:, :, :3, :].sum(dim=(1, 2, 3)) / (4 * 8 * 8)).mean()
    want.backward()
    g_want = torch.cat([p.grad.flatten() for p in params])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(g, g_want, rtol=1e-4, atol=1e-9) and g.abs().sum() > 0
    # a fully masked batch: loss and every gradient exactly 0
    loss0, g0 = grads(dict(batch, alpha_masks=torch.zeros(2, 64, 64)))
    assert loss0.item() == 0 and torch.all(g0 == 0)


# ---- the dataset: masks resized, cropped and flipped with their images -------------------------------------------
def _write_masked_set(tmp, n=2, size=(96, 64), split_at=0.5):
    """n images of `size`; a mask per image whose left `split_at` of the columns is 0 and the rest 255."""
    from test_train_common import make_images

    folder = tmp / "train" / "1_zq shape"
    make_images(folder, n, (size,))
    masks = tmp / "masks"
    masks.mkdir()
    w, h = size
    for p in sorted(folder.glob("*.png")):
        m = np.full((h, w, 3), 255, np.uint8)
        m[:, : int(w * split_at)] = 0
        m[..., 1:] = 7  # only the red channel counts
        Image.fromarray(m).save(masks / p.name)
    return {"train_data_dir": str(tmp / "train")}, masks


def _group(tmp, data, *extra, seed=3):
    from lorakit.data import DatasetGroup, build_dataset_configs

    opts = options(tmp, data, *extra)
    return DatasetGroup.build(build_dataset_configs(opts), seed=seed, masked_loss=opts.masked_loss, scan_cache=False)


def _expected_mask(size, reso, split_at):
    """The mask as the image's bucket sees it: resize to cover the bucket (same aspect), centre crop."""
    w, h = size
    s = max(reso[0] / w, reso[1] / h)
    rw, rh = int(w * s + 0.5), int(h * s + 0.5)
    cols = np.arange(rw)
    full = (cols >= int(rw * split_at)).astype(np.float32)
    left = (rw - reso[0]) // 2
    return full[left:left + reso[0]]


def test_conditioning_masks_follow_bucket_crop_and_flip(tmp_path):
    data, masks = _write_masked_set(tmp_path, size=(192, 128), split_at=0.25)
    group = _group(tmp_path, data, "--masked_loss", "--conditioning_data_dir", str(masks), "--enable_bucket",
                   "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--flip_aug")
    seen = {False: 0, True: 0}
    for epoch in range(1, 6):
        for k in range(group.num_batches(epoch)):
            b = group.get_batch(epoch, k)
            m = b["alpha_masks"]
            assert m is not None and m.shape[-2:] == b["images"].shape[-2:]
            reso = (b["images"].shape[-1], b["images"].shape[-2])
            for i, flipped in enumerate(b["flipped"]):
                cols = _expected_mask((192, 128), reso, 0.25)
                cols = cols[::-1] if flipped else cols
                got = m[i].numpy()
                # far from the edge the mask is exactly 0 or 1 (area/bilinear resampling has no ringing)
                edge = int(np.argmax(np.diff(cols) != 0))
                far = np.abs(np.arange(reso[0]) - edge) > 3
                assert np.array_equal(got[:, far], np.broadcast_to(cols[far], got[:, far].shape))
                seen[flipped] += 1
    assert seen[False] and seen[True]


def test_mask_red_channel_grey_levels(tmp_path):
    data, masks = _write_masked_set(tmp_path, n=1, size=(64, 64))
    for p in masks.glob("*.png"):
        arr = np.zeros((64, 64, 3), np.uint8)
        arr[..., 0] = 127
        Image.fromarray(arr).save(p)
    group = _group(tmp_path, data, "--masked_loss", "--conditioning_data_dir", str(masks))
    m = group.get_batch(1, 0)["alpha_masks"]
    assert torch.allclose(m, torch.full_like(m, 127 / 255))  # 127 = a half weight, as sd-scripts documents


@pytest.mark.parametrize("to_disk", [False, True])
def test_masks_are_cached_with_the_latents(tmp_path, to_disk):
    from lorakit.data.latents import cache_latents

    data, masks = _write_masked_set(tmp_path, size=(96, 64), split_at=0.5)
    args = ("--masked_loss", "--conditioning_data_dir", str(masks), "--flip_aug")
    plain = _group(tmp_path, data, *args)
    cached = _group(tmp_path, data, *args)
    cache_latents(cached, lambda px: px[:, :, ::8, ::8][:, :3].repeat(1, 2, 1, 1)[:, :4] * 0.5, to_disk=to_disk)
    for k in range(plain.num_batches(1)):
        a, b = plain.get_batch(1, k), cached.get_batch(1, k)
        assert b["latents"] is not None and b["images"] is None
        assert a["flipped"] == b["flipped"]
        assert torch.equal(a["alpha_masks"], b["alpha_masks"])
    if to_disk:  # a changed mask rebuilds the cache file
        from lorakit.data.latents import npz_is_valid

        e = cached.datasets[0].entries[0]
        assert npz_is_valid(e.npz_path, e, True, True)
        m = masks / e.path.name
        Image.fromarray(np.zeros((64, 96), np.uint8)).save(m)
        import os

        st = os.stat(m)
        os.utime(m, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert not npz_is_valid(e.npz_path, e, True, True)


def test_mask_lookup_by_subfolder_and_errors(tmp_path):
    data, masks = _write_masked_set(tmp_path)
    # one --conditioning_data_dir for `N_name` folders: masks may sit in a subfolder named like the image folder
    sub = masks / "1_zq shape"
    sub.mkdir()
    for p in list(masks.glob("*.png")):
        p.rename(sub / p.name)
    g = _group(tmp_path, data, "--masked_loss", "--conditioning_data_dir", str(masks))
    assert all(e.mask_path.parent == sub for e in g.datasets[0].entries)
    with pytest.raises(UserError, match="--masked_loss is not"):
        _group(tmp_path, data, "--conditioning_data_dir", str(masks))
    with pytest.raises(UserError, match="no subset has a mask"):
        _group(tmp_path, data, "--masked_loss")
    (sub / "001.png").unlink()
    with pytest.raises(UserError, match=r"1 training image\(s\) have no mask.*001\.png"):
        _group(tmp_path, data, "--masked_loss", "--conditioning_data_dir", str(masks))
    Image.new("L", (30, 90)).save(sub / "001.png")
    with pytest.raises(UserError, match="different aspect ratio"):
        _group(tmp_path, data, "--masked_loss", "--conditioning_data_dir", str(masks))


def test_alpha_mask_flag_and_toml(tmp_path):
    from lorakit.data import DatasetGroup, build_dataset_configs

    folder = tmp_path / "img"
    folder.mkdir()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :32, 3] = 255  # left half opaque
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    (folder / "a.txt").write_text("zq")
    masks = tmp_path / "m"
    masks.mkdir()
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "a.png")
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{folder}"\nalpha_mask = true\n'
                    f'[[datasets.subsets]]\nimage_dir = "{folder}"\nconditioning_data_dir = "{masks}"\n',
                    encoding="utf-8")
    opts = options(tmp_path, {"dataset_config": str(toml)}, "--masked_loss")
    g = DatasetGroup.build(build_dataset_configs(opts), seed=1, masked_loss=True, scan_cache=False)
    ms = {e.subset_index: torch.as_tensor(g._load_sample(g.datasets[0], (64, 64), e, 1, 0, 0, 0)["alpha_mask"])
          for e in g.datasets[0].entries}
    assert torch.equal(ms[0][:, :32], torch.ones(64, 32)) and torch.equal(ms[0][:, 32:], torch.zeros(64, 32))
    assert torch.equal(ms[1], torch.ones(64, 64))  # the mask image, not the alpha channel


def test_masked_training_runs_from_the_command_line(tmp_path):
    data, masks = _write_masked_set(tmp_path, size=(64, 64))
    result = run(options(tmp_path, data, "--masked_loss", "--conditioning_data_dir", str(masks), "--cache_latents",
                         "--max_train_steps", "2"), predict_memory=False)
    assert result.global_step == 2 and result.final_lora.exists()


def test_regularization_images_take_masks_only_from_their_own_folder(tmp_path):
    from test_train_common import make_images

    data, masks = _write_masked_set(tmp_path)
    make_images(tmp_path / "reg" / "1_shape", 2, ((96, 64),), ["shape"], seed=1)  # same file names as the masks
    data["reg_data_dir"] = str(tmp_path / "reg")
    g = _group(tmp_path, data, "--masked_loss", "--conditioning_data_dir", str(masks))
    reg = [e for e in g.datasets[0].entries if e.is_reg]
    assert reg and all(e.mask_path is None for e in reg)  # the flat folder's masks belong to the training images
    assert any("regularization subset" in n for n in g.datasets[0].notes)
    (masks / "1_shape").mkdir()
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(masks / "1_shape" / "000.png")
    g = _group(tmp_path, data, "--masked_loss", "--conditioning_data_dir", str(masks))
    reg = {e.path.name: e.mask_path for e in g.datasets[0].entries if e.is_reg}
    assert reg["000.png"] == masks / "1_shape" / "000.png" and reg["001.png"] is None
