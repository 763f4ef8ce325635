import pytest
from PIL import Image

from lorakit.generate.infotext import (
    GenerationParams,
    format_infotext,
    parse_infotext,
    quote,
    read_infotext,
    save_png_with_infotext,
    unquote,
)


def full_params():
    return GenerationParams(
        prompt="<lora:m4_carbine:0.8:NCNF>1girl, mika \\(blue archive\\), (id card:1.1)",
        negative_prompt="lowres, bad hands",
        steps=28,
        sampler="Euler a",
        cfg_scale=7.0,
        seed=42,
        width=512,
        height=768,
        model_hash="1a2b3c4d5e",
        model="nai_full",
        denoising_strength=0.55,
        clip_skip=2,
        hires_upscale=2.0,
        hires_steps=14,
        hires_upscaler="Latent",
        lora_hashes={"m4_carbine": "1a2b3c4d5e6f", "aru": "0f0f0f0f0f0f"},
        version="lorakit 0.1.0",
    )


def test_format_matches_a1111_layout():
    text = format_infotext(full_params())
    assert text == (
        "<lora:m4_carbine:0.8:NCNF>1girl, mika \\(blue archive\\), (id card:1.1)\n"
        "Negative prompt: lowres, bad hands\n"
        "Steps: 28, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: 1a2b3c4d5e, "
        "Model: nai_full, Denoising strength: 0.55, Clip skip: 2, Hires upscale: 2, Hires steps: 14, "
        'Hires upscaler: Latent, Lora hashes: "m4_carbine: 1a2b3c4d5e6f, aru: 0f0f0f0f0f0f", '
        "Version: lorakit 0.1.0"
    )


def test_round_trip():
    p = full_params()
    back = parse_infotext(format_infotext(p))
    assert back == p


def test_round_trip_multiline_and_quotes():
    p = GenerationParams(
        prompt="line one,\nline (two:1.2)",
        negative_prompt="neg\nmore",
        steps=20,
        sampler="DPM++ 2M",
        schedule_type="Karras",
        cfg_scale=7.5,
        seed=1,
        width=512,
        height=512,
        model='odd, "name": x',
        extra={"Note": 'has "quotes", commas: and colons', "Script": "X/Y/Z plot"},
    )
    text = format_infotext(p)
    assert 'Model: "odd, \\"name\\": x"' in text
    assert parse_infotext(text) == p


def test_no_negative_and_clip_skip_default():
    p = GenerationParams(prompt="a cat", steps=20, sampler="Euler", cfg_scale=7, seed=3, width=512, height=512)
    text = format_infotext(p)
    assert text == "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 512x512"
    back = parse_infotext(text)
    assert back.clip_skip == 1 and back.negative_prompt == ""
    assert back == p


def test_parse_a1111_text():
    text = (
        "masterpiece, 1girl\n"
        "Negative prompt: (worst quality:1.4)\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, "
        "Model hash: 45dee52b, Model: anything, VAE hash: 735e4c3a44, Clip skip: 2, "
        'Lora hashes: "aru: 1a2b3c4d5e6f", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
    )
    p = parse_infotext(text)
    assert p.prompt == "masterpiece, 1girl"
    assert p.negative_prompt == "(worst quality:1.4)"
    assert (p.steps, p.sampler, p.schedule_type, p.cfg_scale, p.seed) == (20, "DPM++ 2M", "Karras", 7.0, 965400086)
    assert (p.width, p.height, p.clip_skip) == (512, 768, 2)
    assert p.lora_hashes == {"aru": "1a2b3c4d5e6f"}
    assert p.extra == {"VAE hash": "735e4c3a44", "TI hashes": "easynegative: c74b4e810b03"}
    assert p.version == "v1.10.1"


def test_short_last_line_belongs_to_prompt():
    p = parse_infotext("a photo\nof: a cat, sitting")
    assert p.prompt == "a photo\nof: a cat, sitting"
    assert p.steps is None


def test_quote_rules():
    assert quote("plain") == "plain"
    assert quote("a, b") == '"a, b"'
    assert quote("a: b") == '"a: b"'
    assert quote("日本語, x") == '"日本語, x"'
    assert unquote('"a, b"') == "a, b"
    assert unquote("not quoted") == "not quoted"


@pytest.mark.parametrize("prompt", ["a cat", "猫耳の少女, (笑顔:1.2)"])
def test_png_chunk_round_trip(tmp_path, prompt):
    p = full_params()
    p.prompt = prompt
    text = format_infotext(p)
    path = tmp_path / "out.png"
    save_png_with_infotext(Image.new("RGB", (8, 8), (10, 20, 30)), path, text)
    assert read_infotext(path) == text
    with Image.open(path) as im:
        assert read_infotext(im) == text
        assert im.size == (8, 8)
    assert parse_infotext(read_infotext(path)) == p
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert read_infotext(plain) is None


def test_hashes(tmp_path):
    import hashlib

    import torch
    from safetensors.torch import save_file

    from lorakit.generate.infotext import lora_short_hash, model_short_hash

    f = tmp_path / "aru.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(f), metadata={"ss_output_name": "aru"})
    data = f.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert lora_short_hash(f) == hashlib.sha256(data[8 + header_len:]).hexdigest()[:12]
    assert model_short_hash(f) == hashlib.sha256(data).hexdigest()[:10]
    # metadata edits do not change the LoRA hash
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(f), metadata={"ss_output_name": "renamed, longer"})
    assert lora_short_hash(f) == hashlib.sha256(data[8 + header_len:]).hexdigest()[:12]
