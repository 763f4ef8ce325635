"""A corpus of bad inputs, each run through the command a user would type (`lorakit.cli.main.main`, in-process).

Every case builds its own broken input (images, captions, folders, TOML, models, LoRA files, prompts, flags,
paths), runs the command and asserts: a non-zero exit (or, for a documented acceptance, exit 0), no traceback, and a
message naming the file or flag. A case whose fix is pending may be marked a strict xfail (`xfail=` reason).

With LORAKIT_CORPUS_REPORT=path.json the outcome of every case (clear / traceback / silent / unclear / accepted) is
written there, so the counts before and after a change can be compared.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import sys
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))

EVERY_IMAGE = ("--max_train_epochs", "1", "--train_batch_size", "3")  # 2 steps over all 6 samples


# ---- the workspace every case builds on -------------------------------------------------------------------------
class Workspace:
    """Shared good inputs (a tiny model, a dataset, a LoRA, a state folder), made once; cases copy and break them."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, Path] = {}

    def _once(self, key: str, make: Callable[[Path], None], name: str) -> Path:
        if key not in self._cache:
            path = self.root / "shared" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            make(path)
            self._cache[key] = path
        return self._cache[key]

    @staticmethod
    def _tiny_bundle():
        from test_train_common import tiny

        return tiny("sd1")

    @property
    def model(self) -> Path:
        from lorakit.models.saving import save_single_file

        return self._once("model", lambda p: save_single_file(self._tiny_bundle(), p), "tiny.safetensors")

    @property
    def model_nan(self) -> Path:
        import torch

        from lorakit.models.saving import save_single_file

        def make(p):
            b = self._tiny_bundle()
            with torch.no_grad():
                b.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
            save_single_file(b, p)

        return self._once("model_nan", make, "tiny_nan.safetensors")

    @property
    def model_tuned(self) -> Path:
        import torch

        from lorakit.models.saving import save_single_file

        def make(p):
            b = self._tiny_bundle()
            with torch.no_grad():
                for prm in b.unet.parameters():
                    prm.add_(0.01 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(1)))
            save_single_file(b, p)

        return self._once("model_tuned", make, "tiny_tuned.safetensors")

    @property
    def data(self) -> Path:
        from test_train_common import make_images

        return self._once("data", lambda p: make_images(p / "2_zq shape", 2), "train")

    def dataset_copy(self, d: Path) -> Path:
        dst = d / "train"
        shutil.copytree(self.data, dst)
        return dst

    def lora_tensors(self):
        from safetensors import safe_open

        with safe_open(str(self.lora), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})

    @property
    def lora(self) -> Path:
        import torch

        from lorakit.adapters.network import create_network

        def make(p):
            b = self._tiny_bundle()
            torch.manual_seed(0)
            net = create_network(b, "networks.lora", 4, 4, {})
            with torch.no_grad():
                for a in net.adapters:
                    torch.nn.init.normal_(a.lora_up.weight, std=0.01)
            net.save_weights(p, precision="fp32")

        return self._once("lora", make, "loras/good.safetensors")

    def broken_lora(self, d: Path, name: str, edit: Callable[[dict], None]) -> Path:
        from safetensors.torch import save_file

        sd, md = self.lora_tensors()
        edit(sd)
        (d / "loras").mkdir(exist_ok=True)
        path = d / "loras" / f"{name}.safetensors"
        save_file(sd, str(path), metadata=md)
        return path

    @property
    def state(self) -> Path:
        def make(p):
            out = p.parent / "state_run"
            rc, text = run_cli(self.train_argv(out, "--save_state_on_train_end", "--output_name", "st"))
            assert rc == 0, text
            shutil.copytree(out / "st-state", p)

        return self._once("state", make, "st-state")

    def state_copy(self, d: Path) -> Path:
        dst = d / "st-state"
        shutil.copytree(self.state, dst)
        return dst

    def train_argv(self, out: Path, *extra: str, data: Path | None = None, dataset_config: Path | None = None):
        source = ["--dataset_config", str(dataset_config)] if dataset_config else ["--train_data_dir",
                                                                                    str(data or self.data)]
        return ["train", "--pretrained_model_name_or_path", str(self.model), *source,
                "--output_dir", str(out), "--resolution", "64", "--network_dim", "2",
                "--network_alpha", "2", "--max_train_steps", "1", "--seed", "1", "--max_data_loader_n_workers", "1",
                "--network_train_unet_only", "--no_progress", *extra]

    def gen_argv(self, d: Path, *extra: str, model: Path | None = None) -> list[str]:
        return ["generate", "--model", str(model or self.model), "--steps", "1", "--width", "64", "--height", "64",
                "--seed", "1", "--no_hash", "--outdir", str(d / "gen"), *extra]


