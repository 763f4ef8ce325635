"""The GUI never reads or writes outside its --root: the real HTTP API of a running app (127.0.0.1) is called with
'..', absolute, URL-encoded and symlinked paths in every kind of field (train form paths and output_name, dataset
TOML entries, dataset/tagging folders, LoRA and model pickers, tool outputs, the file browser, the file route).
Each refusal is a message naming the field; nothing is created outside the root and no job is queued."""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")
sys.path.insert(0, str(Path(__file__).parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import torch

    from test_train_common import make_images

    from lorakit.adapters.network import create_network
    from lorakit.gui.app import launch
    from lorakit.gui.jobs import JobStore
    from lorakit.models.saving import save_single_file
    from lorakit.models.tiny import tiny_bundle

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("roots")
    root, outside = base / "root", base / "outside"
    # outside the root: data, a LoRA, a prompt file, a caption that must stay untouched
    make_images(outside / "data" / "3_secret", 2, captions=["secret tag"])
    bundle = tiny_bundle("sd1", seed=0)
    net = create_network(bundle, "networks.lora", 2, 2, {})
    net.save_weights(outside / "secret_lora.safetensors", precision="fp32")
    (outside / "prompts.txt").write_text("secret --w 64 --h 64\n", encoding="utf-8")
    # inside: a model, a dataset, a LoRA folder, and links that lead out
    save_single_file(bundle, root / "tiny.safetensors")
    make_images(root / "train" / "2_zq shape", 2)
    (root / "loras").mkdir()
    net.save_weights(root / "loras" / "mine.safetensors", precision="fp32")
    os.symlink(outside / "secret_lora.safetensors", root / "loras" / "linked.safetensors")
    os.symlink(outside / "data" / "3_secret", root / "train_linked_sub")  # a folder link
    make_images(root / "train2" / "2_zq shape", 1)
    os.symlink(outside / "data" / "3_secret", root / "train2" / "3_secret")  # a link inside a dataset folder
    os.symlink(outside, root / "out_link")
    os.symlink(outside / "prompts.txt", root / "prompts_link.txt")
    (root / "ok.txt").write_text("inside", encoding="utf-8")
    (base / "cwd").mkdir()
    store = JobStore(base / "jobs")
    demo, ctx, url = launch(roots=[root], port=_free_port(), block=False, quiet=True, store=store)
    yield {"url": url, "root": root, "outside": outside, "base": base, "ctx": ctx,
           "fns": [f.fn for f in demo.fns.values()]}
    store.shutdown()
    demo.close()
    demo.lorakit_generators.close()
    torch.set_num_threads(old)


def call(url: str, api: str, *data, timeout: float = 120):
    """POST /gradio_api/call/<api>, then read its event stream: ("complete", outputs) or ("error", message)."""
    req = urllib.request.Request(f"{url}gradio_api/call/{api}", data=json.dumps({"data": list(data)}).encode(),
                                 headers={"Content-Type": "application/json"})
    event_id = json.load(urllib.request.urlopen(req, timeout=timeout))["event_id"]
    kind, payload = None, None
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event_id}", timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8").rstrip("\n")
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1].strip() or "null")
                break
    if kind == "error":
        return "error", (payload.get("error") or payload.get("message") or "") if isinstance(payload, dict) \
            else str(payload)
    return kind, payload


def form(app, **values):
    from lorakit.gui import forms

    v = forms.default_values() | {"pretrained_model_name_or_path": str(app["root"] / "tiny.safetensors"),
                                  "train_data_dir": str(app["root"] / "train"), "output_dir": str(app["root"] / "out"),
                                  "resolution": "64", "max_train_steps": "1"} | values
    return [v[f.name] for f in forms.form_fields()]


def check_form(app, **values) -> str:
    kind, out = call(app["url"], "on_check", *form(app, **values))
    assert kind == "complete", out
    return out[0]  # the errors markdown ("Options are valid." when none)


def nothing_outside(app) -> None:
    out = app["outside"]
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert names == {"data", "data/3_secret", "data/3_secret/000.png", "data/3_secret/000.txt",
                     "data/3_secret/001.png", "data/3_secret/001.txt", "secret_lora.safetensors",
                     "prompts.txt"}, names
    assert (out / "data" / "3_secret" / "000.txt").read_text(encoding="utf-8") == "secret tag"
    assert not (app["base"] / "x.safetensors").exists() and not (app["base"] / "escaped").exists()


def test_valid_form_is_accepted(app):
    assert "Options are valid." in check_form(app)


