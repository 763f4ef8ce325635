"""Training-time eval reached the ways users start a run: a `--config_file` TOML written by hand and the GUI's Train
form (form -> options -> the job's config.toml -> the worker's options) give the same options, and that run scores
the LoRA of every epoch and the final one (--eval_every_n_epochs; the step schedule is in test_eval_pipeline.py).
Bad eval options stop the run with one paragraph naming the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from test_eval_tagger import write_tagger  # noqa: E402
from test_train_common import dataset, one_thread, run  # noqa: E402,F401

from lorakit import options as O  # noqa: E402
from lorakit.errors import UserError  # noqa: E402


def _prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("zq shape --s 2 --l 4\n", encoding="utf-8")
    return p


def _settings(tmp_path: Path) -> dict:
    data = dataset(tmp_path, n_train=2, captions=["zq shape, tag1", "zq shape, tag2"])
    return {"train_data_dir": data["train_data_dir"], "output_dir": str(tmp_path / "out"), "resolution": "64",
            "network_dim": 4, "network_alpha": 4.0, "seed": 3, "max_data_loader_n_workers": 1, "max_train_epochs": 2,
            "learning_rate": 1e-3, "sample_prompts": str(_prompts(tmp_path)), "eval_every_n_epochs": 1,
            "eval_tagger": str(write_tagger(tmp_path / "tagger")), "eval_seeds": 1, "eval_core_tags": "1girl"}


def _toml(values: dict) -> str:
    # written by hand as a user would (sd-scripts' sections are flattened), not by lorakit's writer
    lines = ["[model]", f"output_dir = {json.dumps(values['output_dir'])}", "", "[training]"]
    for k, v in values.items():
        if k != "output_dir":
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def _values(ns) -> dict:
    # the options themselves: not where they came from (_sources, _given) nor the file that held them
    return {k: v for k, v in vars(ns).items() if not k.startswith("_") and k != "config_file"}


def test_eval_every_n_epochs_from_toml_and_gui_form(tmp_path):
    from lorakit.gui import forms
    from lorakit.train.config_files import write_toml

    values = _settings(tmp_path)
    cfg = tmp_path / "run.toml"
    cfg.write_text(_toml(values), encoding="utf-8")
    from_toml = O.resolve(["--config_file", str(cfg)])

    form = forms.default_values()
    form.update({k: str(v) for k, v in values.items()})  # the form's text fields hold strings
    given, errors = forms.form_to_given(form)
    assert errors == {}
    write_toml(tmp_path / "job.toml", given)  # what Jobs.submit writes, read back as the worker does
    from_gui = O.resolve_given({}, config=O.load_config_file(tmp_path / "job.toml"))
    assert from_gui.eval_every_n_epochs == 1 and from_gui.eval_seeds == 1
    assert _values(from_gui) == _values(from_toml)

    result = run(from_gui)
    out = tmp_path / "out"
    res = json.loads((out / "last_eval.json").read_text())
    # epoch 1's LoRA (saved for the eval: no --save_every_n_epochs) and the final one, each after the base model
    assert [r["name"] for r in res["rows"]] == ["base model", "last-000001", "last"]
    assert [r["epoch"] for r in res["rows"][1:]] == [1, 2]
    assert (out / "last-000001.safetensors").is_file() and Path(result.final_lora) == out / "last.safetensors"
    # prompts: the trigger and the class, alone and with the tagger's own scene label ("tag1"/"tag2" are not tagger
    # tags), and two unrelated; 1 seed
    assert res["concept"]["core_tags"] == ["1girl"] and res["concept"]["scene_tags"] == ["outdoors"]
    assert "own scene labels" in res["concept"]["scene_reason"] and res["samples_per_model"] == 6
    assert res["settings"]["steps"] == 2 and res["settings"]["cfg_scale"] == 4.0  # the prompt file's --s / --l
    assert (out / "last_eval_chart.png").is_file() and (out / "last_eval_sheet.png").is_file()


@pytest.mark.parametrize("extra, flag, before_load", [
    ((), "--eval_tagger", True), (("--eval_tagger", "{tmp}"), "--eval_tagger", True),
    (("--eval_tagger", "toy", "--eval_core_tags", "no such tag"), "--eval_core_tags", False)])
def test_bad_eval_options_name_the_flag(tmp_path, extra, flag, before_load):
    from lorakit.train.preflight import check_before_run

    data = dataset(tmp_path, n_train=2, captions=["zq shape, tag1", "zq shape, tag2"])
    argv = ["--output_dir", str(tmp_path / "out"), "--resolution", "64", "--network_dim", "4", "--max_train_steps",
            "2", "--train_data_dir", data["train_data_dir"], "--eval_every_n_steps", "1",
            *[a.format(tmp=tmp_path) for a in extra]]  # tmp_path: a folder without model.onnx
    opts = O.resolve(argv)
    with pytest.raises(UserError) as exc:
        # the tagger is checked with the other inputs, before the model loads; the concept needs the tagger's
        # reading of the images, at the start of the loop
        check_before_run(opts) if before_load else run(opts)
    msg = str(exc.value)
    assert flag in msg and "\n" not in msg.strip() and "Traceback" not in msg
