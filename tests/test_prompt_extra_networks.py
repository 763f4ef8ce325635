import pytest

from lorakit.errors import UserError
from lorakit.generate.extra_networks import LoraTag, hash_alias, parse_extra_networks, strip_extra_networks


def one(prompt):
    text, tags = parse_extra_networks(prompt)
    assert len(tags) == 1
    return tags[0]


def test_tags_are_removed_and_stack_in_order():
    text, tags = parse_extra_networks("<lora:m4_carbine:0.8><lora:aru:1>1girl, (id card:1.1)")
    assert text == "1girl, (id card:1.1)"
    assert [(t.name, t.te, t.unet) for t in tags] == [("m4_carbine", 0.8, 0.8), ("aru", 1.0, 1.0)]


@pytest.mark.parametrize(
    "tag,expected",
    [
        ("<lora:a>", dict(name="a", te=1.0, unet=1.0, dyn=None)),
        ("<lora:a:0.7>", dict(te=0.7, unet=0.7)),
        ("<lora:a:-0.5>", dict(te=-0.5, unet=-0.5)),
        ("<lora:a:0.5:1.0>", dict(te=0.5, unet=1.0, dyn=None)),
        ("<lora:a:0.5:1:8>", dict(te=0.5, unet=1.0, dyn=8)),
        ("<lora:a:te=0.5:unet=1:dyn=8>", dict(te=0.5, unet=1.0, dyn=8)),
        ("<lora:a:1:unet=0.2>", dict(te=1.0, unet=0.2)),
        ("<lora:a:te=0.3>", dict(te=0.3, unet=0.3)),  # unet follows te
        ("<lyco:a:0.6>", dict(kind="lyco", te=0.6, unet=0.6)),
        ("<lora:SakuraScenery_v1.3:1:NCNF>", dict(name="SakuraScenery_v1.3", te=1.0, unet=1.0, lbw="NCNF")),
        ("<lora:m4_carbine:0.8:NCNF>", dict(te=0.8, unet=0.8, lbw="NCNF", lbwe=None)),
        ("<lora:a:0.8:NCNF:ATTNDEEPOFF>", dict(lbw="NCNF", lbwe="ATTNDEEPOFF")),
        ("<lora:a:1:lbw=OUTD>", dict(lbw="OUTD")),
        ("<lora:a:1:lbw=1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0>", dict(lbw="1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0")),
        ("<lora:a:1:lbw=ALL:lbwe=X1:start=5:stop=20:x=0.5>", dict(lbw="ALL", lbwe="X1", start=5, stop=20, x=0.5)),
        ("<lora:a:1:step=3-12>", dict(start=3, stop=12)),
    ],
)
def test_tag_forms(tag, expected):
    t = one(f"x {tag} y")
    for k, v in expected.items():
        assert getattr(t, k) == v, k
    assert t.raw == tag


def test_needs_unmerged():
    assert one("<lora:a:1:start=2>").needs_unmerged
    assert not one("<lora:a:1>").needs_unmerged


@pytest.mark.parametrize(
    "tag,match",
    [
        ("<lora:a:abc:1>", "not a number"),
        ("<lora:a:1:1:x>", "whole number"),
        ("<lora:a:1:1:8:9>", "too many"),
        ("<lora:a:foo=1>", "unknown argument"),
        ("<lora::1>", "name is missing"),
        ("<lora:a:1:NCNF:0.5>", "elemental"),
        ("<lora:a:1:NCNF:lbw=ALL>", "twice"),
        ("<lora:a:1:dyn=0>", "at least 1"),
        ("<lora:a:1:start=10:stop=5>", "after start"),
        ("<lora:a:1:step=abc>", "step="),
        ("<lora:a:nan>", "finite"),
        ("<hypernet:a:1>", "not supported"),
    ],
)
def test_malformed_tags_raise_user_error_naming_the_tag(tag, match):
    with pytest.raises(UserError, match=match) as ei:
        parse_extra_networks(f"1girl {tag}")
    assert tag.split(":")[0] in str(ei.value)


def test_strip_and_alias():
    assert strip_extra_networks("a <lora:x:1> b <hypernet:y>") == "a  b "
    assert hash_alias("a,b:c") == "abc"
    assert LoraTag(name="n").unet == 1.0
