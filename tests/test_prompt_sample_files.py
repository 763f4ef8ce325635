"""sd-scripts sample prompt files: .txt lines with --options, .toml and .json."""

import json

import pytest

from lorakit.errors import UserError
from lorakit.generate.sample_prompts import SD_SCRIPTS_DEFAULTS, SamplePrompt, load_sample_prompts, parse_prompt_line


def test_full_line():
    sp = parse_prompt_line(
        "1girl, <lora:aru:1>, (id card:1.1) --n lowres, bad hands --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss euler_a"
    )
    assert sp.prompt == "1girl, <lora:aru:1>, (id card:1.1)"
    assert sp.negative_prompt == "lowres, bad hands"
    assert (sp.width, sp.height, sp.seed, sp.scale, sp.steps, sp.sampler) == (512, 768, 42, 7.5, 28, "euler_a")


def test_options_any_order_case_and_clamp():
    sp = parse_prompt_line("a cat --S 5000 --W 640 --g 3.5 --ctr 0.25")
    assert sp.steps == 1000 and sp.width == 640 and sp.guidance_scale == 3.5
    assert sp.extra == {"cfg_trunc_ratio": 0.25}
    assert parse_prompt_line("a --s 0").steps == 1


def test_defaults():
    sp = parse_prompt_line("a cat --w 768").with_defaults(**SD_SCRIPTS_DEFAULTS)
    assert (sp.width, sp.height, sp.steps, sp.scale, sp.seed) == (768, 512, 30, 7.5, None)


@pytest.mark.parametrize("line,match", [("a --w big", "--w"), ("a --zz 3", "unknown option"), (" --w 512", "empty")])
def test_bad_lines(line, match):
    with pytest.raises(UserError, match=match):
        parse_prompt_line(line, where="p.txt line 3")


def test_text_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\n\nfirst --d 1\n   \n  # indented comment\nsecond --n bad\n", encoding="utf-8")
    prompts = load_sample_prompts(f)
    assert [(p.prompt, p.seed, p.negative_prompt, p.index) for p in prompts] == [
        ("first", 1, None, 0),
        ("second", None, "bad", 1),
    ]


def test_bad_line_names_file_and_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("ok\nbad --w x\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"prompts.txt line 2"):
        load_sample_prompts(f)


def test_toml_file(tmp_path):
    f = tmp_path / "prompts.toml"
    f.write_text(
        "[prompt]\nwidth = 512\nheight = 768\nscale = 7\nsample_steps = 28\nnegative_prompt = \"lowres\"\n\n"
        "[[prompt.subset]]\nprompt = \"1girl, aru\"\nseed = 1\n\n"
        "[[prompt.subset]]\nprompt = \"1girl, mika\"\nwidth = 1024\nsample_sampler = \"k_euler_a\"\n",
        encoding="utf-8",
    )
    a, b = load_sample_prompts(f)
    assert (a.prompt, a.width, a.height, a.scale, a.steps, a.seed, a.negative_prompt) == (
        "1girl, aru", 512, 768, 7.0, 28, 1, "lowres")
    assert (b.prompt, b.width, b.sampler, b.index) == ("1girl, mika", 1024, "k_euler_a", 1)


def test_json_file(tmp_path):
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps(["a cat --d 3", {"prompt": "a dog", "sample_steps": 12, "scale": 5}]), encoding="utf-8")
    a, b = load_sample_prompts(f)
    assert (a.prompt, a.seed) == ("a cat", 3)
    assert (b.prompt, b.steps, b.scale, b.index) == ("a dog", 12, 5.0, 1)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("p.json", '{"prompt": "x"}', "list"),
        ("p.json", '[{"prompt": "x", "stepz": 3}]', "unknown key"),
        ("p.json", '[{"prompt": "x", "width": "wide"}]', "width"),
        ("p.json", "[1]", "string or an object"),
        ("p.toml", "[prompt]\nwidth = 3\n", "subset"),
        ("p.toml", "[[prompt.subset]]\nwidth = 3\n", "prompt"),
        ("p.toml", "not toml = = =", "TOML"),
    ],
)
def test_bad_structured_files(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match):
        load_sample_prompts(f)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sample_prompts(tmp_path / "none.txt")
    assert SamplePrompt("x").extra == {}
