"""AUTOMATIC1111 prompt language: emphasis, BREAK, prompt editing, alternation, AND, and 75-token chunking.

Behaviour follows A1111 modules/prompt_parser.py and modules/sd_hijack_clip.py (facts, not code):

* ``parse_prompt_attention`` turns one prompt text into ``(text, weight)`` pairs: ``(x)`` x1.1, ``[x]`` /1.1,
  ``(x:w)`` times w, nesting multiplies, unclosed brackets run to the end, ``\\( \\) \\[ \\] \\\\`` are literal,
  ``BREAK`` becomes ``("BREAK", -1.0)``, neighbouring runs of equal weight merge.
* ``get_prompt_schedule`` expands prompt editing ``[from:to:when]`` / ``[to:when]`` / ``[from::when]`` and
  alternation ``[a|b]`` into ``(end_step, text)`` pairs. A prompt the grammar cannot parse is used as is.
* ``split_and`` splits composable-diffusion sub-prompts ``a :1.2 AND b``.
* ``tokenize_prompt`` builds the 77-token chunks with comma backtracking and per-token weights;
  ``apply_emphasis`` is the "Original" weighting maths (torch, imported lazily).

Everything here is model-free; callers pass a tokenize function and token ids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from lorakit.errors import UserError

__all__ = [
    "parse_prompt_attention",
    "get_prompt_schedule",
    "get_prompt_schedules",
    "split_and",
    "PromptChunk",
    "tokenize_prompt",
    "empty_chunk",
    "pad_chunk_lists",
    "apply_emphasis",
    "encode_chunks",
    "pad_cond_uncond",
    "EMPHASIS_MODES",
    "text_at_step",
    "target_token_count",
    "PreparedPrompt",
    "prepare_prompt",
]

ROUND_MULT = 1.1
SQUARE_MULT = 1 / 1.1
BREAK_WEIGHT = -1.0

# ---------------------------------------------------------------------------------------------------------------
# Emphasis: parse_prompt_attention
# ---------------------------------------------------------------------------------------------------------------

# A BREAK keyword inside plain text, eating the whitespace around it (A1111 splits text runs with this pattern).
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
# "(text:1.2)" closing part: ':' weight ')' with optional spaces; the weight chars are [.\d] like A1111.
_WEIGHT_CLOSE_RE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_SPECIAL = "\\()[]:"


def _split_break(text: str, out: list[list]) -> None:
    parts = _BREAK_RE.split(text)
    for i, part in enumerate(parts):
        if i > 0:
            out.append(["BREAK", BREAK_WEIGHT])
        out.append([part, 1.0])


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(text, weight)`` pairs as A1111's parser does.

    ``BREAK`` comes out as ``("BREAK", -1.0)``; an empty prompt gives ``[("", 1.0)]``.
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, mult: float) -> None:
        # Weights are multiplied in closing order, so equal-looking weights compare equal exactly as in A1111.
        for k in range(start, len(res)):
            res[k][1] *= mult

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt in ("(", ")", "[", "]", "\\"):
                res.append([nxt, 1.0])
                i += 2
            else:
                # A lone backslash is dropped; the next character is read normally.
                res.append(["", 1.0])
                i += 1
        elif c == "(":
            round_open.append(len(res))
            i += 1
        elif c == "[":
            square_open.append(len(res))
            i += 1
        elif c == ":":
            m = _WEIGHT_CLOSE_RE.match(text, i)
            if m is not None and round_open:
                try:
                    w = float(m.group(1))
                except ValueError:
                    raise UserError(
                        f"Prompt weight {m.group(1)!r} in {text[max(0, i - 30):m.end()]!r} is not a number; "
                        "write emphasis as (text:1.2)."
                    ) from None
                scale_from(round_open.pop(), w)
                i = m.end()
            elif m is not None:
                # No open '(' : the whole ':1.2)' is plain text.
                _split_break(m.group(0), res)
                i = m.end()
            else:
                res.append([":", 1.0])
                i += 1
        elif c == ")":
            if round_open:
                scale_from(round_open.pop(), ROUND_MULT)
            else:
                res.append([")", 1.0])
            i += 1
        elif c == "]":
            if square_open:
                scale_from(square_open.pop(), SQUARE_MULT)
            else:
                res.append(["]", 1.0])
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIAL:
                j += 1
            _split_break(text[i:j], res)
            i = j

    for pos in round_open:
        scale_from(pos, ROUND_MULT)
    for pos in square_open:
        scale_from(pos, SQUARE_MULT)

    if not res:
        res = [["", 1.0]]

    merged: list[list] = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, float(w)) for t, w in merged]


# ---------------------------------------------------------------------------------------------------------------
# Prompt editing and alternation: schedules
# ---------------------------------------------------------------------------------------------------------------
# The grammar (A1111, lark):
#   start     : (prompt | stray "[](): " chars)*
#   prompt    : (emphasized | scheduled | alternate | plain | whitespace)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled : "[" [prompt ":"] prompt ":" [ws] NUMBER [ws] "]"
#   alternate : "[" prompt ("|" [prompt])+ "]"
#   plain     : ([^\\[]():|] | \\.)+
# Brackets that cannot form a group are kept as text at top level only; inside a group they make the group fail.
# A prompt with no parse at all (e.g. a bare '|') is used unchanged.

_NUMBER_RE = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*")


class _Fail(Exception):
    pass


@dataclass
class _Sched:
    before: list | None
    after: list
    when_text: str
    when: int = 0


@dataclass
class _Alt:
    options: list[list]


class _ScheduleParser:
    def __init__(self, text: str):
        self.s = text
        self.n = len(text)

    def plain(self, i: int) -> int:
        s, n = self.s, self.n
        j = i
        while j < n:
            c = s[j]
            if c == "\\":
                # An escape needs a following character that is not a newline ('.' in the grammar).
                if j + 1 >= n or s[j + 1] == "\n":
                    raise _Fail
                j += 2
            elif c in "[]():|":
                break
            else:
                j += 1
        return j

    def seq(self, i: int) -> tuple[list, int]:
        """A `prompt` inside a group: stops at ) ] : | or the end."""
        items: list = []
        while i < self.n:
            c = self.s[i]
            if c in "([":
                node, i = self.group(i)
                items.append(node)
            elif c in ")]:|":
                break
            else:
                j = self.plain(i)
                items.append(self.s[i:j])
                i = j
        return items, i

    def group(self, i: int) -> tuple[object, int]:
        s = self.s
        opener = s[i]
        closer = ")" if opener == "(" else "]"
        i += 1
        segments: list[tuple[list, str]] = []
        seps: list[str] = []
        while True:
            start = i
            items, i = self.seq(i)
            segments.append((items, s[start:i]))
            if i >= self.n:
                raise _Fail
            c = s[i]
            if c in ":|":
                seps.append(c)
                i += 1
                continue
            if c != closer:
                raise _Fail
            i += 1
            break

        if opener == "(":
            if not seps:
                return ["(", segments[0][0], ")"], i
            if seps == [":"]:
                return ["(", segments[0][0], ":", segments[1][0], ")"], i
            raise _Fail
        if not seps:
            return ["[", segments[0][0], "]"], i
        if all(x == "|" for x in seps):
            return _Alt([seg for seg, _ in segments]), i
        if all(x == ":" for x in seps) and len(seps) <= 2:
            m = _NUMBER_RE.fullmatch(segments[-1][1])
            if m is None:
                raise _Fail
            if len(seps) == 1:
                return _Sched(None, segments[0][0], m.group(1)), i
            return _Sched(segments[0][0], segments[1][0], m.group(1)), i
        raise _Fail

    def parse(self) -> list:
        items: list = []
        i = 0
        while i < self.n:
            c = self.s[i]
            if c in "([":
                try:
                    node, j = self.group(i)
                except _Fail:
                    items.append(c)  # stray bracket kept as text
                    i += 1
                else:
                    items.append(node)
                    i = j
            elif c in ")]:":
                items.append(c)
                i += 1
            elif c == "|":
                raise _Fail
            else:
                j = self.plain(i)
                items.append(self.s[i:j])
                i = j
        return items


def _walk(node, visit) -> None:
    if isinstance(node, list):
        for child in node:
            _walk(child, visit)
    elif isinstance(node, _Sched):
        visit(node)
        if node.before is not None:
            _walk(node.before, visit)
        _walk(node.after, visit)
    elif isinstance(node, _Alt):
        visit(node)
        for opt in node.options:
            _walk(opt, visit)


def _render(node, step: int, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, list):
        for child in node:
            _render(child, step, out)
    elif isinstance(node, _Sched):
        if step <= node.when:
            if node.before is not None:
                _render(node.before, step, out)
        else:
            _render(node.after, step, out)
    elif isinstance(node, _Alt):
        _render(node.options[(step - 1) % len(node.options)], step, out)


def get_prompt_schedule(
    prompt: str, steps: int, hires_steps: int | None = None, old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """List of ``(end_step, text)``: ``text`` is used for steps up to and including ``end_step``.

    ``when`` with a '.' is a fraction of the steps, otherwise a step number. With ``hires_steps`` (the second pass
    of highres fix) the schedule covers that pass: integers count on from ``steps``, fractions from 1.0.
    ``old_scheduling`` is A1111's legacy rule (below 1 = fraction, else step).
    """
    if hires_steps is None or old_scheduling:
        int_offset, flt_offset, total = 0, 0.0, steps
    else:
        int_offset, flt_offset, total = steps, 1.0, hires_steps

    try:
        tree = _ScheduleParser(prompt).parse()
    except _Fail:
        return [(total, prompt)]

    points = {total}

    def visit(node) -> None:
        if isinstance(node, _Alt):
            points.update(range(1, total + 1))
            return
        v = float(node.when_text)
        if old_scheduling:
            v = v * total if v < 1 else v
        elif "." in node.when_text:
            v = (v - flt_offset) * total
        else:
            v = v - int_offset
        # Clamp before int() so huge/inf values behave like min(steps, int(v)) without overflowing.
        if v >= total:
            node.when = total
        elif v <= -1:
            node.when = -1
        else:
            node.when = int(v)
        if node.when >= 1:
            points.add(node.when)

    _walk(tree, visit)
    result = []
    for step in sorted(points):
        out: list[str] = []
        _render(tree, step, out)
        result.append((step, "".join(out)))
    return result


def get_prompt_schedules(
    prompts: Sequence[str], steps: int, hires_steps: int | None = None, old_scheduling: bool = False
) -> list[list[tuple[int, str]]]:
    """``get_prompt_schedule`` for each prompt."""
    cache: dict[str, list[tuple[int, str]]] = {}
    out = []
    for p in prompts:
        if p not in cache:
            cache[p] = get_prompt_schedule(p, steps, hires_steps, old_scheduling)
        out.append(cache[p])
    return out


def text_at_step(schedule: Sequence[tuple[int, str]], step: int) -> str:
    """The scheduled text in effect at ``step`` (1-based), as A1111 picks it: first entry with step <= end."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[0][1] if schedule else ""


