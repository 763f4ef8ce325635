"""75-token chunking, comma backtracking, BREAK, padding and the "Original" emphasis maths (fake tokenizer)."""

import pytest
import torch

from lorakit.generate.prompt_parser import (
    PromptChunk,
    apply_emphasis,
    empty_chunk,
    encode_chunks,
    pad_chunk_lists,
    pad_cond_uncond,
    tokenize_prompt,
)

BOS, EOS, COMMA, PAD0 = 49406, 49407, 267, 0
VOCAB: dict[str, int] = {}


def tok(text):
    """Fake tokenizer: whitespace-separated words, commas as their own token."""
    ids = []
    for w in text.replace(",", " , ").split():
        ids.append(COMMA if w == "," else VOCAB.setdefault(w, 1000 + len(VOCAB)))
    return ids


def ids(words):
    return [COMMA if w == "," else VOCAB.setdefault(w, 1000 + len(VOCAB)) for w in words]


def chunks_of(text, **kw):
    kw = {"comma_id": COMMA, "bos_id": BOS, "eos_id": EOS, **kw}
    return tokenize_prompt(text, tok, **kw)


def full(body, pad=EOS):
    """Expected 77 ids: BOS, body, EOS, padding."""
    return [BOS] + body + [EOS] + [pad] * (75 - len(body))


def test_short_prompt_one_chunk():
    chunks, count = chunks_of("a b")
    assert count == 2
    assert len(chunks) == 1
    assert chunks[0].tokens == full(ids(["a", "b"]))
    assert chunks[0].multipliers == [1.0] * 77


def test_weights_follow_tokens():
    chunks, _ = chunks_of("(a) [b] c (d e:1.5)")
    m = chunks[0].multipliers
    assert chunks[0].tokens[:7] == [BOS] + ids(["a", "b", "c", "d", "e"]) + [EOS]
    assert m[:7] == pytest.approx([1.0, 1.1, 1 / 1.1, 1.0, 1.5, 1.5, 1.0])
    assert m[7:] == [1.0] * 70


def test_long_prompt_splits_at_75():
    words = [f"w{i}" for i in range(80)]
    chunks, count = chunks_of(" ".join(words))
    assert count == 80
    assert [c.tokens for c in chunks] == [full(ids(words[:75])), full(ids(words[75:]))]


def test_exactly_75_tokens_is_one_chunk():
    words = [f"v{i}" for i in range(75)]
    chunks, count = chunks_of(" ".join(words))
    assert count == 75
    assert [c.tokens for c in chunks] == [[BOS] + ids(words) + [EOS]]


def test_comma_backtracking_moves_text_after_last_comma():
    head = [f"h{i}" for i in range(70)]
    tail = [f"t{i}" for i in range(10)]
    chunks, _ = chunks_of(" ".join(head) + ", " + " ".join(tail))
    # the comma is 5 tokens back when the chunk fills: everything after it goes to chunk 2
    assert [c.tokens for c in chunks] == [full(ids(head + [","])), full(ids(tail))]


def test_no_backtracking_when_comma_is_too_far_back():
    head = [f"p{i}" for i in range(50)]
    tail = [f"q{i}" for i in range(40)]
    chunks, _ = chunks_of(" ".join(head) + ", " + " ".join(tail))
    allw = head + [","] + tail
    assert [c.tokens for c in chunks] == [full(ids(allw[:75])), full(ids(allw[75:]))]
    # with a wider window (A1111 setting) the same prompt backtracks
    chunks, _ = chunks_of(" ".join(head) + ", " + " ".join(tail), comma_backtrack=30)
    assert [c.tokens for c in chunks] == [full(ids(head + [","])), full(ids(tail))]


def test_comma_as_76th_token_starts_next_chunk():
    words = [f"r{i}" for i in range(75)]
    chunks, _ = chunks_of(" ".join(words) + ", z")
    assert [c.tokens for c in chunks] == [[BOS] + ids(words) + [EOS], full(ids([",", "z"]))]


def test_backtracked_tokens_keep_their_weights():
    head = [f"s{i}" for i in range(72)]
    chunks, _ = chunks_of(" ".join(head) + ", (x y z w:1.3)")
    assert chunks[1].tokens == full(ids(["x", "y", "z", "w"]))
    assert chunks[1].multipliers[1:5] == [1.3] * 4


