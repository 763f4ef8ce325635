"""Epoch saves and pruning, bf16, NaN stop, TensorBoard logs with d*lr, sample images during training."""

import math

import pytest
import torch

from lorakit.errors import UserError
from test_train_common import dataset, one_thread, options, read_lora, run  # noqa: F401


def test_epochs_naming_pruning_and_bf16(tmp_path):
    data = dataset(tmp_path, n_train=2)
    args = ["--max_train_epochs", "3", "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", "--save_state",
            "--output_name", "run", "--mixed_precision", "bf16", "--full_bf16", "--network_train_unet_only",
            "--learning_rate", "1e-3",
            "--save_precision", "bf16"]
    result = run(options(tmp_path, data, *args))
    out = tmp_path / "out"
    assert result.global_step == 6 and result.epoch == 3
    names = sorted(p.name for p in out.iterdir())
    # epoch 1 pruned when epoch 2 saved (keep last 1); the last epoch is the final file
    assert "run-000001.safetensors" not in names and "run-000002.safetensors" in names
    assert "run-000001-state" not in names and "run-000002-state" in names
    assert "run.safetensors" in names and "run-state" in names
    tensors, md = read_lora(out / "run-000002.safetensors")
    assert md["ss_epoch"] == "2" and md["ss_output_name"] == "run-000002" and md["ss_mixed_precision"] == "bf16"
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    # --full_bf16 keeps fp32 master LoRA weights, so small updates are not rounded away: the up weights moved
    # (except the mid block's self-attention q/k: at 64 px it sees one token, where softmax has zero gradient)
    assert all(float(t.abs().max()) > 0 for k, t in tensors.items()
               if "lora_up" in k and not ("mid_block" in k and ("to_q" in k or "to_k" in k)))
    assert all(math.isfinite(x) for x in result.losses)


def test_nan_loss_stops_with_clear_message(tmp_path, monkeypatch):
    from lorakit.train import trainer

    data = dataset(tmp_path, n_train=1)
    real = trainer._batch_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer, "_batch_loss", flaky)
    with pytest.raises(UserError, match=r"NaN/inf at step 3.*last-step00000002\.safetensors"):
        run(options(tmp_path, data, "--max_train_steps", "5", "--network_train_unet_only"))
    tensors, _ = read_lora(tmp_path / "out" / "last-step00000002.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_logs_samples_and_effective_lr(tmp_path):
    data = dataset(tmp_path, n_train=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zq shape --w 64 --h 64 --s 2 --d 7\n", encoding="utf-8")
    args = ["--max_train_steps", "2", "--optimizer_type", "prodigy", "--learning_rate", "1", "--network_train_unet_only",
            "--logging_dir", str(tmp_path / "logs"), "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
            "--sample_sampler", "euler_a"]
    result = run(options(tmp_path, data, *args))
    assert len(result.samples) == 1 and result.samples[0].exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next((tmp_path / "logs").glob("*/network_train"))
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert "loss/current" in tags and "loss/average" in tags and "lr/unet" in tags and "lr/d*lr/unet" in tags
    d_lr = [e.value for e in ea.Scalars("lr/d*lr/unet")]
    assert len(d_lr) == 2 and all(v > 0 for v in d_lr)


def test_fp8_base_weights_and_dim_from_weights(tmp_path):
    data = dataset(tmp_path, n_train=1)
    first = run(options(tmp_path / "a", data, "--max_train_steps", "1", "--network_dim", "2", "--mixed_precision",
                        "bf16", "--fp8_base", "--network_train_unet_only", "--learning_rate", "1e-2"))
    assert all(math.isfinite(x) for x in first.losses)
    a, _ = read_lora(first.final_lora)
    second = run(options(tmp_path / "b", data, "--max_train_steps", "1", "--network_weights", str(first.final_lora),
                         "--dim_from_weights", "--network_dim", "16", "--base_weights", str(first.final_lora),
                         "--network_train_unet_only"))
    b, md = read_lora(second.final_lora)
    assert md["ss_network_dim"] == "2" and a.keys() == b.keys()
