import numpy as np
import pytest

from lorakit.data.captions import (CaptionError, estimate_tokens, find_caption, process_caption, read_caption_file,
                                   tag_frequencies, token_warmup_count)
from lorakit.data.config import SubsetConfig
from lorakit.data.rng import rng_for


def sub(**kw):
    return SubsetConfig(**kw)


def rng(seed=1):
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed])))


CAP = "usu bear, forest, sitting, smile, red scarf"


def test_no_options_is_identity_and_prefix_suffix():
    assert process_caption(CAP, sub(), rng()) == CAP
    assert process_caption("a, b", sub(caption_prefix="pre", caption_suffix="post"), rng()) == "pre a, b post"
    # multi-line caption without wildcards: first line only
    assert process_caption("a, b\nc, d", sub(), rng()) == "a, b"


def test_shuffle_keep_tokens_fixed_seed():
    s = sub(shuffle_caption=True, keep_tokens=1)
    out = process_caption(CAP, s, rng(7))
    tags = [t.strip() for t in CAP.split(",")]
    # expected: first tag fixed, the other four permuted by the first draw of the same generator
    perm = rng(7).permutation(4)
    assert out == ", ".join([tags[0]] + [tags[1:][i] for i in perm])
    assert out.startswith("usu bear, ")
    assert sorted(out.split(", ")) == sorted(tags)
    assert process_caption(CAP, s, rng(7)) == out  # pure function of the generator's seed
    outs = {process_caption(CAP, s, rng(i)) for i in range(30)}
    assert len(outs) > 5 and all(o.startswith("usu bear, ") for o in outs)


def test_keep_tokens_2_and_separator_with_tail():
    s = sub(shuffle_caption=True, keep_tokens=2)
    for i in range(10):
        assert process_caption(CAP, s, rng(i)).startswith("usu bear, forest, ")
    s = sub(shuffle_caption=True, keep_tokens_separator="|||")
    for i in range(10):
        out = process_caption("a, b ||| c, d, e ||| z", s, rng(i))
        parts = out.split(", ")
        assert parts[:2] == ["a", "b"] and parts[-1] == "z" and sorted(parts[2:5]) == ["c", "d", "e"]


def test_caption_dropout_rate_and_every_n_epochs():
    assert process_caption(CAP, sub(caption_dropout_rate=1.0), rng()) == ""
    s = sub(caption_dropout_every_n_epochs=2)
    assert process_caption(CAP, s, rng(), epoch=1) == CAP
    assert process_caption(CAP, s, rng(), epoch=2) == ""
    assert process_caption(CAP, s, rng(), epoch=3) == CAP
    # rate 0.5: the first draw of the generator decides
    s = sub(caption_dropout_rate=0.5)
    for i in range(20):
        dropped = rng(i).random() < 0.5
        assert (process_caption(CAP, s, rng(i)) == "") == dropped


def test_tag_dropout_keeps_fixed_tokens():
    assert process_caption(CAP, sub(caption_tag_dropout_rate=1.0, keep_tokens=1), rng()) == "usu bear"
    s = sub(caption_tag_dropout_rate=0.5)
    g = rng(3)
    draws = g.random(5)
    expected = ", ".join(t for t, d in zip([t.strip() for t in CAP.split(",")], draws) if d >= 0.5)
    assert process_caption(CAP, s, rng(3)) == expected


def test_wildcards_and_escapes():
    s = sub(enable_wildcard=True)
    out = process_caption("{red|blue} ball, {{literal}}", s, rng(5))
    first = ["red", "blue"][int(rng(5).integers(2))]
    assert out == f"{first} ball, {{literal}}"
    seen = {process_caption("{red|blue} ball", s, rng(i)) for i in range(20)}
    assert seen == {"red ball", "blue ball"}
    lines = {process_caption("line one\nline two", s, rng(i)) for i in range(20)}
    assert lines == {"line one", "line two"}


def test_secondary_separator():
    s = sub(secondary_separator=";;;", shuffle_caption=True)
    for i in range(10):
        out = process_caption("a;;;b, c, d", s, rng(i))
        assert "a,b" in out  # kept together while shuffling, then joined with the caption separator


def test_token_warmup():
    assert token_warmup_count(5, 1, 10, 5, 0) == 3  # floor(5 * (5 - 1) / 10) + 1
    assert token_warmup_count(5, 1, 10, 10, 0) is None
    assert token_warmup_count(5, 1, 0.5, 5, 20) == 3  # 0.5 of 20 steps
    s = sub(token_warmup_min=1, token_warmup_step=10)
    assert process_caption("a, b, c, d, e", s, rng(), step=5) == "a, b, c"
    assert process_caption("a, b, c, d, e", s, rng(), step=0) == "a"
    assert process_caption("a, b, c, d, e", s, rng(), step=10) == "a, b, c, d, e"


def test_rng_for_is_pure():
    a = rng_for(42, 10, 3, 4, 0).random(3)
    b = rng_for(42, 10, 3, 4, 0).random(3)
    c = rng_for(42, 10, 3, 5, 0).random(3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_read_caption_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond\n", encoding="utf-8")
    assert read_caption_file(tmp_path / "a.txt") == "first line"
    assert read_caption_file(tmp_path / "a.txt", enable_wildcard=True) == "first line\nsecond"
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode("utf-8"))
    assert read_caption_file(tmp_path / "bom.txt") == "hello"
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(CaptionError, match="empty.txt is empty"):
        read_caption_file(tmp_path / "empty.txt")
    (tmp_path / "sjis.txt").write_bytes("猫".encode("shift_jis"))
    with pytest.raises(CaptionError, match="sjis.txt is not UTF-8"):
        read_caption_file(tmp_path / "sjis.txt")
    # face-crop style names fall back to the caption of the base name
    (tmp_path / "img.txt").write_text("base caption", encoding="utf-8")
    cap, path = find_caption(tmp_path / "img_10_20_30_40.png", ".txt")
    assert cap == "base caption" and path.name == "img.txt"
    assert find_caption(tmp_path / "none.png", ".txt") == (None, None)


def test_tag_frequencies_and_token_estimate():
    f = tag_frequencies(["a, b, a", "b, c"])
    assert f == {"a": 1, "b": 2, "c": 1}
    assert estimate_tokens("1girl, red hair") == 4  # "1girl" "," "red" "hair"
