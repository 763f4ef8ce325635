"""Training from a --dataset_config TOML and a --config_file of flags: the metadata follows sd-scripts' layout for
user configs (ss_datasets JSON, merged ss_tag_frequency / ss_dataset_dirs, no per-dataset ss_resolution)."""

import json

from lorakit import options as O
from test_train_common import make_images, one_thread, read_lora, run  # noqa: F401


def test_dataset_config_and_config_file(tmp_path):
    make_images(tmp_path / "imgs", 2, captions=["zq shape, red"])
    make_images(tmp_path / "regs", 2, captions=["shape"], seed=1)
    ds = tmp_path / "dataset.toml"
    ds.write_text(f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{tmp_path / "imgs"}'
  num_repeats = 2
  class_tokens = "zq shape"

  [[datasets.subsets]]
  image_dir = '{tmp_path / "regs"}'
  is_reg = true
  class_tokens = "shape"
""", encoding="utf-8")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
[model]
network_dim = 2
network_alpha = 1
[training]
max_train_steps = 2
learning_rate = 1e-3
network_train_unet_only = true
seed = 5
output_dir = '{tmp_path / "out"}'
output_name = "cfg"
dataset_config = '{ds}'
""", encoding="utf-8")
    opts = O.resolve(["--config_file", str(cfg), "--max_data_loader_n_workers", "1"])
    result = run(opts)
    _, md = read_lora(result.final_lora)
    assert result.final_lora.name == "cfg.safetensors" and md["ss_steps"] == "2"
    datasets = json.loads(md["ss_datasets"])
    assert len(datasets) == 1 and datasets[0]["batch_size_per_device"] == 2 and datasets[0]["resolution"] == [64, 64]
    assert [s["is_reg"] for s in datasets[0]["subsets"]] == [False, True]
    assert json.loads(md["ss_dataset_dirs"]) == {"imgs": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(md["ss_tag_frequency"])["imgs"] == {"zq shape": 2, "red": 2}
    assert "ss_resolution" not in md and md["ss_num_reg_images"] == "2" and md["ss_network_dim"] == "2"