# ---------------------------------------------------------------------------------------------------------------
# AND (composable diffusion)
# ---------------------------------------------------------------------------------------------------------------

_AND_RE = re.compile(r"\bAND\b")
_SUB_WEIGHT_RE = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split ``a AND b :0.5`` into ``[("a", 1.0), (" b", 0.5)]`` (text keeps its leading space, like A1111)."""
    out = []
    for sub in _AND_RE.split(prompt):
        m = _SUB_WEIGHT_RE.search(sub)
        if m is None:
            out.append((sub, 1.0))
            continue
        text, w = m.groups()
        out.append((text, float(w) if w is not None else 1.0))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Token chunks (sd_hijack_clip)
# ---------------------------------------------------------------------------------------------------------------

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@dataclass
class PromptChunk:
    """One CLIP input of ``chunk_length + 2`` ids (BOS, 75 tokens, EOS/padding) with a weight per id."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


def empty_chunk(bos_id: int, eos_id: int, pad_id: int | None = None, chunk_length: int = 75) -> PromptChunk:
    """The chunk of an empty prompt: BOS, EOS, then padding (EOS again on SD1, pad id on SD2/SDXL-bigG)."""
    pad = eos_id if pad_id is None else pad_id
    return PromptChunk([bos_id, eos_id] + [pad] * chunk_length, [1.0] * (chunk_length + 2))


