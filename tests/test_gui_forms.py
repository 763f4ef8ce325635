"""The GUI's form and file browser without a browser: fields generated from the option schema, presets as
--config_file TOML, the command line shown, validation at the field, paths limited to the roots."""

from __future__ import annotations

import os
import shlex

import pytest

from lorakit import options as O
from lorakit.errors import UserError
from lorakit.gui import forms
from lorakit.gui.files import Roots


def test_every_command_line_option_is_a_field_with_help():
    fields = {f.name: f for f in forms.form_fields()}
    expected = {o.name for o in O.OPTIONS if o.cli} - {"config_file", "output_config"}
    assert set(fields) == expected
    for o in O.OPTIONS:
        if o.name in fields:
            f = fields[o.name]
            assert f.help.startswith(o.help) and len(f.help) > 10, o.name
            assert f.group == o.group
            assert f.kind == ("checkbox" if o.type == "bool" else f.kind)
            if o.choices is not None and not o.is_list:
                assert f.kind == "dropdown"
                assert {str(c) for c in o.choices if c is not None} <= set(f.choices)
                assert f.default in f.choices  # the initial value is selectable
    # the basic view: the seed's three tabs, every name a real option, nothing twice
    assert forms.BASIC_NAMES[0] == "pretrained_model_name_or_path"
    assert len(set(forms.BASIC_NAMES)) == len(forms.BASIC_NAMES)
    assert all(fields[n].basic for n in forms.BASIC_NAMES)
    assert {"train_data_dir", "reg_data_dir", "output_dir", "output_name"} <= set(forms.BASIC_NAMES)
    assert sum(f.basic for f in fields.values()) == len(forms.BASIC_NAMES)


def _form(**values):
    v = forms.default_values()
    v.update(values)
    return v


FORM = dict(pretrained_model_name_or_path="/m/model.safetensors", train_data_dir="/d/train", reg_data_dir="/d/reg",
            output_dir="/o/out dir", output_name="usu bear", resolution="768,512", network_dim="32",
            network_alpha="16", learning_rate="1.0", unet_lr="0.0002", text_encoder_lr="5e-5 1e-5",
            optimizer_type="Prodigy", optimizer_args="weight_decay=0.01 'betas=0.9,0.99'", lr_scheduler="cosine",
            lr_warmup_steps="10%", mixed_precision="bf16", max_train_epochs="10", save_every_n_epochs="2",
            save_state=True, enable_bucket=True, shuffle_caption=True, keep_tokens="1", clip_skip="2",
            network_args="conv_dim=8 conv_alpha=4", max_token_length="225", seed="42", sdxl=True,
            caption_extension=".caption", face_crop_aug_range="2.0,4.0", token_warmup_step="0.5")


def test_form_values_become_the_options_the_cli_parses():
    given, errors = forms.form_to_given(_form(**FORM))
    assert errors == {}
    # independently written expectations of what each flag means
    assert given["network_dim"] == 32 and given["network_alpha"] == 16.0 and given["learning_rate"] == 1.0
    assert given["text_encoder_lr"] == [5e-5, 1e-5]
    assert given["optimizer_args"] == ["weight_decay=0.01", "betas=0.9,0.99"]
    assert given["lr_warmup_steps"] == 0.1 and given["max_token_length"] == 225 and given["save_state"] is True
    assert given["token_warmup_step"] == 0.5
    assert "caption_dropout_rate" not in given  # defaults are left out, like flags not typed
    assert "max_train_steps" not in given  # the field shows the default 1600: not given

    cmd = forms.command_line(given)
    argv = shlex.split(cmd)
    assert argv[:2] == ["lorakit", "train"]
    from_cli = O.resolve(argv[2:])
    from_form = O.resolve_given(given)
    assert vars(from_cli) == vars(from_form)  # the command shown trains exactly what the form says
    assert "'/o/out dir'" in cmd and "--output_name 'usu bear'" in cmd


def test_preset_round_trip(tmp_path):
    values = _form(**FORM)
    path = forms.save_preset(values, tmp_path / "preset")
    assert path.endswith("preset.toml")
    loaded = O.load_config_file(path)  # the same file `lorakit train --config_file` reads
    given, _ = forms.form_to_given(values)
    assert loaded == given
    shown = forms.load_preset(path)
    assert shown["network_dim"] == "32" and shown["text_encoder_lr"] == "5e-05 1e-05" and shown["sdxl"] is True
    assert shown["max_train_steps"] == "1600" and shown["caption_dropout_rate"] == "0.0"  # defaults shown
    again, errors = forms.form_to_given(forms.load_preset(path))
    assert errors == {} and again == given
    # `lorakit train --config_file preset.toml` resolves to the same Namespace as the form
    ns_cli = O.resolve(["--config_file", path])
    ns_form = O.resolve_given(given)
    assert {k: v for k, v in vars(ns_cli).items() if not k.startswith("_") and k != "config_file"} == \
        {k: v for k, v in vars(ns_form).items() if not k.startswith("_") and k != "config_file"}


def _valid_dirs(tmp_path):
    (tmp_path / "train" / "10_usu bear").mkdir(parents=True, exist_ok=True)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    return dict(pretrained_model_name_or_path=str(tmp_path / "model.safetensors"),
                train_data_dir=str(tmp_path / "train"), output_dir=str(tmp_path / "out"))