def run_cli(argv: list[str]) -> tuple[object, str]:
    """(exit status or "traceback", everything printed) of `lorakit ARGV` run in this process."""
    from lorakit.cli.main import main

    import logging

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)  # what logging prints on a terminal (pytest's log capture would hide it)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - an escaping exception is what the corpus looks for
            traceback.print_exc(file=buf)
            rc = "traceback"
        finally:
            logging.getLogger().removeHandler(handler)
    return rc, buf.getvalue()


# ---- input makers -----------------------------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid PNG header claiming side x side pixels (over twice Pillow's limit): DecompressionBombError on open."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + png_chunk(b"IEND", b""))
    return path


def add_image(folder: Path, name: str, data: bytes | None = None, caption: str | bytes | None = "zq shape") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    if data is not None:
        p.write_bytes(data)
    if caption is not None:
        cap = p.with_suffix(".txt")
        cap.write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8"))
    return p


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is complete but whose data stops early: the size scan passes, decoding fails."""
    from PIL import Image

    img = Image.effect_noise((64, 64), 80).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return path


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def dataset_toml(d: Path, body: str) -> Path:
    return write(d / "ds.toml", body)


# ---- the cases --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    make: Callable[[Workspace, Path], list[str]]  # builds the input in a fresh folder, returns the argv
    names: tuple[str, ...]  # every one must appear in the output (the file, folder or flag it is about)
    accept: bool = False  # a documented acceptance: exit 0 (names are then what the warning must say)
    xfail: str | None = None


CASES: list[Case] = []


def case(id: str, *names: str, accept: bool = False, xfail: str | None = None):
    def deco(fn):
        CASES.append(Case(id, fn, names, accept, xfail))
        return fn

    return deco


# images -----------------------------------------------------------------------------------------------------------
@case("check-bomb-image", "huge.png")
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "huge.png")
    bomb_png(t / "2_zq shape" / "huge.png")
    return ["dataset", "check", t, "--resolution", "64"]


@case("check-bomb-image-quick", "huge.png")
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "huge.png")
    bomb_png(t / "2_zq shape" / "huge.png")
    return ["dataset", "check", t, "--resolution", "64", "--quick"]


@case("train-bomb-image", "huge.png", "--on_bad_image")
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "huge.png")
    bomb_png(t / "2_zq shape" / "huge.png")
    return w.train_argv(d / "out", data=t)


@case("train-bomb-image-skip", "huge.png", accept=True)
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "huge.png")
    bomb_png(t / "2_zq shape" / "huge.png")
    return w.train_argv(d / "out", "--on_bad_image", "skip", data=t)


@case("dataset-resize-bomb-image", "huge.png")
def _(w, d):
    t = w.dataset_copy(d)
    bomb_png(t / "2_zq shape" / "huge.png")
    return ["dataset", "resize", t / "2_zq shape", "--max_resolution", "32", "--out", d / "small", "--workers", "1",
            "--no_progress"]


@case("dataset-dedupe-bomb-image", "huge.png", accept=True)  # a report: the unreadable file is named and skipped
def _(w, d):
    t = w.dataset_copy(d)
    bomb_png(t / "2_zq shape" / "huge.png")
    return ["dataset", "dedupe", t / "2_zq shape", "--workers", "1", "--no_progress"]


@case("check-truncated-png", "cut.png")
def _(w, d):
    t = w.dataset_copy(d)
    good = (t / "2_zq shape" / "000.png").read_bytes()
    add_image(t / "2_zq shape", "cut.png", good[: len(good) // 2])
    return ["dataset", "check", t, "--resolution", "64"]


@case("check-empty-image", "empty.png")
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "empty.png", b"")
    return ["dataset", "check", t, "--resolution", "64"]


@case("check-text-as-png", "notes.png")
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "notes.png", b"this is not an image\n" * 10)
    return ["dataset", "check", t, "--resolution", "64"]


@case("train-text-as-jpg", "fake.jpg")
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "fake.jpg", b"GIF89a" + b"\0" * 100)
    return w.train_argv(d / "out", data=t)


@case("train-truncated-jpeg", "cut.jpg")
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "cut.jpg")
    truncated_jpeg(t / "2_zq shape" / "cut.jpg")
    return w.train_argv(d / "out", *EVERY_IMAGE, data=t)


@case("train-truncated-jpeg-cache-latents", "cut.jpg")
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "cut.jpg")
    truncated_jpeg(t / "2_zq shape" / "cut.jpg")
    return w.train_argv(d / "out", *EVERY_IMAGE, "--cache_latents", data=t)


@case("train-truncated-jpeg-skip", "cut.jpg", accept=True)
def _(w, d):
    t = w.dataset_copy(d)
    add_image(t / "2_zq shape", "cut.jpg")
    truncated_jpeg(t / "2_zq shape" / "cut.jpg")
    return w.train_argv(d / "out", *EVERY_IMAGE, "--on_bad_image", "skip", "--cache_latents", data=t)


# captions ---------------------------------------------------------------------------------------------------------
@case("check-caption-only-commas", "000.txt")
def _(w, d):
    t = w.dataset_copy(d)
    (t / "2_zq shape" / "000.txt").write_text(" , ,, ,\n", encoding="utf-8")
    return ["dataset", "check", t, "--resolution", "64"]


@case("train-caption-only-commas", "000.txt")
def _(w, d):
    t = w.dataset_copy(d)
    (t / "2_zq shape" / "000.txt").write_text(",,,", encoding="utf-8")
    return w.train_argv(d / "out", data=t)


@case("train-caption-whitespace", "000.txt")
def _(w, d):
    t = w.dataset_copy(d)
    (t / "2_zq shape" / "000.txt").write_text("  \n\t\n", encoding="utf-8")
    return w.train_argv(d / "out", data=t)


@case("train-caption-not-utf8", "001.txt")
def _(w, d):
    t = w.dataset_copy(d)
    (t / "2_zq shape" / "001.txt").write_bytes("zq shape, caf\u00e9".encode("latin-1") + b"\xff")
    return w.train_argv(d / "out", data=t)


@case("check-caption-empty", "001.txt")
def _(w, d):
    t = w.dataset_copy(d)
    (t / "2_zq shape" / "001.txt").write_bytes(b"")
    return ["dataset", "check", t, "--resolution", "64"]


# folders ----------------------------------------------------------------------------------------------------------
@case("check-folder-zero-repeats", "0_zq shape", "1_zq shape")
def _(w, d):
    t = d / "train"
    shutil.copytree(w.data / "2_zq shape", t / "0_zq shape")
    shutil.copytree(w.data / "2_zq shape", t / "3_other")
    return ["dataset", "check", t, "--resolution", "64"]


@case("check-folder-negative-repeats", "-3_zq shape", "3_zq shape")
def _(w, d):
    t = d / "train"
    shutil.copytree(w.data / "2_zq shape", t / "-3_zq shape")
    shutil.copytree(w.data / "2_zq shape", t / "3_other")
    return ["dataset", "check", t, "--resolution", "64"]


@case("train-folder-zero-repeats", "0_zq shape", "1_zq shape")
def _(w, d):
    t = d / "train"
    shutil.copytree(w.data / "2_zq shape", t / "0_zq shape")
    return w.train_argv(d / "out", data=t)


@case("train-folder-no-repeat-prefix", "zq shape", "10_zq shape")
def _(w, d):
    t = d / "train"
    shutil.copytree(w.data / "2_zq shape", t / "zq shape")
    return w.train_argv(d / "out", data=t)


@case("train-data-dir-missing", "--train_data_dir", "nope")
def _(w, d):
    return w.train_argv(d / "out", data=d / "nope")


@case("train-data-dir-is-file", "--train_data_dir", "file.txt")
def _(w, d):
    return w.train_argv(d / "out", data=write(d / "file.txt", "x"))


@case("train-data-dir-empty", "--train_data_dir", "empty")
def _(w, d):
    (d / "empty").mkdir()
    return w.train_argv(d / "out", data=d / "empty")


@case("train-subfolder-without-images", "5_nothing")
def _(w, d):
    t = d / "train"
    (t / "5_nothing").mkdir(parents=True)
    write(t / "5_nothing" / "readme.txt", "no images here")
    return w.train_argv(d / "out", data=t)


@case("train-reg-dir-missing", "--reg_data_dir", "noreg")
def _(w, d):
    return w.train_argv(d / "out", "--reg_data_dir", d / "noreg")


# dataset TOML and --config_file -------------------------------------------------------------------------------------
@case("toml-syntax-error", "ds.toml")
def _(w, d):
    return ["dataset", "check", dataset_toml(d, "[general\nresolution = 64\n")]


@case("toml-unknown-key", "ds.toml", "colour_aug")
def _(w, d):
    return ["dataset", "check", dataset_toml(d, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                                f"image_dir = '{w.data / '2_zq shape'}'\ncolour_aug = true\n")]


@case("toml-no-image-dir", "ds.toml", "image_dir")
def _(w, d):
    return ["dataset", "check",
            dataset_toml(d, "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nnum_repeats = 2\n")]


@case("toml-image-dir-missing", "nowhere")
def _(w, d):
    toml = dataset_toml(d, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{d / 'nowhere'}'\n")
    return w.train_argv(d / "out", dataset_config=toml)


@case("toml-wrong-type", "ds.toml", "num_repeats")
def _(w, d):
    return ["dataset", "check", dataset_toml(d, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                                f"image_dir = '{w.data / '2_zq shape'}'\nnum_repeats = 'ten'\n")]


@case("toml-zero-repeats", "ds.toml", "num_repeats")
def _(w, d):
    return ["dataset", "check", dataset_toml(d, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                                f"image_dir = '{w.data / '2_zq shape'}'\nnum_repeats = 0\n")]


@case("toml-no-datasets", "ds.toml", "[[datasets]]")
def _(w, d):
    return ["dataset", "check", dataset_toml(d, "[general]\nresolution = 64\n")]


@case("toml-bad-resolution", "ds.toml", "resolution")
def _(w, d):
    return ["dataset", "check", dataset_toml(d, f"[[datasets]]\nresolution = 'big'\n[[datasets.subsets]]\n"
                                                f"image_dir = '{w.data / '2_zq shape'}'\n")]


@case("config-file-unknown-option", "run.toml", "learning_rat")
def _(w, d):
    return ["train", "--config_file", write(d / "run.toml", "learning_rat = 1e-4\n")]


@case("config-file-syntax-error", "run.toml")
def _(w, d):
    return ["train", "--config_file", write(d / "run.toml", "learning_rate = = 1\n")]


@case("config-file-wrong-type", "run.toml", "network_dim")
def _(w, d):
    return ["train", "--config_file", write(d / "run.toml", "network_dim = 'sixteen'\n")]


@case("config-file-missing", "--config_file", "absent.toml")
def _(w, d):
    return ["train", "--config_file", d / "absent.toml"]


@case("config-file-negative-lr", "run.toml", "learning_rate")
def _(w, d):
    return w.train_argv(d / "out", "--config_file", write(d / "run.toml", "learning_rate = -0.5\n"))


# models -----------------------------------------------------------------------------------------------------------
@case("train-model-missing", "--pretrained_model_name_or_path", "nomodel.safetensors")
def _(w, d):
    argv = w.train_argv(d / "out")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(d / "nomodel.safetensors")
    return argv


@case("train-model-garbage", "junk.safetensors")
def _(w, d):
    argv = w.train_argv(d / "out")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(write(d / "junk.safetensors", os.urandom(4096)))
    return argv


@case("model-info-truncated", "cut.safetensors")
def _(w, d):
    data = w.model.read_bytes()
    return ["model", "info", write(d / "cut.safetensors", data[: len(data) // 2])]


@case("model-info-pickle-with-code", "evil.ckpt")
def _(w, d):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(d / "pwned"),))

    (d / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    return ["model", "info", d / "evil.ckpt"]


@case("generate-model-is-a-lora", "good.safetensors")
def _(w, d):
    return w.gen_argv(d, "--prompt", "zq", model=w.lora)


@case("generate-model-nan", "tiny_nan.safetensors", "conv_in")
def _(w, d):
    return w.gen_argv(d, "--prompt", "zq", model=w.model_nan)


@case("merge-into-nan-model", "tiny_nan.safetensors", "conv_in")
def _(w, d):
    return ["lora", "merge", w.lora, "--model", w.model_nan, "--save_to", d / "merged.safetensors"]


@case("extract-from-nan-model", "tiny_nan.safetensors", "conv_in")
def _(w, d):
    return ["lora", "extract", "--model_org", w.model, "--model_tuned", w.model_nan, "--save_to",
            d / "x.safetensors"]


@case("extract-model-missing", "--model_org", "none.safetensors")
def _(w, d):
    return ["lora", "extract", "--model_org", d / "none.safetensors", "--model_tuned", w.model, "--save_to",
            d / "x.safetensors"]


# LoRA files -------------------------------------------------------------------------------------------------------
def _nan(sd):
    k = sorted(k for k in sd if k.endswith("lora_up.weight"))[0]
    sd[k][0, 0] = float("nan")


def _inf(sd):
    k = sorted(k for k in sd if k.endswith("lora_down.weight"))[-1]
    sd[k][0, 0] = float("inf")


def _first_module(sd, suffix="lora_up.weight"):
    return sorted(k for k in sd if k.endswith(suffix))[0].split(".")[0]


def _rank_mismatch(sd):
    k = sorted(k for k in sd if k.endswith("lora_up.weight"))[0]
    sd[k] = sd[k][:, :2].clone()


@case("lora-info-garbage", "junk.safetensors")
def _(w, d):
    return ["lora", "info", write(d / "junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")]


@case("lora-info-truncated", "cut.safetensors")
def _(w, d):
    data = w.lora.read_bytes()
    return ["lora", "info", write(d / "cut.safetensors", data[: len(data) - 100])]


@case("lora-info-missing", "absent.safetensors")
def _(w, d):
    return ["lora", "info", d / "absent.safetensors"]


@case("lora-info-rank-mismatch", "rankmix.safetensors", "rank")
def _(w, d):
    return ["lora", "info", w.broken_lora(d, "rankmix", _rank_mismatch)]


@case("lora-info-nan", "NaN")
def _(w, d):
    return ["lora", "info", w.broken_lora(d, "nanlora", _nan)]


@case("generate-lora-nan", "nanlora", "NaN")
def _(w, d):
    w.broken_lora(d, "nanlora", _nan)
    return w.gen_argv(d, "--prompt", "zq <lora:nanlora:1>", "--lora_dir", d / "loras")


@case("generate-lora-inf", "inflora", "inf")
def _(w, d):
    w.broken_lora(d, "inflora", _inf)
    return w.gen_argv(d, "--prompt", "zq <lora:inflora:0.5>", "--lora_dir", d / "loras")


@case("grid-lora-nan", "nanlora", "NaN")
def _(w, d):
    w.broken_lora(d, "nanlora", _nan)
    argv = w.gen_argv(d, "--prompt", "zq <lora:nanlora:1>", "--lora_dir", d / "loras", "--x_type", "LoRA weight",
                      "--x_values", "0,1")
    argv[0] = "grid"
    return argv


@case("generate-lora-rank-mismatch", "rankmix")
def _(w, d):
    w.broken_lora(d, "rankmix", _rank_mismatch)
    return w.gen_argv(d, "--prompt", "zq <lora:rankmix:1>", "--lora_dir", d / "loras")


@case("generate-lora-pickle-with-code", "evil.pt")
def _(w, d):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(d / "pwned"),))

    (d / "loras").mkdir()
    (d / "loras" / "evil.pt").write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": Evil()}))
    return w.gen_argv(d, "--prompt", "zq <lora:evil:1>", "--lora_dir", d / "loras")


@case("generate-lora-sdxl-keys-on-sd1", "xl")
def _(w, d):
    from safetensors.torch import save_file
    import torch

    (d / "loras").mkdir()
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)},
              str(d / "loras" / "xl.safetensors"))
    return w.gen_argv(d, "--prompt", "zq <lora:xl:1>", "--lora_dir", d / "loras")


@case("resize-lora-nan", "nanlora", "NaN")
def _(w, d):
    return ["lora", "resize", w.broken_lora(d, "nanlora", _nan), "--new_rank", "2", "--save_to", d / "r.safetensors"]


@case("resize-rank-mismatch", "rankmix")
def _(w, d):
    return ["lora", "resize", w.broken_lora(d, "rankmix", _rank_mismatch), "--new_rank", "2", "--save_to",
            d / "r.safetensors"]


@case("resize-new-rank-zero", "--new_rank")
def _(w, d):
    return ["lora", "resize", w.lora, "--new_rank", "0", "--save_to", d / "r.safetensors"]


@case("filter-lora-nan", "nanlora", "NaN")
def _(w, d):
    return ["lora", "filter", w.broken_lora(d, "nanlora", _nan), "--drop", "TE", "--save_to", d / "f.safetensors"]


@case("filter-unknown-block", "IN99")
def _(w, d):
    return ["lora", "filter", w.lora, "--keep", "IN99", "--save_to", d / "f.safetensors"]


@case("merge-loras-nan", "nanlora", "NaN")
def _(w, d):
    return ["lora", "merge", w.lora, w.broken_lora(d, "nanlora", _nan), "--concat", "--save_to",
            d / "m.safetensors"]


@case("merge-nan-lora-into-model", "nanlora", "NaN")
def _(w, d):
    return ["lora", "merge", w.broken_lora(d, "nanlora", _nan), "--model", w.model, "--save_to",
            d / "merged.safetensors"]


@case("merge-ratio-count", "--ratios")
def _(w, d):
    return ["lora", "merge", w.lora, w.lora, "--ratios", "1", "0.5", "0.2", "--concat", "--save_to",
            d / "m.safetensors"]


@case("train-network-weights-garbage", "junk.safetensors")
def _(w, d):
    return w.train_argv(d / "out", "--network_weights", write(d / "junk.safetensors", os.urandom(512)))


# prompts ----------------------------------------------------------------------------------------------------------
@case("generate-unknown-lora", "missing")
def _(w, d):
    (d / "loras").mkdir()
    return w.gen_argv(d, "--prompt", "zq <lora:missing:1>", "--lora_dir", d / "loras")


@case("generate-unknown-lbw-preset", "NOPE")
def _(w, d):
    shutil.copy(w.lora, d / "good.safetensors")
    return w.gen_argv(d, "--prompt", "zq <lora:good:1:lbw=NOPE>", "--lora_dir", d)


@case("generate-prompt-file-missing", "prompts.txt")
def _(w, d):
    return w.gen_argv(d, "--prompt_file", d / "prompts.txt")


@case("generate-prompt-file-bad-option", "prompts.txt", "--w")
def _(w, d):
    return w.gen_argv(d, "--prompt_file", write(d / "prompts.txt", "zq shape --w abc\n"))


@case("generate-from-png-without-parameters", "plain.png")
def _(w, d):
    shutil.copy(w.data / "2_zq shape" / "000.png", d / "plain.png")
    return w.gen_argv(d, "--from_png", d / "plain.png")


@case("train-sample-prompts-missing", "nosuch.txt")
def _(w, d):
    return w.train_argv(d / "out", "--sample_prompts", d / "nosuch.txt")


@case("generate-unbalanced-parens", "gen", accept=True)
def _(w, d):
    return w.gen_argv(d, "--prompt", "zq ((shape:1.2")  # A1111 accepts unbalanced brackets; the path is printed


# flags ------------------------------------------------------------------------------------------------------------
@case("flag-learning-rate-negative", "--learning_rate")
def _(w, d):
    return w.train_argv(d / "out", "--learning_rate", "-1")


@case("flag-network-dim-zero", "--network_dim")
def _(w, d):
    return w.train_argv(d / "out", "--network_dim", "0")


@case("flag-max-train-steps-zero", "--max_train_steps")
def _(w, d):
    return w.train_argv(d / "out", "--max_train_steps", "0")


@case("flag-batch-size-zero", "--train_batch_size")
def _(w, d):
    return w.train_argv(d / "out", "--train_batch_size", "0")


@case("flag-network-dropout-one", "--network_dropout")
def _(w, d):
    return w.train_argv(d / "out", "--network_dropout", "1.0")


@case("flag-resolution-not-multiple", "--resolution", "--bucket_reso_steps")
def _(w, d):
    argv = w.train_argv(d / "out")
    argv[argv.index("--resolution") + 1] = "100"
    return argv


@case("flag-grad-accum-zero", "--gradient_accumulation_steps")
def _(w, d):
    return w.train_argv(d / "out", "--gradient_accumulation_steps", "0")


@case("flag-caption-dropout-above-one", "--caption_dropout_rate")
def _(w, d):
    return w.train_argv(d / "out", "--caption_dropout_rate", "1.5")


@case("flag-max-epochs-zero", "--max_train_epochs")
def _(w, d):
    return w.train_argv(d / "out", "--max_train_epochs", "0")


@case("flag-save-every-zero", "--save_every_n_steps")
def _(w, d):
    return w.train_argv(d / "out", "--save_every_n_steps", "0")


@case("flag-misspelled", "--learning_rat", "--learning_rate")
def _(w, d):
    return w.train_argv(d / "out", "--learning_rat", "1e-4")


@case("flag-not-a-number", "--network_dim", "four")
def _(w, d):
    return w.train_argv(d / "out", "--network_dim", "four")


@case("flag-lr-zero-everywhere", "--learning_rate")
def _(w, d):
    return w.train_argv(d / "out", "--learning_rate", "0")


@case("generate-steps-zero", "--steps")
def _(w, d):
    argv = w.gen_argv(d, "--prompt", "zq")
    argv[argv.index("--steps") + 1] = "0"
    return argv


@case("generate-width-not-multiple-of-8", "--width")
def _(w, d):
    argv = w.gen_argv(d, "--prompt", "zq")
    argv[argv.index("--width") + 1] = "60"
    return argv


# paths ------------------------------------------------------------------------------------------------------------
@case("train-output-dir-is-file", "--output_dir", "taken")
def _(w, d):
    return w.train_argv(write(d / "taken", "a file"))


@case("train-output-dir-parent-is-file", "--output_dir", "taken")
def _(w, d):
    return w.train_argv(write(d / "taken", "a file") / "out")


@case("train-logging-dir-is-file", "--logging_dir", "logs")
def _(w, d):
    return w.train_argv(d / "out", "--logging_dir", write(d / "logs", "a file"))


@case("train-console-log-in-missing-dir", "--console_log_file", "log.txt")
def _(w, d):
    return w.train_argv(d / "out", "--console_log_file", write(d / "f", "x") / "log.txt")


@case("train-output-name-with-slash", "--output_name")
def _(w, d):
    return w.train_argv(d / "out", "--output_name", "../escaped")


@case("resize-save-to-under-a-file", "taken")
def _(w, d):
    return ["lora", "resize", w.lora, "--new_rank", "2", "--save_to", write(d / "taken", "x") / "r.safetensors"]


@case("generate-outdir-is-file", "--outdir", "taken")
def _(w, d):
    argv = w.gen_argv(d, "--prompt", "zq")
    argv[argv.index("--outdir") + 1] = str(write(d / "taken", "x"))
    return argv


@case("resume-missing-folder", "--resume", "nostate")
def _(w, d):
    return w.train_argv(d / "out", "--resume", d / "nostate")


@case("resume-missing-file", "optimizer.pt")
def _(w, d):
    s = w.state_copy(d)
    (s / "optimizer.pt").unlink()
    return w.train_argv(d / "out", "--resume", s)


@case("resume-truncated-optimizer", "optimizer.pt")
def _(w, d):
    s = w.state_copy(d)
    data = (s / "optimizer.pt").read_bytes()
    (s / "optimizer.pt").write_bytes(data[: len(data) // 2])
    return w.train_argv(d / "out", "--resume", s)


@case("resume-garbage-training", "training.pt")
def _(w, d):
    s = w.state_copy(d)
    (s / "training.pt").write_bytes(os.urandom(2000))
    return w.train_argv(d / "out", "--resume", s)


@case("resume-truncated-network", "network.safetensors")
def _(w, d):
    s = w.state_copy(d)
    data = (s / "network.safetensors").read_bytes()
    (s / "network.safetensors").write_bytes(data[:100])
    return w.train_argv(d / "out", "--resume", s)


@case("resume-garbage-json", "train_state.json")
def _(w, d):
    s = w.state_copy(d)
    (s / "train_state.json").write_text("{ half", encoding="utf-8")
    return w.train_argv(d / "out", "--resume", s)


@case("resume-other-dim", "--network_dim", "st-state")
def _(w, d):
    s = w.state_copy(d)
    argv = w.train_argv(d / "out", "--resume", s)
    argv[argv.index("--network_dim") + 1] = "3"
    return argv


@case("dataset-check-source-missing", "nothing_here")
def _(w, d):
    return ["dataset", "check", d / "nothing_here"]


# found before the model loads (issue 21) ------------------------------------------------------------------------------
@case("train-model-is-a-hub-id", "runwayml/stable-diffusion-v1-5", "never downloads")
def _(w, d):
    argv = w.train_argv(d / "out")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = "runwayml/stable-diffusion-v1-5"
    return argv


@case("generate-model-is-a-hub-id", "--model", "never downloads")
def _(w, d):
    return w.gen_argv(d, "--prompt", "zq", model="stabilityai/stable-diffusion-xl-base-1.0")


@case("flag-optimizer-args-bad-value", "--optimizer_args", "d_coef")
def _(w, d):
    return w.train_argv(d / "out", "--optimizer_type", "Prodigy", "--learning_rate", "1", "--optimizer_args", "d_coef=x")


@case("flag-optimizer-args-unknown-name", "--optimizer_args", "betaz")
def _(w, d):
    return w.train_argv(d / "out", "--optimizer_args", "betaz=0.9,0.99")


@case("flag-network-args-unknown-name", "network_args", "conv_dimm")
def _(w, d):
    return w.train_argv(d / "out", "--network_args", "conv_dimm=4")


@case("flag-num-threads-zero", "--num_cpu_threads_per_process")
def _(w, d):
    return w.train_argv(d / "out", "--num_threads", "0")


@case("flag-log-every-zero", "--log_every_n_steps")
def _(w, d):
    return w.train_argv(d / "out", "--log_every_n_steps", "0")


@case("dataset-resize-no-images", "empty", "N_name")
def _(w, d):
    (d / "empty" / "notes").mkdir(parents=True)
    return ["dataset", "resize", d / "empty", "--no_progress"]


@case("dataset-tag-missing-tagger-folder", "no_tagger", "does not exist")
def _(w, d):
    return ["dataset", "tag", w.dataset_copy(d), "--model_dir", d / "no_tagger", "--no_progress"]


# ---- running them -------------------------------------------------------------------------------------------------
def classify(c: Case, rc, text: str) -> str:
    low = text.lower()
    named = all(n.lower() in low for n in c.names)
    if rc == "traceback" or "Traceback (most recent call last)" in text:
        return "traceback"
    if c.accept:
        return "accepted" if rc == 0 and named else ("silent" if rc == 0 else "unclear")
    if rc == 0:
        return "silent"
    return "clear" if named else "unclear"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import torch

    import copy

    from lorakit.models import loading

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared machine
    real_load, loaded = loading.load_bundle, {}

    def cached_load(path, *args, **kwargs):
        # the same tiny checkpoint is loaded by most cases: keep one copy (a file that fails to load is not cached)
        st = os.stat(path) if os.path.isfile(path) else None
        key = (str(path), st and (st.st_mtime_ns, st.st_size), repr(args), repr(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = real_load(path, *args, **kwargs)
        return copy.deepcopy(loaded[key])

    loading.load_bundle = cached_load
    w = Workspace(tmp_path_factory.mktemp("bad_inputs"))
    w.outcomes = {}
    try:
        yield w
    finally:
        loading.load_bundle = real_load
        torch.set_num_threads(old)
    report = os.environ.get("LORAKIT_CORPUS_REPORT")
    if report:
        Path(report).write_text(json.dumps(w.outcomes, indent=1, sort_keys=True), encoding="utf-8")


def test_corpus_is_large_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                                            if c.xfail else []) for c in CASES])
def test_bad_input(ws, c: Case):
    d = ws.root / "cases" / c.id
    d.mkdir(parents=True)
    argv = c.make(ws, d)
    rc, text = run_cli(argv)
    outcome = classify(c, rc, text)
    ws.outcomes[c.id] = outcome
    assert not (d / "pwned").exists(), "a pickle ran code"
    assert outcome == ("accepted" if c.accept else "clear"), f"{outcome} (exit {rc}):\n{text[-3000:]}"
