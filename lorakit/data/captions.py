"""Captions: reading caption files and the per-step caption pipeline (sd-scripts' process_caption order).

prefix/suffix -> whole-caption dropout (rate, every N epochs) -> wildcards `{a|b}` (or first line) -> split on the
caption separator -> fixed head (keep_tokens or text before keep_tokens_separator; text after a second separator is a
fixed tail) -> token warmup -> shuffle -> tag dropout -> join with ", " -> secondary separator -> caption separator.

Randomness comes from a numpy Generator given by the caller (see lorakit.data.rng); draws happen in this order:
dropout (one draw, only when caption_dropout_rate > 0), wildcard line choice, one choice per wildcard, the shuffle
permutation, one draw per tag for tag dropout.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from lorakit.errors import UserError


class CaptionError(UserError):
    """A caption file cannot be used; the message names the file."""


def caption_candidates(image_path: str | os.PathLike, caption_extension: str) -> list[str]:
    """`<stem><ext>`, then for face-crop names `name_cx_cy_w_h` also `name<ext>` (sd-scripts)."""
    base = os.path.splitext(str(image_path))[0]
    out = [base + caption_extension]
    tokens = base.split("_")
    if len(tokens) >= 5:
        out.append("_".join(tokens[:-4]) + caption_extension)
    return out


def read_caption_file(path: str | os.PathLike, enable_wildcard: bool = False) -> str:
    """The caption in a file: the first line, or with wildcards all non-empty lines joined by newlines.

    Raises CaptionError for an empty file or one that is not UTF-8 (a UTF-8 BOM is accepted)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(f"caption {path} is not UTF-8 (byte {exc.start}). Re-save it as UTF-8, "
                           "or run with --on_bad_image skip to leave its image out.") from None
    # a line of only separators and spaces (", , ,") trains exactly like an empty caption: treat it as one
    lines = [line.strip() for line in text.splitlines()]
    used = [line for line in lines if _has_text(line)] if enable_wildcard else lines[:1]
    if not used or not _has_text(used[0]):
        what = "is empty" if not any(lines) else (
            "holds only commas and spaces" if not any(_has_text(line) for line in lines) else
            "has an empty first line (only the first line is the caption)")
        raise CaptionError(f"caption {path} {what}. Write the caption into it or delete the file "
                           "(then the folder's class tokens are used), or run with --on_bad_image skip.")
    return "\n".join(used)


def _has_text(line: str) -> bool:
    return bool(line.replace(",", "").strip())


def find_caption(image_path: str | os.PathLike, caption_extension: str, enable_wildcard: bool = False,
                 names: set[str] | None = None) -> tuple[str | None, Path | None]:
    """(caption, caption file) for an image, or (None, None) when there is no caption file.
    `names`: the file names in the image's folder, to skip a stat per candidate on big folders."""
    for cand in caption_candidates(image_path, caption_extension):
        if (os.path.basename(cand) in names) if names is not None else os.path.isfile(cand):
            return read_caption_file(cand, enable_wildcard), Path(cand)
    return None, None


_WILDCARD = re.compile(r"\{([^}]+)\}")


def expand_wildcards(caption: str, rng: np.random.Generator) -> str:
    """Pick one line of a multi-line caption, then one option of each `{a|b|c}`; `{{`/`}}` are literal braces."""
    if "\n" in caption:
        lines = caption.split("\n")
        caption = lines[int(rng.integers(len(lines)))]
    open_m, close_m = "\x00<", ">\x00"
    caption = caption.replace("{{", open_m).replace("}}", close_m)

    def pick(match):
        options = match.group(1).split("|")
        return options[int(rng.integers(len(options)))]

    caption = _WILDCARD.sub(pick, caption)
    return caption.replace(open_m, "{").replace(close_m, "}")


def token_warmup_count(n_flex: int, token_warmup_min: int, token_warmup_step: float, step: int,
                       max_train_steps: int) -> int | None:
    """How many flexible tags are kept at `step`, or None when warmup is over/off (sd-scripts' formula).
    A token_warmup_step below 1 is a fraction of max_train_steps."""
    warm = token_warmup_step
    if warm < 1:
        warm = math.floor(warm * max_train_steps)
    if not warm or step >= warm:
        return None
    return math.floor(step * ((n_flex - token_warmup_min) / warm)) + token_warmup_min


def process_caption(caption: str, subset, rng: np.random.Generator, epoch: int = 1, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """Apply one step's caption pipeline. `subset` has sd-scripts' caption fields (SubsetConfig); epochs count from 1
    so `caption_dropout_every_n_epochs = n` drops captions in epochs n, 2n, ... as sd-scripts does."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix

    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    if subset.caption_dropout_every_n_epochs > 0 and epoch % subset.caption_dropout_every_n_epochs == 0:
        dropped = True
    if dropped:
        return ""

    if subset.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    sep = subset.caption_separator
    if subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0:
        fixed: list[str] = []
        tail: list[str] = []
        kts = subset.keep_tokens_separator
        if kts and kts in caption:
            head, flex_part = caption.split(kts, 1)
            if kts in flex_part:
                flex_part, tail_part = flex_part.split(kts, 1)
                tail = [t.strip() for t in tail_part.split(sep) if t.strip()]
            fixed = [t.strip() for t in head.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex = tokens
            if subset.keep_tokens > 0:
                fixed, flex = tokens[: subset.keep_tokens], tokens[subset.keep_tokens:]

        keep = token_warmup_count(len(flex), subset.token_warmup_min, subset.token_warmup_step, step, max_train_steps)
        if keep is not None:
            flex = flex[:keep]
        if subset.shuffle_caption and len(flex) > 1:
            flex = [flex[i] for i in rng.permutation(len(flex))]
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + tail)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, sep)
    return caption


def captions_are_static(subset) -> str | None:
    """None when this subset's captions are the same every step (text-encoder outputs may be cached), else why not."""
    reasons = []
    if subset.shuffle_caption:
        reasons.append("shuffle_caption")
    if subset.caption_dropout_rate > 0:
        reasons.append("caption_dropout_rate")
    if subset.caption_dropout_every_n_epochs > 0:
        reasons.append("caption_dropout_every_n_epochs")
    if subset.caption_tag_dropout_rate > 0:
        reasons.append("caption_tag_dropout_rate")
    if subset.token_warmup_step > 0:
        reasons.append("token_warmup_step")
    if subset.enable_wildcard:
        reasons.append("enable_wildcard")
    return ", ".join(reasons) if reasons else None


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


def tag_frequencies(captions: Iterable[str], separator: str = ",") -> Counter:
    """Count each tag once per caption (sd-scripts' tag frequency metadata counts per image)."""
    freq: Counter = Counter()
    for cap in captions:
        freq.update(set(split_tags(cap.split("\n")[0], separator)))
    return freq


_WORDISH = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def estimate_tokens(text: str) -> int:
    """Rough CLIP token count without a tokenizer: words and punctuation marks each count one."""
    return len(_WORDISH.findall(text))
