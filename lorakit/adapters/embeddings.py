"""Trained token embeddings inside a LoRA file ("pivotal tuning", OneTrainer's additional embeddings).

A word of the prompt (e.g. the trigger "usu") gets its own input vectors at each text encoder, trained together with
the LoRA; wherever the word's tokens occur in a prompt, the vectors replace the tokens' rows of the encoder's token
embedding. The LoRA file keeps them as A1111 bundled embeddings, the keys AUTOMATIC1111/Forge register as textual
inversions when the LoRA is used and OneTrainer writes:

    bundle_emb.<word>.string_to_param.*    SD 1.x/2.x: [n_tokens, width]   (the family's TextEncoderSpec.embedding_key)
    bundle_emb.<word>.clip_l / .clip_g     SDXL: one tensor per encoder

Why it matters: a new trigger word's token row is one the base model has never learned to read, so "usu bear" and
"bear" are nearly the same condition and whatever the LoRA learns for one it does for the other (the class leak).
A trained vector gives the trigger a condition of its own. One vector per token of the word, so the prompt keeps its
length (A1111 replaces the word's tokens by as many vectors as the embedding holds: the same count here).

The vectors are a module so the optimizer, the NaN guard and the training state see them like adapter weights; their
state-dict keys are the bundle keys above (`Network` registers this module as "bundle_emb").
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from lorakit.errors import UserError

BUNDLE_MODULE = "bundle_emb"
BUNDLE_PREFIX = BUNDLE_MODULE + "."


def is_bundle_key(key: str) -> bool:
    return key.startswith(BUNDLE_PREFIX)


def split_bundle(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(adapter tensors, bundled-embedding tensors) of a LoRA state dict."""
    emb = {k: v for k, v in tensors.items() if is_bundle_key(k)}
    return {k: v for k, v in tensors.items() if not is_bundle_key(k)}, emb


