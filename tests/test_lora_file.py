"""The LoRA file: save -> load round trips for every algorithm on a tiny SD1 model, metadata and hashes (computed here
independently), precision, files from other tools (LyCORIS/PEFT key styles), clear errors, and `lorakit lora info`."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.adapters import create_network, load_network, read_lora_file
from lorakit.adapters.file import detect_family
from lorakit.cli.main import main as cli_main
from lorakit.errors import UserError
from lorakit.models.tiny import tiny_bundle

torch.set_num_threads(1)  # tiny tensors: extra threads only contend on the shared test machine

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_bundle("sdxl", seed=0)


def randomize(net, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def unet_out(b):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)  # small inputs keep the tiny UNet fast
    ctx = torch.randn(1, 8, b.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if b.family.name == "sdxl":
        kw = dict(added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                                     "time_ids": torch.randn(1, 6, generator=g)})
    with torch.no_grad():
        return b.unet(x, torch.tensor([10]), ctx, **kw).sample


def te_out(b):
    ids = torch.arange(8)[None] * 37 % 500
    with torch.no_grad():
        return b.text_encoders[0](ids)[0]


# a few blocks keep this fast; each still has attention, ResNet (3x3 + 1x1 + time_emb_proj) and text-encoder layers
FEW = {"blocks": "IN01,IN02,MID,TE"}
ALGOS = {
    "lora": ("networks.lora", {**FEW}),
    "locon": ("networks.lora", {"conv_dim": "4", "conv_alpha": "2", **FEW}),
    "lycoris-lora": ("lycoris.kohya", {"algo": "lora", "conv_dim": "4", "conv_alpha": "2", **FEW}),
    "loha": ("lycoris.kohya", {"algo": "loha", **FEW}),
    "loha-tucker": ("lycoris.kohya", {"algo": "loha", "use_tucker": "True", **FEW}),
    "lokr": ("lycoris.kohya", {"algo": "lokr", "factor": "4", **FEW}),
    "dora": ("lycoris.kohya", {"algo": "lora", "dora_wd": "True", **FEW}),
    "dylora": ("networks.dylora", {"unit": "2", **FEW}),
    "full": ("lycoris.kohya", {"algo": "full", "preset": "attn-only", **FEW}),
}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_round_trip_and_merge(sd1, algo, tmp_path):
    module, args = ALGOS[algo]
    base_u, base_t = unet_out(sd1), te_out(sd1)
    net = randomize(create_network(sd1, module, 4, 2, args)).eval()
    net.apply_to(sd1)
    try:
        unmerged_u, unmerged_t = unet_out(sd1), te_out(sd1)
        net.set_multiplier(0.5)
        half_u = unet_out(sd1)
    finally:
        net.remove()
    assert (unmerged_u - base_u).abs().max() > 1e-3
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(path, precision="fp32")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == set(net.state_dict())
    loaded = load_network(sd1, path)  # unmerged, from the file
    try:
        torch.testing.assert_close(unet_out(sd1), unmerged_u, **TOL)
        torch.testing.assert_close(te_out(sd1), unmerged_t, **TOL)
    finally:
        loaded.remove()
    merged = load_network(sd1, path, multiplier=0.5, merge=True)
    try:
        torch.testing.assert_close(unet_out(sd1), half_u, **TOL)
    finally:
        merged.remove()
    torch.testing.assert_close(unet_out(sd1), base_u)
    # same-layout reload (resume)
    net2 = create_network(sd1, module, 4, 2, args)
    net2.load_weights(path)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(net2.state_dict()[k], v)


def test_stacking_two_files(sd1, tmp_path):
    """Two LoRAs stacked unmerged give what merging both gives; removing one leaves exactly the other."""
    for i, name in enumerate(("a", "b")):
        net = randomize(create_network(sd1, "networks.lora", 4, 4, FEW), seed=10 + i)
        net.save_weights(tmp_path / f"{name}.safetensors", precision="fp32")
    b_alone = load_network(sd1, tmp_path / "b.safetensors", multiplier=0.7)
    only_b_ref = unet_out(sd1)
    b_alone.remove()
    a = load_network(sd1, tmp_path / "a.safetensors")
    b = load_network(sd1, tmp_path / "b.safetensors", multiplier=0.7)
    both = unet_out(sd1)
    a.remove()  # not the last one applied
    only_b = unet_out(sd1)
    b.remove()
    am = load_network(sd1, tmp_path / "a.safetensors", merge=True)
    bm = load_network(sd1, tmp_path / "b.safetensors", multiplier=0.7, merge=True)
    both_merged = unet_out(sd1)
    bm.remove()
    am.remove()
    torch.testing.assert_close(both, both_merged, **TOL)
    torch.testing.assert_close(only_b, only_b_ref, **TOL)


def test_metadata_hashes_and_precision(sd1, tmp_path):
    net = randomize(create_network(sd1, "networks.lora", 8, 4, {"conv_dim": "8", "conv_alpha": "1"}))
    path = tmp_path / "my_lora-000003.safetensors"
    md = net.save_weights(path, precision="fp16", metadata={"ss_steps": "120", "ss_output_name": "other",
                                                            "lora_adapter_metadata": "{}"}, clip_skip=2)
    lf = read_lora_file(path)
    assert lf.metadata == md
    assert md["ss_output_name"] == "my_lora-000003"
    assert "lora_adapter_metadata" not in md
    assert md["ss_steps"] == "120" and md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "4"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "1"}
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.resolution"] == "512x512" and md["modelspec.encoder_layer"] == "2"
    assert md["modelspec.prediction_type"] == "epsilon"
    assert all(v.dtype == torch.float16 for v in lf.tensors.values())
    names = {k.split(".")[0] for k in lf.tensors}
    assert all(f"{n}.alpha" in lf.tensors for n in names)  # alpha on every module
    assert float(lf.tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert raw[8:10] == b'{"'
    # sshs_model_hash: sha256 of everything after the header (metadata does not change the tensor bytes)
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    # ModelSpec hash: each tensor's bytes, keys in sorted order, "0x" prefix
    h = hashlib.sha256()
    for k in sorted(k for k in header if k != "__metadata__"):
        s, e = header[k]["data_offsets"]
        h.update(raw[8 + n + s:8 + n + e])
    assert md["modelspec.hash_sha256"] == "0x" + h.hexdigest()
    # legacy: bytes 0x100000..0x110000 of the same tensors saved with only the ss_* metadata
    only_ss = tmp_path / "ss_only.safetensors"
    save_file({k: lf.tensors[k] for k in lf.tensors}, str(only_ss),
              metadata={k: v for k, v in md.items() if k.startswith("ss_")})
    assert md["sshs_legacy_hash"] == hashlib.sha256(only_ss.read_bytes()[0x100000:0x110000]).hexdigest()[:8]

    net.save_weights(tmp_path / "bf.safetensors", precision="bf16")
    assert {v.dtype for v in read_lora_file(tmp_path / "bf.safetensors").tensors.values()} == {torch.bfloat16}
    with pytest.raises(UserError, match="fp16"):
        net.save_weights(tmp_path / "x.safetensors", precision="int8")


def test_sdxl_metadata(sdxl, tmp_path):
    net = create_network(sdxl, "networks.lora", 4, 1, {"blocks": "IN04-IN05,TE"})
    md = net.save_weights(tmp_path / "xl.safetensors")
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.resolution"] == "1024x1024"
    assert all(k.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_4_", "lora_unet_input_blocks_5_"))
               for k in net.state_dict())


def test_wrong_family_and_bad_files(sd1, sdxl, tmp_path):
    xl = create_network(sdxl, "networks.lora", 4, 1, {})
    xl.save_weights(tmp_path / "xl.safetensors")
    with pytest.raises(UserError, match="is for SDXL.*model is Stable Diffusion 1"):
        load_network(sd1, tmp_path / "xl.safetensors")
    s1 = create_network(sd1, "networks.lora", 4, 1, {})
    s1.save_weights(tmp_path / "s1.safetensors")
    with pytest.raises(UserError, match="is for SD 1.x.*model is Stable Diffusion XL"):
        load_network(sdxl, tmp_path / "s1.safetensors")
    # an SDXL LoRA without telling metadata or TE keys: the layer shapes do not fit
    unet_only = {k: v for k, v in xl.state_dict().items() if k.startswith("lora_unet_")}
    renamed = {k.replace("lora_unet_input_blocks_4_1", "lora_unet_down_blocks_1_attentions_0"): v
               for k, v in unet_only.items() if k.startswith("lora_unet_input_blocks_4_1")}
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(UserError, match="do not fit"):
        load_network(sd1, tmp_path / "odd.safetensors")
    # corrupt / truncated
    data = (tmp_path / "s1.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        read_lora_file(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(UserError, match="corrupt"):
        read_lora_file(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")
    # unknown key style
    save_file({"model.layer.weight": torch.zeros(2, 2)}, str(tmp_path / "style.safetensors"))
    with pytest.raises(UserError, match="unknown LoRA key style"):
        load_network(sd1, tmp_path / "style.safetensors")
    # unknown module name of the right style
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "name.safetensors"))
    with pytest.raises(UserError, match="do not exist"):
        load_network(sd1, tmp_path / "name.safetensors")
    with pytest.raises(UserError, match="do not exist"):
        load_network(sd1, tmp_path / "name.safetensors", strict=False)  # nothing matches at all
    mixed = {**{k: v for k, v in s1.state_dict().items() if "mid_block" in k},
             "lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 4),
             "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 2)}
    save_file({k: v.contiguous() for k, v in mixed.items()}, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(UserError, match="1 module name"):
        load_network(sd1, tmp_path / "mixed.safetensors")
    lenient = load_network(sd1, tmp_path / "mixed.safetensors", strict=False)
    assert lenient.skipped_modules == ["lora_unet_nothing_here"] and len(lenient.adapters) == 12
    lenient.remove()


def test_family_detection_from_widths_and_metadata():
    def lora(name, inp):
        return {f"{name}.lora_down.weight": torch.zeros(2, inp), f"{name}.lora_up.weight": torch.zeros(4, 2)}
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert detect_family(lora(te, 768))[0] == {"sd1"}
    assert detect_family(lora(te, 1024))[0] == {"sd2", "sd2-v"}
    assert detect_family(lora(te, 1024), {"ss_base_model_version": "sd_v2_v"})[0] == {"sd2-v"}
    # SDXL and its v-prediction fine-tunes share weights: keys cannot tell them apart, metadata can
    assert detect_family(lora(k, 2048))[0] == {"sdxl", "sdxl-v"}  # diffusers-style SDXL names, told by width
    assert detect_family(lora(k, 768))[0] == {"sd1"}
    te1 = lora("lora_te1_text_model_encoder_layers_0_mlp_fc1", 768)
    assert detect_family(te1)[0] == {"sdxl", "sdxl-v"}
    assert detect_family(te1, {"ss_base_model_version": "sdxl_base_v1-0"})[0] == {"sdxl"}
    assert detect_family(te1, {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.prediction_type": "v"})[0] == \
        {"sdxl-v"}


def test_files_from_other_tools(sd1, tmp_path):
    """Hand-written LyCORIS (LoHa, LoKr, Tucker LoCon, IA3, full) and PEFT files load onto the layers they name."""
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    te = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    layer_q = sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    c = layer_q.in_features
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.1

    cin = sd1.unet.down_blocks[0].resnets[0].conv1.in_channels
    cout = sd1.unet.down_blocks[0].resnets[0].conv1.out_channels
    sd = {f"{q}.hada_w1_a": r(c, 2), f"{q}.hada_w1_b": r(2, c), f"{q}.hada_w2_a": r(c, 2), f"{q}.hada_w2_b": r(2, c),
          f"{q}.alpha": torch.tensor(1.0),
          f"{conv}.lora_down.weight": r(3, cin, 1, 1), f"{conv}.lora_mid.weight": r(3, 3, 3, 3),
          f"{conv}.lora_up.weight": r(cout, 3, 1, 1), f"{conv}.alpha": torch.tensor(3.0),
          f"{te}.weight": torch.rand(64), f"{te}.on_input": torch.tensor(False)}
    save_file(sd, str(tmp_path / "lyco.safetensors"))
    w_before = layer_q.weight.detach().clone()
    net = load_network(sd1, tmp_path / "lyco.safetensors", merge=True)
    expected = w_before + (sd[f"{q}.hada_w1_a"] @ sd[f"{q}.hada_w1_b"]) * (sd[f"{q}.hada_w2_a"] @ sd[f"{q}.hada_w2_b"]) / 2
    torch.testing.assert_close(layer_q.weight.detach(), expected, **TOL)
    assert {a.algo for a in net.adapters} == {"loha", "lora", "ia3"}
    net.remove()
    torch.testing.assert_close(layer_q.weight.detach(), w_before)

    # PEFT / diffusers naming with alpha in lora_adapter_metadata
    A, B = r(4, c), r(c, 4)
    tA, tB = r(4, 32), r(64, 4)
    peft = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": A,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": B,
            "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_A.weight": tA,
            "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight": tB}
    save_file(peft, str(tmp_path / "peft.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2, "unet.r": 4})})
    net = load_network(sd1, tmp_path / "peft.safetensors", merge=True)
    names = sorted(a.lora_name for a in net.adapters)
    assert names == sorted([q, te])
    torch.testing.assert_close(layer_q.weight.detach(), w_before + B @ A * 0.5, **TOL)
    net.remove()


def run_info(path, capsys, *extra):
    rc = cli_main(["lora", "info", str(path), *extra])
    return rc, capsys.readouterr().out


def test_lora_info_block_restricted(sd1, tmp_path, capsys):
    net = randomize(create_network(sd1, "networks.lora", 16, 8, {"blocks": "IN04-IN07,OUT03-OUT06"}))
    path = tmp_path / "blocks.safetensors"
    tag_freq = {"10_usu bear": {"bear": 12, "outdoors": 5, "solo": 9}, "1_bear": {"bear": 3}}
    net.save_weights(path, metadata={"ss_tag_frequency": json.dumps(tag_freq), "ss_steps": "800",
                                     "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
                                     "ss_dataset_dirs": json.dumps({"10_usu bear": {"n_repeats": 10, "img_count": 12}})})
    rc, out = run_info(path, capsys, "--json")
    info = json.loads(out)
    assert rc == 0
    assert info["family"] == "sd1" and info["algorithm"].startswith("LoRA")
    assert info["blocks_present"] == ["IN04", "IN05", "IN07", "OUT03", "OUT04", "OUT05", "OUT06"]
    assert all(b["rank"] == 16 and b["alpha"] == 8 for b in info["blocks"].values())
    assert info["modules"] == 7 * 12
    t = info["training"]
    assert t["steps"] == "800" and "AdamW8bit" in t["optimizer"]
    assert t["top_tags"][0] == ["bear", 15]
    assert t["dataset_dirs"]["10_usu bear"] == {"repeats": 10, "images": 12}
    # per-block norms equal the sum of |alpha/r * up @ down| computed here
    sd = net.state_dict()
    in04 = [n for n in {k.split(".")[0] for k in sd} if "down_blocks_1_attentions_0" in n]
    norms = [float((sd[f"{n}.lora_up.weight"].flatten(1).half().float() @ sd[f"{n}.lora_down.weight"].flatten(1)
                    .half().float()).norm() * 0.5) for n in in04]
    assert info["blocks"]["IN04"]["max_delta_norm"] == pytest.approx(max(norms), rel=1e-3)
    rc, text = run_info(path, capsys)
    assert "IN04, IN05, IN07, OUT03, OUT04, OUT05, OUT06" in text and "bear (15)" in text


def test_lora_info_flags_nan_and_zero(sd1, tmp_path, capsys):
    net = create_network(sd1, "networks.lora", 4, 1, {"blocks": "MID"})  # fresh: lora_up is zero everywhere
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    key = next(k for k in sd if k.endswith("lora_down.weight"))
    sd[key][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    rc, out = run_info(tmp_path / "bad.safetensors", capsys, "--json")
    info = json.loads(out)
    assert rc == 1
    problems = {f["module"]: f["problem"] for f in info["flagged"]}
    assert problems[key.split(".")[0]] == "NaN/Inf"
    assert sum(p.startswith("all zero") for p in problems.values()) == 11
    rc = cli_main(["lora", "info", str(tmp_path / "nope.safetensors")])
    assert rc == 2


def test_sdxl_diffusers_style_kohya_names_load(sdxl, tmp_path):
    """sd-scripts converts diffusers-style SDXL UNet names on load; so do we (same layers, same output)."""
    from lorakit.models.keymaps import unet_path_to_ldm

    net = randomize(create_network(sdxl, "networks.lora", 4, 4, {"blocks": "IN04,MID,OUT05"}))
    sai_to_diffusers = {}
    for name, mod in sdxl.unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            sai = unet_path_to_ldm(name, sdxl.configs["unet"])
            sai_to_diffusers["lora_unet_" + sai.replace(".", "_")] = "lora_unet_" + name.replace(".", "_")
    renamed = {}
    for k, v in net.state_dict().items():
        mod, _, param = k.partition(".")
        renamed[f"{sai_to_diffusers.get(mod, mod)}.{param}"] = v
    assert any("down_blocks" in k for k in renamed)
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(tmp_path / "dstyle.safetensors"))
    net.save_weights(tmp_path / "sai.safetensors", precision="fp32")
    a = load_network(sdxl, tmp_path / "sai.safetensors")
    ref = unet_out(sdxl)
    a.remove()
    b = load_network(sdxl, tmp_path / "dstyle.safetensors")
    got = unet_out(sdxl)
    assert sorted(x.lora_name for x in b.adapters) == sorted(x.lora_name for x in a.adapters)  # canonical SAI names
    b.remove()
    torch.testing.assert_close(got, ref, **TOL)


def test_bare_save_writes_only_given_metadata(sd1, tmp_path):
    net = create_network(sd1, "networks.lora", 4, 1, {"blocks": "MID"})
    from lorakit.adapters.file import save_lora

    save_lora(tmp_path / "bare.safetensors", net.state_dict(), {}, "fp16", bare=True)
    assert read_lora_file(tmp_path / "bare.safetensors").metadata == {}


def test_lbw_block_names_agree_with_generator(sd1, sdxl):
    lbw = pytest.importorskip("lorakit.generate.lbw")
    from lorakit.adapters.blocks import lbw_block_of
    from lorakit.adapters.targets import module_map

    for b in (sd1, sdxl):
        for name in module_map(b):
            mine = lbw_block_of(name)
            theirs = lbw.block_of_lora_name(name)
            assert (mine if mine != "OTHER" else None) == theirs, name
