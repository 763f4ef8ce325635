"""The GUI's event handlers called in-process (no browser): presets, dataset check and tag editing, LoRA info,
resize, filter, merge, model info, a grid over LoRA weights, the file browser's "Use", and errors as messages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_common import dataset, options, run

    from lorakit.gui.app import build_app
    from lorakit.models.saving import save_single_file
    from lorakit.models.tiny import tiny_bundle

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gui_tools")
    save_single_file(tiny_bundle("sd1", seed=0), root / "tiny.safetensors")
    data = dataset(root, n_train=2)
    result = run(options(root, data, "--max_train_steps", "2", "--output_name", "toy", "--learning_rate", "1e-2",
                         "--network_train_unet_only"))
    demo, ctx = build_app(roots=[root], jobs_dir=root / "jobs")
    fns = {}
    for f in demo.fns.values():
        fns.setdefault(f.name, f.fn)
    yield {"root": root, "fns": fns, "ctx": ctx, "lora": result.final_lora, "demo": demo}
    demo.lorakit_generators.close()
    torch.set_num_threads(old)


def test_preset_save_and_load_through_the_train_tab(env):
    from lorakit import options as O
    from lorakit.gui import forms

    fns, root = env["fns"], env["root"]
    names = [f.name for f in forms.form_fields()]
    values = forms.default_values() | {"network_dim": "16", "output_name": "usu", "save_state": True}
    msg = fns["on_save"](str(root / "presets" / "usu"), *[values[n] for n in names])
    assert "usu.toml" in msg
    assert O.load_config_file(root / "presets" / "usu.toml") == {"network_dim": 16, "output_name": "usu",
                                                                 "save_state": True}
    out = fns["on_load"](str(root / "presets" / "usu.toml"))
    assert out[1 + names.index("network_dim")] == "16" and out[1 + names.index("save_state")] is True
    with pytest.raises(gr.Error, match="outside the folders"):
        fns["on_save"]("/etc/usu.toml", *[values[n] for n in names])


def test_dataset_check_and_tag_editing(env):
    fns, root = env["fns"], env["root"]
    report, problems, tags = fns["on_check_dataset"](str(root / "train"), "", "64", ".txt", False, 1, False)
    assert "2 images x 1 repeats" in report and "steps per epoch" in report
    assert dict((t, n) for t, n in tags)["zq shape"] == 2
    text = fns["on_edit"](str(root / "train"), True, "extra=bonus", "color*", "usu", 0, True, False, True, True)
    assert "would change 2" in text and "+usu, zq shape" in text  # dry run: the diff, nothing written
    assert "extra" in (root / "train" / "1_zq shape" / "000.txt").read_text()
    with pytest.raises(gr.Error, match="does not exist"):
        fns["on_check_dataset"](str(root / "nope"), "", "64", ".txt", False, 1, True)


def test_lora_tools(env):
    from safetensors import safe_open

    fns, root, lora = env["fns"], env["root"], str(env["lora"])
    chart, text = fns["on_info"](lora)
    assert chart.size[0] > 100 and "algorithm: LoRA" in text
    fns["on_resize"](lora, str(root / "r.safetensors"), 1, 0, "", None, "fp16")
    with safe_open(str(root / "r.safetensors"), "pt") as fh:
        downs = [fh.get_tensor(k) for k in fh.keys() if k.endswith("lora_down.weight")]
    assert downs and all(d.shape[0] == 1 for d in downs)
    fns["on_filter"](lora, str(root / "f.safetensors"), "", "OUT00-OUT11", "")
    with safe_open(str(root / "f.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and not any("up_blocks" in k for k in keys)
    fns["on_merge"](f"{lora}\n{lora}:0.5", "", str(root / "m.safetensors"), "concat", 0, "")
    with safe_open(str(root / "m.safetensors"), "pt") as fh:
        d = [fh.get_tensor(k) for k in fh.keys() if k.endswith("lora_down.weight")]
    assert d and all(x.shape[0] == 8 for x in d)  # concat: rank 4 + 4
    with pytest.raises(gr.Error, match="LoRA file"):
        fns["on_merge"]("", "", str(root / "m2.safetensors"), "svd", 4, "")
    info = fns["on_model_info"](str(root / "tiny.safetensors"), False)
    assert "1.x" in info or "sd1" in info.lower()


def test_grid_over_lora_weights_and_lora_picker(env):
    fns, root = env["fns"], env["root"]
    upd = fns["on_refresh"](str(root / "out"))
    assert upd["value"] == "toy.safetensors"
    card, preview = fns["on_pick"](str(root / "out"), "toy.safetensors")
    assert "zq shape" in card and "network dim" in card and preview is None
    assert fns["on_insert"]("a bear", "toy.safetensors", 0.7) == "a bear <lora:toy:0.7>"
    gen_args = [str(root / "tiny.safetensors"), str(root / "out"), "zq shape <lora:toy:1>", "", "Euler", 2, 7.0, 3,
                64, 64, 1, 0, str(root / "outputs" / "txt2img")]
    path, text = fns["on_grid"](*gen_args, "LoRA weight", "0,1", "Nothing", "", "Nothing", "")
    from PIL import Image

    assert Image.open(path).width >= 128 and "Seed: 3" in text
    with pytest.raises(gr.Error, match="Type a prompt"):
        fns["on_generate"](*(gen_args[:2] + [""] + gen_args[3:]))


def test_file_browser_use(env):
    fns, root, ctx = env["fns"], env["root"], env["ctx"]
    folder, rows, choices, selected = fns["on_list"](str(root), "")
    assert folder == str(root) and any(r[0] == "tiny.safetensors" for r in rows)
    folder, rows, choices, selected = fns["on_open"](str(root), "tiny.safetensors", "")
    assert selected == str(root / "tiny.safetensors")
    out = fns["on_use"](selected, "Generate: model")
    labels = list(ctx.targets)
    assert out[1 + labels.index("Generate: model")] == selected
    assert all(isinstance(o, dict) for i, o in enumerate(out[1:]) if labels[i] != "Generate: model")
    with pytest.raises(gr.Error, match="outside"):
        fns["on_list"](str(root / ".." / ".."), "")
