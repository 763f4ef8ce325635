"""The option schema: argparse, TOML config files, unknown-flag suggestions, the seed command lines, ss_* metadata."""

import shlex

import pytest

from lorakit import options as O
from lorakit.errors import UserError

SEED_1 = """accelerate launch --num_cpu_threads_per_process 16 train_network.py --pretrained_model_name_or_path="nai_full.ckpt"
 --train_data_dir="shiroko/train" --output_dir="shiroko/out" --reg_data_dir="Lora_RegImageA240" --network_module=lycoris.kohya
 --network_args "algo=lora" "conv_dim=64" "conv_alpha=32" --mem_eff_attn --gradient_checkpointing --persistent_data_loader_workers
 --color_aug --enable_bucket --save_model_as="safetensors" --lr_scheduler_num_cycles=4 --mixed_precision=fp16 --learning_rate=0.0001
 --resolution=1024,1024 --train_batch_size=1 --max_train_epochs=4 --network_dim=64 --network_alpha=32 --shuffle_caption --keep_tokens=1
 --optimizer_type="AdamW8bit" --lr_warmup_steps=100 --output_name="shiroko_1024" --clip_skip=2 --seed=42 --save_precision="fp16"
 --lr_scheduler=cosine_with_restarts --min_bucket_reso=320 --max_bucket_reso=2048 --caption_extension=".txt"
"""

SEED_2 = """--network_module="networks.lora" --network_args "conv_dim=64" "conv_alpha=28" --xformers --color_aug
 --persistent_data_loader_workers --max_data_loader_n_workers=1 --enable_bucket --optimizer_type="AdamW" --lr_warmup_steps=500
 --train_batch_size=2 --max_train_epochs=8 --network_dim=64 --network_alpha=28 --resolution=512,512
"""


def test_seed_command_line_1_parses_as_written():
    ns = O.resolve(shlex.split(SEED_1))
    assert ns.pretrained_model_name_or_path == "nai_full.ckpt"
    assert ns.train_data_dir == "shiroko/train" and ns.reg_data_dir == "Lora_RegImageA240"
    assert ns.output_dir == "shiroko/out"
    assert ns.network_module == "lycoris.kohya"
    assert ns.network_args == ["algo=lora", "conv_dim=64", "conv_alpha=32"]
    assert ns.mem_eff_attn and ns.gradient_checkpointing and ns.persistent_data_loader_workers
    assert ns.color_aug and ns.enable_bucket and ns.shuffle_caption
    assert ns.save_model_as == "safetensors"
    assert ns.lr_scheduler_num_cycles == 4 and ns.lr_scheduler == "cosine_with_restarts"
    assert ns.mixed_precision == "fp16" and ns.save_precision == "fp16"
    assert ns.learning_rate == 1e-4
    assert O.parse_resolution(ns.resolution) == (1024, 1024)
    assert ns.train_batch_size == 1 and ns.max_train_epochs == 4
    assert ns.network_dim == 64 and ns.network_alpha == 32.0
    assert ns.keep_tokens == 1 and ns.clip_skip == 2 and ns.seed == 42
    assert ns.optimizer_type == "AdamW8bit"
    assert ns.lr_warmup_steps == 100 and isinstance(ns.lr_warmup_steps, int)
    assert ns.output_name == "shiroko_1024"
    assert ns.min_bucket_reso == 320 and ns.max_bucket_reso == 2048
    assert ns.caption_extension == ".txt"
    assert ns.num_cpu_threads_per_process == 16
    assert not ns.sdxl


def test_seed_command_line_2_parses_as_written():
    ns = O.resolve(shlex.split(SEED_2))
    assert ns.network_module == "networks.lora"
    assert ns.network_args == ["conv_dim=64", "conv_alpha=28"]
    assert ns.xformers and ns.color_aug and ns.enable_bucket
    assert ns.max_data_loader_n_workers == 1
    assert ns.optimizer_type == "AdamW" and ns.lr_warmup_steps == 500
    assert ns.train_batch_size == 2 and ns.max_train_epochs == 8
    assert ns.network_dim == 64 and ns.network_alpha == 28.0
    assert O.parse_resolution(ns.resolution) == (512, 512)


