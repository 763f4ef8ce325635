"""--train_embedding (pivotal tuning): the trigger word's own text-encoder input vectors, trained with the LoRA and
bundled in its file as A1111 reads them (bundle_emb.<word>.string_to_param.* / .clip_l / .clip_g)."""

import pytest
import torch

from lorakit.errors import UserError
from test_train_common import dataset, one_thread, options, read_lora, run, tiny  # noqa: F401


def _rows_with_replaced(ids: torch.Tensor, table: torch.Tensor, seq: list[int], vec: torch.Tensor) -> torch.Tensor:
    """Reference: embed token by token, then overwrite each occurrence of `seq` position by position (plain loops)."""
    rows = table[ids].clone()
    n = len(seq)
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        for p in range(len(row) - n + 1):
            if row[p:p + n] == seq:
                for k in range(n):
                    rows[b, p + k] = vec[k]
    return rows


def test_replacement_matches_a_loop_and_leaves_other_tokens():
    from lorakit.adapters.embeddings import TokenEmbeddings

    bundle = tiny("sd1")
    emb = TokenEmbeddings.for_words(bundle, ["zq"])  # two tokens in CLIP's BPE: one vector each
    seq = emb.token_ids[0][0]
    assert len(seq) == 2
    table = bundle.text_encoders[0].get_input_embeddings().weight.detach()
    with torch.no_grad():
        emb.vector(0, 0).copy_(torch.randn_like(emb.vector(0, 0)))
    ids = torch.tensor([[49406, *seq, 320, seq[0], 500, *seq, 49407],  # the first token alone is not the word
                        [49406, seq[1], seq[0], 320, 321, 322, 323, 324, 49407]])
    got = emb.replace(0, ids, table[ids])
    want = _rows_with_replaced(ids, table, seq, emb.vector(0, 0).detach())
    assert torch.equal(got, want)
    assert torch.equal(got[1], table[ids[1]])  # tokens out of order: untouched
    assert not torch.equal(got[0], table[ids[0]])


def test_fresh_vectors_change_nothing_and_hooks_come_off():
    from lorakit.adapters.embeddings import TokenEmbeddings
    from lorakit.models.conditioning import encode_captions

    bundle = tiny("sd1")
    caps = ["zq shape, tag1", "shape"]
    with torch.no_grad():
        before, _ = encode_captions(bundle, caps, None, None)
        emb = TokenEmbeddings.for_words(bundle, ["zq"])
        emb.attach()
        same, _ = encode_captions(bundle, caps, None, None)
        emb.vector(0, 0).add_(1.0)
        moved, _ = encode_captions(bundle, caps, None, None)
        emb.detach()
        after, _ = encode_captions(bundle, caps, None, None)
    assert torch.equal(before, same) and torch.equal(before, after)
    assert not torch.allclose(moved[0], before[0]) and torch.equal(moved[1], before[1])


def test_training_bundles_a1111_keys_and_loading_applies_them(tmp_path):
    from lorakit.adapters.network import load_network
    from lorakit.models.conditioning import encode_captions

    data = dataset(tmp_path, n_train=2)
    res = run(options(tmp_path, data, "--max_train_steps", "3", "--learning_rate", "1e-3", "--train_embedding", "zq",
                      "--embedding_lr", "5e-2", "--network_train_unet_only"))
    sd, _ = read_lora(res.final_lora)
    base = tiny("sd1")
    key = "bundle_emb.zq.string_to_param.*"
    assert key in sd and sd[key].shape == (2, base.text_encoders[0].config.hidden_size)
    start = base.text_encoders[0].get_input_embeddings().weight.detach()[[89, 336]]
    assert (sd[key].float() - start).abs().max() > 1e-3  # trained, although no text-encoder LoRA module exists
    assert not any(k.startswith("lora_te") for k in sd)
    # generation: the file's vectors stand in for the word; reference = the same rows written into the table
    caps = ["zq shape", "shape"]
    net = load_network(base, res.final_lora, multiplier=0.0)  # the adapters off: only the embedding acts
    with torch.no_grad():
        got, _ = encode_captions(base, caps, None, None)
        net.remove()
        ref = tiny("sd1")
        ref.text_encoders[0].get_input_embeddings().weight[[89, 336]] = sd[key].float()
        want, _ = encode_captions(ref, caps, None, None)
        plain, _ = encode_captions(base, caps, None, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got[1], plain[1])


def test_resume_with_embeddings_is_exact(tmp_path):
    data = dataset(tmp_path, n_train=3)
    args = ["--max_train_steps", "4", "--learning_rate", "1e-3", "--train_embedding", "zq", "--embedding_lr", "1e-2",
            "--save_state"]
    full = run(options(tmp_path / "a", data, *args))
    stopped = run(options(tmp_path / "b", data, *args), stop_after_step=2)
    resumed = run(options(tmp_path / "b", data, *args, "--resume", str(stopped.states[-1])))
    a, _ = read_lora(full.final_lora)
    b, _ = read_lora(resumed.final_lora)
    assert a.keys() == b.keys() and "bundle_emb.zq.string_to_param.*" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sdxl_bundles_one_tensor_per_encoder(tmp_path):
    data = dataset(tmp_path, n_train=1)
    res = run(options(tmp_path, data, "--max_train_steps", "1", "--train_embedding", "zq", "--resolution", "64"),
              family="sdxl")
    sd, _ = read_lora(res.final_lora)
    bundle = tiny("sdxl")
    widths = [te.config.hidden_size for te in bundle.text_encoders]
    assert sd["bundle_emb.zq.clip_l"].shape == (2, widths[0]) and sd["bundle_emb.zq.clip_g"].shape == (2, widths[1])


