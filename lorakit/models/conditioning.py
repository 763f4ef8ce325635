"""Text and size conditioning: the one path from captions and prompts to what the UNet reads, used by training,
text-encoder caching, previews and generation.

A text becomes windows of 77 ids (BOS + 75 tokens + EOS/padding). `encode_windows` runs each text encoder once over
every window and reads the hidden layer the family's clip-skip rule picks; `join_windows` lays the windows out in one
of the two layouts users' files were made with:
- training (sd-scripts, `trim=True`): the first BOS, each window's 75 tokens and the very last position: 2 + 75 n;
- generation (A1111, `trim=False`): whole windows side by side: 77 n.
With a causal text encoder the shared positions are the same numbers in both layouts. Layer numbers: sd-scripts'
--clip_skip through `Family.train_clip_layer`, A1111's "Clip skip" through `Family.prompt_clip_layer`.
"""

from __future__ import annotations

import torch

from lorakit.models.bundle import ModelBundle
from lorakit.models.tokenizer import MODEL_MAX_LENGTH

WINDOW = MODEL_MAX_LENGTH  # ids per window
BODY = MODEL_MAX_LENGTH - 2  # tokens per window


# ---- tokens -------------------------------------------------------------------------------------------------------
def tokenize(bundle: ModelBundle, texts: list[str], max_chunks: int = 1) -> list[torch.Tensor]:
    """Plain tokenization (no emphasis syntax) to [B, 77*max_chunks] ids per encoder, truncating longer captions.
    max_chunks=1/2/3 matches sd-scripts' --max_token_length 75/150/225."""
    out = []
    for tok in bundle.tokenizers:
        rows = []
        for text in texts:
            ids = tok(text, add_special_tokens=False, truncation=False).input_ids[: BODY * max_chunks]
            chunks = [ids[i: i + BODY] for i in range(0, max(len(ids), 1), BODY)] or [[]]
            chunks += [[]] * (max_chunks - len(chunks))
            row = []
            for chunk in chunks:
                row += [tok.bos_token_id] + chunk + [tok.eos_token_id]
                row += [tok.pad_token_id] * (BODY - len(chunk))
            rows.append(row)
        out.append(torch.tensor(rows, dtype=torch.long))
    return out


def caption_windows(tokenizer, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """[B, n, 77] ids of training captions, sd-scripts' layout: the caption is cut to n*75 tokens, then each
    window is BOS + its 75 ids + the row's last id."""
    total = (max_token_length or BODY) + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=total, return_tensors="pt").input_ids
    if total == WINDOW:
        return ids[:, None, :]
    bos, last = ids[:, :1], ids[:, -1:]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    windows = []
    for i in range(1, total - 1, BODY):
        window = torch.cat([bos, ids[:, i:i + BODY], last], dim=1)
        if pad != eos:  # OpenCLIP pads with id 0 (sd-scripts' rules): a window the caption runs through ends in
            for row in window:  # EOS, not in the row's last id (padding); a window with nothing left is BOS EOS pad...
                if row[-2] != eos and row[-2] != pad:
                    row[-1] = eos
                if row[1] == pad:
                    row[1] = eos
        windows.append(window)
    return torch.stack(windows, dim=1)


# ---- encoders -----------------------------------------------------------------------------------------------------
def _layer(te, out, layer: int, final_norm: bool) -> torch.Tensor:
    if final_norm and layer > 1:
        return getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-layer])
    if final_norm:
        return out.last_hidden_state  # already normed
    return out.hidden_states[-layer]


def encode_windows(bundle: ModelBundle, windows: list[torch.Tensor], layer: int):
    """(hidden [B, n, 77, D], pooled [B, P] or None) for [B, n, 77] ids per text encoder. `layer` counts from the
    end (1 = last); the encoders' features are concatenated (SDXL: CLIP-L then bigG); pooled is the projected
    output of the first window (sd-scripts and A1111 both pool the first window)."""
    hiddens, pooled = [], None
    for spec, te, ids in zip(bundle.family.text_encoders, bundle.text_encoders, windows):
        b, n, length = ids.shape
        out = te(ids.reshape(b * n, length).to(next(te.parameters()).device), output_hidden_states=True)
        hiddens.append(_layer(te, out, layer, spec.final_norm_on_skip).reshape(b, n, length, -1))
        if spec.with_projection:
            pooled = out.text_embeds.reshape(b, n, -1)[:, 0]
    hidden = hiddens[0] if len(hiddens) == 1 else torch.cat(hiddens, dim=-1)
    return hidden, pooled


