"""The CLIP BPE tokenizer, built offline from the merges file we ship.

SD1, SD2 and both SDXL encoders share the same 49,408-token vocabulary; they differ only in the padding token:
SD1 and SDXL's first tokenizer pad with <|endoftext|> (49407), OpenCLIP-based encoders (SD2, SDXL tokenizer_2) pad
with id 0 ("!"), as their reference implementations do.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

MODEL_MAX_LENGTH = 77
BOS_ID = 49406
EOS_ID = 49407


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet. Order matters (it fixes token ids): printable bytes first, mapped to themselves,
    # then the remaining bytes mapped to code points from 256 up.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    data = resources.files("lorakit.models").joinpath("data/clip_bpe_merges.txt.gz").read_bytes()
    merges = gzip.decompress(data).decode("utf-8").split("\n")
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def make_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer with CLIP's vocabulary, no download. pad_token "!" gives OpenCLIP's id-0 padding."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token)
    tok.model_max_length = MODEL_MAX_LENGTH
    return tok
