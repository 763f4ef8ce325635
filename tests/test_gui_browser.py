"""The GUI in a real browser (headless Debian Chromium through Playwright): fill the Train tab for a tiny model and
dataset, start, watch progress, reload during training, see the finished LoRA; generate with it; open LoRA info.
Takes a screenshot of every tab; with LORAKIT_UPDATE_SCREENSHOTS=1 they are written to docs/images/gui/ (the ones
the docs show), otherwise to a temporary folder so a test run leaves the checkout clean.

Runs on the first Chromium found: $LORAKIT_CHROMIUM, Debian's /usr/bin/chromium (`apt install chromium`; .ci/run
installs it), Chrome, or Playwright's own build. When there is none, Playwright's Chromium is installed once
(`python -m playwright install chromium`, into ~/.cache/ms-playwright); only if that fails too (offline, or system
libraries missing) are the tests skipped, with the reason in pytest's summary. LORAKIT_SKIP_BROWSER=1 skips them.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest

SYSTEM_BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome",
                   "/usr/bin/google-chrome-stable", "/snap/bin/chromium")
DOC_SHOTS = Path(__file__).resolve().parents[1] / "docs" / "images" / "gui"
SHOTS = DOC_SHOTS if os.environ.get("LORAKIT_UPDATE_SCREENSHOTS") == "1" else \
    Path(__import__("tempfile").gettempdir()) / "lorakit-gui-screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if os.environ.get("LORAKIT_SKIP_BROWSER") == "1":
    pytest.skip("LORAKIT_SKIP_BROWSER=1", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_common import make_images

    from lorakit.gui.app import launch
    from lorakit.gui.jobs import JobStore
    from lorakit.models.saving import save_single_file
    from lorakit.models.tiny import tiny_bundle

    torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared machine
    root = tmp_path_factory.mktemp("gui")
    save_single_file(tiny_bundle("sd1", seed=0), root / "tiny.safetensors")
    make_images(root / "train" / "2_zq shape", 3)
    (root / "prompts.txt").write_text("zq shape --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    store = JobStore(root / "jobs", env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    demo, ctx, url = launch(roots=[root], port=_free_port(), block=False, quiet=True, store=store)
    yield {"root": root, "url": url, "ctx": ctx}
    store.shutdown()
    demo.close()


def _installed_browser(pw) -> str | None:
    import shutil

    env = os.environ.get("LORAKIT_CHROMIUM")
    if env:
        return env
    for path in SYSTEM_BROWSERS + tuple(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                                                   "google-chrome")))):
        if os.access(path, os.X_OK):
            return path
    try:
        own = pw.chromium.executable_path  # Playwright's build, if `playwright install chromium` ran
    except Exception:  # noqa: BLE001 - no browser registry yet
        return None
    return own if own and os.access(own, os.X_OK) else None


def _browser(pw):
    """A launched headless Chromium: the first one found, else Playwright's, installed once; skips with the reason
    when none can run."""
    import subprocess

    path = _installed_browser(pw)
    if path is None:
        print("\ntest_gui_browser: no Chromium found; installing Playwright's (once, about 150 MB, into "
              "~/.cache/ms-playwright) ...", file=sys.__stderr__, flush=True)
        try:
            done = subprocess.run([sys.executable, "-m", "playwright", "install", "chromium"], capture_output=True,
                                  text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"no Chromium for the browser tests, and installing Playwright's failed ({exc}); install "
                        "one: sudo apt install chromium (Debian/Ubuntu), or python -m playwright install chromium")
        path = _installed_browser(pw)
        if done.returncode != 0 or path is None:
            why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"no Chromium for the browser tests, and `python -m playwright install chromium` failed "
                        f"({why[0][:200]}); install one: sudo apt install chromium (Debian/Ubuntu), or run that "
                        "command where the network is reachable")
    try:
        return pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
    except Exception as exc:  # noqa: BLE001 - a browser that cannot start: say why, do not fail the suite
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        pytest.skip(f"Chromium {path} cannot start ({first}); its system libraries may be missing: "
                    "sudo apt install chromium, or python -m playwright install-deps chromium")


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        browser = _browser(pw)
    except BaseException:  # a skip included: stop Playwright's driver process
        pw.stop()
        raise
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(60_000)
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(server["url"])
    pg.wait_for_selector("#opt-pretrained_model_name_or_path")
    yield pg
    # the page works offline: every request went to the local server (or is inline data)
    foreign = [u for u in requests if not u.startswith((server["url"].rstrip("/"), "data:", "blob:"))]
    assert not foreign, foreign[:5]
    browser.close()
    pw.stop()


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id}").locator("input, textarea").first
    box.fill(value)
    box.dispatch_event("blur")


def _wait_text(page, elem_id: str, text: str, timeout: float = 60_000, value: bool = False) -> None:
    """Wait until the element (or, with value=True, its input/textarea) contains `text`."""
    prop = "(e.querySelector('input, textarea') || {value: ''}).value" if value else "e.innerText"
    page.wait_for_function(f"(() => {{ const e = document.querySelector('#{elem_id}'); "
                           f"return !!e && {prop}.includes({text!r}); }})()", timeout=timeout)


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").locator("input, textarea").first.input_value()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def _wait_images(page, *elem_ids: str) -> None:
    """Scroll each element into view (images load lazily) and wait until its images are decoded."""
    for elem_id in elem_ids:
        page.locator(f"#{elem_id}").scroll_into_view_if_needed()
        page.wait_for_function(f"(() => {{ const imgs = document.querySelectorAll('#{elem_id} img'); "
                               f"return imgs.length > 0 && Array.from(imgs).every(i => i.complete && "
                               f"i.naturalWidth > 0); }})()")


def _shot(page, name: str, full_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(700)  # let the last update's fade-in finish
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def test_train_tab_validation_then_training_with_reload(page, server):
    root = server["root"]
    # a bad value is reported at its field, with no job started
    _fill(page, "opt-pretrained_model_name_or_path", str(root / "tiny.safetensors"))
    _fill(page, "opt-max_train_steps", "many")
    page.click("#check-btn")
    _wait_text(page, "train-errors", "max_train_steps")
    assert "not a valid int" in _text(page, "opt-max_train_steps") or "⚠" in _text(page, "opt-max_train_steps")
    assert "train_data_dir" in _text(page, "train-errors")  # required folder missing
    assert page.locator("#opt-max_train_steps.lk-invalid").count() == 1  # the field itself is marked
    page.locator("#opt-max_train_steps").scroll_into_view_if_needed()
    _shot(page, "train_errors")

    for elem, value in [("opt-train_data_dir", str(root / "train")), ("opt-output_dir", str(root / "out")),
                        ("opt-output_name", "gui_lora"), ("opt-resolution", "64"), ("opt-max_train_steps", "40"),
                        ("opt-network_dim", "4"), ("opt-learning_rate", "1e-3"), ("opt-seed", "1"),
                        ("opt-sample_prompts", str(root / "prompts.txt")), ("opt-sample_every_n_epochs", "1")]:
        _fill(page, elem, value)
    page.click("#check-btn")
    _wait_text(page, "train-errors", "Options are valid")
    _wait_text(page, "memory-prediction", "Predicted peak memory", timeout=60_000)  # beside the Start button
    assert re.search(r"[0-9.]+ GiB on cpu", _text(page, "memory-prediction"))
    assert page.locator(".lk-invalid").count() == 0
    assert "--output_name gui_lora" in _text(page, "command-line")
    page.locator("#train-errors").scroll_into_view_if_needed()
    _shot(page, "train")
    page.click("#start-btn")
    _wait_text(page, "job-status", "running", timeout=60_000)
    page.wait_for_function("/step [0-9]+\\/40/.test(document.querySelector('#job-progress').innerText)",
                           timeout=90_000)
    job_id = re.search(r"Job `?([^`:\s]+)", _text(page, "job-status")).group(1)
    assert job_id in _value(page, "job-select")

    was_running = server["ctx"].store.get(job_id).state == "running"
    page.reload()  # a new session finds the running job again
    _wait_text(page, "job-status", job_id)
    assert was_running  # the reload happened during training
    assert job_id in _value(page, "job-select")
    _wait_text(page, "job-status", "finished", timeout=120_000)
    _wait_text(page, "job-files", "gui_lora.safetensors")
    assert "40/40" in _text(page, "job-progress")
    assert (root / "out" / "gui_lora.safetensors").is_file()
    _wait_images(page, "job-samples", "lr-chart", "loss-chart")  # epoch previews and the charts
    page.evaluate("document.querySelector('#job-select').scrollIntoView({block: 'start'})")
    _shot(page, "train_job")


def test_generate_with_the_trained_lora(page, server):
    root = server["root"]
    assert (root / "out" / "gui_lora.safetensors").is_file()
    _tab(page, "Generate")
    _fill(page, "gen-model", str(root / "tiny.safetensors"))
    _fill(page, "gen-lora-dir", str(root / "out"))
    page.click("#gen-refresh")
    _wait_text(page, "gen-lora-card", "network dim")
    assert "zq shape" in _text(page, "gen-lora-card")  # trained tags from the metadata
    _fill(page, "gen-prompt", "zq shape <lora:gui_lora:0.8>")
    for elem, value in [("gen-steps", "2"), ("gen-width", "64"), ("gen-height", "64"), ("gen-seed", "7")]:
        _fill(page, elem, value)
    page.click("#gen-btn")
    _wait_text(page, "gen-infotext", "Steps: 2", value=True, timeout=120_000)
    text = _value(page, "gen-infotext")
    assert "Seed: 7" in text and "Size: 64x64" in text and "gui_lora" in text
    _wait_images(page, "gen-gallery")
    page.locator("#gen-prompt").scroll_into_view_if_needed()
    assert list((root / "outputs" / "txt2img").glob("*-7.png"))
    _shot(page, "generate", full_page=True)


def test_tools_lora_info_dataset_and_files(page, server):
    root = server["root"]
    _tab(page, "Tools")
    _fill(page, "info-path", str(root / "out" / "gui_lora.safetensors"))
    page.click("#info-btn")
    _wait_text(page, "info-text", "algorithm", value=True)
    info = _value(page, "info-text")
    assert "SD 1.x" in info and "algorithm: LoRA" in info
    _wait_images(page, "info-chart")
    _shot(page, "tools", full_page=True)

    _tab(page, "Dataset")
    _fill(page, "ds-train", str(root / "train"))
    _fill(page, "ds-resolution", "64")
    page.click("#ds-check")
    _wait_text(page, "ds-report", "steps per epoch", value=True)
    assert "3 images x 2 repeats" in _value(page, "ds-report")
    _shot(page, "dataset", full_page=True)

    _tab(page, "Files")
    _fill(page, "fb-folder", str(root))
    page.click("#fb-list")
    _wait_text(page, "fb-listing", "tiny.safetensors")
    _shot(page, "files", full_page=True)
    _fill(page, "fb-folder", "/etc")
    page.click("#fb-list")
    page.wait_for_selector("text=outside the folders")  # refused, shown as an error message
