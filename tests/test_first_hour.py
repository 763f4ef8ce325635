"""Issue 21, the first hour of a newcomer: each item of the README's path has a check here. The Quick start itself
(fresh clone, fresh venv, install, demo, whole suite) is scripts/check_quickstart.sh, too slow for the suite."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_train_common import make_images, one_thread, tiny  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def cli(argv, cwd=None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lorakit ARGV` in this process."""
    from lorakit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


# ---- the README's Quick start and CI ------------------------------------------------------------------------------
def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip()]


def test_quickstart_is_two_commands_with_a_venv_and_ci_runs_the_same_test_command():
    install, tests = quickstart_commands()
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install ")
    assert install.endswith("&& lorakit demo") and '"torch==2.13.0" -e ".[dev]"' in install
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci[-1] == tests, "the last command of .ci/run must be the README's test command"
    script = (ROOT / "scripts" / "check_quickstart.sh")
    assert os.access(script, os.X_OK) and "## Quick start" in script.read_text(encoding="utf-8")
    # the README names what the browser tests need and the variable that skips them, as the tests spell it
    quick = (ROOT / "README.md").read_text(encoding="utf-8").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    browser_tests = (ROOT / "tests" / "test_gui_browser.py").read_text(encoding="utf-8")
    assert "apt install chromium" in quick and "playwright install chromium" in quick
    assert "`LORAKIT_SKIP_BROWSER=1`" in quick and 'os.environ.get("LORAKIT_SKIP_BROWSER") == "1"' in browser_tests


