"""--blocks_to_swap on the tiny FLUX (19 double, 38 single blocks, as the full model): the same outputs and LoRA
gradients as without swapping, the moves sd-scripts' schedule makes, never more than (blocks - swapped) blocks of a
list on the compute device, every block on the device when it runs, and the options refused where they cannot apply.

This machine has no GPU, so the compute device is the CPU: a block "on the device" holds a copy of its weights made
by the swap, a block "off" it points at its home copy. The recording hooks tell them apart by storage."""

from __future__ import annotations

import pytest
import torch

from lorakit.adapters.network import create_network
from lorakit.errors import UserError
from lorakit.models.block_swap import device_bytes_change, max_blocks_to_swap, swap_counts
from lorakit.models.tiny import tiny_bundle
from test_train_common import one_thread  # noqa: F401


def test_sd_scripts_split_and_limits():
    assert swap_counts(18, (19, 38)) == (9, 18)  # sd-scripts: n // 2 double, 2 (n - n // 2) single
    assert swap_counts(35, (19, 38)) == (17, 36) and max_blocks_to_swap((19, 38)) == 35
    assert swap_counts(1, (19, 38)) == (0, 2)
    with pytest.raises(UserError, match="--blocks_to_swap 36: at most 35"):
        swap_counts(36, (19, 38))
    with pytest.raises(UserError, match=">= 0"):
        swap_counts(-1, (19, 38))


def _inputs(unet, seed=0):
    from lorakit.models.flux import image_ids, text_ids

    g = torch.Generator().manual_seed(seed)
    p = unet.params
    img = torch.randn(2, 16, p.in_channels, generator=g)
    txt = torch.randn(2, 5, p.context_in_dim, generator=g)
    y = torch.randn(2, p.vec_in_dim, generator=g)
    return (img, image_ids(2, 8, 8), txt, text_ids(2, 5), torch.tensor([0.3, 0.8]), y, torch.tensor([3.5, 3.5]))


def _model_with_lora(seed=0):
    bundle = tiny_bundle("flux-dev", seed=seed)
    torch.manual_seed(1)
    net = create_network(bundle, "networks.lora", 4, 1, train_text_encoder=False)
    for m in net.unet_adapters:
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)  # a LoRA that changes the output
    net.apply_to(bundle)
    bundle.unet.requires_grad_(False)
    return bundle.unet, net


def _step(unet, net, steps=2):
    """Outputs and LoRA gradients of `steps` forward + backward passes (the second after the first's moves)."""
    outs, grads = [], []
    for s in range(steps):
        net.zero_grad(set_to_none=True)
        out = unet(*_inputs(unet, s))
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None})
    return outs, grads


class Recorder:
    """Moves as they happen, the blocks of each list on the device after each move, and a check before every block
    runs (forward, and recomputation under gradient checkpointing) that its weights are the device copy."""

    def __init__(self, unet):
        self.unet, self.moves, self.max_on_device, self.ran_off_device = unet, [], {}, []
        for name, blocks in (("double", unet.double_blocks), ("single", unet.single_blocks)):
            for i, block in enumerate(blocks):
                block.register_forward_pre_hook(lambda m, a, n=name, i=i: self._check(n, i))

    def observer(self, name, kind, i):
        self.moves.append((name, kind, i))
        swap = self.unet.block_swaps[0 if name == "double" else 1] if self.unet.block_swaps else None
        if swap is not None:
            on = sum(1 for j in range(swap.n) if self._on_device(swap, j))
            self.max_on_device[name] = max(self.max_on_device.get(name, 0), on)

    @staticmethod
    def _on_device(swap, j) -> bool:
        if j not in swap.home:
            return True
        return all(p.data.untyped_storage().data_ptr() != home.untyped_storage().data_ptr() for p, home in swap.home[j])

    def _check(self, name, i):
        swap = self.unet.block_swaps[0 if name == "double" else 1]
        if not self._on_device(swap, i):
            self.ran_off_device.append((name, i))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_model_matches_and_keeps_at_most_the_rest_on_the_device(checkpointing, one_thread):
    ref, ref_net = _model_with_lora()
    swp, swp_net = _model_with_lora()
    for m in (ref, swp):
        m.train()
        if checkpointing:
            m.enable_gradient_checkpointing()
    rec = Recorder(swp)
    assert swp.enable_block_swap(18, "cpu", observer=rec.observer) == (9, 18)
    # blocks 0..s-1 and keep..n-1 take turns; s..keep-1 (double 9, single 18-19) stay on the device
    assert rec.moves == [("double", "in", i) for i in range(9)] + [("single", "in", i) for i in range(18)]
    rec.moves.clear()
    want_outs, want_grads = _step(ref, ref_net)
    got_outs, got_grads = _step(swp, swp_net)
    for w, g in zip(want_outs, got_outs):
        assert torch.equal(w, g)
    for w, g in zip(want_grads, got_grads):
        assert w.keys() == g.keys() and len(w) == 2 * 304  # every down and up
        assert all(torch.equal(w[k], g[k]) for k in w)
    assert rec.ran_off_device == []
    assert rec.max_on_device == {"double": 19 - 9, "single": 38 - 18}
    # sd-scripts' schedule: after block i (< s) runs, i leaves and i + keep comes; backward brings them back
    fwd = [m for m in rec.moves[:2 * 9] if m[0] == "double"]
    assert fwd[:4] == [("double", "out", 0), ("double", "in", 10), ("double", "out", 1), ("double", "in", 11)]
    per_step = {k: sum(1 for m in rec.moves if m[:2] == k) for k in (("double", "in"), ("single", "in"))}
    assert per_step == {("double", "in"): 2 * 2 * 9, ("single", "in"): 2 * 2 * 18}  # 2 steps x (forward + backward)
    assert [sorted(s.resident) for s in swp.block_swaps] == [list(range(10)), list(range(20))]


