"""lorakit.train.preflight: the checks that run before the model loads (option ranges and combinations, inputs,
writable output folders, disk space for the planned saves), called directly."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from lorakit import options as O
from lorakit.errors import UserError
from lorakit.train import preflight as P

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def env(tmp_path):
    from test_train_common import make_images

    make_images(tmp_path / "train" / "5_zq shape", 4)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\0" * 1000)  # only its size and existence matter here (not a real checkpoint)
    return tmp_path, model


def opts_for(tmp: Path, model: Path, *extra: str):
    return O.resolve(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tmp / "train"),
                      "--output_dir", str(tmp / "out"), "--resolution", "64", *extra])


def test_good_options_pass_and_report_the_plan(env):
    tmp, model = env
    notes = P.preflight(opts_for(tmp, model, "--max_train_epochs", "3", "--save_every_n_epochs", "1"))
    assert len(notes) == 1 and "planned saves" in notes[0] and "LoRA files" in notes[0]
    assert (tmp / "out").is_dir() and not any((tmp / "out").iterdir())  # created, probe file removed


@pytest.mark.parametrize("name,value,flag", [
    ("learning_rate", -1.0, "--learning_rate"), ("network_dim", 0, "--network_dim"),
    ("max_train_steps", 0, "--max_train_steps"), ("max_train_epochs", 0, "--max_train_epochs"),
    ("train_batch_size", 0, "--train_batch_size"), ("network_dropout", 1.0, "--network_dropout"),
    ("caption_dropout_rate", -0.1, "--caption_dropout_rate"), ("gradient_accumulation_steps", 0,
                                                               "--gradient_accumulation_steps"),
    ("save_every_n_steps", 0, "--save_every_n_steps"), ("min_snr_gamma", 0.0, "--min_snr_gamma"),
    ("max_timestep", 1001, "--max_timestep"), ("text_encoder_lr", [1e-4, -1e-5], "--text_encoder_lr"),
    ("learning_rate", float("nan"), "--learning_rate"),
])
def test_values_out_of_range_name_the_flag(env, name, value, flag):
    tmp, model = env
    ns = opts_for(tmp, model)
    setattr(ns, name, value)  # as a caller setting values in code would: the parsers' checks are bypassed
    with pytest.raises(UserError, match=flag):
        P.preflight(ns)


def test_range_checks_also_run_when_parsing():
    with pytest.raises(UserError, match="--network_dim must be at least 1"):
        O.resolve(["--network_dim", "0"])
    assert O.range_problem(O.get_option("network_dropout"), 0.999) is None
    assert "between 0 and 1 (1 excluded)" in O.range_problem(O.get_option("network_dropout"), 1.0)
    assert O.range_problem(O.get_option("learning_rate"), 0.0) is None  # 0 leaves a part untrained (sd-scripts)


def test_combinations(env):
    tmp, model = env
    for extra, flag in [
        (("--resolution", "100"), "--bucket_reso_steps 64"),
        (("--learning_rate", "0"), "--learning_rate"),
        (("--learning_rate", "0", "--unet_lr", "0", "--network_train_unet_only"), "--unet_lr"),
        (("--min_timestep", "500", "--max_timestep", "400"), "--min_timestep"),
        (("--enable_bucket", "--min_bucket_reso", "320", "--max_bucket_reso", "640", "--resolution", "256"),
         "--min_bucket_reso"),
        (("--enable_bucket", "--min_bucket_reso", "200", "--resolution", "256"), "--min_bucket_reso 200"),
    ]:
        with pytest.raises(UserError, match=flag):
            P.preflight(opts_for(tmp, model, *extra))
    # a learning rate of 0 for the UNet is fine while the text encoder trains
    P.check_values(opts_for(tmp, model, "--learning_rate", "0", "--text_encoder_lr", "1e-5"))


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", "..", "", "c:evil", "x\\y"])
def test_output_name_must_be_a_plain_name(env, name):
    tmp, model = env
    with pytest.raises(UserError, match="--output_name"):
        P.preflight(opts_for(tmp, model, "--output_name", name))


@pytest.mark.parametrize("prefix", ["../../x", "/tmp/abs", "sub/x", ".."])
def test_log_prefix_must_be_a_plain_name(env, prefix):
    tmp, model = env
    with pytest.raises(UserError, match="--log_prefix"):
        P.preflight(opts_for(tmp, model, "--logging_dir", str(tmp / "logs"), "--log_prefix", prefix))


def test_inputs_must_exist(env):
    tmp, model = env
    for extra, flag in [(("--pretrained_model_name_or_path", str(tmp / "nope.safetensors")),
                         "--pretrained_model_name_or_path"),
                        (("--train_data_dir", str(tmp / "nodata")), "--train_data_dir"),
                        (("--resume", str(tmp / "nostate")), "--resume"),
                        (("--sample_prompts", str(tmp / "p.txt")), "--sample_prompts"),
                        (("--network_weights", str(tmp)), "--network_weights")]:
        with pytest.raises(UserError, match=flag):
            P.preflight(opts_for(tmp, model, *extra))
    (tmp / "p.txt").write_text("zq --w abc\n", encoding="utf-8")
    with pytest.raises(UserError, match="p.txt"):  # the prompt file is parsed before the model loads
        P.preflight(opts_for(tmp, model, "--sample_prompts", str(tmp / "p.txt")))


def test_output_folder_that_is_a_file_or_under_a_file(env):
    tmp, model = env
    (tmp / "taken").write_text("x")
    with pytest.raises(UserError, match=r"--output_dir .*taken.* is a file"):
        P.preflight(opts_for(tmp, model, "--output_dir", str(tmp / "taken")))
    with pytest.raises(UserError, match=r"--output_dir .*taken.* is a file"):
        P.preflight(opts_for(tmp, model, "--output_dir", str(tmp / "taken" / "sub" / "out")))
    with pytest.raises(UserError, match="--logging_dir"):
        P.preflight(opts_for(tmp, model, "--logging_dir", str(tmp / "taken")))
    with pytest.raises(UserError, match="--console_log_file"):
        P.preflight(opts_for(tmp, model, "--console_log_file", str(tmp / "taken" / "log.txt")))
    (tmp / "out" / "last.safetensors").mkdir(parents=True)
    with pytest.raises(UserError, match="--output_name"):
        P.preflight(opts_for(tmp, model))


def test_read_only_output_folder(env, monkeypatch):
    tmp, model = env
    (tmp / "ro").mkdir()
    if os.geteuid() != 0:
        os.chmod(tmp / "ro", 0o555)
    else:  # root writes anywhere: make the probe fail the way a read-only folder does
        import tempfile

        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **k):
            if dir is not None and Path(dir) == tmp / "ro":
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    try:
        with pytest.raises(UserError, match=r"--output_dir .*ro is not writable \(permission denied\)"):
            P.preflight(opts_for(tmp, model, "--output_dir", str(tmp / "ro")))
    finally:
        os.chmod(tmp / "ro", 0o755)


def test_planned_saves_counts():
    def ns(*extra):
        return O.resolve(["--max_train_epochs", "10", *extra])

    # epochs 1..9 divisible by 2 save (the last epoch is the final save): 4, + final + one interrupt save
    assert P.planned_saves(ns("--save_every_n_epochs", "2"), steps_per_epoch=5) == (4 + 2, 1)
    assert P.planned_saves(ns("--save_every_n_epochs", "2", "--save_state"), steps_per_epoch=5) == (6, 4 + 1 + 1)
    # --save_last_n_epochs 2 keeps at most 3 of them at once
    assert P.planned_saves(ns("--save_every_n_epochs", "1", "--save_last_n_epochs", "2"), 5) == (3 + 2, 1)
    # 50 steps, every 10: steps 10..40 (the 50th is the final save)
    assert P.planned_saves(ns("--save_every_n_steps", "10", "--save_state_on_train_end"), 5) == (4 + 2, 2)


def test_disk_space(env, monkeypatch):
    tmp, model = env
    from lorakit.utils import atomic

    opts = opts_for(tmp, model, "--max_train_epochs", "4", "--save_every_n_epochs", "1", "--save_state")
    one = P.lora_bytes(opts)
    assert one <= 4 * model.stat().st_size + (1 << 20)  # a tiny model bounds its LoRA
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 1000)
    with pytest.raises(UserError, match=r"--output_dir .*: the disk has 1.0 KB free, but the planned saves need"):
        P.preflight(opts)
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 10**12)
    assert "1.0 TB free" in P.preflight(opts)[0]


def _lora_size(family_name):
    """What networks.lora builds on a weightless model, per unit of rank: values and modules per part."""
    import torch

    from lorakit.adapters.network import create_network
    from lorakit.models.bundle import build_bundle
    from lorakit.models.families import LoraSize, get_family

    fam = get_family(family_name)
    b = build_bundle(fam, device="meta", components=("unet", "text_encoders"))

    def count(unet: bool, te: bool, **args) -> tuple[int, int]:
        torch.manual_seed(0)
        net = create_network(b, "networks.lora", 1, 1, {k: str(v) for k, v in args.items()}, train_unet=unet,
                             train_text_encoder=te)
        return sum(p.numel() for p in net.parameters()), len(net.adapters)

    (unet, n_unet), (te, n_te) = count(True, False), count(False, True)
    conv = count(True, False, conv_dim=1)[0] - unet if fam.denoiser == "unet" else 0
    extra, n_extra = (count(False, True, train_t5xxl=True) if len(fam.text_encoders) > 1 and
                      not fam.text_encoders[1].lora_by_default else (te, n_te))
    return LoraSize(unet, te, conv, n_unet + n_te, extra - te, n_extra - n_te)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "flux-dev"])
def test_lora_size_of_each_family_is_what_networks_lora_builds(family):
    from lorakit.models.families import get_family

    assert get_family(family).lora_size == _lora_size(family)


def test_a_flux_file_is_recognised_and_its_lora_bound_is_flux_sized(tmp_path):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "guidance_in.in_layer.weight": torch.zeros(1)},
              str(path))
    assert P.guess_family(O.resolve(["--pretrained_model_name_or_path", str(path)])) == "flux-dev"
    ns = O.resolve(["--network_dim", "16", "--save_precision", "bf16"])
    # 2 bytes x 16 x (4,786,176 + 165,888): sd-scripts' FLUX LoRAs of rank 16 are about 150 MiB
    assert 158e6 < P.lora_bytes(ns, "flux-dev") < 159e6
    ns_t5 = O.resolve(["--network_dim", "16", "--save_precision", "bf16", "--network_args", "train_t5xxl=True"])
    assert P.lora_bytes(ns_t5, "flux-dev") - P.lora_bytes(ns, "flux-dev") == 2 * 16 * 1_818_624 + 450 * 168


def test_sd1_estimate_matches_a_known_file_size():
    # sd-scripts' SD1 LoRA of rank 128 in fp16 is about 151 MB (2 bytes x 128 x the in+out widths)
    ns = O.resolve(["--network_dim", "128", "--save_precision", "fp16"])
    assert 150e6 < P.lora_bytes(ns, "sd1") < 152e6


def test_tiny_model_lora_fits_the_bound(tmp_path):
    import torch

    from lorakit.adapters.network import create_network
    from lorakit.models.saving import save_single_file
    from test_train_common import tiny

    b = tiny("sd1")
    save_single_file(b, tmp_path / "tiny.safetensors")
    torch.manual_seed(0)
    net = create_network(b, "networks.lora", 8, 8, {})
    net.save_weights(tmp_path / "l.safetensors", precision="fp32")
    ns = O.resolve(["--pretrained_model_name_or_path", str(tmp_path / "tiny.safetensors"), "--network_dim", "8"])
    assert P.guess_family(ns) == "sd1"
    assert (tmp_path / "l.safetensors").stat().st_size <= P.lora_bytes(ns)
