"""Generation with LoRAs on a tiny SD1 model: <lora:x:0.7> equals hand-merged weights, stacking adds deltas, an LBW
preset that zeroes a block equals the file without that block's keys, per-image seeds, clip skip vs transformers."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import UserError
from lorakit.generate.pipeline import GenerationSettings, Generator
from lorakit.models.tiny import tiny_bundle

torch.set_num_threads(1)  # tiny models: extra threads only fight the other jobs on a shared 2-core machine

# kohya module names written by hand from the diffusers paths (down_blocks.1 = IN04/IN05, up_blocks.1 = OUT03..05)
UNET_MODULES = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_k",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "mid_block.attentions.0.proj_in",
]
TE_MODULES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]
IN04_PREFIX = "lora_unet_down_blocks_1_attentions_0_"  # input_blocks_4_1 = IN04


def _kohya(prefix, path):
    return prefix + path.replace(".", "_")


def make_lora(bundle, seed, rank=2, alpha=1.0):
    """{kohya key: tensor} plus {module: delta at multiplier 1} computed independently of lorakit."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    mods = [(m, bundle.unet.get_submodule(m), "lora_unet_") for m in UNET_MODULES]
    te = bundle.text_encoders[0]
    inner = getattr(te, "text_model", te)  # transformers 4.x nests the CLIP text model, 5.x does not
    mods += [(m, inner.get_submodule(m), "lora_te_text_model_") for m in TE_MODULES]
    for path, mod, prefix in mods:
        w = mod.weight
        out_f, in_f = w.shape[0], w.shape[1]
        down = torch.randn(rank, in_f, generator=g) * 0.3
        up = torch.randn(out_f, rank, generator=g) * 0.3
        name = _kohya(prefix, path)
        if w.dim() == 4:  # 1x1 conv proj_in
            down4, up4 = down[:, :, None, None], up[:, :, None, None]
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down4, up4
            deltas[mod] = (alpha / rank) * (up @ down)[:, :, None, None]
        else:
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            deltas[mod] = (alpha / rank) * (up @ down)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors, deltas


def write(path, tensors, output_name=None):
    md = {"ss_base_model_version": "sd_v1"}
    if output_name:
        md["ss_output_name"] = output_name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=md)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.manual_seed(0)
    bundle = tiny_bundle("sd1", seed=3)
    d = tmp_path_factory.mktemp("loras")
    a, da = make_lora(bundle, 1)
    b, db = make_lora(bundle, 2, rank=3, alpha=1.5)
    write(d / "a.safetensors", a)
    write(d / "some_file_name.safetensors", b, output_name="b")  # reached through its ss_output_name
    a_no_in04 = {k: v for k, v in a.items() if not k.startswith(IN04_PREFIX)}
    assert len(a_no_in04) < len(a)
    write(d / "a_no_in04.safetensors", a_no_in04)
    # user preset (legacy form <lora:a:0.7:NOIN04>): BASE IN01 IN02 IN04 ... -> IN04 is the 4th value
    (d / "lbwpresets.txt").write_text("NOIN04:1,1,1,0,1,1,1,1,1,1,1,1,1,1,1,1,1\n")
    return bundle, d, da, db


def settings(prompt, **kw):
    base = dict(prompt=prompt, negative_prompt="ugly", steps=2, width=64, height=64, seed=7, sampler="Euler a",
                cfg_scale=5.0)
    base.update(kw)
    return GenerationSettings(**base)


def merged_copy(bundle, *pairs):
    """A copy of the bundle with deltas added by hand: W + sum(m_i * delta_i)."""
    memo = {}
    copied = copy.deepcopy(bundle, memo)
    with torch.no_grad():
        for mult, deltas in pairs:
            for mod, d in deltas.items():
                memo[id(mod)].weight += mult * d
    return copied