def test_browser_tests_install_or_skip_with_a_reason(monkeypatch):
    """No browser anywhere and no network: the browser tests are skipped with a reason that says what to do."""
    monkeypatch.delenv("LORAKIT_SKIP_BROWSER", raising=False)
    import test_gui_browser as B

    class Chromium:
        executable_path = "/nonexistent/chrome"

        def launch(self, **kw):
            raise AssertionError("nothing to launch")

    class PW:
        chromium = Chromium()

    monkeypatch.setattr(B, "SYSTEM_BROWSERS", ())
    monkeypatch.delenv("LORAKIT_CHROMIUM", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    ran = []

    def no_network(cmd, **kw):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Error: getaddrinfo ENOTFOUND playwright.azureedge.net")

    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(pytest.skip.Exception, match=r"playwright install chromium` failed.*ENOTFOUND.*apt install"):
        B._browser(PW())
    assert ran and ran[0][1:] == ["-m", "playwright", "install", "chromium"]


# ---- nothing that reads as an error -------------------------------------------------------------------------------
def _run(argv, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def test_no_kernel_hub_lines_when_a_model_loads(tmp_path):
    """diffusers imports bitsandbytes, which (offline) used to log two lines about a kernel hub and downloads."""
    done = _run(["model", "tiny", "--family", "sd1", "--out", str(tmp_path / "t.safetensors")])  # imports diffusers
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    for alarming in ("kernels-community", "Hugging Face Hub", "offline mode", "Download the kernel"):
        assert alarming not in text, text


def test_gui_start_prints_its_url_and_no_share_hint(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "gui", "--port", str(port), "--root", str(tmp_path),
                             "--jobs_dir", str(tmp_path / "jobs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env,
                            # a suite started in the background (`cmd &` in a script) passes SIGINT on as ignored,
                            # and Python then installs no Ctrl-C handler: give the GUI the terminal's disposition
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        end = time.time() + 120
        while time.time() < end:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "lorakit gui: open" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert f"lorakit gui: open http://127.0.0.1:{port}" in text, text
    assert "share=True" not in text and "public link" not in text and "Traceback" not in text, text


# ---- dataset commands on the README's layout ----------------------------------------------------------------------
@pytest.fixture
def train_dir(tmp_path):
    """train/20_usu bear/ (3 images, one an exact copy) and train/5_bear/ (1 image), captions beside them."""
    t = tmp_path / "train"
    make_images(t / "20_usu bear", 2, sizes=((96, 64),))
    make_images(t / "5_bear", 1, sizes=((96, 64),), seed=3)
    (t / "20_usu bear" / "002.png").write_bytes((t / "20_usu bear" / "000.png").read_bytes())
    (t / "20_usu bear" / "002.txt").write_text("zq shape", encoding="utf-8")
    return t


def test_dataset_commands_walk_the_n_name_folders(train_dir, tmp_path):
    rc, out, err = cli(["dataset", "tags", train_dir, "--add_front", "usu", "--dry_run"])
    assert rc == 0 and "4 caption files, would change 4" in out, out + err
    rc, out, err = cli(["dataset", "dedupe", train_dir, "--workers", "1", "--no_progress"])
    assert rc == 0 and "4 images" in out and "20_usu bear/002.png  (exact copy)" in out, out + err
    scores = tmp_path / "scores.json"
    scores.write_text('{"000.png": 20, "001.png": 7}', encoding="utf-8")
    rc, out, err = cli(["dataset", "quality", train_dir, "--scores", scores, "--dry_run"])
    assert rc == 0 and "3 captions with a score" in out, out + err  # 000.png is in both folders' names
    rc, out, err = cli(["dataset", "resize", train_dir, "--max_resolution", "48x32", "--out", tmp_path / "small",
                        "--workers", "1", "--no_progress"])
    assert rc == 0 and "4 images: 4 resized" in out, out + err
    with Image.open(tmp_path / "small" / "20_usu bear" / "000.png") as im:
        assert im.size == (48, 32)


def test_dataset_commands_read_a_dataset_toml(train_dir, tmp_path):
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{train_dir / '5_bear'}'\n",
                    encoding="utf-8")
    rc, out, err = cli(["dataset", "tags", toml, "--show_frequency", "--dry_run"])
    assert rc == 0 and "1 caption files" in out, out + err


def test_dataset_commands_refuse_an_empty_source_and_a_missing_tagger(tmp_path, train_dir):
    from test_prep_tagger import write_model

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    for argv, what in ((["dataset", "resize", empty, "--no_progress"], "images"),
                       (["dataset", "dedupe", empty, "--no_progress"], "images"),
                       (["dataset", "quality", empty], "images"),
                       (["dataset", "tags", empty, "--dedupe"], "*.txt caption files"),
                       (["dataset", "tag", empty, "--model_dir", write_model(tmp_path / "tagger"), "--no_progress"],
                        "images")):
        rc, out, err = cli(argv)
        assert rc == 2 and f"no {what}" in err and f"{empty} and its `N_name` subfolders" in err, (argv, out, err)
        assert "--recursive" in err
    # every image captioned already: a tagger folder that does not exist is still an error, not "all skipped"
    rc, out, err = cli(["dataset", "tag", train_dir, "--model_dir", tmp_path / "no_tagger", "--no_progress"])
    assert rc == 2 and "no_tagger" in err and "does not exist" in err, out + err


def readme_dataset_commands() -> list[list[str]]:
    """The `lorakit dataset ...` examples of the README's "What you can do" table, as argument lists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## What you can do", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(c)[1:] for c in re.findall(r"`(lorakit dataset [^`]+)`", table)]


def test_the_readmes_dataset_examples_work_on_the_readmes_layout(tmp_path, monkeypatch):
    """Each example as written (paths relative to a folder holding train/20_usu bear/, reg/, the tagger folder and
    scores.json) finds the images: exit 0 and a count above zero, never "0 images"."""
    from test_prep_tagger import write_model

    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "train" / "20_usu bear", 3, sizes=((96, 64),))
    (tmp_path / "train" / "20_usu bear" / "002.txt").unlink()  # one image for the tagger to caption
    make_images(tmp_path / "reg" / "1_bear", 1, seed=2)
    write_model(tmp_path / "wd-v1-4-moat-tagger-v2")
    (tmp_path / "scores.json").write_text('{"000.png": 70, "001.png": 2}', encoding="utf-8")
    expect = {"check": r"train train/20_usu bear: 3 images x 20 repeats", "tag": r"3 images: 1 captions? written",
              "tags": r"3 caption files, would change 3", "quality": r"2 captions with a score",
              "resize": r"3 images: 0 resized, 3 copied unchanged", "dedupe": r"3 images: 0 duplicate groups"}
    cmds = readme_dataset_commands()
    assert sorted(c[1] for c in cmds) == sorted(expect), cmds
    for argv in cmds:
        fast = ["--workers", "1", "--no_progress"] if argv[1] in ("resize", "dedupe") else []
        rc, out, err = cli(argv + fast + (["--no_progress"] if argv[1] == "tag" else []))
        assert rc == 0 and re.search(expect[argv[1]], out), (argv, out, err)
        assert not re.search(r"\b0 (images|caption files)\b", out), (argv, out)
    assert (tmp_path / "train" / "20_usu bear" / "002.txt").read_text(encoding="utf-8").strip()
    assert sorted(p.name for p in (tmp_path / "train_1024" / "20_usu bear").glob("*.png")) == \
        ["000.png", "001.png", "002.png"]


# ---- the demo's command line --------------------------------------------------------------------------------------
def test_demo_command_line_reproduces_the_demo_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    rc, out, err = cli(["demo", "--output_dir", tmp_path / "demo", "--steps", "1", "--no_eval", "--no_progress"])
    assert rc == 0, out + err
    line = out.split("the same training as a command line", 1)[1].splitlines()[1].strip()
    argv = shlex.split(line)
    assert argv[:2] == ["lorakit", "train"] and "--num_threads" in argv
    torch.set_num_threads(3)  # the printed line must not depend on this process' setting
    rc, out2, err2 = cli(argv[1:] + ["--output_dir", tmp_path / "again", "--no_progress"])
    assert rc == 0, out2 + err2
    a = load_file(str(tmp_path / "demo" / "output" / "usu_bear.safetensors"))
    b = load_file(str(tmp_path / "again" / "usu_bear.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- training output ----------------------------------------------------------------------------------------------
def test_log_lines_never_land_inside_the_progress_bar():
    """In a terminal the bar is on stderr and log lines on stdout: a line is written only after the bar was cleared
    (so it starts at the left margin), and the bar is drawn again below it."""
    from tqdm import tqdm

    from lorakit.train.steplog import Console

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        bar = tqdm(total=10, desc="steps", ascii=True)
        bar.update(3)
        Console(print)("saved out/x.safetensors")
        bar.update(1)
        bar.close()
    text = buf.getvalue()
    before, after = text.split("saved out/x.safetensors\n")
    last = before.split("\r")[-1]
    assert last.strip() == "", repr(text)  # the bar's text was overwritten with blanks before the line
    assert "steps:" in after  # and drawn again


def test_the_bar_says_what_it_waits_for_while_saving_and_sampling(tmp_path):
    """The bar does not freeze silently: its description names the save or the previews until they are done."""
    from lorakit.train.steplog import LogOptions, StepLogger

    events = []
    with contextlib.redirect_stderr(io.StringIO()):
        sl = StepLogger(LogOptions(None, None), is_main=True, progress=True, on_event=events.append, adaptive=False)
        sl.start(0, 10, 1)
        seen = []
        for ev, kw in (("saving", {"path": str(tmp_path / "zq-step00000005.safetensors")}),
                       ("saved", {"path": str(tmp_path / "zq-step00000005.safetensors")}),
                       ("sampling", {"step": 5, "prompts": 4}), ("sample", {"paths": [], "step": 5})):
            sl.emit(ev, **kw)
            seen.append(sl._bar.desc)
        sl.close()
    assert seen == ["saving zq-step00000005.safetensors", "steps", "sampling 4 previews", "steps"], seen
    assert [e["event"] for e in events] == ["start", "saving", "saved", "sampling", "sample"]


def test_the_bar_is_for_terminals_and_no_progress_turns_it_off():
    from lorakit.utils.terminal import want_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert want_bar(False, Terminal()) and not want_bar(True, Terminal())
    assert not want_bar(False, io.StringIO())  # a log file or pipe gets step lines, not glued redraws
    with open(os.devnull, "w") as closed:
        pass
    assert not want_bar(False, closed)  # isatty() of a closed file raises: no bar, no traceback


@pytest.fixture
def tiny_model(tmp_path):
    from lorakit.models.saving import save_single_file

    path = tmp_path / "tiny.safetensors"
    save_single_file(tiny(), path)
    return path


def test_step_lines_in_a_log_file_status_lines_and_summary(tmp_path, tiny_model):
    make_images(tmp_path / "train" / "2_zq shape", 2)
    (tmp_path / "prompts.txt").write_text("zq shape --w 64 --h 64 --s 1\n", encoding="utf-8")
    rc, out, err = cli(["train", "--pretrained_model_name_or_path", tiny_model, "--train_data_dir", tmp_path / "train",
                        "--output_dir", tmp_path / "out", "--output_name", "zq", "--resolution", "64",
                        "--network_dim", "2", "--max_train_steps", "4", "--save_every_n_steps", "2",
                        "--network_train_unet_only", "--cache_latents", "--sample_prompts", tmp_path / "prompts.txt",
                        "--sample_every_n_steps", "4", "--logging_dir", tmp_path / "logs", "--seed", "1",
                        "--max_memory", "off", "--log_every_n_steps", "2"])  # a log file: no bar, step lines
    assert rc == 0, out + err
    assert "it/s]" not in err and "\r" not in out + err, err
    steps = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in steps] == ["1/4", "2/4", "4/4"], out
    assert all(re.search(r"loss [\d.]+ \(average [\d.]+\), lr 1\.00e-04, [\d.]+ it/s, ETA ", ln) for ln in steps)
    assert "caching latents of 2 images ..." in out and "cached latents: 2 encoded" in out
    assert "sampling 1 preview prompt for step 4 ..." in out and "samples: 1 image in" in out
    summary = out[out.index("finished: step 4 of 4"):]
    assert re.search(r"loss: final [\d.]+, average [\d.]+ over the run", summary)
    for f in ("zq-step00000002.safetensors", "zq.safetensors"):
        assert str(tmp_path / "out" / f) in summary
    assert "final LoRA" in summary and "samples" in summary
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'logs'}" in summary


# ---- late errors: the dataset is checked before the model loads --------------------------------------------------
@pytest.mark.parametrize("case, pattern", [
    ("missing", r"--train_data_dir .*nodata does not exist"),
    ("no repeats", r"no usable `N_class` subfolder.*bear is skipped: its name has no leading repeat count"),
    ("empty", r"(?s)no usable training images.*empty/3_bear has no images"),
    ("missing toml", r"--dataset_config .*nothere.toml does not exist"),
])
def test_dataset_mistakes_are_reported_before_the_model_loads(tmp_path, tiny_model, monkeypatch, case, pattern):
    """Issue 21 item 7 (the optimizer, scheduler and network-args cases: tests/test_train_robust.py)."""
    from lorakit.errors import UserError
    from lorakit.models import loading
    from lorakit.options import resolve
    from lorakit.train.trainer import train

    make_images(tmp_path / "train" / "bear", 1)  # no `N_` prefix
    (tmp_path / "empty" / "3_bear").mkdir(parents=True)
    data = {"missing": ["--train_data_dir", tmp_path / "nodata"], "empty": ["--train_data_dir", tmp_path / "empty"],
            "no repeats": ["--train_data_dir", tmp_path / "train"],
            "missing toml": ["--dataset_config", tmp_path / "nothere.toml"]}[case]
    monkeypatch.setattr(loading, "load_bundle", lambda *a, **k: pytest.fail("the model was loaded first"))
    opts = resolve([str(a) for a in ["--pretrained_model_name_or_path", tiny_model, "--output_dir", tmp_path / "out",
                                     "--resolution", "64", "--max_train_steps", "1", *data]])
    with pytest.raises(UserError, match=pattern):
        train(opts, progress=False, log=lambda *a: None, predict_memory=False)


# ---- grids ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", [16, 24, 64])
def test_grid_labels_stay_inside_their_columns_at_any_cell_size(cell):
    from lorakit.generate.grid import draw_grid

    cols = ["LoRA file: usu_bear-000005", "LoRA file: usu_bear-step00000500", "LoRA file: usu_bear", "Seed: 7"]
    rows = [[Image.new("RGB", (cell, cell), (128, 128, 128)) for _ in cols] for _ in range(2)]
    img, (left, top) = draw_grid(rows, cols, ["usu bear, forest, night", "b"])
    px = img.convert("L").load()
    assert top > 0 and left > 0
    band = range(0, top)
    inked = [any(px[x, y] < 128 for y in band for x in range(left + i * cell + 1, left + (i + 1) * cell - 1))
             for i in range(len(cols))]
    assert all(inked), "every column has a label"
    for i in range(1, len(cols)):  # no text crosses from one column into the next
        x = left + i * cell
        assert all(px[xx, y] > 200 for y in band for xx in (x - 1, x)), (cell, i)
    assert all(px[x, y] > 200 for y in band for x in range(left - 1))  # the corner above the row labels is empty
    # row labels stay in their rows too (a label wrapped taller than its row would run into the next one)
    assert all(px[x, top + cell] > 200 for x in range(left - 1)), cell


def test_a_runs_saves_are_labelled_by_epoch_and_step_one_line_each_in_64_pixel_cells():
    """`usu_bear-step00000500` in a 64-pixel column used to break into "usu_bear-", "step000000", "03"; a run's saves
    read "epoch 5", "step 500", "final" under the run's name."""
    from PIL import ImageDraw

    from lorakit.generate.grid import _font, _wrap, draw_grid, run_save_labels

    labels = run_save_labels(["usu_bear-000005", "usu_bear-step00000500", "usu_bear"])
    assert labels == ["usu_bear: epoch 5", "usu_bear: step 500", "usu_bear: final"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert all(len(_wrap(probe, t.split(": ")[1], _font(), 64 - 8)) == 1 for t in labels)
    rows = [[Image.new("RGB", (64, 64), "gray")] * 3]
    img, (left, top) = draw_grid(rows, labels, [""])
    px = img.convert("L").load()
    lines = [y for y in range(top) if any(px[x, y] < 128 for x in range(left, img.size[0]))]
    assert lines and lines[-1] - lines[0] < 30  # the title and one line of labels, not a tower of digit rows
    # files of different runs, or names that are not a run's saves, keep "LoRA file: name"
    assert run_save_labels(["usu_bear-000005", "other"]) is None
    assert run_save_labels(["usu_bear-000005", "usu_bear-step00000005", "usu_bear-000005"]) is None


def test_lora_file_axis_lists_saves_in_training_order_with_the_final_file_last(tmp_path):
    """The README's `usu_bear*` glob: epoch and step saves by step, the final LoRA (no suffix) last."""
    from lorakit.adapters.file import save_lora
    from lorakit.generate.grid import make_axis
    from lorakit.generate.lora_loading import LoraLibrary

    t = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}
    for name, steps in (("usu_bear", 40), ("usu_bear-000002", 16), ("usu_bear-000001", 8),
                        ("usu_bear-step00000012", 12), ("usu_bear-000003", 24)):
        save_lora(tmp_path / f"{name}.safetensors", t, {"ss_steps": str(steps), "ss_output_name": name})
    axis = make_axis("LoRA file", "usu_bear*", LoraLibrary(tmp_path))
    assert axis.values == ["usu_bear-000001", "usu_bear-step00000012", "usu_bear-000002", "usu_bear-000003",
                           "usu_bear"]
    assert axis.labels == ["usu_bear: epoch 1", "usu_bear: step 12", "usu_bear: epoch 2", "usu_bear: epoch 3",
                           "usu_bear: final"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert '--x_values "usu_bear*"' in readme and '"usu_bear-*"' not in readme
    # explicit values keep the order they were given in
    assert make_axis("LoRA file", "usu_bear,usu_bear-000001", LoraLibrary(tmp_path)).values == \
        ["usu_bear", "usu_bear-000001"]


def test_grid_with_a_hub_id_names_the_model_flag(tmp_path):
    """The hub-id message of `lorakit grid --model owner/name` names --model (it once called it an axis value)."""
    rc, out, err = cli(["grid", "--model", "runwayml/stable-diffusion-v1-5", "--prompt", "x", "--x_type", "Seed",
                        "--x_values", "1,2", "--outdir", tmp_path / "grids"])
    assert rc == 2 and "--model runwayml/stable-diffusion-v1-5 is not a file" in err and "never downloads" in err, err
    assert "axis" not in err, err


def test_generation_progress_in_a_log_file_is_lines_not_one_glued_line():
    """`cells 3/12` is redrawn with a carriage return only in a terminal; in a log file each count is a line."""
    from lorakit.cli.generate_cmd import _progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, tty in ((io.StringIO(), False), (Terminal(), True)):
        with contextlib.redirect_stderr(stream):
            show = _progress_bar("cells ")
            for i in range(1, 21):
                show(i, 20)
        text = stream.getvalue()
        if tty:
            assert text.count("\r") == 20 and text.endswith("cells 20/20\n"), repr(text)
        else:
            assert "\r" not in text and text.splitlines() == [f"cells {i}/20" for i in range(2, 21, 2)], repr(text)


# ---- the smaller items ----------------------------------------------------------------------------------------------
def test_lora_info_calls_the_files_own_hash_lora_hash(tmp_path):
    from lorakit.adapters.file import save_lora

    path = tmp_path / "l.safetensors"
    save_lora(path, {"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1)},
              {"ss_sd_model_hash": "1234abcd", "ss_output_name": "l"})
    rc, out, err = cli(["lora", "info", path])
    assert rc == 0, err
    assert "base_model_hash: 1234abcd" in out and "lora_hash: " in out and "  model_hash:" not in out


def test_similar_names_are_listed_once(tmp_path):
    from lorakit.adapters.file import save_lora
    from lorakit.errors import UserError
    from lorakit.generate.lora_loading import LoraLibrary

    t = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}
    save_lora(tmp_path / "usu_bear.safetensors", t, {"ss_output_name": "usu_bear"})
    with pytest.raises(UserError) as err:
        LoraLibrary(tmp_path).resolve("usu_baer")
    similar = str(err.value).split("Similar names:", 1)[1]
    assert similar.strip() == "usu_bear."  # once, though it is both the stem and the ss_output_name


def test_dedupe_calls_a_byte_copy_of_another_duplicate_an_exact_copy(tmp_path):
    from lorakit.tools.image_prep import dedupe_folder

    base = Image.new("RGB", (64, 64), (10, 120, 200))
    base.save(tmp_path / "big.png")  # kept: the largest file of the group
    small = base.resize((48, 48))
    small.save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    rep = dedupe_folder(tmp_path, workers=1, progress=False)
    (g,) = rep.groups
    kinds = {d.path.name: (d.kind, d.same_as and d.same_as.name) for d in g.duplicates}
    assert g.keep.name == "big.png" and kinds == {"a.png": ("near", None), "b.png": ("exact", "a.png")}
    rc, out, err = cli(["dataset", "dedupe", tmp_path, "--workers", "1", "--no_progress"])
    assert "b.png  (exact copy of a.png)" in out and "distance" in out


def test_dataset_check_says_how_many_it_does_not_list(tmp_path):
    make_images(tmp_path / "train" / "1_zq", 12, sizes=((40, 40),))
    rc, out, err = cli(["dataset", "check", tmp_path / "train", "--resolution", "64", "--quick"])
    assert "12 images are smaller than their bucket" in out
    assert out.count(" -> bucket 64x64") == 10 and "... and 2 more" in out