def test_validation_names_the_field(tmp_path):
    roots = Roots([tmp_path])
    ns, errors = forms.validate(_form(**_valid_dirs(tmp_path)), roots)
    assert errors == {} and ns.train_data_dir == str(tmp_path / "train")

    _, errors = forms.validate(_form(**_valid_dirs(tmp_path), network_dim="eight", lr_warmup_steps="2.5",
                                     resolution="512,512,3"), roots)
    assert set(errors) == {"network_dim", "lr_warmup_steps", "resolution"}
    assert "'eight'" in errors["network_dim"]

    _, errors = forms.validate(_form(), roots)  # nothing filled
    assert {"pretrained_model_name_or_path", "output_dir", "train_data_dir"} <= set(errors)

    _, errors = forms.validate(_form(**{**_valid_dirs(tmp_path), "reg_data_dir": str(tmp_path / "missing")}), roots)
    assert set(errors) == {"reg_data_dir"} and "does not exist" in errors["reg_data_dir"]

    _, errors = forms.validate(_form(**{**_valid_dirs(tmp_path), "output_dir": "/etc/lorakit-out"}), roots)
    assert set(errors) == {"output_dir"} and "outside" in errors["output_dir"]

    # a combination the trainer refuses is reported at the flag its message names
    _, errors = forms.validate(_form(**_valid_dirs(tmp_path), full_fp16=True), roots)
    assert list(errors) == ["full_fp16"] and "--mixed_precision fp16" in errors["full_fp16"]
    _, errors = forms.validate(_form(**_valid_dirs(tmp_path), network_train_unet_only=True,
                                     network_train_text_encoder_only=True), roots)
    assert list(errors) == ["network_train_unet_only"]


def test_file_browser_stays_under_the_roots(tmp_path):
    root = tmp_path / "root"
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "a.safetensors").write_bytes(b"1")
    (root / "data" / "b.txt").write_text("x")
    (root / "data" / ".hidden").write_text("x")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("k")
    os.symlink(outside, root / "data" / "link_out")
    os.symlink(root / "data" / "sub", root / "data" / "link_in")
    roots = Roots([root])

    names = [e.name for e in roots.listdir(root / "data")]
    assert names == ["link_in", "sub", "a.safetensors", "b.txt"]  # folders first; hidden and escaping links left out
    assert [e.name for e in roots.listdir(root / "data", ".safetensors")] == ["link_in", "sub", "a.safetensors"]
    assert roots.check("data/b.txt") == (root / "data" / "b.txt")  # relative to the first root
    for bad in (outside, root / "data" / ".." / ".." / "secret", root / "data" / "link_out",
                root / "data" / "link_out" / "key.txt", "/etc/passwd", "../secret"):
        with pytest.raises(UserError, match="outside the folders"):
            roots.check(bad)
    with pytest.raises(UserError, match="outside"):
        roots.listdir(root / "data" / "link_out")
    assert roots.parent(root) == root.resolve()  # never above a root
    assert roots.parent(root / "data" / "sub") == (root / "data").resolve()
    with pytest.raises(UserError, match="not a folder"):
        Roots([tmp_path / "nope"])


def test_gui_command_line(monkeypatch):
    from lorakit.cli import gui_cmd
    from lorakit.cli.main import build_parser

    args = build_parser().parse_args(["gui", "--listen", "--auth", "me:pw", "--root", "/a", "--root", "/b",
                                      "--port", "9999"])
    assert args.listen == "0.0.0.0" and args.root == ["/a", "/b"] and args.port == 9999
    assert gui_cmd.parse_auth(args.auth) == ("me", "pw")
    args = build_parser().parse_args(["gui"])
    assert args.listen is None and args.root is None and args.jobs_dir is None
    with pytest.raises(UserError, match="USER:PASSWORD"):
        gui_cmd.parse_auth("nopass")
    seen = {}

    class Stopped:  # a server that has already stopped, so run() returns at once
        is_running = False

        def close(self):
            seen["closed"] = True

    class Ctx:
        class store:  # noqa: N801
            @staticmethod
            def shutdown():
                seen["shutdown"] = True

    monkeypatch.setattr("lorakit.gui.app.launch", lambda **kw: (seen.update(kw), (Stopped(), Ctx(), "http://x"))[1])
    assert gui_cmd.run(build_parser().parse_args(["gui", "--listen", "10.0.0.2", "--auth", "a:b"])) == 0
    assert seen["closed"] and seen["shutdown"] and seen["quiet"]
    assert seen["listen"] == "10.0.0.2" and seen["auth"] == ("a", "b") and seen["port"] == 7860


def test_charts_draw():
    from lorakit.gui.charts import bar_chart, line_chart

    img = line_chart({"loss": ([1, 2, 3], [0.5, 0.4, float("nan")])}, "loss")
    assert img.size == (520, 260)
    px = img.load()
    assert any(px[x, y] == (31, 119, 180) for x in range(60, 510) for y in range(24, 226))  # the line is drawn
    img = bar_chart(["IN01", "OUT02"], [1.0, 0.0], "norms")
    assert img.size == (760, 280)


def test_relative_paths_are_made_absolute_under_the_first_root(tmp_path, monkeypatch):
    dirs = _valid_dirs(tmp_path)
    monkeypatch.chdir("/")  # the server's working folder does not matter
    given, ns, errors = forms.prepare(_form(pretrained_model_name_or_path="model.safetensors", train_data_dir="train",
                                            output_dir="out"), Roots([tmp_path]))
    assert errors == {}
    assert given["pretrained_model_name_or_path"] == dirs["pretrained_model_name_or_path"]
    assert given["train_data_dir"] == dirs["train_data_dir"] and ns.output_dir == dirs["output_dir"]