def test_refusals(tmp_path):
    data = dataset(tmp_path, n_train=1)
    with pytest.raises(UserError, match="--cache_text_encoder_outputs cannot be used with --train_embedding"):
        run(options(tmp_path, data, "--max_train_steps", "1", "--train_embedding", "zq", "--cache_text_encoder_outputs",
                    "--network_train_unet_only"))
    with pytest.raises(UserError, match="no dots or commas"):
        run(options(tmp_path, data, "--max_train_steps", "1", "--train_embedding", "zq,"))


def test_tools_keep_or_drop_the_embeddings(tmp_path):
    from lorakit.adapters.info import format_text, summarize
    from lorakit.tools.lora_filter import filter_lora
    from lorakit.tools.lora_merge import specs_from_lists, merge_lora_files
    from lorakit.tools.lora_resize import resize_lora

    data = dataset(tmp_path, n_train=1)
    res = run(options(tmp_path, data, "--max_train_steps", "1", "--train_embedding", "zq"))
    key = "bundle_emb.zq.string_to_param.*"
    src, _ = read_lora(res.final_lora)
    info = summarize(res.final_lora)
    assert info["embeddings"] == {"zq": {"string_to_param.*": [2, src[key].shape[1]]}}
    assert "embedded:  zq" in format_text(info)
    resize_lora(res.final_lora, tmp_path / "r.safetensors", 2, log=None)
    filter_lora(res.final_lora, tmp_path / "f.safetensors", keep="IN04-IN07,OUT03-OUT06", log=None)
    filter_lora(res.final_lora, tmp_path / "n.safetensors", drop_embeddings=True, log=None)
    for name, has in (("r", True), ("f", True), ("n", False)):
        sd, _ = read_lora(tmp_path / f"{name}.safetensors")
        assert (key in sd) == has, name
        if has:
            assert torch.equal(sd[key], src[key])
    merge_lora_files(specs_from_lists([str(res.final_lora), str(tmp_path / "n.safetensors")]),
                     tmp_path / "m.safetensors", mode="concat", log=None)
    assert key in read_lora(tmp_path / "m.safetensors")[0]
    with pytest.raises(UserError, match="both bundle a trained embedding for 'zq'"):
        merge_lora_files(specs_from_lists([str(res.final_lora), str(tmp_path / "r.safetensors")]),
                         tmp_path / "m2.safetensors", mode="concat", log=None)


def test_merging_into_a_model_writes_the_token_rows(tmp_path):
    from lorakit.tools.lora_merge import merge_into_bundle, specs_from_lists

    data = dataset(tmp_path, n_train=1)
    res = run(options(tmp_path, data, "--max_train_steps", "1", "--train_embedding", "zq", "--embedding_lr", "1e-2"))
    sd, _ = read_lora(res.final_lora)
    bundle = tiny("sd1")
    lines = []
    merge_into_bundle(bundle, specs_from_lists([str(res.final_lora)]), log=lines.append)
    table = bundle.text_encoders[0].get_input_embeddings().weight
    assert torch.equal(table[[89, 336]], sd["bundle_emb.zq.string_to_param.*"].to(table.dtype))
    assert "trained embeddings of zq written into the token rows" in lines[-1]


def test_a_word_no_caption_holds_is_refused_before_loading(tmp_path):
    data = dataset(tmp_path, n_train=1)
    with pytest.raises(UserError, match="--train_embedding usu: no caption or folder name"):
        run(options(tmp_path, data, "--max_train_steps", "1", "--train_embedding", "usu"))


def test_bundles_of_other_writers_load_or_are_left_out_loudly(caplog):
    """A1111 reads a single tensor of any key for a one-encoder model; a vector count that differs from the word's
    token count cannot be replaced one for one: that word is skipped with a warning and the LoRA still loads."""
    from lorakit.adapters.embeddings import TokenEmbeddings

    bundle = tiny("sd1")
    width = bundle.text_encoders[0].get_input_embeddings().weight.shape[1]
    emb = TokenEmbeddings.from_bundle(bundle, {"bundle_emb.zq.clip_l": torch.zeros(2, width)}, "f.safetensors")
    assert emb.words == ["zq"] and torch.equal(emb.vector(0, 0), torch.zeros(2, width))
    with caplog.at_level("WARNING"):
        none = TokenEmbeddings.from_bundle(bundle, {"bundle_emb.zq.string_to_param.*": torch.zeros(3, width)}, "f")
    assert none is None and "holds 3 vector(s) for a word of 2 token(s)" in caplog.text
    with pytest.raises(UserError, match="needs \\[tokens, "):
        TokenEmbeddings.from_bundle(bundle, {"bundle_emb.zq.string_to_param.*": torch.zeros(2, width + 1)}, "f")
