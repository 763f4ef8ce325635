"""FLUX.1 LoRA files written by lorakit, judged by ComfyUI's and Forge's LoRA loaders: every tensor in the file is
read and lands on a model weight (nothing "lora key not loaded"), the factors multiply out to that weight's shape,
the loader applies the strength lorakit trained, and a full LoRA reaches every Linear the loader would patch.

The loaders' rules, restated here from their sources (not copied):

ComfyUI (comfyanonymous/ComfyUI)
  comfy/lora.py model_lora_keys_unet: every model key "diffusion_model.<path>.weight" is reachable as
      "lora_unet_" + <path> with "." -> "_", and as "diffusion_model.<path>". For Flux it also maps the diffusers names
      from comfy/utils.py flux_to_diffusers ("transformer.transformer_blocks.0.attn.to_q" -> a row slice of
      double_blocks.0.img_attn.qkv, also "lycoris_..." and "lora_transformer_...") and "<single block>.linear1_qkv"
      (the first 3*hidden rows of linear1). The model's own keys are BFL's (double_blocks.N.img_attn.qkv, ...), the
      layout Forge's backend/nn/flux.py also has.
  comfy/lora.py model_lora_keys_clip: FLUX's text encoder (comfy/text_encoders/flux.py FluxClipModel) holds
      "clip_l.transformer.text_model.*" (CLIPTextModel) and "t5xxl.transformer.*" (comfy/text_encoders/t5.py: shared,
      encoder.block.N.layer.0.SelfAttention.{q,k,v,o}, encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}, i.e.
      transformers' T5EncoderModel names minus encoder.embed_tokens).
      CLIP-L: for layer b < 32 and self_attn.{q,k,v,out}_proj, mlp.fc{1,2}: "lora_te_text_model_encoder_layers_{b}_<c>",
      "lora_te1_..." and "text_encoder.text_model.encoder.layers.{b}.<c>" (c with "_" for the lora_te names).
      T5: with clip_l and no clip_g: "lora_te2_<path>" (OneTrainer) and "lora_te3_<path>" (sd-scripts), <path> the key
      after "t5xxl.transformer." without ".weight", "." -> "_". Newer versions add "text_encoders.<key>" too.
  comfy/lora.py load_lora (+ comfy/weight_adapter): for every mapped name x it reads x.alpha (.item()), x.dora_scale,
      LoRA x.lora_up.weight + x.lora_down.weight [+ x.lora_mid.weight] (or the diffusers spellings), LoHa
      x.hada_w{1,2}_{a,b} [+ hada_t{1,2}], LoKr x.lokr_w1 | x.lokr_w1_{a,b} and x.lokr_w2 | x.lokr_w2_{a,b} [+ lokr_t2];
      any other key is logged "lora key not loaded" and dropped. One patch per model weight (a second overwrites).
      Deltas: LoRA alpha/down.shape[0] * up @ down; LoHa alpha/w1_b.shape[0] * (w1_a@w1_b) * (w2_a@w2_b); LoKr
      kron(w1, w2) * alpha/(rows of the low-rank b factor), * 1 when w1 and w2 are both full; reshaped to the weight.
      DoRA (weight_decompose): W' = dora_scale * (W + dW) / ||W + dW||, per output row if dora_scale.shape[0] == W's
      rows, else per input column.
  comfy/lora_convert.py convert_lora rewrites only BFL-control (img_in.lora_A.weight), Wan-Fun (lora_unet__blocks_),
      USO (single_blocks.37.processor.qkv_lora) and fused "attn.to_qkv" files; other files go in as they are.

Forge (lllyasviel/stable-diffusion-webui-forge)
  backend/patcher/lora.py model_lora_keys_unet / model_lora_keys_clip use packages_3rdparty/comfyui_lora_collection/
      lora.py (the rules above: lora_unet_, lora_te/lora_te1_ + text_encoder. for CLIP-L, lora_te3_ and lora_te2_ for
      T5) and add lora_te1_/lora_te2_/lora_te3_ + <path> for every "t5xxl.transformer.*.weight". The CLIP-L is
      transformers' CLIPTextModel under "clip_l.transformer." (backend/nn/clip.py), the T5 backend/nn/t5.py with
      T5EncoderModel's names under "t5xxl.transformer.". Its load_lora reads the same tensor names, dora_scale too,
      and merge_lora_to_weight uses the same deltas. extensions-builtin/sd_forge_lora/networks.py
      load_lora_for_models drops the whole LoRA ("LoRA version mismatch") when over 12 keys stay unmatched.

sd-scripts (kohya-ss/sd-scripts) networks/lora_flux.py, whose names lorakit writes: lora_unet_ (transformer), lora_te1_
  (CLIP-L), lora_te3_ (T5); split_qkv trains one LoRA per q/k/v (and MLP) part, but LoRANetwork.state_dict saves them
  merged into one module per fused layer: down = the parts' downs stacked (k*r, in), up block-diagonal (out, k*r),
  alpha unchanged (so a loader, dividing by the file's rank k*r, applies 1/k of it). lorakit saves k*alpha instead.
"""