def test_lora_equals_hand_merged_and_stacking_adds(env):
    bundle, d, da, db = env
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    with Generator(bundle, lora_dir=d) as gen:
        single = gen(settings("a cat <lora:a:0.7>"), decode=False).latents
        stacked = gen(settings("a cat <lora:a:0.7><lora:b:0.5>"), decode=False).latents
        unmerged = gen(settings("a cat <lora:a:0.7:start=0>"), decode=False).latents  # start= forces the unmerged path
    # LoRAs are taken out again
    for k, v in bundle.unet.state_dict().items():
        assert torch.equal(v, before[k]), k

    with Generator(merged_copy(bundle, (0.7, da))) as ref_gen:
        ref_single = ref_gen(settings("a cat"), decode=False).latents
    with Generator(merged_copy(bundle, (0.7, da), (0.5, db))) as ref_gen:
        ref_stacked = ref_gen(settings("a cat"), decode=False).latents
    with Generator(bundle) as plain:
        none = plain(settings("a cat"), decode=False).latents
    assert not torch.allclose(ref_single, none, atol=1e-3)  # the LoRA does change the image
    torch.testing.assert_close(single, ref_single, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(unmerged, ref_single, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(stacked, ref_stacked, atol=2e-4, rtol=1e-4)


def test_lbw_preset_zeroing_a_block_equals_file_without_its_keys(env):
    bundle, d, _, _ = env
    with Generator(bundle, lora_dir=d) as gen:
        legacy = gen(settings("a cat <lora:a:0.7:NOIN04>"), decode=False).latents
        named = gen(settings("a cat <lora:a:0.7:lbw=1,1,1,0,1,1,1,1,1,1,1,1,1,1,1,1,1>"), decode=False).latents
        removed = gen(settings("a cat <lora:a_no_in04:0.7>"), decode=False).latents
        full = gen(settings("a cat <lora:a:0.7>"), decode=False).latents
    torch.testing.assert_close(legacy, removed, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(named, removed, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(full, removed, atol=1e-4)


def test_missing_lora_or_unknown_preset_is_an_error_and_nothing_is_applied(env):
    bundle, d, _, _ = env
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    with Generator(bundle, lora_dir=d) as gen:
        with pytest.raises(UserError, match="not found"):
            gen(settings("x <lora:a:1> <lora:nope:1>"))
        with pytest.raises(UserError, match="unknown block-weight preset"):
            gen(settings("x <lora:a:1> <lora:b:1:NCNF>"))
        for k, v in bundle.unet.state_dict().items():
            assert torch.equal(v, before[k]), k
    with pytest.raises(UserError, match="lora_dir"):
        Generator(bundle)(settings("x <lora:a:1>"), decode=False)


def test_batch_seeds_are_seed_plus_i_and_independent_of_the_batch(env):
    bundle, _, _, _ = env
    with Generator(bundle) as gen:
        batch = gen(settings("a dog", seed=100, batch_size=2))
        one = gen(settings("a dog", seed=101))
    assert batch.seeds == [100, 101]
    assert "Seed: 101" in batch.infotexts[1]
    torch.testing.assert_close(batch.latents[1:], one.latents, atol=1e-5, rtol=1e-5)


def test_clip_skip_matches_transformers(env):
    from lorakit.generate.conditioning_prompt import PromptEncoder

    bundle, _, _, _ = env
    te, tok = bundle.text_encoders[0], bundle.tokenizers[0]
    text = "a photo of a cat"
    ids = tok(text, add_special_tokens=False).input_ids
    row = [tok.bos_token_id] + ids + [tok.eos_token_id] * (77 - 1 - len(ids))  # SD1 pads with EOS
    x = torch.tensor([row])
    with torch.no_grad():
        out = te(x, output_hidden_states=True)
        want2 = getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-2])
        want1 = out.last_hidden_state
    got2 = PromptEncoder(bundle, clip_skip=2).encode(text).context
    got1 = PromptEncoder(bundle, clip_skip=1).encode(text).context
    torch.testing.assert_close(got2, want2)
    torch.testing.assert_close(got1, want1)
    assert not torch.allclose(got1, got2)


def test_long_prompt_and_negative_are_padded_to_equal_chunks(env):
    from lorakit.generate.conditioning_prompt import ConditioningSchedule, PromptEncoder

    bundle, _, _, _ = env
    enc = PromptEncoder(bundle, clip_skip=1)
    long = ", ".join(["red apple"] * 40)  # > 75 tokens: two chunks
    sched = ConditioningSchedule(enc, long + " AND a dog :0.5", "bad", steps=4)
    c = sched.at(1)
    assert c.context.shape[:2] == (3, 154) and c.weights == [1.0, 0.5]
    empty = enc.encode("").context
    torch.testing.assert_close(c.context[0:1, 77:], empty)  # the negative prompt's padding is the "" chunk
    # prompt editing: [cat:dog:2] switches after step 2
    sched = ConditioningSchedule(enc, "a [cat:dog:2]", "", steps=4)
    torch.testing.assert_close(sched.at(2).context[1:], enc.encode("a cat").context)
    torch.testing.assert_close(sched.at(3).context[1:], enc.encode("a dog").context)


def test_img2img_strength(env):
    import numpy as np
    from PIL import Image

    bundle, _, _, _ = env
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = bundle.vae.encode(x).latent_dist.mean * bundle.vae.config.scaling_factor
    steps_run = []
    with Generator(bundle) as gen:
        r0 = gen(settings("a cat", init_image=init, denoising_strength=0.0), decode=False)
        r = gen(settings("a cat", init_image=init, denoising_strength=0.5, steps=4), decode=False,
                progress=lambda i, n: steps_run.append(n))
    torch.testing.assert_close(r0.latents, want, atol=1e-5, rtol=1e-5)  # strength 0: the image itself
    assert steps_run[-1] == 2  # A1111 img2img: int(strength * steps) steps
    assert "Denoising strength: 0.5" in r.infotexts[0]


def test_emphasis_is_original_maths_per_text_encoder_and_other_families_generate():
    from lorakit.generate.conditioning_prompt import PromptEncoder

    bundle = tiny_bundle("sdxl", seed=1)
    enc = PromptEncoder(bundle)
    plain = enc.encode("a cat dog").context
    weighted = enc.encode("a (cat:1.5) dog").context
    mult = torch.ones(1, 77, 1)
    mult[0, 2] = 1.5  # BOS, a, cat, dog
    start = 0
    for te in bundle.text_encoders:  # A1111 weights each encoder's output on its own
        w = te.config.hidden_size
        z = plain[..., start:start + w]
        want = z * mult
        want = want * (z.mean() / want.mean())
        torch.testing.assert_close(weighted[..., start:start + w], want, atol=1e-5, rtol=1e-4)
        start += w
    with Generator(bundle) as gen:
        r = gen(settings("a cat AND a dog :0.5", hires_scale=1.5, sampler="DPM++ 2M Karras"))
    assert r.images[0].size == (96, 96) and torch.isfinite(r.latents).all()
    with Generator(tiny_bundle("sd2-v", seed=1)) as gen:
        r = gen(settings("a [cat|dog]", sampler="Euler"), decode=False)
    assert torch.isfinite(r.latents).all()


def test_start_stop_switches_the_unet_part_and_trainer_previews(env, tmp_path):
    from PIL import Image

    from lorakit.generate.infotext import read_infotext
    from lorakit.generate.pipeline import generate_samples
    from lorakit.generate.sample_prompts import parse_prompt_text

    bundle, d, _, _ = env
    with Generator(bundle, lora_dir=d) as gen:
        on = gen(settings("a cat <lora:a:0.7>", steps=3), decode=False).latents
        stop = gen(settings("a cat <lora:a:0.7:stop=2>", steps=3), decode=False).latents
        start = gen(settings("a cat <lora:a:0.7:start=2>", steps=3), decode=False).latents
    assert not torch.allclose(on, stop, atol=1e-5) and not torch.allclose(on, start, atol=1e-5)
    assert not torch.allclose(stop, start, atol=1e-5)

    paths = generate_samples(bundle, parse_prompt_text("a bear --w 64 --h 96 --d 3 --s 2 --l 5"), tmp_path,
                             prefix="e1-")
    assert [p.name for p in paths] == ["e1-00-3.png"]
    assert Image.open(paths[0]).size == (64, 96) and "Seed: 3" in read_infotext(paths[0])


def test_bundled_embedding_stands_in_for_its_word_merged_and_unmerged(env, tmp_path):
    """A1111's bundled textual inversion (bundle_emb.<word>.string_to_param.*, written here by hand): with the LoRA
    active, the word reads as the file's vectors; the reference writes those vectors into the token-embedding rows."""
    bundle, d, da, _ = env
    a, _ = make_lora(bundle, 1)
    te = bundle.text_encoders[0]
    vec = torch.randn(2, te.config.hidden_size, generator=torch.Generator().manual_seed(5))
    write(tmp_path / "e.safetensors", {**a, "bundle_emb.zq.string_to_param.*": vec})
    with Generator(bundle, lora_dir=tmp_path) as gen:
        merged = gen(settings("zq cat <lora:e:0.7>"), decode=False).latents
        unmerged = gen(settings("zq cat <lora:e:0.7:start=0>"), decode=False).latents
        after = gen(settings("zq cat"), decode=False).latents  # the LoRA's word is gone with it
    ref = merged_copy(bundle, (0.7, da))
    with torch.no_grad():
        ref.text_encoders[0].get_input_embeddings().weight[[89, 336]] = vec  # "zq" is two CLIP tokens
    with Generator(ref) as ref_gen:
        want = ref_gen(settings("zq cat"), decode=False).latents
    with Generator(merged_copy(bundle, (0.7, da))) as no_emb:
        without = no_emb(settings("zq cat"), decode=False).latents
    with Generator(bundle) as plain:
        none = plain(settings("zq cat"), decode=False).latents
    assert not torch.allclose(want, without, atol=1e-3)  # the embedding changes the image
    torch.testing.assert_close(merged, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(unmerged, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(after, none, atol=0, rtol=0)