def bundle_words(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """word -> {encoder key: tensor} of the bundled embeddings in a state dict."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if is_bundle_key(k):
            word, _, enc_key = k[len(BUNDLE_PREFIX):].partition(".")
            out.setdefault(word, {})[enc_key] = v
    return out


def word_token_ids(tokenizer, word: str) -> list[int]:
    return list(tokenizer(word, add_special_tokens=False).input_ids)


class TokenEmbeddings(nn.Module):
    """Vectors for some words at each text encoder: `vector(w, e)` is word w's [n_tokens, width] at encoder e.
    attach() hooks the encoders' token embeddings; detach() takes the hooks out."""

    def __init__(self, family, encoders: list, words: list[str], token_ids: list[list[list[int]]],
                 vectors: list[list[torch.Tensor]]):
        super().__init__()
        self._encoders = list(encoders)  # a plain list: the encoders are the model's, not submodules of this one
        self.words = list(words)
        self.token_ids = token_ids  # [word][encoder] -> ids
        self.keys = [spec.embedding_key for spec in family.text_encoders]
        # parameters of this module itself (no child module): state_dict() and load_state_dict() then see only the
        # bundle keys written by the two methods below
        for w in range(len(words)):
            for e in range(len(self.keys)):
                self.register_parameter(f"v{w}_{e}", nn.Parameter(vectors[w][e].detach().float().clone()))
        self._hooks: list = []

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def for_words(cls, bundle, words: list[str]) -> "TokenEmbeddings":
        """New vectors for `words`, starting from the rows their tokens have now (the word's current meaning)."""
        check_family_supports(bundle.family, "--train_embedding")
        words = check_words(words)
        ids, vecs = [], []
        for w in words:
            ids.append([word_token_ids(tok, w) for tok in bundle.tokenizers])
            vecs.append([te.get_input_embeddings().weight[i].detach() for te, i in zip(bundle.text_encoders, ids[-1])])
        return cls(bundle.family, bundle.text_encoders, words, ids, vecs)

    @classmethod
    def from_bundle(cls, bundle, tensors: Mapping[str, torch.Tensor], source: str) -> "TokenEmbeddings | None":
        """The bundled embeddings of a LoRA file for this model (None when it has none)."""
        found = bundle_words(tensors)
        if not found:
            return None
        check_family_supports(bundle.family, source)
        keys = [spec.embedding_key for spec in bundle.family.text_encoders]
        words, ids, vecs = [], [], []
        for w, parts in found.items():
            if len(keys) == 1 and len(parts) == 1:  # one encoder: any single tensor, as A1111 reads an embedding
                parts = {keys[0]: next(iter(parts.values()))}
            if set(parts) != set(keys):
                raise UserError(f"{source}: the bundled embedding {w!r} has {', '.join(sorted(parts))}, but a "
                                f"{bundle.family.title} model needs {', '.join(keys)}: it was made for another model "
                                f"family.")
            word_ids = [word_token_ids(tok, w) for tok in bundle.tokenizers]
            for te, k in zip(bundle.text_encoders, keys):
                v, width = parts[k], te.get_input_embeddings().weight.shape[1]
                if v.dim() != 2 or v.shape[1] != width:
                    raise UserError(f"{source}: the bundled embedding {w!r} ({k}) has shape {tuple(v.shape)}; this "
                                    f"model's encoder needs [tokens, {width}].")
            counts = {int(parts[k].shape[0]) for k in keys} | {len(i) for i in word_ids}
            if len(counts) != 1:
                # A1111 would put N vectors where the word's tokens were; lorakit replaces tokens one for one (the
                # prompt is tokenized before the hook), so such a word is left out, loudly, and the LoRA still loads
                logging.getLogger(__name__).warning(
                    "%s: bundled embedding %r holds %d vector(s) for a word of %d token(s); lorakit replaces a word's "
                    "tokens one for one, so this embedding is not used.", source, w, int(parts[keys[0]].shape[0]),
                    len(word_ids[0]))
                continue
            words.append(w)
            ids.append(word_ids)
            vecs.append([parts[k] for k in keys])
        return cls(bundle.family, bundle.text_encoders, words, ids, vecs) if words else None

    def vector(self, w: int, e: int) -> nn.Parameter:
        return getattr(self, f"v{w}_{e}")

    # ---- state dict: the bundle keys ---------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for w, word in enumerate(self.words):
            for e, key in enumerate(self.keys):
                p = self.vector(w, e)
                destination[f"{prefix}{word}.{key}"] = p if keep_vars else p.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = set()
        for w, word in enumerate(self.words):
            for e, key in enumerate(self.keys):
                k = f"{prefix}{word}.{key}"
                expected.add(k)
                if k not in state_dict:
                    missing_keys.append(k)
                    continue
                p, v = self.vector(w, e), state_dict[k]
                if v.shape != p.shape:
                    error_msgs.append(f"{k}: shape {tuple(v.shape)} vs {tuple(p.shape)}")
                    continue
                with torch.no_grad():
                    p.copy_(v.to(p.dtype))
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)

    @torch.no_grad()
    def write_rows(self) -> list[str]:
        """Put the vectors into the encoders' token-embedding rows (merging a LoRA into a model): the word then reads
        the same with no hook. The rows belong to the word's tokens, so any other word made of those tokens changes
        too (for a rare one-token trigger, nothing else). Returns the words written."""
        for w in range(len(self.words)):
            for e, te in enumerate(self._encoders):
                if te is not None:
                    table = te.get_input_embeddings().weight
                    for k, i in enumerate(self.token_ids[w][e]):
                        table[i] = self.vector(w, e)[k].to(table.dtype)
        return list(self.words)

    # ---- the hooks -----------------------------------------------------------------------------------------------
    def attach(self) -> None:
        self.detach()
        for e, te in enumerate(self._encoders):
            if te is not None:
                self._hooks.append(te.get_input_embeddings().register_forward_hook(self._hook_for(e)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook_for(self, e: int):
        def hook(module, args, out):
            return self.replace(e, args[0], out)
        return hook

    def replace(self, e: int, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (the embedding of `ids`, [B, L, width]) with every occurrence of a word's tokens replaced by its
        vectors. A word cut by a 75-token chunk boundary is not found there (A1111 moves it to the next chunk)."""
        for w in range(len(self.words)):
            seq = self.token_ids[w][e]
            n = len(seq)
            if n == 0 or ids.shape[-1] < n:
                continue
            target = torch.tensor(seq, device=ids.device)
            # [B, L - n + 1]: a match begins here (no data-dependent branch: the memory prediction traces this)
            start = (ids.unfold(-1, n, 1) == target).all(-1)
            vec = self.vector(w, e).to(rows.dtype)
            for k in range(n):  # position p + k takes vector k
                at = torch.nn.functional.pad(start, (k, n - 1 - k))
                rows = torch.where(at.unsqueeze(-1), vec[k], rows)
        return rows


def check_words(words: list[str]) -> list[str]:
    """--train_embedding's words, stripped; a dot would break the bundle key, a comma means two tags."""
    words = [w.strip() for w in words]
    for w in words:
        if not w or "." in w or "," in w:
            raise UserError(f"--train_embedding {w!r}: give the trigger word itself (no dots or commas), e.g. "
                            f"--train_embedding usu.")
    if len(set(words)) != len(words):
        raise UserError(f"--train_embedding lists a word twice ({', '.join(words)}).")
    return words


def check_family_supports(family, what: str) -> None:
    if any(spec.embedding_key is None for spec in family.text_encoders):
        raise UserError(f"{what}: trained token embeddings are not supported for {family.title} (its T5 encoder has "
                        f"no bundled-embedding format); train the LoRA alone.")