from __future__ import annotations

import re

import pytest
import torch

from lorakit.adapters.network import create_network

# ComfyUI comfy/lora.py LORA_CLIP_MAP (same in Forge's comfyui_lora_collection): CLIP layers lora_te names reach
CLIP_LAYERS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
               "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
               "self_attn.out_proj": "self_attn_out_proj"}
# comfy/text_encoders/t5.py and Forge backend/nn/t5.py: the Linears of one T5 encoder block
T5_LINEARS = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
              "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
              "layer.1.DenseReluDense.wo")
# load_lora's LoRA spellings (up, down), tried in this order; lora_mid only with the first
LORA_SPELLINGS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                  (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                  (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))
LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

CONFIGS = {  # id: (network_module, network_args, the adapter kind each module has in the file)
    "lora": ("networks.lora", {}, "lora"),
    "lora_t5": ("networks.lora", {"train_t5xxl": "True"}, "lora"),
    "split_qkv": ("networks.lora", {"split_qkv": "True"}, "lora"),
    "in_dims": ("networks.lora", {"in_dims": "[4,4,4,4,4]"}, "lora"),
    "loha": ("lycoris.kohya", {"algo": "loha"}, "loha"),
    "lokr": ("lycoris.kohya", {"algo": "lokr"}, "lokr"),
    "lokr_both": ("lycoris.kohya", {"algo": "lokr", "factor": "16", "decompose_both": "True"}, "lokr"),
    "dora": ("lycoris.kohya", {"algo": "lora", "dora_wd": "True"}, "lora"),
    "dora_out": ("lycoris.kohya", {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}, "lora"),
}
DIM, ALPHA = 4, 2.0  # alpha != rank: a loader that scaled by the wrong rank would show


@pytest.fixture(scope="module")
def meta_dev():
    from lorakit.models.meta import meta_bundle

    return meta_bundle("flux-dev", components=("unet", "text_encoders"))


@pytest.fixture(scope="module")
def tiny_dev():
    from lorakit.models.tiny import tiny_bundle

    return tiny_bundle("flux-dev", seed=0)  # 19 double, 38 single blocks, 12 CLIP-L layers, 24 T5 blocks: same names