def test_inference_passes_start_from_the_first_blocks(one_thread):
    ref, _ = _model_with_lora()
    swp, _ = _model_with_lora()
    rec = Recorder(swp)
    swp.enable_block_swap(35, "cpu", observer=rec.observer)
    with torch.no_grad():
        for s in range(2):  # no backward: the next pass must put blocks 0.. back itself
            assert torch.equal(ref(*_inputs(ref, s)), swp(*_inputs(swp, s)))
    assert rec.ran_off_device == [] and rec.max_on_device == {"double": 2, "single": 2}


def test_device_bytes_change_by_device():
    unet = tiny_bundle("flux-dev").unet
    lists = (unet.double_blocks, unet.single_blocks)
    per_double = sum(p.numel() * 4 for p in unet.double_blocks[0].parameters())
    per_single = sum(p.numel() * 4 for p in unet.single_blocks[0].parameters())
    # a GPU: the swapped blocks leave it
    assert device_bytes_change(lists, (17, 36), "cuda") == -(17 * per_double + 36 * per_single)
    # the CPU holds the home copies already: the copies of the swapped blocks on the "device" at once come on top
    assert device_bytes_change(lists, (17, 36), "cpu") == 2 * per_double + 2 * per_single


# ---- through `lorakit train` ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_flux_file(tmp_path_factory):
    from lorakit.models.saving import save_single_file

    path = tmp_path_factory.mktemp("model") / "tiny_flux.safetensors"
    return save_single_file(tiny_bundle("flux-dev", seed=0), path)


def _train_args(model, tmp_path, out, *extra):
    from lorakit import options as O
    from test_train_common import make_images

    data = tmp_path / "data"
    if not data.exists():
        make_images(data / "1_zq", 2, sizes=((64, 64),))
    return O.resolve(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir",
                      str(tmp_path / out), "--resolution", "64", "--network_dim", "2", "--learning_rate", "3e-3",
                      "--max_train_steps", "2", "--seed", "7", "--t5xxl_max_token_length", "8",
                      "--model_prediction_type", "raw", "--max_data_loader_n_workers", "0", *extra])


def test_training_with_block_swap_gives_the_same_lora(tiny_flux_file, tmp_path, one_thread):
    from safetensors.torch import load_file

    from lorakit.train.trainer import train

    def both(tag, *extra, logs=None):
        plain = train(_train_args(tiny_flux_file, tmp_path, tag + "a", *extra), progress=False, log=lambda *a: None,
                      predict_memory=False)
        swapped = train(_train_args(tiny_flux_file, tmp_path, tag + "b", *extra, "--blocks_to_swap", "18"),
                        progress=False, log=(logs.append if logs is not None else lambda *a: None),
                        predict_memory=False)
        return plain.losses, swapped.losses, load_file(str(plain.final_lora)), load_file(str(swapped.final_lora))

    logs = []
    la, lb, wa, wb = both("u", "--gradient_checkpointing", "--network_train_unet_only", logs=logs)
    assert la == lb and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit
    text = "\n".join(map(str, logs))
    assert "--blocks_to_swap 18: 9 double and 18 single blocks stay in CPU memory" in text
    assert "nothing is saved" in text  # the CPU note


