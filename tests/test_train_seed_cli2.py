"""The second seed command line through `lorakit train` (see test_train_seed_cli.py for the rules checked), plus the
command's unknown-flag answer and --output_config."""

import pytest
import torch

from test_train_common import dataset, one_thread, read_lora  # noqa: F401
from test_train_seed_cli import SEED_2, check_common_metadata, check_kohya_layout, checkpoint, run_cli


def test_seed_command_line_2(tmp_path):
    data = dataset(tmp_path, n_train=2)
    out = tmp_path / "out"
    line = SEED_2.format(ckpt=checkpoint(str(tmp_path)), train=data["train_data_dir"], out=out)
    assert run_cli(line) == 0
    path = out / "last.safetensors"  # no --output_name: sd-scripts' default name
    tensors, md = read_lora(path)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # no --save_precision: as trained
    modules = check_kohya_layout(tensors, 28.0, 28.0)
    unet = [m for m in modules if m.startswith("lora_unet_")]
    te = [m for m in modules if m.startswith("lora_te_")]
    assert len(te) == 72 and len([m for m in unet if "_attentions_" in m]) == 192
    assert any("_resnets_" in m for m in unet) and any("downsamplers" in m for m in unet)
    check_common_metadata(md, path)
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "64"
    assert md["ss_network_alpha"] == "28.0" and md["ss_batch_size_per_device"] == "2"
    assert md["ss_optimizer"] == "torch.optim.adamw.AdamW" and md["ss_lr_warmup_steps"] == "500"
    assert md["ss_steps"] == "1" and md["ss_clip_skip"] == "None"


def test_unknown_flag_from_cli(capsys):
    from lorakit.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--network_dimm", "4"])
    assert exc.value.code == 2
    assert "did you mean '--network_dim'" in capsys.readouterr().err


def test_output_config_from_cli(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    assert run_cli(f"--network_dim 8 --learning_rate 2e-4 --network_args conv_dim=4 --config_file {cfg} "
                   "--output_config") == 0
    text = cfg.read_text()
    assert "network_dim = 8" in text and "learning_rate = 0.0002" in text and 'network_args = ["conv_dim=4"]' in text