def tokenize_prompt(
    text: str,
    tokenize: Callable[[str], Sequence[int]],
    *,
    comma_id: int | None,
    bos_id: int,
    eos_id: int,
    pad_id: int | None = None,
    chunk_length: int = 75,
    comma_backtrack: int = 20,
    emphasis: str = "Original",
) -> tuple[list[PromptChunk], int]:
    """Turn one prompt text (already free of ``<lora:...>`` tags and scheduling) into 77-id chunks.

    ``tokenize(text)`` returns ids without BOS/EOS. When a chunk is full and the last comma is at most
    ``comma_backtrack`` tokens back, the tokens after that comma move to the next chunk. ``BREAK`` closes the
    current chunk. Padding after the first EOS uses ``pad_id`` (defaults to ``eos_id``, as on SD1).
    Returns ``(chunks, token_count)``; token_count is A1111's count shown as "n/75".
    """
    if emphasis not in EMPHASIS_MODES:
        raise UserError(f"Unknown emphasis mode {emphasis!r}; choose one of {', '.join(EMPHASIS_MODES)}.")
    pad = eos_id if pad_id is None else pad_id
    parsed = parse_prompt_attention(text) if emphasis != "None" else [(text, 1.0)]

    chunks: list[PromptChunk] = []
    cur_tokens: list[int] = []
    cur_mults: list[float] = []
    last_comma = -1
    token_count = 0

    def close_chunk(is_last: bool = False) -> None:
        nonlocal cur_tokens, cur_mults, last_comma, token_count
        token_count += len(cur_tokens) if is_last else chunk_length
        fill = chunk_length - len(cur_tokens)
        # EOS right after the text, then padding; with pad == eos this is A1111's SD1 layout exactly.
        toks = [bos_id] + cur_tokens + [eos_id] + [pad] * fill
        mults = [1.0] + cur_mults + [1.0] * (fill + 1)
        chunks.append(PromptChunk(toks, mults))
        cur_tokens, cur_mults = [], []
        last_comma = -1

    for part, weight in parsed:
        if part == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        for tok in tokenize(part):
            if comma_id is not None and tok == comma_id:
                last_comma = len(cur_tokens)
            elif (
                comma_backtrack > 0
                and len(cur_tokens) == chunk_length
                and last_comma != -1
                and len(cur_tokens) - last_comma <= comma_backtrack
            ):
                keep = last_comma + 1
                moved_t, moved_m = cur_tokens[keep:], cur_mults[keep:]
                cur_tokens, cur_mults = cur_tokens[:keep], cur_mults[:keep]
                close_chunk()
                cur_tokens, cur_mults = moved_t, moved_m
            if len(cur_tokens) == chunk_length:
                close_chunk()
            cur_tokens.append(int(tok))
            cur_mults.append(weight)

    if cur_tokens or not chunks:
        close_chunk(is_last=True)
    return chunks, token_count


