"""`lorakit generate` end to end on a tiny checkpoint file: PNG parameters text, file names, --from_png reproduction,
highres fix, prompt files, resumable regularization images, and `lorakit grid`."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lorakit.cli.main import main
from lorakit.generate.infotext import parse_infotext, read_infotext
from lorakit.models.saving import save_single_file
from lorakit.models.tiny import tiny_bundle

torch.set_num_threads(1)  # tiny models: extra threads only fight the other jobs on a shared 2-core machine


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    bundle = tiny_bundle("sd1", seed=2)
    model = root / "tinymodel.safetensors"
    save_single_file(bundle, model)
    loras = root / "loras"
    loras.mkdir()
    g = torch.Generator().manual_seed(0)
    m = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    w = bundle.unet.get_submodule(m).weight
    name = "lora_unet_" + m.replace(".", "_")
    save_file({f"{name}.lora_down.weight": torch.randn(2, w.shape[1], generator=g),
               f"{name}.lora_up.weight": torch.randn(w.shape[0], 2, generator=g),
               f"{name}.alpha": torch.tensor(1.0)}, str(loras / "x.safetensors"),
              metadata={"ss_base_model_version": "sd_v1"})
    return root, model, loras


def _args(model, **kw):
    out = ["--model", str(model), "--steps", "2", "--width", "64", "--height", "64", "--no_hash"]
    for k, v in kw.items():
        out += [f"--{k}", str(v)]
    return out


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_writes_parameters_and_from_png_reproduces(env):
    root, model, loras = env
    out1, out2 = root / "o1", root / "o2"
    rc = main(["generate", *_args(model, prompt="a (cat:1.1), <lora:x:0.7>", negative_prompt="bad", seed=42,
                                   sampler="DPM++ 2M Karras", cfg_scale=6.5, clip_skip=2, lora_dir=loras,
                                   outdir=out1, batch_size=2)])
    assert rc == 0
    files = sorted(p.name for p in out1.iterdir())
    assert files == ["00000-42.png", "00001-43.png"]
    text = read_infotext(out1 / "00001-43.png")
    p = parse_infotext(text)
    assert p.prompt == "a (cat:1.1), <lora:x:0.7>" and p.negative_prompt == "bad"
    assert (p.steps, p.sampler, p.cfg_scale, p.seed, p.width, p.height, p.clip_skip) == \
        (2, "DPM++ 2M Karras", 6.5, 43, 64, 64, 2)
    assert p.model == "tinymodel" and re.fullmatch(r"[0-9a-f]{12}", p.lora_hashes["x"])

    rc = main(["generate", "--model", str(model), "--no_hash", "--from_png", str(out1 / "00001-43.png"),
               "--lora_dir", str(loras), "--outdir", str(out2)])
    assert rc == 0
    (again,) = list(out2.iterdir())
    assert again.name == "00000-43.png"
    # the original was image 2 of a batch: batched maths may round differently by one level, nothing more
    diff = np.abs(pixels(again).astype(int) - pixels(out1 / "00001-43.png").astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05
    # a second run in the same folder does not overwrite: the counter moves on
    assert main(["generate", "--model", str(model), "--no_hash", "--from_png", str(again), "--lora_dir", str(loras),
                 "--outdir", str(out2)]) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["00000-43.png", "00001-43.png"]


def test_hires_fix_from_png_and_missing_lora(env, capsys):
    root, model, loras = env
    out = root / "hr"
    assert main(["generate", *_args(model, prompt="a dog", seed=5, outdir=out, hr_scale=1.5, hr_steps=2,
                                    denoising_strength=0.6), "--hires_fix"]) == 0
    (f,) = list(out.iterdir())
    assert Image.open(f).size == (96, 96)
    p = parse_infotext(read_infotext(f))
    assert (p.hires_upscale, p.hires_steps, p.denoising_strength) == (1.5, 2, 0.6)
    assert main(["generate", "--model", str(model), "--no_hash", "--from_png", str(f), "--outdir", str(out)]) == 0
    a, b = sorted(out.iterdir())
    np.testing.assert_array_equal(pixels(a), pixels(b))  # made alone: reproduced exactly

    assert main(["generate", *_args(model, prompt="a <lora:nothere:1>", lora_dir=loras, outdir=out)]) == 2
    assert "nothere" in capsys.readouterr().err


def test_reg_images_resume_and_prompt_file(env):
    root, model, _ = env
    reg = root / "reg" / "1_bear"
    assert main(["generate", *_args(model, prompt="bear", seed=100, outdir=reg, count=3)]) == 0
    names = sorted(p.name for p in reg.glob("*.png"))
    assert names == ["00000-100.png", "00001-101.png", "00002-102.png"]
    before = pixels(reg / "00001-101.png")
    (reg / "00001-101.png").unlink()
    # resumed without --seed: the first run's seed is kept, the missing image comes back identical
    assert main(["generate", *_args(model, prompt="bear", outdir=reg, count=4, batch_size=2)]) == 0
    assert sorted(p.name for p in reg.glob("*.png")) == names + ["00003-103.png"]
    np.testing.assert_array_equal(pixels(reg / "00001-101.png"), before)
    assert main(["generate", *_args(model, prompt="cat", outdir=reg, count=4)]) == 2  # other class: refused

    pf = root / "prompts.txt"
    pf.write_text("# previews\na cat --n bad --w 64 --h 96 --d 7 --l 5 --s 2\n\na dog --d 8 --ss euler\n")
    out = root / "pf"
    assert main(["generate", *_args(model, prompt_file=pf, outdir=out)]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00000-7.png", "00001-8.png"]
    assert Image.open(files[0]).size == (64, 96)
    p = parse_infotext(read_infotext(files[1]))
    assert (p.prompt, p.sampler, p.seed) == ("a dog", "Euler", 8)


def test_grid_command(env):
    root, model, loras = env
    out = root / "grid"
    assert main(["grid", *_args(model, prompt="a cat <lora:x:1>", lora_dir=loras, outdir=out, seed=3,
                                x_type="LoRA weight", x_values="0,1", y_type="Steps", y_values="1-2")]) == 0
    (f,) = list(out.iterdir())
    assert f.name == "00000-grid.png"
    w, h = Image.open(f).size
    assert w > 128 and h > 128


def test_generate_in_bf16_on_a_cpu_without_it_warns_before_loading(env, capsys, monkeypatch):
    """utils.cpu: --dtype bf16 where the CPU has no bf16 arithmetic names the measured slowdown first."""
    from lorakit.utils import cpu

    root, model, _ = env
    monkeypatch.setattr(cpu, "native_half", lambda dtype: dtype == torch.float32)
    assert main(["generate", *_args(model, prompt="a cat", seed=1, outdir=root / "bf", dtype="bf16")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: --dtype bf16 on this CPU .* [0-9]+x slower than fp32", err)
    assert err.index("warning: --dtype bf16") < err.index("loading ")
    monkeypatch.setattr(cpu, "native_half", lambda dtype: True)
    assert main(["generate", *_args(model, prompt="a cat", seed=1, outdir=root / "bf2", dtype="bf16")]) == 0
    assert "warning: --dtype" not in capsys.readouterr().err
