"""One text-conditioning path: captions encoded for training (and the text-encoder cache) and prompts encoded for
generation (and previews) read the same hidden layer and give the same numbers at the same token positions, for
prompts longer than one 75-token window, clip skip 1 and 2, every family. References are computed here directly
from the text encoders."""

import pytest
import torch

from lorakit.generate.conditioning_prompt import PromptEncoder
from lorakit.models.conditioning import encode_captions
from lorakit.models.tiny import tiny_bundle

# no commas: A1111's chunking (which backs up to a comma) then cuts at exactly 75 tokens, like sd-scripts' windows
LONG = " ".join(f"zq shape tag{i} colour{i % 5}" for i in range(20))

# the hidden layer (from the end) sd-scripts' --clip_skip N reads; SD2's encoder there lacks its last layer
TRAIN_LAYER = {"sd1": {1: 1, 2: 2}, "sd2": {1: 2, 2: 3}, "sdxl": {1: 2, 2: 2}}


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def reference_window(bundle, ids_per_encoder, layer):
    """One 77-id window per encoder -> context, by hand: layer -`layer`, the final layer norm where the family's
    reference applies it (SD1/SD2), encoders concatenated on features."""
    parts = []
    for spec, te, ids in zip(bundle.family.text_encoders, bundle.text_encoders, ids_per_encoder):
        out = te(torch.tensor([ids]), output_hidden_states=True)
        h = out.hidden_states[-layer]
        if spec.final_norm_on_skip:
            h = getattr(te, "text_model", te).final_layer_norm(h)
        parts.append(h)
    return torch.cat(parts, dim=-1)


def windows_of(tok, text):
    """A1111/sd-scripts windows by hand: BOS + 75 tokens + EOS, the last window padded with the tokenizer's pad."""
    ids = tok(text, add_special_tokens=False).input_ids
    out = []
    for i in range(0, len(ids), 75):
        body = ids[i:i + 75]
        out.append([tok.bos_token_id] + body + [tok.eos_token_id] + [tok.pad_token_id] * (75 - len(body)))
    return out


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_training_and_generation_give_the_same_embeddings(family, clip_skip):
    bundle = tiny_bundle(family, seed=3)
    per_encoder = [windows_of(tok, LONG) for tok in bundle.tokenizers]
    assert all(len(w) == 2 for w in per_encoder)  # > 75 tokens: two windows
    layer = TRAIN_LAYER[family][clip_skip]
    with torch.no_grad():
        train, _ = encode_captions(bundle, [LONG], clip_skip, 150)
        # previews render with the layer training reads: the generation path given that layer as A1111's clip skip
        gen = PromptEncoder(bundle, clip_skip=bundle.family.train_clip_layer(clip_skip)).encode(LONG).context
        want = [reference_window(bundle, [w[i] for w in per_encoder], layer) for i in range(2)]
    assert bundle.family.train_clip_layer(clip_skip) == layer
    assert train.shape[1] == 2 + 2 * 75 and gen.shape[1] == 2 * 77  # sd-scripts' and A1111's layouts
    torch.testing.assert_close(gen, torch.cat(want, dim=1), rtol=1e-5, atol=1e-6)
    # the same token positions hold bit-identical numbers: BOS + window 1's tokens, then window 2's tokens and end
    torch.testing.assert_close(train[:, :76], gen[:, :76], rtol=0, atol=0)
    torch.testing.assert_close(train[:, 76:], gen[:, 78:], rtol=0, atol=0)


def test_a1111_clip_skip_numbering_in_generation():
    """Generation counts clip skip like A1111: SD1 reads layer N, SD2 at least the penultimate, SDXL always it."""
    for family, cases in (("sd1", {1: 1, 2: 2, 3: 3}), ("sd2", {1: 2, 2: 2, 3: 3}), ("sdxl", {1: 2, 3: 2})):
        bundle = tiny_bundle(family, seed=3)
        ids = [windows_of(tok, "zq shape")[0] for tok in bundle.tokenizers]
        for n, layer in cases.items():
            with torch.no_grad():
                got = PromptEncoder(bundle, clip_skip=n).encode("zq shape").context
                want = reference_window(bundle, ids, layer)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_openclip_windows_of_a_long_caption_follow_sd_scripts():
    """OpenCLIP pads with id 0, not EOS: a window the caption runs through ends in EOS (sd-scripts' rule), so the
    pooled output (first window) is read at that EOS; a window with nothing left is BOS EOS pad..."""
    from lorakit.models.conditioning import caption_windows

    bundle = tiny_bundle("sdxl", seed=3)
    tok = bundle.tokenizers[1]
    assert tok.pad_token_id != tok.eos_token_id
    text = " ".join(LONG.split()[:60])
    ids = tok(text, add_special_tokens=False).input_ids
    assert 75 < len(ids) < 150
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    w = caption_windows(tok, [text], 225)[0].tolist()
    assert w[0] == [bos] + ids[:75] + [eos]
    assert w[1] == [bos] + ids[75:] + [eos] + [pad] * (150 - len(ids))
    assert w[2] == [bos, eos] + [pad] * 75
    with torch.no_grad():
        _, pooled = encode_captions(bundle, [text], None, 150)
        te = bundle.text_encoders[1]
        hidden = te.text_model(torch.tensor([w[0]])).last_hidden_state  # final-normed
        want = te.text_projection(hidden[:, 76])
    torch.testing.assert_close(pooled, want, rtol=1e-5, atol=1e-6)


def test_sdxl_pooled_and_size_conditioning_agree():
    from lorakit.models.conditioning import added_cond_kwargs

    bundle = tiny_bundle("sdxl", seed=3)
    text = "zq shape, forest"
    with torch.no_grad():
        _, pooled_train = encode_captions(bundle, [text], None, None)
        pooled_gen = PromptEncoder(bundle).encode(text).pooled
        ids = windows_of(bundle.tokenizers[1], text)[0]
        want = bundle.text_encoders[1](torch.tensor([ids])).text_embeds
    torch.testing.assert_close(pooled_train, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled_gen, want, rtol=1e-5, atol=1e-6)
    kw = added_cond_kwargs(bundle.family, pooled_train, torch.tensor([[768, 1024]]), torch.tensor([[0, 32]]),
                           torch.tensor([[512, 512]]), dtype=torch.float16, device="cpu")["added_cond_kwargs"]
    assert kw["time_ids"].dtype == torch.float16
    assert kw["time_ids"].tolist() == [[768.0, 1024.0, 0.0, 32.0, 512.0, 512.0]]  # (h, w), (top, left), (h, w)
    assert added_cond_kwargs(tiny_bundle("sd1").family, None, None, None, None, dtype=torch.float32, device="cpu") == {}