def join_windows(hidden: torch.Tensor, trim: bool) -> torch.Tensor:
    """[B, n, 77, D] -> [B, L, D]: whole windows (L = 77 n), or trimmed to the first BOS, every window's 75 tokens and
    the last position (L = 2 + 75 n; one window stays whole)."""
    b, n, length, d = hidden.shape
    flat = hidden.reshape(b, n * length, d)
    if not trim or n == 1:
        return flat
    parts = [flat[:, :1]] + [flat[:, i * length + 1:(i + 1) * length - 1] for i in range(n)] + [flat[:, -1:]]
    return torch.cat(parts, dim=1)


def encode_captions(bundle: ModelBundle, captions: list[str], clip_skip: int | None,
                    max_token_length: int | None):
    """Training captions -> (context [B, 2 + 75 n, D], pooled [B, P] or None) with sd-scripts' --clip_skip and
    --max_token_length (75/150/225)."""
    windows = [caption_windows(tok, captions, max_token_length) for tok in bundle.tokenizers]
    hidden, pooled = encode_windows(bundle, windows, bundle.family.train_clip_layer(clip_skip))
    return join_windows(hidden, trim=True), pooled


def caption_outputs(bundle: ModelBundle, captions: list[str], clip_skip: int | None, max_token_length: int | None):
    """encode_captions as a text-encoder cache stores it (data.latents.TextEncoderCache): the hidden states, with
    the pooled vector beside them when the family has one (SDXL)."""
    hidden, pooled = encode_captions(bundle, captions, clip_skip, max_token_length)
    return hidden if pooled is None else (hidden, pooled)


def encode_text(bundle: ModelBundle, ids_per_encoder: list[torch.Tensor], clip_skip: int | None = None):
    """Prompt ids [B, 77 k] per encoder -> (context [B, 77 k, D], pooled [B, P] or None), A1111's "Clip skip"
    (1 = last layer; SD2 reads at least the penultimate one, SDXL always it)."""
    windows = [ids.reshape(ids.shape[0], -1, WINDOW) for ids in ids_per_encoder]
    hidden, pooled = encode_windows(bundle, windows, bundle.family.prompt_clip_layer(clip_skip))
    return join_windows(hidden, trim=False), pooled


# ---- size conditioning --------------------------------------------------------------------------------------------
def size_time_ids(original_size, crop_top_left, target_size, dtype=torch.float32, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample.
    Sizes are (height, width) pairs; pass lists or [B, 2] tensors for a batch."""
    def rows(x):
        t = torch.as_tensor(x, dtype=torch.float32)
        return t.unsqueeze(0) if t.ndim == 1 else t

    ids = torch.cat([rows(original_size), rows(crop_top_left), rows(target_size)], dim=1)
    return ids.to(dtype=dtype, device=device)


def added_cond_kwargs(family, pooled: torch.Tensor | None, original_size, crop_top_left, target_size, *,
                      dtype: torch.dtype, device) -> dict:
    """The UNet's extra keyword arguments: {} for families without size conditioning, else SDXL's
    {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids in `dtype`}}."""
    if not family.size_conditioning:
        return {}
    if pooled is None:
        raise ValueError(f"{family.title} needs the pooled text embedding")
    time_ids = size_time_ids(original_size, crop_top_left, target_size, dtype=dtype, device=device)
    return {"added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": time_ids}}


# ---- FLUX.1: CLIP-L's pooled vector and T5's token features ------------------------------------------------------
def t5_ids(bundle: ModelBundle, captions: list[str], max_length: int,
           tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, max_length] of T5's tokenizer (the bundle's unless given): EOS-terminated, padded or
    cut to max_length."""
    tok = tokenizer if tokenizer is not None else bundle.tokenizers[1]
    enc = tok(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc.input_ids, enc.attention_mask.bool()


def encode_t5_clip(bundle: ModelBundle, captions: list[str], t5_max_length: int, t5_mask: bool, t5_tokenizer=None):
    """FLUX captions -> (T5 features [B, t5_max_length, D], CLIP-L pooled [B, P]) as sd-scripts encodes them: CLIP-L
    over 77 tokens (its pooled output only), T5 over t5_max_length tokens; with `t5_mask` (--apply_t5_attn_mask) T5
    attends to the caption's tokens only (the transformer then masks the padding too: `t5_ids`' mask)."""
    clip, t5 = bundle.text_encoders
    clip_ids = bundle.tokenizers[0](captions, padding="max_length", truncation=True, max_length=WINDOW,
                                    return_tensors="pt").input_ids
    pooled = clip(clip_ids.to(next(clip.parameters()).device)).pooler_output
    ids, mask = t5_ids(bundle, captions, t5_max_length, t5_tokenizer)
    device = next(t5.parameters()).device
    hidden = t5(ids.to(device), attention_mask=mask.to(device) if t5_mask else None).last_hidden_state
    return hidden, pooled
