import random

import pytest

from lorakit.errors import UserError
from lorakit.generate.xyz_values import (
    apply_prompt_sr,
    find_axis,
    fix_seeds,
    format_label,
    loop_order,
    parse_axis_values,
    split_values,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1,2,3", [1, 2, 3]),
        (" 4 , 5 ", [4, 5]),
        ("1-5", [1, 2, 3, 4, 5]),
        ("1 - 5", [1, 2, 3, 4, 5]),
        ("1-5 (+2)", [1, 3, 5]),
        ("10-20 (+5), 100", [10, 15, 20, 100]),
        ("1-10 [5]", [1, 3, 5, 7, 10]),  # linspace 1, 3.25, 5.5, 7.75, 10 truncated
        ("0-100 [3]", [0, 50, 100]),
        ("5-1 (-1)", [5, 4, 3]),  # A1111: descending ranges stop one short
        ("-1", [-1]),
        ("-5--3", [-5, -4, -3]),
    ],
)
def test_int_values(text, expected):
    assert parse_axis_values(text, "int") == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("7, 7.5", [7.0, 7.5]),
        ("0.5-1.0 [3]", [0.5, 0.75, 1.0]),
        ("0-1 (+0.25)", [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("1-3", [1.0, 2.0, 3.0]),
        ("0.2-1 [5]", [0.2, 0.4, 0.6, 0.8, 1.0]),
    ],
)
def test_float_values(text, expected):
    assert parse_axis_values(text, "float") == pytest.approx(expected)


def test_string_values_csv_quotes():
    assert split_values('a, "b, c", d') == ["a", "b, c", "d"]
    assert split_values('a,"b, c",d') == ["a", "b, c", "d"]
    assert parse_axis_values('<lora:x-000001:1>, "<lora:x-000002:1>, extra"', "str") == [
        "<lora:x-000001:1>",
        "<lora:x-000002:1>, extra",
    ]
    assert parse_axis_values("Euler a, DPM++ 2M Karras", "str") == ["Euler a", "DPM++ 2M Karras"]
    assert split_values("one, two\nthree, four", raw_lines=True) == ["one, two", "three, four"]


@pytest.mark.parametrize("text,kind", [("a,b", "int"), ("x", "float"), ("5-1", "int"), ("", "str")])
def test_bad_values(text, kind):
    with pytest.raises(UserError):
        parse_axis_values(text, kind, axis="Steps")


def test_prompt_sr():
    values = ["<lora:aru-000005:1>", "<lora:aru-000010:1>", "<lora:aru:1>"]
    prompt = "<lora:aru-000005:1>1girl, <lora:aru-000005:1>"
    neg = "lowres"
    assert apply_prompt_sr(prompt, neg, values, values[0]) == (prompt, neg)
    assert apply_prompt_sr(prompt, neg, values, values[1]) == ("<lora:aru-000010:1>1girl, <lora:aru-000010:1>", neg)
    assert apply_prompt_sr("a dog", "cat ears", ["cat", "fox"], "fox") == ("a dog", "fox ears")
    with pytest.raises(UserError, match="did not find"):
        apply_prompt_sr("a dog", "", ["cat", "fox"], "fox")


def test_fix_seeds():
    rng = random.Random(5)
    ref = random.Random(5)
    out = fix_seeds([1, -1, "", 7], rng)
    assert out[0] == 1 and out[3] == 7
    assert out[1] == ref.randrange(4294967294) and out[2] == ref.randrange(4294967294)


def test_labels_and_axes():
    assert format_label(find_axis("Steps"), 20) == "Steps: 20"
    assert format_label(find_axis("cfg scale"), 0.1 + 0.2) == "CFG Scale: 0.3"
    assert format_label(find_axis("Prompt S/R"), "<lora:a:1>") == "<lora:a:1>"
    assert format_label(find_axis("Sampler"), "Euler a") == "Euler a"
    assert format_label(find_axis("LoRA weight"), 0.7) == "LoRA weight: 0.7"
    assert find_axis("LoRA file").value_type == "str"
    assert find_axis("Seed").value_type == "int"
    with pytest.raises(UserError, match="Axes"):
        find_axis("Colour")


def test_loop_order_puts_costly_axis_outermost():
    ckpt = find_axis("Checkpoint name").cost
    assert loop_order(ckpt, 0, 0) == ("x", "z")  # ties fall to z as in A1111
    assert loop_order(0, ckpt, 0) == ("y", "z")
    assert loop_order(0.3, ckpt, 0) == ("y", "x")
    assert loop_order(0, 0, 0) == ("z", "y")
    assert loop_order(0.3, 0, ckpt) == ("z", "x")
