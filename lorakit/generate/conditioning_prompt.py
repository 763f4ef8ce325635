"""Prompt text -> per-step conditioning, as A1111 builds it.

Order of operations (A1111 processing / prompt_parser): extra-network tags are removed from the whole prompt first;
the positive prompt is split on AND into weighted sub-prompts; each sub-prompt and the negative prompt get their own
prompt-editing/alternation schedule; each scheduled text is parsed for emphasis, cut into 75-token chunks (comma
backtracking, BREAK), encoded chunk by chunk with the family's clip-skip rule, weighted with the "Original" maths per
chunk and per text encoder, and concatenated. At every step all texts in use are padded with empty-prompt chunks to
one length so they go through the UNet as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import UserError
from lorakit.generate.extra_networks import parse_extra_networks
from lorakit.generate.prompt_parser import get_prompt_schedule, split_and, text_at_step, tokenize_prompt

__all__ = ["Encoded", "PromptEncoder", "StepConditioning", "ConditioningSchedule", "split_prompt_tags"]


@dataclass
class Encoded:
    context: torch.Tensor  # [1, 77*k, D]
    pooled: torch.Tensor | None  # [1, P] (SDXL) or None


def split_prompt_tags(prompt: str, negative_prompt: str = ""):
    """(clean prompt, clean negative, LoRA tags). Tags belong in the positive prompt; one in the negative prompt is
    an error rather than text that would be silently encoded."""
    clean, tags = parse_extra_networks(prompt)
    neg_clean, neg_tags = parse_extra_networks(negative_prompt or "")
    if neg_tags:
        raise UserError(f"The negative prompt contains {neg_tags[0].raw}; LoRA tags apply to the whole generation "
                        "and belong in the positive prompt.")
    return clean, neg_clean, tags


class PromptEncoder:
    """Encodes one prompt text (no tags, no scheduling syntax left) to context/pooled, with an encoding cache.

    The cache must be cleared (`clear()`) whenever text-encoder weights change (LoRAs applied or removed)."""

    def __init__(self, bundle, clip_skip: int | None = None, emphasis: str = "Original"):
        self.bundle = bundle
        self.clip_skip = clip_skip
        self.emphasis = emphasis
        self._cache: dict[str, Encoded] = {}
        self._empty: Encoded | None = None

    def clear(self) -> None:
        self._cache.clear()
        self._empty = None

    def _chunks(self, text: str):
        per_tok = []
        for tok in self.bundle.tokenizers:
            comma = tok.convert_tokens_to_ids(",</w>")
            chunks, _ = tokenize_prompt(
                text, lambda s, _t=tok: _t(s, add_special_tokens=False, truncation=False).input_ids,
                comma_id=comma, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                emphasis=self.emphasis)
            per_tok.append(chunks)
        n = max(len(c) for c in per_tok)
        if any(len(c) != n for c in per_tok):  # same vocabulary: cannot happen unless tokenizers differ
            raise RuntimeError("text encoders disagree on the chunk count")
        return per_tok

    @torch.no_grad()
    def encode(self, text: str) -> Encoded:
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        from lorakit.generate.prompt_parser import apply_emphasis
        from lorakit.models.conditioning import encode_text

        per_tok = self._chunks(text)
        widths = [te.config.hidden_size for te in self.bundle.text_encoders]
        contexts, pooled = [], None
        for c in range(len(per_tok[0])):
            ids = [torch.tensor([chunks[c].tokens], dtype=torch.long) for chunks in per_tok]
            ctx, pool = encode_text(self.bundle, ids, self.clip_skip)
            if c == 0:
                pooled = pool  # A1111/sd-scripts: SDXL's pooled embedding comes from the first chunk
            # emphasis per text encoder (A1111 hooks each encoder separately), per chunk
            parts, start = [], 0
            for chunks, w in zip(per_tok, widths):
                z = ctx[..., start:start + w]
                if any(m != 1.0 for m in chunks[c].multipliers):
                    # all-ones is the identity; skipping it also avoids 0/0 when a chunk's mean is 0
                    mult = torch.tensor([chunks[c].multipliers], dtype=torch.float32)
                    z = apply_emphasis(z.float(), mult, self.emphasis).to(ctx.dtype)
                parts.append(z)
                start += w
            if start != ctx.shape[-1]:
                raise RuntimeError("context width does not match the text encoders' hidden sizes")
            contexts.append(torch.cat(parts, dim=-1))
        out = Encoded(torch.cat(contexts, dim=1), pooled)
        if len(self._cache) > 256:
            self._cache.clear()
        self._cache[text] = out
        return out

    def empty(self) -> Encoded:
        """The encoding of "" (one chunk): used to pad shorter conditionings."""
        if self._empty is None:
            self._empty = self.encode("")
        return self._empty


def _pad_to(enc: Encoded, length: int, empty: Encoded) -> torch.Tensor:
    ctx = enc.context
    missing = length - ctx.shape[1]
    if missing <= 0:
        return ctx
    k = missing // empty.context.shape[1]
    return torch.cat([ctx, empty.context.to(ctx.dtype).repeat(1, k, 1)], dim=1)


@dataclass
class StepConditioning:
    """Everything the UNet needs at one step: row 0 is the negative prompt, rows 1.. the AND sub-prompts."""

    context: torch.Tensor  # [1 + n, L, D]
    pooled: torch.Tensor | None  # [1 + n, P] or None
    weights: list[float]  # AND weight of each sub-prompt (n values)


class ConditioningSchedule:
    """Per-step conditioning of one (prompt, negative prompt) pair over `steps` sampling steps.

    `hires_steps` gives the schedule of highres fix's second pass (A1111: integer `when` counts on from `steps`)."""

    def __init__(self, encoder: PromptEncoder, prompt: str, negative_prompt: str, steps: int,
                 hires_steps: int | None = None):
        self.encoder = encoder
        self.prompt, self.negative_prompt = prompt, negative_prompt
        total = hires_steps if hires_steps is not None else steps
        self.steps = total
        subs = split_and(prompt)
        self.weights = [w for _, w in subs]
        self.sub_schedules = [get_prompt_schedule(t, steps, hires_steps) for t, _ in subs]
        self.neg_schedule = get_prompt_schedule(negative_prompt, steps, hires_steps)
        self._memo: dict[tuple, StepConditioning] = {}

    def texts_at(self, step: int) -> tuple[str, list[str]]:
        step = min(max(step, 1), self.steps)
        return text_at_step(self.neg_schedule, step), [text_at_step(s, step) for s in self.sub_schedules]

    def at(self, step: int) -> StepConditioning:
        """Conditioning for 1-based `step`."""
        neg, subs = self.texts_at(step)
        key = (neg, *subs)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        encs = [self.encoder.encode(neg)] + [self.encoder.encode(t) for t in subs]
        length = max(e.context.shape[1] for e in encs)
        empty = self.encoder.empty() if any(e.context.shape[1] < length for e in encs) else None
        ctx = torch.cat([_pad_to(e, length, empty) if empty is not None else e.context for e in encs], dim=0)
        pooled = None
        if encs[0].pooled is not None:
            pooled = torch.cat([e.pooled for e in encs], dim=0)
        out = StepConditioning(ctx, pooled, list(self.weights))
        self._memo[key] = out
        return out