def pad_chunk_lists(
    a: list[PromptChunk], b: list[PromptChunk], empty: PromptChunk
) -> tuple[list[PromptChunk], list[PromptChunk]]:
    """Append empty chunks to the shorter list so prompt and negative prompt encode to the same length."""
    n = max(len(a), len(b))

    def pad(xs: list[PromptChunk]) -> list[PromptChunk]:
        extra = [PromptChunk(list(empty.tokens), list(empty.multipliers)) for _ in range(n - len(xs))]
        return list(xs) + extra

    return pad(a), pad(b)


def apply_emphasis(z, multipliers, mode: str = "Original"):
    """Weight CLIP outputs ``z`` (…, tokens, channels) by per-token ``multipliers`` (…, tokens).

    "Original": multiply, then rescale so the mean of the whole tensor equals its mean before weighting.
    "No norm": multiply only. "Ignore"/"None": unchanged.
    """
    import torch

    if mode not in EMPHASIS_MODES:
        raise UserError(f"Unknown emphasis mode {mode!r}; choose one of {', '.join(EMPHASIS_MODES)}.")
    if mode in ("Ignore", "None"):
        return z
    m = torch.as_tensor(multipliers, dtype=z.dtype, device=z.device)
    before = z.mean()
    z = z * m.unsqueeze(-1).expand(z.shape)
    if mode == "Original":
        z = z * (before / z.mean())
    return z