def test_sdxl_script_name_implies_sdxl():
    ns = O.resolve(["accelerate", "launch", "sdxl_train_network.py", "--network_dim", "8"])
    assert ns.sdxl and ns.network_dim == 8


def test_equals_and_space_forms_and_defaults():
    a = O.resolve(["--learning_rate=0.5", "--network_dim", "16"])
    assert a.learning_rate == 0.5 and a.network_dim == 16
    assert a.caption_extension == ".txt"  # not sd-scripts' .caption trap
    assert a.max_grad_norm == 1.0 and a.lr_scheduler == "constant" and a.loss_type == "l2"
    assert a.huber_schedule == "snr" and a.huber_c == 0.1 and a.multires_noise_discount == 0.3
    assert a.network_args is None and a.text_encoder_lr is None


def test_optimizer_args_and_text_encoder_lrs():
    ns = O.resolve(["--optimizer_type=DAdaptLion", "--learning_rate=1", "--optimizer_args", "betas=0.9,0.999",
                    "weight_decay=0", "d0=1e-06", "--text_encoder_lr", "1e-5", "2e-5"])
    assert ns.optimizer_args == ["betas=0.9,0.999", "weight_decay=0", "d0=1e-06"]
    assert ns.text_encoder_lr == [1e-5, 2e-5]


@pytest.mark.parametrize("text,expected", [("100", 100), ("0.1", 0.1), ("5%", 0.05), ("1", 1), ("12.5%", 0.125)])
def test_warmup_forms(text, expected):
    v = O.resolve([f"--lr_warmup_steps={text}"]).lr_warmup_steps
    assert v == pytest.approx(expected) and type(v) is type(expected)


def test_unknown_flag_suggests_nearest():
    with pytest.raises(UserError, match=r"--netwrk_dim.*did you mean '--network_dim'"):
        O.resolve(["--netwrk_dim", "4"])
    with pytest.raises(UserError, match=r"did you mean '--learning_rate'"):
        O.resolve(["--learning_rat=1e-4"])


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="network_dim"):
        O.resolve(["--network_dim", "abc"])
    with pytest.raises(UserError):
        O.resolve(["--mixed_precision", "fp32"])
    with pytest.raises(UserError, match="resolution"):
        O.resolve(["--resolution", "512,512,3"])


def test_old_caption_extention_alias():
    assert O.resolve(["--caption_extention", ".cap"]).caption_extension == ".cap"


def test_config_file_precedence_and_sections(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "base.safetensors"\n'
                   '[training]\nlearning_rate = 0.0003\nnetwork_dim = 32\nnetwork_args = ["conv_dim=8"]\n'
                   'text_encoder_lr = 5e-5\nlr_warmup_steps = "10%"\nshuffle_caption = true\nresolution = 768\n'
                   'seed = 7\n', encoding="utf-8")
    ns = O.resolve([f"--config_file={cfg}", "--network_dim", "8"])
    assert ns.network_dim == 8  # command line wins
    assert ns.learning_rate == 3e-4 and ns.pretrained_model_name_or_path == "base.safetensors"
    assert ns.network_args == ["conv_dim=8"] and ns.text_encoder_lr == [5e-5]
    assert ns.lr_warmup_steps == pytest.approx(0.1) and ns.shuffle_caption is True
    assert O.parse_resolution(ns.resolution) == (768, 768)
    assert ns.max_grad_norm == 1.0  # default
    assert ns._sources["network_dim"] == "cli" and ns._sources["seed"] == "config"
    # sd-scripts accepts the path without .toml
    ns2 = O.resolve(["--config_file", str(tmp_path / "run")])
    assert ns2.seed == 7