# ---- the model as the loaders hold it -----------------------------------------------------------------------------
def loader_model(bundle) -> dict[str, torch.Tensor]:
    """State dict of FLUX.1 as ComfyUI's and Forge's model objects name it: the BFL transformer under
    "diffusion_model." (ComfyUI model_base / Forge KModel .diffusion_model), CLIP-L under
    "clip_l.transformer.text_model." and T5 under "t5xxl.transformer." (ComfyUI FluxClipModel, Forge's
    JointTextEncoder of IntegratedCLIP / IntegratedT5). T5EncoderModel's tied encoder.embed_tokens is left out:
    their T5 has only `shared`."""
    out = {f"diffusion_model.{k}": v for k, v in bundle.unet.state_dict().items()}
    clip, t5 = bundle.text_encoders
    for k, v in clip.state_dict().items():  # transformers 5 drops the text_model. level; ComfyUI's names keep it
        out["clip_l.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    for k, v in t5.state_dict().items():
        if not k.startswith("encoder.embed_tokens."):
            out["t5xxl.transformer." + k] = v
    return out


def _weight_paths(model, prefix):
    return [(k, k[len(prefix):-len(".weight")]) for k in model if k.startswith(prefix) and k.endswith(".weight")]


def comfy_key_map(model) -> dict[str, object]:
    """ComfyUI comfy/lora.py model_lora_keys_unet + model_lora_keys_clip for a Flux model: LoRA name -> model key
    (or (key, (dim, start, length)) for a slice)."""
    km: dict[str, object] = {}
    for k, path in _weight_paths(model, "diffusion_model."):
        km["lora_unet_" + path.replace(".", "_")] = k
        km["diffusion_model." + path] = k  # generic format
        if path.endswith(".linear1"):  # isinstance(model, Flux): the q/k/v rows of a single block's linear1
            km["diffusion_model." + path + "_qkv"] = (k, (0, 0, 3 * model[k].shape[1]))
    for k in model:
        if k.startswith(("clip_l.", "t5xxl.")) and k.endswith(".weight"):
            km["text_encoders." + k[:-len(".weight")]] = k  # generic format (newer ComfyUI)
    clip_l = _map_clip_l(model, km)
    for k, path in _weight_paths(model, "t5xxl.transformer."):
        for te in (("te2", "te3") if clip_l else ("te1",)):  # t5 index: 1 + clip_g + clip_l, OneTrainer's 2 as well
            km[f"lora_{te}_{path.replace('.', '_')}"] = k
    return km


def forge_key_map(model) -> dict[str, object]:
    """Forge backend/patcher/lora.py model_lora_keys_unet + model_lora_keys_clip (over its
    comfyui_lora_collection/lora.py): LoRA name -> model key."""
    km: dict[str, object] = {}
    for k, path in _weight_paths(model, "diffusion_model."):
        km["lora_unet_" + path.replace(".", "_")] = k
        km["diffusion_model." + path] = k
    _map_clip_l(model, km)
    for k, path in _weight_paths(model, "t5xxl.transformer."):
        for te in ("te1", "te2", "te3"):  # collection: te3 (OneTrainer SD3), te2 (OneTrainer Flux); patcher: all three
            km[f"lora_{te}_{path.replace('.', '_')}"] = k
    return km


def _map_clip_l(model, km) -> bool:
    present = False
    for b in range(32):
        for c, c_ in CLIP_LAYERS.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in model:
                km[f"lora_te_text_model_encoder_layers_{b}_{c_}"] = k
                km[f"lora_te1_text_model_encoder_layers_{b}_{c_}"] = k
                km[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k  # diffusers
                present = True
    return present


LOADERS = {"ComfyUI": comfy_key_map, "Forge": forge_key_map}


# ---- reading a file as load_lora does ------------------------------------------------------------------------------
def load_like_comfy(sd, key_map):
    """comfy/lora.py load_lora (Forge: comfyui_lora_collection/lora.py load_lora): for each mapped name, the tensors it
    reads. Returns ({model key: [(name, kind, {suffix: tensor})]}, the file keys it read)."""
    patches: dict[object, list] = {}
    read: set[str] = set()
    for x, target in key_map.items():
        got = {s: sd[f"{x}.{s}"] for s in ("alpha", "dora_scale") if f"{x}.{s}" in sd}
        read.update(f"{x}.{s}" for s in got)
        kind, t = None, {}
        for up, down in LORA_SPELLINGS:
            if x + up in sd:
                assert x + down in sd, f"{x}{up} without {down}: load_lora raises KeyError"
                kind, t = "lora", {"up": sd[x + up], "down": sd[x + down]}
                read.update((x + up, x + down))
                if up == ".lora_up.weight" and f"{x}.lora_mid.weight" in sd:
                    t["mid"] = sd[f"{x}.lora_mid.weight"]
                    read.add(f"{x}.lora_mid.weight")
                break
        if f"{x}.hada_w1_a" in sd:
            names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
            if f"{x}.hada_t1" in sd:
                names += ["hada_t1", "hada_t2"]
            missing = [n for n in names if f"{x}.{n}" not in sd]
            assert not missing, f"{x}: LoHa without {missing}: load_lora raises KeyError"
            kind, t = "loha", {n: sd[f"{x}.{n}"] for n in names}
            read.update(f"{x}.{n}" for n in names)
        lokr = {n: sd[f"{x}.{n}"] for n in LOKR if f"{x}.{n}" in sd}
        if lokr:
            read.update(f"{x}.{n}" for n in lokr)
            if {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"} & set(lokr):
                kind, t = "lokr", lokr
        if kind is not None:
            patches.setdefault(target, []).append((x, kind, {**t, **got}))
    return patches, read


def target_shape(model, target) -> tuple[int, ...]:
    if isinstance(target, tuple):  # a slice (dim, start, length) of a weight
        key, (dim, _start, length) = target
        shape = list(model[key].shape)
        shape[dim] = length
        return tuple(shape)
    return tuple(model[target].shape)


def product_shape(name: str, kind: str, t: dict) -> tuple[int, ...]:
    """The shape of the delta the loader builds from a Linear module's factors (their inner sizes must agree)."""
    if kind == "lora":
        up, down = t["up"].flatten(1), t["down"].flatten(1)
        assert "mid" not in t and up.shape[1] == down.shape[0], f"{name}: up {tuple(up.shape)} down {tuple(down.shape)}"
        return up.shape[0], down.shape[1]
    if kind == "loha":
        assert "hada_t1" not in t
        one = (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
        two = (t["hada_w2_a"].shape[0], t["hada_w2_b"].shape[1])
        assert t["hada_w1_a"].shape[1] == t["hada_w1_b"].shape[0] and t["hada_w2_a"].shape[1] == t["hada_w2_b"].shape[0]
        assert one == two, f"{name}: Hadamard factors {one} and {two}"
        return one

    def side(n):
        if f"lokr_{n}" in t:
            return tuple(t[f"lokr_{n}"].shape)
        a, b = t[f"lokr_{n}_a"], t[f"lokr_{n}_b"]
        assert a.shape[1] == b.shape[0], f"{name}: lokr_{n}_a {tuple(a.shape)} lokr_{n}_b {tuple(b.shape)}"
        return a.shape[0], b.shape[1]

    assert "lokr_t2" not in t
    (a, c), (b, d) = side("w1"), side("w2")
    return a * b, c * d  # torch.kron


def check_file(sd: dict[str, torch.Tensor], model: dict[str, torch.Tensor], loader: str, kind: str):
    """What a loader makes of the file: every key read, every module on one model weight whose shape its factors
    give, an alpha load_lora can .item(), a dora_scale weight_decompose can broadcast. Returns the patches."""
    assert not ("img_in.lora_A.weight" in sd or "single_blocks.37.processor.qkv_lora.up.weight" in sd
                or any(k.startswith("lora_unet__") or re.search(r"attn[._]to_qkv", k) for k in sd)), \
        "comfy/lora_convert.py convert_lora would rewrite the file"
    patches, read = load_like_comfy(sd, LOADERS[loader](model))
    unread = sorted(set(sd) - read)
    assert not unread, f"{loader}: {len(unread)} keys not loaded, e.g. {unread[:5]}"
    for target, mods in patches.items():
        assert len(mods) == 1, f"{loader}: {[m[0] for m in mods]} all patch {target} (only the last would act)"
        name, got_kind, t = mods[0]
        assert got_kind == kind, f"{name}: read as {got_kind}"
        want = target_shape(model, target)
        assert len(want) == 2, f"{name} -> {target}: not a Linear"
        assert product_shape(name, got_kind, t) == want, f"{loader}: {name} does not give {target}'s shape {want}"
        assert "alpha" in t and t["alpha"].numel() == 1, f"{name}: no scalar alpha"
        if "dora_scale" in t:
            assert tuple(t["dora_scale"].shape) in ((want[0], 1), (1, want[1])), f"{name}: dora_scale shape"
    return patches


# ---- the file's keys ------------------------------------------------------------------------------------------------
def file_of(net, monkeypatch) -> dict[str, torch.Tensor]:
    """The tensors Network.save_weights hands to the file writer (lorakit.adapters.file.save_lora); on the meta device
    nothing can be written, so the writer is replaced by a spy. test_file_keys_are_the_meta_capture checks on the
    tiny model that the written file has exactly these keys."""
    import lorakit.adapters.file as lfile

    captured = {}

    def spy(path, state_dict, metadata=None, precision="fp16", bare=False):
        captured.update(state_dict)
        return dict(metadata or {})

    monkeypatch.setattr(lfile, "save_lora", spy)
    net.save_weights("spy.safetensors")
    return captured


def _net(bundle, config: str):
    module, args, _kind = CONFIGS[config]
    return create_network(bundle, module, DIM, ALPHA, args)


# ---- the tests ------------------------------------------------------------------------------------------------------
def bfl_flux_dev_linears(h=3072, mlp=12288, depth=19, depth_single=38) -> dict[str, tuple[int, int]]:
    """FLUX.1-dev's Linear weights in BFL's module tree (Forge backend/nn/flux.py, ComfyUI comfy/ldm/flux, BFL's
    flux/model.py): hidden 3072, MLP 4x, 64 latent channels in and out, T5 4096, CLIP pooled 768, 256-wide
    timestep/guidance embeddings."""
    w = {"img_in": (h, 64), "txt_in": (h, 4096), "final_layer.linear": (64, h),
         "final_layer.adaLN_modulation.1": (2 * h, h)}
    for emb, width in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        w[f"{emb}.in_layer"], w[f"{emb}.out_layer"] = (h, width), (h, h)
    for i in range(depth):
        for s in ("img", "txt"):
            w |= {f"double_blocks.{i}.{s}_mod.lin": (6 * h, h), f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h),
                  f"double_blocks.{i}.{s}_attn.proj": (h, h), f"double_blocks.{i}.{s}_mlp.0": (mlp, h),
                  f"double_blocks.{i}.{s}_mlp.2": (h, mlp)}
    for i in range(depth_single):
        w |= {f"single_blocks.{i}.linear1": (3 * h + mlp, h), f"single_blocks.{i}.linear2": (h, h + mlp),
              f"single_blocks.{i}.modulation.lin": (3 * h, h)}
    return w


def test_the_model_keys_are_bfl_and_comfyui_names(meta_dev):
    """The key map below is built from lorakit's meta model; that model must carry the names the loaders' models
    carry: BFL's Linear tree for the transformer, ComfyUI's CLIP-L layer names, ComfyUI's T5 block names."""
    linears = {n: tuple(m.weight.shape) for n, m in meta_dev.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == bfl_flux_dev_linears()
    model = loader_model(meta_dev)
    assert sum(f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight" in model
               for b in range(32) for c in CLIP_LAYERS) == 12 * 6
    t5 = {k for k in model if k.startswith("t5xxl.transformer.encoder.block.") and k.endswith(".weight")}
    assert {f"t5xxl.transformer.encoder.block.{b}.{p}.weight" for b in range(24) for p in T5_LINEARS} <= t5


@pytest.mark.parametrize("config", list(CONFIGS))
def test_full_size_file_maps_completely(meta_dev, monkeypatch, config):
    """Full-size FLUX.1-dev (meta): under ComfyUI's and Forge's rules every key of the file is read, each module
    patches exactly one weight with factors of that weight's shape, and the modules cover every Linear of every
    double and single block, the 72 CLIP-L Linears (lora_te1_), with train_t5xxl the 168 T5 Linears (lora_te3_), with
    in_dims the 8 embedder Linears - and nothing else."""
    net = _net(meta_dev, config)
    sd = file_of(net, monkeypatch)
    model = loader_model(meta_dev)
    _module, args, kind = CONFIGS[config]
    want = {k for k in model if k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks."))
            and k.endswith(".weight")}  # in the blocks, every ".weight" is a Linear's (the norms are ".scale")
    want |= {f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight" for b in range(12) for c in CLIP_LAYERS}
    if args.get("train_t5xxl"):
        want |= {f"t5xxl.transformer.encoder.block.{b}.{p}.weight" for b in range(24) for p in T5_LINEARS}
    if args.get("in_dims"):
        want |= {f"diffusion_model.{p}.weight" for p in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
                                                         "vector_in.in_layer", "vector_in.out_layer",
                                                         "guidance_in.in_layer", "guidance_in.out_layer")}
    for loader in LOADERS:
        patches = check_file(sd, model, loader, kind)
        assert set(patches) == want, (loader, sorted(set(patches) ^ want)[:5])
    assert len({k.split(".")[0] for k in sd}) == len(want)
    if config == "split_qkv":
        # sd-scripts' saved layout: one fused module per fused layer, rank k*r, never per-part lora_down.N keys
        assert not any(re.search(r"\.lora_(down|up)\.\d", k) for k in sd)
        assert tuple(sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape) == (3 * 3072, 3 * DIM)
        assert tuple(sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape) == (3 * DIM, 3072)
        assert tuple(sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape) == (3 * 3072 + 12288, 4 * DIM)
        assert tuple(sd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape) == (4 * DIM, 3072)


def comfy_weight(kind: str, t: dict, w: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI (comfy/weight_adapter lora/loha/lokr + base.weight_decompose) and Forge
    (backend/patcher/lora.py merge_lora_to_weight) compute at strength 1."""
    w = w.float()
    alpha = float(t["alpha"]) if "alpha" in t else None
    f = {k: v.float() for k, v in t.items() if k not in ("alpha", "dora_scale")}
    if kind == "lora":
        diff, scale = f["up"].flatten(1) @ f["down"].flatten(1), (alpha / f["down"].shape[0] if alpha else 1.0)
    elif kind == "loha":
        diff = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        scale = alpha / f["hada_w1_b"].shape[0] if alpha else 1.0
    else:
        dim = None
        if "lokr_w1" in f:
            w1 = f["lokr_w1"]
        else:
            w1, dim = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w1_b"].shape[0]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        else:
            w2, dim = f["lokr_w2_a"] @ f["lokr_w2_b"], f["lokr_w2_b"].shape[0]
        diff, scale = torch.kron(w1, w2), (alpha / dim if alpha is not None and dim is not None else 1.0)
    diff = diff.reshape(w.shape)
    if "dora_scale" not in t:
        return w + scale * diff
    merged = w + scale * diff
    ds = t["dora_scale"].float()
    if ds.shape[0] == w.shape[0]:  # per output row
        norm = merged.reshape(w.shape[0], -1).norm(dim=1, keepdim=True)
    else:  # per input column
        norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    return merged * (ds / (norm + torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_file_keys_are_the_meta_capture_and_act_as_trained(meta_dev, tiny_dev, tmp_path, monkeypatch, config):
    """A real file (tiny FLUX.1-dev, same module names as the full size): its keys are exactly those captured on the
    meta device (LoKr: its modules; which factors are low-rank follows the layer sizes), both loaders read all of it,
    and the weight they compute from it (their alpha/rank scales, LoKr's full-factor rule, DoRA's norm axis) is the
    one lorakit trained, so nothing is applied at another strength. For split_qkv that means the file's alpha is
    k*alpha for its rank k*r (sd-scripts' unchanged alpha would give 1/k)."""
    net = _net(tiny_dev, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():  # "trained": every factor non-zero (split_qkv's off-diagonal blocks never act)
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / f"{config}.safetensors"
    net.save_weights(path, precision=None)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    with monkeypatch.context() as m:
        captured = set(file_of(_net(meta_dev, config), m))
    if CONFIGS[config][2] == "lokr":  # which LoKr factors are low-rank depends on the layer's size: compare modules
        assert {k.split(".")[0] for k in sd} == {k.split(".")[0] for k in captured}
    else:
        assert set(sd) == captured
    model = loader_model(tiny_dev)
    modules = dict(net.named_children())
    for loader in LOADERS:
        patches = check_file(sd, model, loader, CONFIGS[config][2])
        assert len(patches) == len(modules)
    for target, [(name, kind, t)] in patches.items():
        w = model[target]
        with torch.no_grad():
            ours = modules[name].new_weight(w, 1.0)
        theirs = comfy_weight(kind, t, w)
        assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-6), (name, (theirs - ours).abs().max())
    if config == "split_qkv":
        h, up = tiny_dev.unet.params.hidden_size, sd["lora_unet_double_blocks_3_txt_attn_qkv.lora_up.weight"]
        off = torch.ones_like(up, dtype=torch.bool)
        for j in range(3):
            off[j * h:(j + 1) * h, j * DIM:(j + 1) * DIM] = False
        assert up[off].abs().sum() == 0  # block-diagonal, as sd-scripts merges the parts
        assert float(sd["lora_unet_double_blocks_3_txt_attn_qkv.alpha"]) == 3 * ALPHA
        assert float(sd["lora_unet_single_blocks_0_linear1.alpha"]) == 4 * ALPHA