def encode_chunks(chunks: Sequence[PromptChunk], encode: Callable, emphasis: str = "Original"):
    """Encode each chunk with ``encode(ids LongTensor[1, 77]) -> Tensor[1, 77, C]``, weight it, concatenate.

    Returns a tensor of shape (1, 77 * len(chunks), C).
    """
    import torch

    outs = []
    for ch in chunks:
        ids = torch.tensor([ch.tokens], dtype=torch.long)
        z = encode(ids)
        outs.append(apply_emphasis(z, [ch.multipliers], emphasis))
    return torch.cat(outs, dim=1)


def pad_cond_uncond(cond, uncond, empty):
    """Pad the shorter of two (B, 77*k, C) encodings with repeats of ``empty`` (the (1, 77, C) encoding of "")."""
    import torch

    def grow(t, k):
        return torch.cat([t, empty.to(t.dtype).repeat(t.shape[0], k, 1)], dim=1)

    step = empty.shape[1]
    diff = cond.shape[1] - uncond.shape[1]
    if diff % step:
        raise ValueError("conditioning lengths are not whole chunks")
    if diff > 0:
        uncond = grow(uncond, diff // step)
    elif diff < 0:
        cond = grow(cond, -diff // step)
    return cond, uncond


def target_token_count(token_count: int, chunk_length: int = 75) -> int:
    """The ``n/75`` display target: token count rounded up to whole chunks (at least one)."""
    return math.ceil(max(token_count, 1) / chunk_length) * chunk_length


# ---------------------------------------------------------------------------------------------------------------
# Whole-prompt preparation in A1111's order
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedPrompt:
    """A prompt ready for encoding: its LoRA tags, and per AND-part the weight and the schedule of texts."""

    text: str  # prompt with extra-network tags removed
    loras: list  # list[lorakit.generate.extra_networks.LoraTag]
    parts: list[tuple[float, list[tuple[int, str]]]]  # (AND weight, [(end_step, text), ...])

    def texts(self) -> list[str]:
        """Every distinct text the encoder has to see, in first-use order."""
        seen: dict[str, None] = {}
        for _, sched in self.parts:
            for _, t in sched:
                seen.setdefault(t, None)
        return list(seen)


def prepare_prompt(
    prompt: str, steps: int, *, hires_steps: int | None = None, negative: bool = False
) -> PreparedPrompt:
    """A1111's order: remove ``<lora:...>`` tags, split on AND, then expand editing/alternation per part.

    For the negative prompt (``negative=True``) A1111 neither reads extra-network tags nor splits on AND: the
    text is only scheduled, and the LoRA list is empty.
    """
    from lorakit.generate.extra_networks import parse_extra_networks

    if negative:
        return PreparedPrompt(prompt, [], [(1.0, get_prompt_schedule(prompt, steps, hires_steps))])
    text, loras = parse_extra_networks(prompt)
    parts = [(w, get_prompt_schedule(sub, steps, hires_steps)) for sub, w in split_and(text)]
    return PreparedPrompt(text, loras, parts)
