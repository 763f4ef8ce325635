"""Text conditioning and SDXL size conditioning, with each family's clip-skip rule.

Token ids arrive as one row of 77*k ids per text encoder (k chunks of BOS + 75 + EOS, A1111 style); each chunk is
encoded separately and the hidden states are concatenated along the sequence, so prompts longer than 75 tokens work
the same in training and generation.
"""

from __future__ import annotations

import torch

from lorakit.models.bundle import ModelBundle
from lorakit.models.tokenizer import MODEL_MAX_LENGTH


def tokenize(bundle: ModelBundle, texts: list[str], max_chunks: int = 1) -> list[torch.Tensor]:
    """Plain tokenization (no emphasis syntax) to [B, 77*max_chunks] ids per encoder, truncating longer captions.
    max_chunks=1/2/3 matches sd-scripts' --max_token_length 75/150/225."""
    out = []
    body = MODEL_MAX_LENGTH - 2
    for tok in bundle.tokenizers:
        rows = []
        for text in texts:
            ids = tok(text, add_special_tokens=False, truncation=False).input_ids[: body * max_chunks]
            chunks = [ids[i: i + body] for i in range(0, max(len(ids), 1), body)] or [[]]
            chunks += [[]] * (max_chunks - len(chunks))
            row = []
            for chunk in chunks:
                row += [tok.bos_token_id] + chunk + [tok.eos_token_id]
                row += [tok.pad_token_id] * (MODEL_MAX_LENGTH - 2 - len(chunk))
            rows.append(row)
        out.append(torch.tensor(rows, dtype=torch.long))
    return out


def _encode_one(te, spec, ids: torch.Tensor, clip_skip: int, want_pooled: bool):
    out = te(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    if spec.final_norm_on_skip and clip_skip > 1:
        inner = getattr(te, "text_model", te)
        hidden = inner.final_layer_norm(hidden)
    elif clip_skip == 1:
        hidden = out.last_hidden_state  # already has the final layer norm
    pooled = None
    if want_pooled:
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = out.pooler_output
    return hidden, pooled


def encode_text(bundle: ModelBundle, ids_per_encoder: list[torch.Tensor], clip_skip: int | None = None):
    """(context [B, 77*k, D], pooled [B, P] or None). clip_skip follows A1111: 1 = last layer, 2 = penultimate.

    SD1: hidden_states[-clip_skip] + final layer norm. SD2: the penultimate layer + final layer norm by default.
    SDXL: both encoders' penultimate hidden states without final norm, concatenated on features; pooled from the
    projected bigG output of the first chunk (clip_skip is ignored for SDXL, as in sd-scripts)."""
    fam = bundle.family
    skip = fam.default_clip_skip if clip_skip is None else max(int(clip_skip), 1)
    if fam.size_conditioning:
        skip = 2
    elif fam.is_v2:
        skip = max(skip, 2)
    contexts, pooled = [], None
    for idx, (spec, te, ids) in enumerate(zip(fam.text_encoders, bundle.text_encoders, ids_per_encoder)):
        device = next(te.parameters()).device
        ids = ids.to(device)
        n_chunks = ids.shape[1] // MODEL_MAX_LENGTH
        want_pooled = spec.with_projection
        hiddens = []
        for c in range(n_chunks):
            h, p = _encode_one(te, spec, ids[:, c * MODEL_MAX_LENGTH:(c + 1) * MODEL_MAX_LENGTH], skip,
                               want_pooled and c == 0)
            hiddens.append(h)
            if p is not None:
                pooled = p
        contexts.append(torch.cat(hiddens, dim=1))
    context = contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=-1)
    return context, pooled


def sdxl_time_ids(original_size, crop_top_left, target_size, dtype=torch.float32, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample.
    Sizes are (height, width) pairs; pass lists for a batch."""
    def rows(x):
        t = torch.as_tensor(x, dtype=torch.float32)
        return t.unsqueeze(0) if t.ndim == 1 else t

    ids = torch.cat([rows(original_size), rows(crop_top_left), rows(target_size)], dim=1)
    return ids.to(dtype=dtype, device=device)


def unet_kwargs(bundle: ModelBundle, context: torch.Tensor, pooled: torch.Tensor | None,
                time_ids: torch.Tensor | None) -> dict:
    """Keyword arguments for `bundle.unet(latents, t, **kwargs)` for any family."""
    kwargs = {"encoder_hidden_states": context}
    if bundle.family.size_conditioning:
        if pooled is None or time_ids is None:
            raise ValueError("SDXL needs the pooled text embedding and size time_ids")
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(context.dtype)}
    return kwargs