def test_break_pads_chunk():
    chunks, _ = chunks_of("a BREAK b")
    assert [c.tokens for c in chunks] == [full(ids(["a"])), full(ids(["b"]))]
    chunks, _ = chunks_of("a BREAK")
    assert [c.tokens for c in chunks] == [full(ids(["a"]))]
    chunks, _ = chunks_of("BREAK a")
    assert [c.tokens for c in chunks] == [full([]), full(ids(["a"]))]


def test_break_inside_brackets_is_a_word():
    chunks, _ = chunks_of("(a BREAK b)")
    assert len(chunks) == 1
    assert chunks[0].tokens[1:4] == ids(["a", "BREAK", "b"])


def test_pad_id_after_first_eos():
    chunks, _ = chunks_of("a b", pad_id=PAD0)
    assert chunks[0].tokens == full(ids(["a", "b"]), pad=PAD0)


def test_empty_prompt_equals_empty_chunk():
    chunks, count = chunks_of("")
    assert count == 0
    assert [c.tokens for c in chunks] == [empty_chunk(BOS, EOS).tokens]
    assert empty_chunk(BOS, EOS).tokens == [BOS] + [EOS] * 76
    assert empty_chunk(BOS, EOS, PAD0).tokens == [BOS, EOS] + [PAD0] * 75


def test_emphasis_none_keeps_brackets_as_text():
    chunks, _ = chunks_of("(a) BREAK b", emphasis="None")
    assert len(chunks) == 1
    assert chunks[0].tokens[1:4] == ids(["(a)", "BREAK", "b"])
    assert chunks[0].multipliers == [1.0] * 77


def test_pad_chunk_lists():
    a, _ = chunks_of("a")
    b, _ = chunks_of("x BREAK y BREAK z")
    e = empty_chunk(BOS, EOS)
    pa, pb = pad_chunk_lists(a, b, e)
    assert len(pa) == len(pb) == 3
    assert pa[0].tokens == a[0].tokens
    assert pa[1].tokens == pa[2].tokens == e.tokens
    assert pb == b


def test_original_emphasis_keeps_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 8, generator=g, dtype=torch.float64) + 0.3
    m = torch.rand(2, 77, generator=g, dtype=torch.float64) + 0.5
    out = apply_emphasis(z, m, "Original")
    weighted = z * m[..., None]
    expected = weighted * (z.mean() / weighted.mean())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.mean(), z.mean())
    torch.testing.assert_close(apply_emphasis(z, m, "No norm"), weighted)
    assert apply_emphasis(z, m, "Ignore") is z
    torch.testing.assert_close(apply_emphasis(z, torch.ones(2, 77, dtype=torch.float64)), z)


def test_encode_chunks_concatenates_weighted_chunks():
    table = torch.randn(50000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def encode(x):
        return table[x]

    chunks, _ = chunks_of("(a:2) b BREAK c")
    z = encode_chunks(chunks, encode)
    assert z.shape == (1, 154, 4)
    first = table[torch.tensor([chunks[0].tokens])]
    w = torch.tensor([chunks[0].multipliers], dtype=torch.float64)
    exp = first * w[..., None]
    exp = exp * (first.mean() / exp.mean())
    torch.testing.assert_close(z[:, :77], exp)
    torch.testing.assert_close(z[:, 77:], table[torch.tensor([chunks[1].tokens])])


def test_pad_cond_uncond():
    empty = torch.full((1, 77, 3), 7.0)
    cond = torch.zeros(2, 231, 3)
    uncond = torch.ones(2, 77, 3)
    c, u = pad_cond_uncond(cond, uncond, empty)
    assert c is cond and u.shape == (2, 231, 3)
    assert torch.equal(u[:, :77], uncond) and torch.all(u[:, 77:] == 7.0)
    u2, c2 = pad_cond_uncond(uncond, cond, empty)
    assert u2.shape == (2, 231, 3) and c2 is cond


def test_prompt_chunk_is_plain_data():
    c = PromptChunk([1, 2], [1.0, 1.0])
    assert c == PromptChunk([1, 2], [1.0, 1.0])