def test_block_swap_is_refused_where_it_cannot_apply(tiny_flux_file, tmp_path):
    from lorakit.models.saving import save_single_file
    from lorakit.train.trainer import train

    with pytest.raises(UserError, match="--blocks_to_swap 36: at most 35"):
        train(_train_args(tiny_flux_file, tmp_path, "a", "--blocks_to_swap", "36"), progress=False,
              log=lambda *a: None, predict_memory=False)
    sd1 = save_single_file(tiny_bundle("sd1"), tmp_path / "sd1.safetensors")
    from lorakit import options as O

    ns = O.resolve(["--pretrained_model_name_or_path", str(sd1), "--train_data_dir", str(tmp_path / "data"),
                    "--output_dir", str(tmp_path / "c"), "--resolution", "64", "--blocks_to_swap", "4"])
    with pytest.raises(UserError, match="--blocks_to_swap: Stable Diffusion 1.x's UNet has no transformer block"):
        train(ns, progress=False, log=lambda *a: None, predict_memory=False)


def _estimate(model, tmp_path, *extra):
    from lorakit import options as O
    from lorakit.train import memory as M
    from lorakit.train import stages as S

    opts = O.normalize(_train_args(model, tmp_path, "m", "--network_train_unet_only", *extra))
    run = S.set_up_run(S.picked(S.RunOptions, opts), lambda *a: None, False)
    plan = S.plan_base_model(S.picked(S.LoadOptions, opts))
    data = S.load_data(S.dataset_configs(opts, plan.family, lambda *a: None), S.picked(S.DataOptions, opts), run)
    return M.estimate(opts, run, plan.family, plan.configs, M.step_shape(data))


def test_memory_estimate_counts_the_swap_on_this_cpu(tiny_flux_file, tmp_path, one_thread):
    base = _estimate(tiny_flux_file, tmp_path)
    swapped = _estimate(tiny_flux_file, tmp_path, "--blocks_to_swap", "35")
    unet = tiny_bundle("flux-dev").unet
    want = device_bytes_change((unet.double_blocks, unet.single_blocks), (17, 36), "cpu")
    assert swapped.weights - base.weights == want > 0 and swapped.activations == base.activations
    assert any("--blocks_to_swap 35: 17 and 36 blocks take turns" in n for n in swapped.notes)


def test_weights_that_leave_a_gpu():
    """What place_denoiser moves off a GPU, as the estimate counts it: cached text encoders and swapped blocks."""
    from types import SimpleNamespace

    from lorakit import options as O
    from lorakit.train.memory import _moved_weights, module_bytes

    bundle = tiny_bundle("flux-dev")
    gpu = SimpleNamespace(device=torch.device("cuda"))
    opts = O.normalize(O.resolve(["--cache_text_encoder_outputs", "--blocks_to_swap", "18"]))
    notes = []
    lists = (bundle.unet.double_blocks, bundle.unet.single_blocks)
    got = _moved_weights(opts, gpu, bundle.family, bundle.configs, bundle, notes)
    assert got == -module_bytes(*bundle.text_encoders) + device_bytes_change(lists, (9, 18), "cuda")
    assert len(notes) == 2
    plain = O.normalize(O.resolve([]))
    assert _moved_weights(plain, gpu, bundle.family, bundle.configs, bundle, []) == 0
    sd1 = tiny_bundle("sd1")  # SD keeps its text encoders where they are
    assert _moved_weights(O.normalize(O.resolve(["--cache_text_encoder_outputs"])), gpu, sd1.family, sd1.configs,
                          sd1, []) == 0


def test_gradients_reaching_the_conditioning_vector(one_thread):
    """With CLIP-L trained, the pooled vector y needs a gradient: every block's share of it passes block swap's marker,
    so the 57 shares are added in another order (rounding only); the blocks' LoRA gradients stay bit for bit."""
    ref, ref_net = _model_with_lora()
    swp, swp_net = _model_with_lora()
    swp.enable_block_swap(18, "cpu")
    ys = []
    for unet in (ref, swp):
        args = list(_inputs(unet))
        args[5] = args[5].clone().requires_grad_(True)
        unet(*args).square().mean().backward()
        ys.append(args[5].grad)
    assert torch.allclose(ys[0], ys[1], rtol=1e-5, atol=1e-9) and ys[0].abs().max() > 0
    for (k, a), (_, b) in zip(ref_net.named_parameters(), swp_net.named_parameters()):
        assert torch.equal(a.grad, b.grad), k


def test_estimate_offers_block_swap_on_a_gpu_only():
    from lorakit.models.loading import ModelPlan
    from lorakit.train.memory import _swap_fix

    dev, sd1 = tiny_bundle("flux-dev"), tiny_bundle("sd1")
    fix = _swap_fix(ModelPlan.of(dev), torch.device("cuda"))
    assert fix.flags.startswith("--blocks_to_swap 18 ")
    from lorakit import options as O

    opts, _ = fix.apply(O.normalize(O.resolve([])), None)
    assert opts.blocks_to_swap == 18
    assert _swap_fix(ModelPlan.of(dev), torch.device("cpu")) is None
    assert _swap_fix(ModelPlan.of(sd1), torch.device("cuda")) is None
