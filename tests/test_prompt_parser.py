"""Table-driven tests of the A1111 prompt grammar; expectations written from the rules, not from the code."""

import pytest

from lorakit.errors import UserError
from lorakit.generate.prompt_parser import (
    get_prompt_schedule,
    get_prompt_schedules,
    parse_prompt_attention,
    split_and,
    text_at_step,
)

UP = 1.1
DOWN = 1 / 1.1

ATTENTION_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("", [("", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", UP), (" word", 1.0)]),
    ("((a))", [("a", UP**2)]),
    ("(((a)))", [("a", UP**3)]),
    ("[a]", [("a", DOWN)]),
    ("[[a]]", [("a", DOWN**2)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),
    ("(a:+2)", [("a", 2.0)]),
    ("((a:1.5))", [("a", 1.5 * UP)]),
    ("[(a:2)]", [("a", 2 * DOWN)]),
    ("(a [b])", [("a ", UP), ("b", UP * DOWN)]),
    # unclosed brackets run to the end of the prompt
    ("(unbalanced", [("unbalanced", UP)]),
    ("[unbalanced", [("unbalanced", DOWN)]),
    ("a (b [c", [("a ", 1.0), ("b ", UP), ("c", UP * DOWN)]),
    ("(a:1.2", [("a:1.2", UP)]),
    # closing brackets with nothing open are text
    ("a) b] c", [("a) b] c", 1.0)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),
    # a colon that is not a weight is text
    ("a:b", [("a:b", 1.0)]),
    ("(a:b)", [("a:b", UP)]),
    # escapes
    (r"mika \(blue archive\)", [("mika (blue archive)", 1.0)]),
    (r"\[x\] \\ y", [("[x] \\ y", 1.0)]),
    (r"(mika \(blue archive\):1.2)", [("mika (blue archive)", 1.2)]),
    (r"a\b", [("ab", 1.0)]),  # a lone backslash disappears
    # neighbouring runs with the same weight merge
    ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),
    ("(a) (b)", [("a", UP), (" ", 1.0), ("b", UP)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("(x:1.2) BREAK (y)", [("x", 1.2), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("y", UP)]),
    # A1111's documented example: the last '(' is never closed, so everything after 'a ' gets another x1.1
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.3 * UP * UP),
            (" ", UP),
            ("on", UP * DOWN),
            (" a ", UP),
            ("hill", 0.5 * UP),
            (", sun, ", UP),
            ("sky", UP**4),
            (".", UP),
        ],
    ),
]


@pytest.mark.parametrize("text,expected", ATTENTION_CASES)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_bad_weight_is_user_error():
    with pytest.raises(UserError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


def alternate(values, steps):
    return [(i, values[(i - 1) % len(values)]) for i in range(1, steps + 1)]


SCHEDULE_CASES = [
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3 ]", 10, [(3, "a "), (10, "a b")]),
    ("[a:b:5]", 10, [(5, "a"), (10, "b")]),
    ("[a:b:0.5]", 10, [(5, "a"), (10, "b")]),
    ("[a:b:.25]", 10, [(2, "a"), (10, "b")]),  # 2.5 steps truncated
    ("[a::5] c", 10, [(5, "a c"), (10, " c")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("[a:b:20]", 10, [(10, "a")]),  # past the end: never switches
    ("[a:b:0]", 10, [(10, "b")]),  # step 0: switched from the start
    ("[a:b:1.0]", 10, [(10, "a")]),  # '.' makes it a fraction: all 10 steps
    ("[a:b:1]", 10, [(1, "a"), (10, "b")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("[(a:1.2):b:1]", 10, [(1, "(a:1.2)"), (10, "b")]),
    ("(a:[b:c:2])", 3, [(2, "(a:b)"), (3, "(a:c)")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[a|b]", 4, alternate(["a", "b"], 4)),
    ("[a|b|c] x", 4, alternate(["a x", "b x", "c x"], 4)),
    ("[fe|]male", 4, alternate(["female", "male"], 4)),
    ("[[a|b]:c:2]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "c")]),
    # not scheduling syntax: kept as text for the emphasis parser
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("[a:b]", 10, [(10, "[a:b]")]),
    ("[a:b:c]", 10, [(10, "[a:b:c]")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    (r"\[a:b:3\]", 10, [(10, r"\[a:b:3\]")]),
    # a '|' outside [..|..] makes the whole prompt unparsable: used unchanged, no editing at all
    ("a | b [c:3]", 10, [(10, "a | b [c:3]")]),
]


@pytest.mark.parametrize("prompt,steps,expected", SCHEDULE_CASES)
def test_prompt_schedule(prompt, steps, expected):
    assert get_prompt_schedule(prompt, steps) == expected


def test_hires_schedule_offsets():
    # second pass of highres fix: integers count on from the base steps, fractions from 1.0
    assert get_prompt_schedule("[a:b:15]", 10, hires_steps=10) == [(5, "a"), (10, "b")]
    assert get_prompt_schedule("[a:b:1.5]", 10, hires_steps=10) == [(5, "a"), (10, "b")]
    assert get_prompt_schedule("[a:b:0.5]", 10, hires_steps=10) == [(10, "b")]
    assert get_prompt_schedule("[a:b:0.5]", 10, hires_steps=10, old_scheduling=True) == [(5, "a"), (10, "b")]


def test_schedules_list_and_text_at_step():
    scheds = get_prompt_schedules(["x", "[a:b:2]", "x"], 4)
    assert scheds[0] == scheds[2] == [(4, "x")]
    assert [text_at_step(scheds[1], s) for s in range(1, 5)] == ["a", "a", "b", "b"]


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("a AND b", [("a", 1.0), (" b", 1.0)]),
        ("a :1.5 AND b:0.5", [("a", 1.5), (" b", 0.5)]),
        ("a AND b : -0.7", [("a", 1.0), (" b", -0.7)]),
        ("ANDROID and ANDY", [("ANDROID and ANDY", 1.0)]),
        ("(x:1.2) AND y", [("(x:1.2)", 1.0), (" y", 1.0)]),
    ],
)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


def test_prepare_prompt_order():
    from lorakit.generate.prompt_parser import prepare_prompt

    pp = prepare_prompt("<lora:aru:0.8>1girl, [smile:frown:2] AND <lora:m4:1>gun :0.5", 4)
    assert [t.name for t in pp.loras] == ["aru", "m4"]
    assert pp.text == "1girl, [smile:frown:2] AND gun :0.5"
    assert pp.parts == [(1.0, [(2, "1girl, smile"), (4, "1girl, frown")]), (0.5, [(4, " gun")])]
    assert pp.texts() == ["1girl, smile", "1girl, frown", " gun"]
    neg = prepare_prompt("<lora:x:1> lowres AND bad", 4, negative=True)
    assert neg.loras == [] and neg.parts == [(1.0, [(4, "<lora:x:1> lowres AND bad")])]