def test_config_file_unknown_key_and_wrong_type(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("learning_rat = 1e-4\n")
    with pytest.raises(UserError, match=r"learning_rat.*bad\.toml.*did you mean 'learning_rate'"):
        O.resolve(["--config_file", str(cfg)])
    cfg.write_text('network_dim = "eight"\n')
    with pytest.raises(UserError, match=r"network_dim.*bad\.toml"):
        O.resolve(["--config_file", str(cfg)])
    cfg.write_text("shuffle_caption = 1\n")
    with pytest.raises(UserError, match=r"shuffle_caption.*true or false"):
        O.resolve(["--config_file", str(cfg)])
    cfg.write_text('lr_scheduler = "cosine_restart"\n')
    with pytest.raises(UserError, match="lr_scheduler"):
        O.resolve(["--config_file", str(cfg)])
    cfg.write_text("image_dir = 'x'\n")
    with pytest.raises(UserError, match="dataset_config"):
        O.resolve(["--config_file", str(cfg)])
    cfg.write_text("a = [1,\n")
    with pytest.raises(UserError, match="not valid TOML"):
        O.resolve(["--config_file", str(cfg)])


def test_output_config_round_trip(tmp_path):
    ns = O.resolve(shlex.split(SEED_1))
    out = O.write_config_file(ns, tmp_path / "saved.toml")
    text = out.read_text()
    assert "network_dim = 64" in text and "caption_extension" not in text  # defaults are left out
    again = O.resolve(["--config_file", str(out)])
    for k in O.given_values(ns):
        assert getattr(again, k) == getattr(ns, k), k
    with pytest.raises(UserError, match="already exists"):
        O.write_config_file(ns, out)


def test_dataset_config_keys():
    subset = O.dataset_config_keys("subset")
    dataset = O.dataset_config_keys("dataset")
    general = O.dataset_config_keys("general")
    for k in ("image_dir", "is_reg", "num_repeats", "class_tokens", "caption_extension", "keep_tokens", "color_aug",
              "flip_aug", "random_crop", "shuffle_caption", "caption_dropout_rate", "keep_tokens_separator"):
        assert k in subset, k
    for k in ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
              "bucket_no_upscale", "keep_tokens", "caption_extension"):
        assert k in dataset and k in general, k
    assert "image_dir" not in dataset and "is_reg" not in general
    assert dataset["batch_size"].name == "train_batch_size"
    assert O.coerce_value(subset["num_repeats"], 3, "x.toml") == 3
    with pytest.raises(UserError, match="num_repeats"):
        O.coerce_value(subset["num_repeats"], "3", "x.toml")


def test_every_option_documented_and_accepted_no_effect_marked():
    names = set()
    for o in O.OPTIONS:
        assert o.help and o.group and o.scope in ("train", "dataset", "subset", "general")
        assert o.name not in names
        names.add(o.name)
        if not o.effect:
            assert O.NO_EFFECT in o.help
    assert O.get_option("persistent_data_loader_workers").effect is False
    assert O.get_option("num_cpu_threads_per_process").effect  # sets torch's thread count (issue 15)
    assert "--caption_extension" in O.option_table_markdown()


def test_ss_metadata_values():
    ns = O.resolve(shlex.split(SEED_1))
    md = O.ss_metadata(ns, max_train_steps=400)
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_dim"] == "64" and md["ss_network_alpha"] == "32.0"
    assert md["ss_network_module"] == "lycoris.kohya"
    assert md["ss_network_args"] == '{"algo": "lora", "conv_dim": "64", "conv_alpha": "32"}'
    assert md["ss_resolution"] == "(1024, 1024)"
    assert md["ss_clip_skip"] == "2" and md["ss_seed"] == "42"
    assert md["ss_learning_rate"] == "0.0001" and md["ss_lr_warmup_steps"] == "100"
    assert md["ss_lr_scheduler"] == "cosine_with_restarts" and md["ss_mixed_precision"] == "fp16"
    assert md["ss_max_train_steps"] == "400"
    assert md["ss_color_aug"] == "True" and md["ss_flip_aug"] == "False" and md["ss_keep_tokens"] == "1"
    assert md["ss_v2"] == "False" and md["ss_sd_model_name"] == "nai_full.ckpt"
    assert md["ss_output_name"] == "shiroko_1024"
    assert md["ss_text_encoder_lr"] == "None" and md["ss_unet_lr"] == "None"
    assert md["ss_noise_offset"] == "None" and md["ss_min_snr_gamma"] == "None"
    assert "ss_caption_extension" not in md  # sd-scripts does not write it
