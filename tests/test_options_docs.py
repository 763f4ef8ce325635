"""The option schema reaches every user: each dataset/subset key of the schema is accepted in a dataset TOML and
lands in the config objects, network args are checked before the model loads, `lorakit train --help` and
docs/training-options.md list every --network_args key with a working example, and the ss_* keys sd-scripts writes
are written the same way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lorakit import options as O
from lorakit.errors import UserError
from test_train_common import dataset, one_thread, options, read_lora, run, tiny  # noqa: F401


def _model_file(tmp: Path) -> Path:
    from lorakit.models.saving import save_single_file

    path = tmp / "tiny_sd1.safetensors"
    save_single_file(tiny("sd1"), path)
    return path


# ---- dataset TOML keys ---------------------------------------------------------------------------------------------
def _sample_value(o: O.Option, tmp: Path):
    if o.choices:
        return next(c for c in o.choices if c is not None)
    return {"str": "x", "path": str(tmp), "int": 1, "float": 0.1 if "split" in o.name or "rate" in o.name else 1.0,
            "bool": True, "int_or_ratio": 1, "resolution": 64, "float_pair": [2.0, 4.0], "number": 1,
            "dict": {"k": "v"}}[o.type]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return str(v)


@pytest.mark.parametrize("level", ["general", "dataset", "subset"])
def test_every_dataset_key_of_the_schema_is_accepted_in_toml(tmp_path, level):
    from lorakit.data.config import build_dataset_configs, load_dataset_toml

    keys = O.dataset_config_keys(level)
    assert {"conditioning_data_dir", "alpha_mask"} <= set(O.dataset_config_keys("subset"))
    assert "validation_split" in keys if level != "subset" else "conditioning_data_dir" in keys
    body = {k: _sample_value(o, tmp_path) for k, o in keys.items() if k not in ("image_dir", "metadata_file")}
    lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in body.items())
    sub = f'[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n'
    text = {"general": f"[general]\n{lines}\n[[datasets]]\n{sub}",
            "dataset": f"[[datasets]]\n{lines}\n{sub}",
            "subset": f"[[datasets]]\nresolution = 64\n{sub}{lines}\n"}[level]
    path = tmp_path / "ds.toml"
    path.write_text(text, encoding="utf-8")
    data = load_dataset_toml(path)  # every key accepted
    configs = build_dataset_configs(None, dataset_config=data)
    sub_cfg, ds_cfg = configs[0].subsets[0], configs[0]
    for k, v in body.items():  # and landed in the config objects, through the schema's types
        o = keys[k]
        target = sub_cfg if o.scope == "subset" else ds_cfg
        got = getattr(target, k)
        if o.type == "resolution":
            assert got == (64, 64)
        elif o.type == "float_pair":
            assert got == (2.0, 4.0)
        else:
            assert got == v, k


# ---- network args ---------------------------------------------------------------------------------------------------
def test_network_args_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    from lorakit.train import stages as S

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(S, "load_base_model", never)
    monkeypatch.setattr(S, "prepare_model", never)
    model = _model_file(tmp_path)
    base = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", dataset(tmp_path)["train_data_dir"],
            "--output_dir", str(tmp_path / "o"), "--resolution", "64"]
    from lorakit.train.trainer import train

    def go(*extra):  # no bundle given: the family is planned from the file's header, nothing is loaded
        train(O.resolve(base + list(extra)), progress=False, log=lambda *a, **k: None, predict_memory=False)

    with pytest.raises(UserError, match="unknown argument.*dora_wdd"):
        go("--network_args", "dora_wdd=True")
    with pytest.raises(UserError, match="block_dims: 3 values given, sd1 needs 25"):
        go("--network_args", "block_dims=1,2,3")
    with pytest.raises(UserError, match="dora_detach_norm applies to DoRA only"):
        go("--network_args", "dora_detach_norm=True")


def test_every_network_arg_has_a_working_example():
    # the parser's known keys are this schema's keys, so each documented example must also parse as documented
    from lorakit.adapters.network import parse_network_args
    from lorakit.models.families import get_family
    from lorakit.network_args import NETWORK_ARGS
    for a in NETWORK_ARGS:
        items = dict(x.split("=", 1) for x in (*a.needs, a.example))
        assert a.example.startswith(a.key + "=")
        cfg = parse_network_args(get_family(a.family), a.module, 8, 4, items)
        assert cfg.args[a.key] == items[a.key]


def test_help_and_docs_list_every_network_arg():
    import subprocess

    from lorakit.option_docs import NETWORK_ARGS, main, training_options_markdown

    out = subprocess.run([sys.executable, "-m", "lorakit.cli.main", "train", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "200", "PATH": "", "HF_HUB_OFFLINE": "1"}, timeout=120).stdout
    assert "network_args keys" in out
    for a in NETWORK_ARGS:
        assert f"  {a.key}: " in out and f"e.g. {a.example}" in out, a.key
    assert "dora_wd=True" in out and "blocks=IN04-IN07,OUT03-OUT06" in out
    doc = training_options_markdown()
    for a in NETWORK_ARGS:
        assert f"| `{a.key}` | `{a.example}` |" in doc
    for o in O.OPTIONS:
        assert (f"`--{o.name}`" if o.cli else f"`{o.name}`") in doc
    assert main(["--check"]) == 0, "docs/training-options.md is stale: run python -m lorakit.option_docs"


# ---- ss_* metadata ------------------------------------------------------------------------------------------------
def test_sd_scripts_metadata_keys(tmp_path):
    data = dataset(tmp_path)
    plain = run(options(tmp_path / "a", data, "--max_train_steps", "1"), predict_memory=False)
    _, md = read_lora(plain.final_lora)
    for key, want in (("ss_num_validation_images", "0"), ("ss_validation_seed", "None"),
                      ("ss_validation_split", "0.0"), ("ss_max_validation_steps", "None"),
                      ("ss_validate_every_n_epochs", "None"), ("ss_validate_every_n_steps", "None"),
                      ("ss_resize_interpolation", "None")):
        assert md[key] == want, key
    assert md["ss_sd_scripts_commit_hash"].startswith("lorakit/")
    assert "ss_network_args" not in md  # sd-scripts writes it only when --network_args are given
    with_args = run(options(tmp_path / "b", data, "--max_train_steps", "1", "--network_args", "conv_dim=2",
                            "--resize_interpolation", "bicubic"), predict_memory=False)
    _, md = read_lora(with_args.final_lora)
    assert md["ss_network_args"] == '{"conv_dim": "2"}' and md["ss_resize_interpolation"] == "bicubic"


# ---- the options the issue found unread ------------------------------------------------------------------------
def test_modelspec_metadata_options_are_written(tmp_path):
    import base64

    from PIL import Image

    thumb = tmp_path / "t.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(thumb)
    result = run(options(tmp_path, dataset(tmp_path), "--max_train_steps", "1", "--metadata_usage_hint", "use zq",
                         "--metadata_thumbnail", str(thumb), "--metadata_merged_from", "a, b",
                         "--metadata_preprocessor", "canny", "--metadata_is_negative_embedding", "False",
                         "--metadata_license", "MIT", "--metadata_tags", "x,y"), predict_memory=False)
    _, md = read_lora(result.final_lora)
    assert (md["modelspec.usage_hint"], md["modelspec.merged_from"], md["modelspec.preprocessor"],
            md["modelspec.is_negative_embedding"], md["modelspec.license"], md["modelspec.tags"]) == \
        ("use zq", "a, b", "canny", "False", "MIT", "x,y")
    assert md["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(thumb.read_bytes()).decode()
    with pytest.raises(UserError, match="--metadata_thumbnail"):
        run(options(tmp_path / "b", dataset(tmp_path), "--max_train_steps", "1", "--metadata_thumbnail",
                    "nope.png"), predict_memory=False)


def test_skip_cache_check_trusts_existing_files(tmp_path):
    import numpy as np

    from lorakit.data import DatasetGroup, build_dataset_configs
    from lorakit.data.latents import cache_latents

    data = dataset(tmp_path, n_train=1)

    def group():
        return DatasetGroup.build(build_dataset_configs(options(tmp_path, data)), seed=1, scan_cache=False)

    encode = lambda px: px[:, :, ::8, ::8][:, :3].repeat(1, 2, 1, 1)[:, :4]  # noqa: E731
    g = group()
    assert cache_latents(g, encode, to_disk=True)["encoded"] == 1
    npz = g.datasets[0].entries[0].npz_path
    with np.load(npz) as f:
        stale = {k: f[k] for k in f.files if k != "lorakit_meta"}
    stale["latents"] = stale["latents"] + 1.0
    np.savez(open(npz, "wb"), **stale, lorakit_meta=np.array('{"stale": true}'))
    assert cache_latents(group(), encode, to_disk=True)["encoded"] == 1  # checked: rebuilt
    np.savez(open(npz, "wb"), **stale, lorakit_meta=np.array('{"stale": true}'))
    g = group()
    assert cache_latents(g, encode, to_disk=True, skip_check=True)["reused"] == 1  # trusted as it is
    assert np.allclose(g.get_batch(1, 0)["latents"][0].numpy(), stale["latents"])