@pytest.mark.parametrize("name", ["../../x", "../escaped", "/tmp/abs_x", "sub/x", "..", "%2e%2e%2fx/../../y"])
def test_output_name_that_leaves_the_output_folder(app, name):
    msg = check_form(app, output_name=name)
    assert "**output_name**" in msg and "plain file name" in msg


def test_start_refuses_and_queues_nothing(app):
    kind, out = call(app["url"], "on_start", *form(app, output_name="../../x"))
    assert kind == "complete" and "output_name" in out[0]
    kind, out = call(app["url"], "on_start", *form(app, output_dir=str(app["outside"] / "out")))
    assert kind == "complete" and "**output_dir**" in out[0] and "outside the folders" in out[0]
    assert app["ctx"].store.jobs() == []
    nothing_outside(app)


@pytest.mark.parametrize("field,value", [
    ("output_dir", "../outside/out"), ("output_dir", "/tmp"), ("output_dir", "out_link/run"),
    ("output_dir", "~/lorakit-out"), ("logging_dir", "../outside/logs"), ("console_log_file", "/tmp/log.txt"),
    ("sample_prompts", "prompts_link.txt"), ("vae", "../outside/secret_lora.safetensors"),
    ("network_weights", "loras/linked.safetensors"), ("resume", "out_link"),
    ("train_data_dir", "train_linked_sub/.."), ("train_data_dir", "/etc"), ("pretrained_model_name_or_path",
                                                                           "../outside/secret_lora.safetensors"),
    ("train_data_dir", "train2"),  # inside, but one of its folders is a link out
    ("eval_tagger", "../outside/data"), ("eval_tagger", "/etc"),  # a path-or-keyword option's path form
])
def test_paths_outside_the_root_are_refused(app, field, value):
    msg = check_form(app, **{field: value})
    assert f"**{field}**" in msg and ("outside the folders" in msg or "outside" in msg), msg
    nothing_outside(app)


@pytest.mark.parametrize("prefix", ["../../x", "/tmp/abs", "sub/x"])
def test_log_prefix_cannot_name_a_folder_outside_logging_dir(app, prefix):
    msg = check_form(app, logging_dir="logs", log_prefix=prefix)
    assert "**log_prefix**" in msg and "plain file name" in msg


def test_url_encoded_names_stay_literal_inside_the_root(app):
    # the form takes text, not URLs: '%2e%2e' is a folder name inside the root, never a parent folder
    assert "Options are valid." in check_form(app, output_dir="%2e%2e/%2e%2e/out")
    assert not (app["base"] / "out").exists()


def test_dataset_toml_cannot_point_outside(app):
    root, outside = app["root"], app["outside"]
    head = "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
    cases = {
        "abs.toml": f"{head}image_dir = '{outside / 'data' / '3_secret'}'\n",
        "rel.toml": f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                    f"image_dir = '{os.path.relpath(outside / 'data' / '3_secret', os.getcwd())}'\n",
        "link.toml": f"{head}image_dir = '{root / 'train_linked_sub'}'\n",
        "meta.toml": f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{root / 'train'}'\n"
                     f"metadata_file = '{root / 'meta.json'}'\n",
    }
    (root / "meta.json").write_text(json.dumps({str(outside / "data" / "3_secret" / "000.png"): {"caption": "x"}}))
    for name, text in cases.items():
        (root / name).write_text(text, encoding="utf-8")
        msg = check_form(app, train_data_dir="", dataset_config=str(root / name))
        assert "**dataset_config**" in msg and "outside" in msg, (name, msg)
        # the Dataset tab reads the same TOML: refused, and the secret tags are not shown
        kind, out = call(app["url"], "on_check_dataset", str(root / name), "", "64", ".txt", False, 1, True)
        assert kind == "error" and "outside" in out and "secret tag" not in out, (name, out)
    kind, out = call(app["url"], "on_check_dataset", str(root / "train2"), "", "64", ".txt", False, 1, True)
    assert kind == "error" and "3_secret" in out
    kind, out = call(app["url"], "on_check_dataset", str(root / "train"), str(root / "train_linked_sub"), "64", ".txt",
                     False, 1, True)
    assert kind == "error" and "reg folder" in out and "outside" in out


def test_tag_editing_and_tagging_never_follow_links_out(app):
    root = app["root"]
    kind, out = call(app["url"], "on_edit", str(root / "train2"), True, "secret tag=changed", "", "pwned", 0, False,
                     False, False, False)
    assert kind == "error" and "3_secret" in out
    kind, out = call(app["url"], "on_tag", str(root / "train2"), str(root / "loras"), 0.35, "", True, "overwrite")
    assert kind == "error" and "3_secret" in out
    nothing_outside(app)


