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


# T5's SentencePiece vocabulary (32,128 pieces) is not bundled: a full-size T5-XXL needs its tokenizer files (a
# diffusers FLUX folder's tokenizer_2). Tiny T5 encoders (tests, demos) use ByT5's byte tokenizer, which transformers
# builds without any file: ids 0 pad, 1 EOS, 2 UNK, 3..258 the UTF-8 bytes (and 125 sentinel ids up to 384).
BYTE_T5_VOCAB = 384


def make_t5_tokenizer(config: dict, folder=None):
    """The tokenizer of a T5 encoder: the one saved beside it (`folder`), else ByT5's byte tokenizer for an encoder
    whose vocabulary it fits; a full-size T5 without its tokenizer files is a UserError at encode time."""
    if folder is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if int(config.get("vocab_size", 0)) <= BYTE_T5_VOCAB:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    return MissingT5Tokenizer(int(config["vocab_size"]))


class MissingT5Tokenizer:
    """Stands where a full-size T5's tokenizer belongs when no tokenizer files came with the model; the model still
    loads (info, LoRA names, memory), and encoding text says what to provide."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, *args, **kwargs):
        from lorakit.errors import UserError

        raise UserError(f"the T5 text encoder ({self.vocab_size}-token vocabulary) needs its SentencePiece tokenizer, "
                        "which lorakit does not bundle and never downloads: pass --tokenizer_cache_dir DIR with "
                        "DIR/google_t5-v1_1-xxl/tokenizer.json (sd-scripts' layout), or load a diffusers FLUX folder "
                        "(its tokenizer_2/ is used).")


def make_tokenizer(spec, config: dict, folder=None):
    """The tokenizer of one text encoder of a family (TextEncoderSpec.kind)."""
    if spec.kind == "t5":
        return make_t5_tokenizer(config, folder)
    return make_clip_tokenizer(spec.pad_token)


T5_TOKENIZER_ID = "google/t5-v1_1-xxl"  # the tokenizer FLUX.1's T5-XXL was trained with (sd-scripts loads this id)


def t5_tokenizer_from_cache(folder):
    """FLUX's T5 tokenizer from sd-scripts' --tokenizer_cache_dir: DIR/google_t5-v1_1-xxl (where sd-scripts saves
    it) or DIR itself. tokenizer.json is read by `tokenizers` (no SentencePiece needed)."""
    from pathlib import Path

    from lorakit.errors import UserError

    folder = Path(folder)
    for candidate in (folder / T5_TOKENIZER_ID.replace("/", "_"), folder):
        if (candidate / "tokenizer.json").exists() or (candidate / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(candidate, local_files_only=True)
            except (OSError, ValueError, ImportError) as exc:
                raise UserError(f"--tokenizer_cache_dir {folder}: cannot read the T5 tokenizer in {candidate} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0]}).") from None
    raise UserError(f"--tokenizer_cache_dir {folder}: no T5 tokenizer there (expected tokenizer.json in "
                    f"{folder / T5_TOKENIZER_ID.replace('/', '_')} or in the folder itself).")
