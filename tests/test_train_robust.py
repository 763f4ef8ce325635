"""Issue 15's training-loop parts: the NaN/inf guard of the weights, exact resume across thread counts, checks
before the model loads, and file permissions of generated images and diffusers folders."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from lorakit.errors import UserError
from test_train_common import dataset, one_thread, options, read_lora, run, tiny  # noqa: F401


# ---- NaN/inf in the weights -------------------------------------------------------------------------------------
def test_guard_restores_the_last_finite_weights():
    from lorakit.train.guard import WeightGuard

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))
    guard = WeightGuard([a, b], lambda: [("a", a), ("b", b)])
    with torch.no_grad():
        a.add_(1.0)
    assert guard.check() and guard.bad_names is None  # 2,2,2 is now the last good copy
    with torch.no_grad():
        a.add_(1.0)
        b[1, 0] = float("inf")
    assert not guard.check()
    assert guard.bad_names == ["b"]
    assert torch.equal(a.detach(), torch.full((3,), 2.0)) and torch.equal(b.detach(), torch.zeros(2, 2))


def test_nan_in_the_weights_after_a_step_keeps_the_last_finite_lora(tmp_path, monkeypatch):
    """A finite loss but an update that writes NaN: the run stops, resets the weights and names a file that loads,
    is finite and equals the weights before the bad step."""
    from lorakit.train import loop as L

    data = dataset(tmp_path, n_train=1)
    real = L._optimizer_step
    seen = {"calls": 0, "before": None}

    def poisoned(lp):
        seen["calls"] += 1
        if seen["calls"] == 3:
            seen["before"] = {k: v.detach().clone() for k, v in lp.network.state_dict().items()}
        real(lp)
        if seen["calls"] == 3:
            with torch.no_grad():
                lp.optim.trainable[5].view(-1)[0] = float("nan")

    monkeypatch.setattr(L, "_optimizer_step", poisoned)
    with pytest.raises(UserError) as err:
        run(options(tmp_path, data, "--max_train_steps", "6", "--network_train_unet_only"))
    msg = str(err.value)
    assert "weights became NaN/inf at step 3" in msg and "reset to those after step 2" in msg
    assert "stopped before the weights were touched" not in msg
    path = re.search(r"saved as (\S+\.safetensors)", msg).group(1)
    assert path.endswith("last-step00000002.safetensors")
    saved, _ = read_lora(path)
    assert all(torch.isfinite(t).all() for t in saved.values())
    before = seen["before"]
    assert saved.keys() == before.keys()
    for k in before:
        assert torch.equal(saved[k].float(), before[k].float()), k


def test_nan_loss_before_any_step_saves_nothing_and_says_so(tmp_path, monkeypatch):
    from lorakit.train import trainer

    data = dataset(tmp_path, n_train=1)
    real = trainer._batch_loss
    monkeypatch.setattr(trainer, "_batch_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(UserError, match=r"NaN/inf at step 1 .*no step had completed, so nothing was saved"):
        run(options(tmp_path, data, "--max_train_steps", "3", "--network_train_unet_only"))
    assert not list((tmp_path / "out").glob("*.safetensors"))


# ---- threads and exact resume -------------------------------------------------------------------------------------
ARGS = ["--max_train_steps", "3", "--network_dim", "2", "--learning_rate", "1e-3", "--network_train_unet_only",
        "--shuffle_caption", "--noise_offset", "0.05"]


# ---- gradients that never arrive ----------------------------------------------------------------------------------
def test_loha_with_gradient_checkpointing_trains_the_unet(tmp_path):
    """A LoHa run with --gradient_checkpointing changes its UNet modules (they start as no change: hada_w2_a = 0).
    Before the fix no UNet adapter got a gradient under diffusers' checkpointing and the file's UNet part stayed
    at zero."""
    opts = options(tmp_path, dataset(tmp_path), "--network_module", "lycoris.kohya", "--network_args", "algo=loha",
                   "--gradient_checkpointing", "--max_train_steps", "2", "--learning_rate", "1e-2")
    run(opts)
    sd, _ = read_lora(tmp_path / "out" / "last.safetensors")
    w2a = {k: v for k, v in sd.items() if k.endswith("hada_w2_a")}
    unet = [k for k in w2a if k.startswith("lora_unet_")]
    assert unet and all(w2a[k].abs().sum() > 0 for k in unet)


def test_a_step_whose_gradients_reach_no_adapter_stops_at_step_1(tmp_path, monkeypatch):
    """If no UNet adapter gets a gradient on the first step (a bug, as LoHa under checkpointing once was), the run
    stops there with a one-paragraph error instead of training nothing for an hour; some missing is logged."""
    from lorakit.adapters import base

    host_call = base._Host.__call__

    def unet_bypassed(self, x, *a, **k):  # the UNet's layers ignore their adapters; the text encoders' do not
        if self.adapters[0].lora_name.startswith("lora_unet_"):
            return self.orig_forward(x, *a, **k)
        return host_call(self, x, *a, **k)

    monkeypatch.setattr(base._Host, "__call__", unet_bypassed)
    opts = options(tmp_path, dataset(tmp_path), "--max_train_steps", "2")
    with pytest.raises(UserError, match=r"No gradient reached any of the UNet's \d+ adapters on the first step"):
        run(opts)
    assert not (tmp_path / "out" / "last.safetensors").exists()
    # and with no adapter anywhere on the loss's path (nothing to differentiate): the same kind of stop
    monkeypatch.setattr(base._Host, "__call__", lambda self, x, *a, **k: self.orig_forward(x, *a, **k))
    with pytest.raises(UserError, match=r"A step's loss depends on no trained parameter"):
        run(opts)


def test_some_adapters_without_a_gradient_are_named_in_the_log():
    from lorakit.adapters.network import create_network
    from lorakit.train.loop import check_first_gradients

    b = tiny("sd1")
    net = create_network(b, "networks.lora", 4, 4, {})
    net.apply_to(b)
    x, h = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    b.unet(x, torch.tensor([500]), h).sample.square().mean().backward()
    lines = []
    check_first_gradients(net, lines.append)
    assert lines == []
    first = net.unet_adapters[0]
    for p in first.parameters():
        p.grad = None
    check_first_gradients(net, lines.append)
    assert len(lines) == 1 and f"1 of the UNet's {len(net.unet_adapters)} adapters got no gradient" in lines[0] \
        and first.lora_name in lines[0]


def test_resume_is_bitwise_exact_with_two_threads_and_restores_the_count(tmp_path):
    """Two threads: the state records the count; a resume started under another count takes it back."""
    data = dataset(tmp_path, n_train=2)
    args = [*ARGS, "--max_train_steps", "2"]
    torch.set_num_threads(2)
    full = run(options(tmp_path / "a", data, *args))
    stopped = run(options(tmp_path / "b", data, *args), stop_after_step=1)
    state = stopped.states[-1]
    assert json.loads((state / "train_state.json").read_text(encoding="utf-8"))["num_threads"] == 2
    torch.set_num_threads(1)  # a new process with another default
    lines = []
    from lorakit.train.trainer import train

    resumed = train(options(tmp_path / "b", data, *args, "--resume", str(state)), bundle=tiny(), progress=False,
                    log=lines.append, predict_memory=False)
    assert torch.get_num_threads() == 2
    assert any("using 2 CPU threads like the run that saved the state" in ln for ln in lines)
    assert resumed.losses == full.losses[1:]
    a, _ = read_lora(full.final_lora)
    b, _ = read_lora(resumed.final_lora)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_num_threads_option_sets_the_count_and_overrides_the_state(tmp_path):
    data = dataset(tmp_path, n_train=1)
    stopped = run(options(tmp_path, data, *ARGS), stop_after_step=1)
    info = stopped.states[-1] / "train_state.json"
    assert json.loads(info.read_text(encoding="utf-8"))["num_threads"] == 1
    info.write_text(info.read_text(encoding="utf-8").replace('"num_threads": 1', '"num_threads": 2'),
                    encoding="utf-8")  # as if saved by a 2-thread run
    lines = []
    from lorakit.train.trainer import train

    train(options(tmp_path, data, *ARGS, "--num_threads", "1", "--resume", str(stopped.states[-1])), bundle=tiny(),
          progress=False, log=lines.append, predict_memory=False, stop_after_step=2)
    assert torch.get_num_threads() == 1
    assert any("saved by a run with 2 CPU threads and this one uses 1" in ln for ln in lines)


def test_num_threads_is_the_sd_scripts_flag_and_is_checked():
    from lorakit import options as O

    assert O.resolve(["--num_threads", "3"]).num_cpu_threads_per_process == 3
    ns = O.resolve(["accelerate", "launch", "--num_cpu_threads_per_process", "5", "train_network.py"])
    assert ns.num_cpu_threads_per_process == 5
    assert O.get_option("num_cpu_threads_per_process").effect
    with pytest.raises((UserError, SystemExit)):
        O.resolve(["--num_threads", "0"])


# ---- checks before the model loads ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, pattern", [
    (["--optimizer_type", "AdamWW"], r"--optimizer_type 'AdamWW'.*did you mean 'AdamW'"),
    (["--optimizer_args", "betaz=0.9,0.99"], r"--optimizer_args: AdamW has no argument betaz; it takes .*betas"),
    (["--optimizer_args", "weight_decay"], r"--optimizer_args item 'weight_decay' is not key=value"),
    (["--lr_scheduler_type", "NoSuchLR"], r"--lr_scheduler_type 'NoSuchLR' not found"),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step=3"], r"StepLR has no argument step; .*step_size"),
    (["--network_args", "conv_dimm=4"], r"network_args: unknown argument\(s\) conv_dimm"),
    (["--network_module", "networks.nope"], r"network_module 'networks.nope' is not supported"),
    (["--max_train_steps", "0"], r"--max_train_steps must be at least 1"),
])
def test_mistakes_are_reported_before_the_model_loads(tmp_path, monkeypatch, extra, pattern):
    from lorakit.models import loading
    from lorakit.models.saving import save_single_file
    from lorakit.train.trainer import train

    model = tmp_path / "tiny.safetensors"
    save_single_file(tiny(), model)
    monkeypatch.setattr(loading, "load_bundle", lambda *a, **k: pytest.fail("the model was loaded"))
    data = dataset(tmp_path, n_train=1)
    with pytest.raises(UserError, match=pattern):
        train(options(tmp_path, data, "--pretrained_model_name_or_path", str(model), *extra), progress=False,
              log=lambda *a: None, predict_memory=False)


def test_a_hub_id_says_lorakit_never_downloads(tmp_path, monkeypatch):
    from lorakit.cli.main import main

    monkeypatch.chdir(tmp_path)
    data = dataset(tmp_path, n_train=1)
    from lorakit.train.trainer import train

    with pytest.raises(UserError, match=r"--pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 .*Hugging "
                                        r"Face Hub id. lorakit never downloads.*pass the local file"):
        train(options(tmp_path, data, "--pretrained_model_name_or_path", "runwayml/stable-diffusion-v1-5"),
              progress=False, log=lambda *a: None, predict_memory=False)
    # other commands say it too, without naming a flag they do not have
    for argv in (["model", "info", "runwayml/stable-diffusion-v1-5"],
                 ["generate", "--model", "runwayml/stable-diffusion-v1-5", "--prompt", "x"]):
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(argv) == 2
        assert "never downloads" in err.getvalue() and "--pretrained_model_name_or_path" not in err.getvalue()


def test_a_plain_missing_path_is_not_called_a_hub_id():
    from lorakit.models.paths import looks_like_hub_id, missing_model_error

    assert looks_like_hub_id("stabilityai/stable-diffusion-xl-base-1.0")
    for path in ("models/sd15.safetensors", "./a/b", "/abs/model", "~/x/y", "a/b/c", "model.ckpt"):
        assert not looks_like_hub_id(path), path
    assert "never downloads" not in str(missing_model_error("models/sd15.safetensors", "--x"))


# ---- permissions ------------------------------------------------------------------------------------------------
def test_generated_pngs_and_diffusers_folders_get_the_usual_permissions(tmp_path):
    from PIL import Image

    from lorakit.generate.pipeline import save_image_unique
    from lorakit.models.saving import save_diffusers_folder
    from lorakit.utils import atomic

    want_file, want_dir = atomic.FILE_MODE, atomic.DIR_MODE
    assert want_file == 0o666 & ~atomic._UMASK and want_dir == 0o777 & ~atomic._UMASK
    png = save_image_unique(Image.new("RGB", (8, 8)), tmp_path / "imgs", "x", "a prompt\nSteps: 1")
    assert (os.stat(png).st_mode & 0o777) == want_file
    folder = save_diffusers_folder(tiny(), tmp_path / "diffusers")
    modes = {os.path.relpath(os.path.join(d, n), folder): os.stat(os.path.join(d, n)).st_mode & 0o777
             for d, dirs, files in os.walk(folder) for n in dirs + files}
    assert (os.stat(folder).st_mode & 0o777) == want_dir
    assert modes and all(m == (want_dir if os.path.isdir(folder / rel) else want_file) for rel, m in modes.items())
    assert any(rel.endswith(".safetensors") for rel in modes)


def test_guard_keeps_huge_finite_weights_and_finds_nan_among_them():
    """The guard's one-read check is a norm, which overflows for finite weights beyond ~1e19: those are still
    finite (checked element by element then), and a NaN next to them is still found."""
    from lorakit.train.guard import WeightGuard

    a, b = torch.nn.Parameter(torch.full((4,), 1e30)), torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    guard = WeightGuard([a, b], lambda: [("a", a), ("b", b)])
    assert guard.check() and guard.bad_names is None
    with torch.no_grad():
        b[2] = float("nan")
    assert not guard.check() and guard.bad_names == ["b"]
    assert torch.equal(b.detach(), torch.ones(3, dtype=torch.bfloat16))