def test_lora_and_model_pickers(app):
    root, url = app["root"], app["url"]
    kind, out = call(url, "on_refresh", str(root / "loras"))
    assert kind == "complete" and out[0]["choices"] == [["mine.safetensors", "mine.safetensors"]], out
    pick = next(fn for fn in app["fns"] if fn.__name__ == "on_pick")
    for name in ("linked.safetensors", "../../outside/secret_lora.safetensors",
                 str(app["outside"] / "secret_lora.safetensors")):
        # over HTTP gradio itself refuses a value that is not one of the listed choices...
        kind, out = call(url, "on_pick", str(root / "loras"), name)
        assert kind == "error" and "not in the list of choices" in out, (name, out)
        # ...and the handler behind it refuses it too (a page that listed it, or a future gradio)
        with pytest.raises(Exception, match="outside the folders"):
            pick(str(root / "loras"), name)
    kind, out = call(url, "on_info", str(root / "loras" / "linked.safetensors"))
    assert kind == "error" and "LoRA file" in out and "outside" in out
    # a prompt naming the linked LoRA cannot load it: the library does not see it
    args = [str(root / "tiny.safetensors"), str(root / "loras"), "zq <lora:linked:1>", "", "Euler a", 1, 7.0, 1, 64, 64,
            1, 0, str(root / "gen"), "", "", "", "", 3.5]  # the last five: FLUX.1's clip_l, t5xxl, ae, tokenizer
    kind, out = call(url, "on_generate", *args)
    assert kind == "error" and "'linked' was not found" in out, out
    flux_args = list(args)
    flux_args[13] = str(app["outside"] / "secret_lora.safetensors")  # a FLUX.1 part file outside the roots
    kind, out = call(url, "on_generate", *flux_args)
    assert kind == "error" and "CLIP-L file" in out and "outside" in out, out
    args[0] = str(root / "out_link" / "secret_lora.safetensors")
    kind, out = call(url, "on_generate", *args)
    assert kind == "error" and "model" in out and "outside" in out
    kind, out = call(url, "on_model_info", "../outside/secret_lora.safetensors", False)
    assert kind == "error" and "outside" in out


def test_tool_outputs(app):
    root, url, lora = app["root"], app["url"], str(app["root"] / "loras" / "mine.safetensors")
    for dst in ("../x.safetensors", str(app["base"] / "x.safetensors"), "out_link/x.safetensors"):
        kind, out = call(url, "on_resize", lora, dst, 1, 0, "", None, "")
        assert kind == "error" and "output file" in out and "outside" in out, (dst, out)
        kind, out = call(url, "on_filter", lora, dst, "", "TE", "", False)
        assert kind == "error" and "outside" in out
        kind, out = call(url, "on_merge", lora, "", dst, "concat", 8, "")
        assert kind == "error" and "outside" in out
    kind, out = call(url, "on_merge", "loras/linked.safetensors:0.5", "", "m.safetensors", "concat", 8, "")
    assert kind == "error" and "LoRA file" in out and "outside" in out
    nothing_outside(app)


def test_file_browser(app):
    root, url = app["root"], app["url"]
    for folder in ("/etc", "..", str(root / ".."), "out_link", "%2e%2e", "~"):
        kind, out = call(url, "on_list", folder, "")
        if folder == "%2e%2e":  # a literal (missing) folder name inside the root
            assert kind == "error" and "not a folder" in out or "outside" in out
        else:
            assert kind == "error" and "outside the folders" in out, (folder, out)
    kind, out = call(url, "on_list", str(root), "")
    names = [row[0] for row in out[1]["data"]]
    assert "loras/" in names and "out_link/" not in names and "prompts_link.txt" not in names, names
    kind, out = call(url, "on_up", str(root), "")
    assert kind == "complete" and out[0] == str(root)  # never above the root
    kind, out = call(url, "on_open", str(root), "../outside", "")
    assert kind == "error" and "outside" in out
    kind, out = call(url, "on_use", str(app["outside"] / "prompts.txt"), "Train: sample_prompts")
    assert kind == "error" and "outside" in out


def test_file_route(app):
    root, outside, url = app["root"], app["outside"], app["url"]

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"{url}gradio_api/file={path}") as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(str(root / "ok.txt")) == 200
    secret = outside / "prompts.txt"
    for path in (str(secret), str(root / "prompts_link.txt"), str(root / "out_link" / "prompts.txt"),
                 str(root) + "/../outside/prompts.txt", str(root) + "/..%2Foutside%2Fprompts.txt",
                 urllib.parse.quote(str(root) + "/../outside/prompts.txt", safe=""),
                 str(root) + "/%2e%2e/outside/prompts.txt"):
        assert status(path) in (403, 404), path
