"""The two seed command lines, run through `lorakit train` as written: only paths, resolution and epochs are swapped
for a tiny single-file checkpoint and a generated dataset. The LoRA's keys and metadata are checked against the rules
in shared/reference/lora-file-format.md and training-conventions.md:
  - every key is `<lora_unet_|lora_te_><module path with _>.<lora_down.weight|lora_up.weight|alpha>` (SD1: lora_te_,
    never lora_te1_), every module has all three, alpha a 0-d tensor equal to network_alpha (conv_alpha on 3x3 convs);
  - a 3x3 conv's down weight has the base kernel (r, in, 3, 3) and its up weight is 1x1;
  - networks.lora: 192 UNet attention modules + 72 text-encoder modules on SD1, plus ResNet/down/up convs with conv_dim;
  - metadata: every value a string, ss_* as sd-scripts writes them for these flags, ss_output_name = file stem,
    ModelSpec architecture stable-diffusion-v1/lora, sshs hashes present, no lora_adapter_metadata;
  - --save_precision fp16 stores fp16 tensors.
"""

import functools
import json
import shlex
from pathlib import Path

import pytest
import torch

from test_train_common import dataset, one_thread, read_lora, tiny  # noqa: F401

SEED_1 = """accelerate launch --num_cpu_threads_per_process 16 train_network.py --pretrained_model_name_or_path="{ckpt}"
 --train_data_dir="{train}" --output_dir="{out}" --reg_data_dir="{reg}" --network_module=lycoris.kohya
 --network_args "algo=lora" "conv_dim=64" "conv_alpha=32" --mem_eff_attn --gradient_checkpointing --persistent_data_loader_workers
 --color_aug --enable_bucket --save_model_as="safetensors" --lr_scheduler_num_cycles=4 --mixed_precision=fp16 --learning_rate=0.0001
 --resolution=64,64 --train_batch_size=1 --max_train_epochs=1 --network_dim=64 --network_alpha=32 --shuffle_caption --keep_tokens=1
 --optimizer_type="AdamW8bit" --lr_warmup_steps=100 --output_name="shiroko_1024" --clip_skip=2 --seed=42 --save_precision="fp16"
 --lr_scheduler=cosine_with_restarts --min_bucket_reso=64 --max_bucket_reso=128 --caption_extension=".txt"
"""

SEED_2 = """--pretrained_model_name_or_path={ckpt} --train_data_dir={train} --output_dir={out}
 --network_module="networks.lora" --network_args "conv_dim=64" "conv_alpha=28" --xformers --color_aug
 --persistent_data_loader_workers --max_data_loader_n_workers=1 --enable_bucket --optimizer_type="AdamW" --lr_warmup_steps=500
 --train_batch_size=2 --max_train_epochs=1 --network_dim=64 --network_alpha=28 --resolution=64,64
 --min_bucket_reso=64 --max_bucket_reso=128
"""  # bucket limits added: the default min (256) is above the cut-down resolution


@functools.lru_cache(maxsize=None)
def checkpoint(folder: str) -> str:
    from lorakit.models.saving import save_single_file

    path = Path(folder) / "nai_full.safetensors"
    save_single_file(tiny("sd1"), path)
    return str(path)


def run_cli(line: str) -> int:
    from lorakit.cli.main import main

    # the seeds' `--num_cpu_threads_per_process 16` takes effect now: keep tiny models on one thread (the last flag wins)
    return main(["train", "--no_progress", *shlex.split(line), "--num_threads", "1"])


def check_kohya_layout(tensors: dict, alpha: float, conv_alpha: float):
    modules: dict[str, set] = {}
    for k in tensors:
        mod, _, param = k.partition(".")
        assert mod.startswith(("lora_unet_", "lora_te_")) and not mod.startswith("lora_te1_"), k
        assert "." not in mod
        modules.setdefault(mod, set()).add(param)
    for mod, params in modules.items():
        assert params == {"lora_down.weight", "lora_up.weight", "alpha"}, (mod, params)
        down, up, a = (tensors[f"{mod}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert a.ndim == 0
        if down.ndim == 4 and down.shape[-1] == 3:
            assert up.shape[-2:] == (1, 1) and float(a) == conv_alpha, mod
        else:
            assert float(a) == alpha, mod
        assert up.shape[1] == down.shape[0]  # rank
    return modules


def check_common_metadata(md: dict, path: Path):
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_output_name"] == path.stem
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["ss_sd_model_name"] == "nai_full.safetensors"
    import hashlib

    ckpt = path.parent.parent / "nai_full.safetensors"
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert len(md["ss_sd_model_hash"]) == 8
    assert "sshs_model_hash" in md and "lora_adapter_metadata" not in md
    for key in ("ss_training_started_at", "ss_training_finished_at", "ss_num_train_images", "ss_num_reg_images",
                "ss_num_epochs", "ss_steps", "ss_epoch", "ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info",
                "ss_session_id", "ss_max_train_steps", "ss_optimizer", "ss_lr_scheduler", "ss_learning_rate"):
        assert key in md, key
    json.loads(md["ss_tag_frequency"]), json.loads(md["ss_bucket_info"])


def test_seed_command_line_1(tmp_path):
    data = dataset(tmp_path, n_train=2, n_reg=2, captions=["zq shape, red, round"])
    out = tmp_path / "out"
    line = SEED_1.format(ckpt=checkpoint(str(tmp_path)), train=data["train_data_dir"], reg=data["reg_data_dir"], out=out)
    assert run_cli(line) == 0
    path = out / "shiroko_1024.safetensors"
    tensors, md = read_lora(path)
    assert all(t.dtype == torch.float16 for t in tensors.values())  # --save_precision fp16
    modules = check_kohya_layout(tensors, 32.0, 32.0)
    assert any(tensors[f"{m}.lora_down.weight"].ndim == 4 and tensors[f"{m}.lora_down.weight"].shape[-1] == 3
               for m in modules)  # conv_dim=64 adds 3x3 convs
    assert any(m.startswith("lora_te_text_model_encoder_layers_") for m in modules)
    check_common_metadata(md, path)
    assert md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"]) == {"algo": "lora", "conv_dim": "64", "conv_alpha": "32"}
    assert md["ss_network_dim"] == "64" and md["ss_network_alpha"] == "32.0"
    assert md["ss_clip_skip"] == "2" and md["ss_seed"] == "42" and md["ss_mixed_precision"] == "fp16"
    assert md["ss_lr_scheduler"] == "cosine_with_restarts" and md["ss_lr_warmup_steps"] == "100"
    assert md["ss_optimizer"].startswith("bitsandbytes.optim.") and "AdamW8bit" in md["ss_optimizer"]
    assert md["ss_learning_rate"] == "0.0001" and md["ss_gradient_checkpointing"] == "True"
    assert md["ss_color_aug"] == "True" and md["ss_shuffle_caption"] == "True" and md["ss_keep_tokens"] == "1"
    assert md["ss_enable_bucket"] == "True" and md["ss_min_bucket_reso"] == "64" and md["ss_max_bucket_reso"] == "128"
    assert md["ss_resolution"] == "(64, 64)" and md["ss_num_epochs"] == "1"
    assert md["ss_num_train_images"] == "2" and md["ss_num_reg_images"] == "2"
    assert json.loads(md["ss_dataset_dirs"]) == {"1_zq shape": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(md["ss_tag_frequency"])["1_zq shape"] == {"zq shape": 2, "red": 2, "round": 2}
    assert md["ss_steps"] == md["ss_max_train_steps"] == "4"  # 2 train + 2 reg batches of 1, one epoch
