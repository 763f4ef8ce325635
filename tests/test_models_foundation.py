"""Model families, single-file layout, loading/saving, tokenizer, safety of .ckpt loading."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import UserError
from lorakit.models.bundle import count_parameters
from lorakit.models.loading import load_bundle
from lorakit.models.meta import meta_bundle
from lorakit.models.saving import ldm_state_dict, save_single_file
from lorakit.models.tiny import tiny_bundle

FAMILIES = ["sd1", "sd2", "sd2-v", "sdxl"]


@pytest.fixture(scope="module")
def meta_sd1():
    return meta_bundle("sd1")


@pytest.fixture(scope="module")
def meta_sdxl():
    return meta_bundle("sdxl")


def test_full_size_parameter_counts_match_published(meta_sd1, meta_sdxl):
    assert count_parameters(meta_sd1.unet) == 859_520_964
    assert count_parameters(meta_sd1.vae) == 83_653_863
    assert count_parameters(meta_sd1.text_encoders[0]) == 123_060_480
    assert count_parameters(meta_sdxl.unet) == 2_567_463_684
    assert count_parameters(meta_sdxl.text_encoders[1]) == 694_659_840


# Names as they appear in real checkpoints (v1-5-pruned, sd_xl_base_1.0, v2-1_768-ema-pruned), written by hand.
REAL_KEYS = {
    "sd1": [
        ("model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
        ("model.diffusion_model.input_blocks.3.0.op.weight", (320, 320, 3, 3)),
        ("model.diffusion_model.input_blocks.4.0.skip_connection.weight", (640, 320, 1, 1)),
        ("model.diffusion_model.middle_block.2.out_layers.3.weight", (1280, 1280, 3, 3)),
        ("model.diffusion_model.output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
        ("model.diffusion_model.output_blocks.5.2.conv.weight", (1280, 1280, 3, 3)),
        ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
        ("model.diffusion_model.time_embed.2.weight", (1280, 1280)),
        ("model.diffusion_model.out.2.weight", (4, 320, 3, 3)),
        ("first_stage_model.encoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
        ("first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", (128, 256, 1, 1)),
        ("first_stage_model.decoder.up.3.upsample.conv.weight", (512, 512, 3, 3)),
        ("first_stage_model.quant_conv.weight", (8, 8, 1, 1)),
        ("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight", (768, 3072)),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", (768,)),
    ],
    "sd2": [
        ("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", (3072, 1024)),
        ("cond_stage_model.model.positional_embedding", (77, 1024)),
        ("cond_stage_model.model.ln_final.bias", (1024,)),
        ("model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320)),
    ],
    "sdxl": [
        ("model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
        ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", (640, 2048)),
        ("model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight", (1280, 5120)),
        ("model.diffusion_model.output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
        ("model.diffusion_model.output_blocks.8.0.skip_connection.weight", (320, 640, 1, 1)),
        ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", (768, 768)),
        ("conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight", (5120, 1280)),
        ("conditioner.embedders.1.model.text_projection", (1280, 1280)),
        ("conditioner.embedders.1.model.token_embedding.weight", (49408, 1280)),
    ],
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_single_file_names_are_the_real_ones(family, request):
    sd = ldm_state_dict(meta_bundle(family))
    for key, shape in REAL_KEYS[family]:
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    if family == "sd1":
        # v1-5-pruned-emaonly holds 1,130 tensors: 686 UNet + 248 VAE + 196 text encoder.
        assert len(sd) == 1130
        assert sum(k.startswith("model.diffusion_model.") for k in sd) == 686
        assert sum(k.startswith("first_stage_model.") for k in sd) == 248


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_single_file_round_trip_is_bit_identical(family, tmp_path):
    bundle = tiny_bundle(family, seed=3)
    path = tmp_path / f"{family}.safetensors"
    save_single_file(bundle, path)
    saved_keys = set(load_file(str(path)))
    assert saved_keys == set(ldm_state_dict(meta_bundle(family)))  # the full-size model's exact key list
    loaded = load_bundle(path)
    assert loaded.family.name == family
    for name, module in bundle.components().items():
        a, b = module.state_dict(), loaded.components()[name].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_fp16_save_and_dtype_choice(tmp_path):
    bundle = tiny_bundle("sd1", seed=1)
    path = tmp_path / "half.safetensors"
    save_single_file(bundle, path, dtype="fp16")
    assert all(t.dtype == torch.float16 for t in load_file(str(path)).values())
    loaded = load_bundle(path, dtype="bf16")
    assert next(loaded.unet.parameters()).dtype == torch.bfloat16
    ref = bundle.unet.state_dict()["conv_in.weight"].half().to(torch.bfloat16)
    assert torch.equal(loaded.unet.state_dict()["conv_in.weight"], ref)


def test_ckpt_with_ema_and_state_dict_wrapper_loads(tmp_path):
    bundle = tiny_bundle("sd1", seed=2)
    sd = ldm_state_dict(bundle)
    sd["model_ema.decay"] = torch.tensor(0.999)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000}, path)
    loaded = load_bundle(path, family="sd1", configs=bundle.configs)
    assert torch.equal(loaded.unet.conv_in.weight, bundle.unet.conv_in.weight)
    assert loaded.info["ema_present"]


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ckpt_is_refused_and_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"x": _Exploit()}}, fh)
    with pytest.raises(UserError, match="refused"):
        load_bundle(path)
    assert not marker.exists()
    # The same file through the CLI: a clear error, no traceback, exit 2.
    r = subprocess.run([sys.executable, "-m", "lorakit", "model", "info", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_unsupported_models_are_named(tmp_path):
    sd = ldm_state_dict(tiny_bundle("sd1"))
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    inpaint = dict(sd)
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, 3, 3)
    save_file(inpaint, str(tmp_path / "inpaint.safetensors"))
    with pytest.raises(UserError, match="inpainting"):
        load_bundle(tmp_path / "inpaint.safetensors")
    save_file({"model.diffusion_model.joint_blocks.0.x": torch.zeros(1)}, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(UserError, match="Stable Diffusion 3"):
        load_bundle(tmp_path / "sd3.safetensors")
    # FLUX.1 loads now (tests/test_flux_models.py); ComfyUI's scaled-fp8 FLUX files (per-tensor scales) do not
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
               "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1)}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(UserError, match="is a scaled-fp8 FLUX file .*, which lorakit does not train or load"):
        load_bundle(tmp_path / "flux.safetensors")
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)}, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(UserError, match="refiner"):
        load_bundle(tmp_path / "refiner.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(UserError, match="not a valid"):
        load_bundle(tmp_path / "trunc.safetensors")


def test_separate_vae_file_in_ldm_and_diffusers_layouts(tmp_path):
    base = tiny_bundle("sd1", seed=4)
    other = tiny_bundle("sd1", seed=5)
    full = ldm_state_dict(base)
    no_vae = {k: v for k, v in full.items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, str(tmp_path / "novae.safetensors"), metadata={"lorakit.configs": json.dumps({
        "unet": dict(base.configs["unet"]), "vae": dict(base.configs["vae"]),
        "text_encoder": dict(base.configs["text_encoder"])})})
    assert load_bundle(tmp_path / "novae.safetensors").vae is None
    ldm_vae = {k.removeprefix("first_stage_model."): v for k, v in ldm_state_dict(other).items()
               if k.startswith("first_stage_model.")}
    save_file(ldm_vae, str(tmp_path / "vae_ldm.safetensors"))
    save_file(other.vae.state_dict(), str(tmp_path / "vae_diffusers.safetensors"))
    for vae_file in ("vae_ldm.safetensors", "vae_diffusers.safetensors"):
        b = load_bundle(tmp_path / "novae.safetensors", vae=tmp_path / vae_file)
        for k, v in other.vae.state_dict().items():
            assert torch.equal(b.vae.state_dict()[k], v), (vae_file, k)


def test_sd2_prediction_type_from_flags_and_metadata(tmp_path):
    bundle = tiny_bundle("sd2", seed=0)
    path = tmp_path / "sd2.safetensors"
    save_file(ldm_state_dict(bundle), str(path), metadata={"lorakit.configs": json.dumps(
        {k: dict(v) for k, v in bundle.configs.items() if k != "scheduler"})})
    assert load_bundle(path, v2=True, v_parameterization=True).family.name == "sd2-v"
    assert load_bundle(path, v2=True).family.name == "sd2"
    assert load_bundle(path, family="sd2-v").noise_scheduler.config.prediction_type == "v_prediction"


def test_diffusers_folder_round_trip(tmp_path):
    from lorakit.models.saving import save_diffusers_folder

    bundle = tiny_bundle("sdxl", seed=6)
    save_diffusers_folder(bundle, tmp_path / "xl")
    loaded = load_bundle(tmp_path / "xl")
    assert loaded.family.name == "sdxl"
    for name, module in bundle.components().items():
        for k, v in module.state_dict().items():
            assert torch.equal(loaded.components()[name].state_dict()[k], v), (name, k)
    # and back to a single file with the real names
    save_single_file(loaded, tmp_path / "xl.safetensors")
    assert set(load_file(str(tmp_path / "xl.safetensors"))) == set(ldm_state_dict(meta_bundle("sdxl")))


def test_tokenizer_matches_reference_clip_ids():
    from lorakit.models.tokenizer import make_clip_tokenizer

    tok = make_clip_tokenizer()
    ids = tok("1girl, aru (blue archive), m4 carbine").input_ids
    assert ids == [49406, 272, 1611, 267, 23907, 263, 1746, 10548, 2361, 332, 275, 811, 34848, 49407]
    assert tok.model_max_length == 77 and len(tok) == 49408
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {49407}
    open_clip_padded = make_clip_tokenizer("!")("a cat", padding="max_length", max_length=77).input_ids
    assert open_clip_padded[:4] == [49406, 320, 2368, 49407] and set(open_clip_padded[4:]) == {0}


def test_tiny_bundle_families_share_text_encoder_layer_counts():
    b = tiny_bundle("sdxl")
    assert [te.config.num_hidden_layers for te in b.text_encoders] == [12, 32]
    assert b.unet.config.transformer_layers_per_block == [1, 2, 10]


def test_model_cli_info_tiny_and_convert(tmp_path, capsys):
    from lorakit.cli.main import main

    out = tmp_path / "t.safetensors"
    assert main(["model", "tiny", "--family", "sd1", "--out", str(out)]) == 0
    assert main(["model", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["family"] == "sd1" and info["problems"] == [] and len(info["sha256"]) == 64
    assert main(["model", "info", "sdxl", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["unet"] == 2_567_463_684
    assert main(["model", "convert", str(out), str(tmp_path / "half.safetensors"), "--dtype", "fp16"]) == 0
    assert main(["model", "info", str(tmp_path / "missing.safetensors")]) == 2


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loaded_model_computes_like_the_original(family, tmp_path):
    """Weights equal is not enough: non-persistent buffers (CLIP position_ids) must be real after loading."""
    from lorakit.models.conditioning import encode_text, tokenize

    bundle = tiny_bundle(family, seed=8)
    save_single_file(bundle, tmp_path / "m.safetensors")
    loaded = load_bundle(tmp_path / "m.safetensors")
    ids = tokenize(bundle, ["usu bear, forest"])
    with torch.no_grad():
        a, pa = encode_text(bundle, ids)
        b, pb = encode_text(loaded, ids)
        assert torch.equal(a, b)
        assert (pa is None and pb is None) or torch.equal(pa, pb)
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(bundle.vae.encode(x).latent_dist.mean, loaded.vae.encode(x).latent_dist.mean)


def test_tiny_sd1_diffusers_folder_is_recognised(tmp_path):
    from lorakit.models.saving import save_diffusers_folder

    bundle = tiny_bundle("sd1", seed=9)
    save_diffusers_folder(bundle, tmp_path / "sd1")
    loaded = load_bundle(tmp_path / "sd1")
    assert loaded.family.name == "sd1"
    assert torch.equal(loaded.text_encoders[0].state_dict()["embeddings.token_embedding.weight"],
                       bundle.text_encoders[0].state_dict()["embeddings.token_embedding.weight"])


_FIRST_IMPORT = """
import sys, importlib.util
from lorakit.models.bundle import import_model_libraries
from lorakit.models.tiny import tiny_bundle
import_model_libraries()
from diffusers.utils.import_utils import is_bitsandbytes_available
print("after diffusers:", "bitsandbytes" in sys.modules, is_bitsandbytes_available())
tiny_bundle("sd1")  # diffusers builds its modules without it
installed = importlib.util.find_spec("bitsandbytes") is not None
if installed:
    import bitsandbytes.optim  # lorakit's 8-bit optimizers import it when chosen: it still imports
print("later import:", installed, "bitsandbytes" in sys.modules)
"""


def test_diffusers_first_import_leaves_bitsandbytes_out():
    # diffusers imports bitsandbytes at import when installed (0.9 s a start here) for a quantizer lorakit never
    # uses; the first import of diffusers (models.bundle.import_model_libraries) keeps it out, nothing else
    r = subprocess.run([sys.executable, "-c", _FIRST_IMPORT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "after diffusers: False False" in r.stdout
    import importlib.util

    installed = importlib.util.find_spec("bitsandbytes") is not None
    assert f"later import: {installed} {installed}" in r.stdout
    # diffusers already imported (as in this process): the window is not opened, nothing is hidden
    from lorakit.models.bundle import import_model_libraries

    import_model_libraries()
    assert sys.modules.get("bitsandbytes", "absent") is not None


_NEEDS_IT = """
import sys
import lorakit.models.bundle as B
tries = []
def library_that_needs_it():
    tries.append(sys.modules.get("bitsandbytes", "absent"))
    if tries[-1] is None:
        import bitsandbytes  # noqa: F401  (hidden: ModuleNotFoundError)
B._import_model_libraries = library_that_needs_it
B.import_model_libraries()
print("tries:", tries, "after:", sys.modules.get("bitsandbytes", "absent"))
"""


def test_a_diffusers_that_needs_bitsandbytes_at_import_gets_it():
    r = subprocess.run([sys.executable, "-c", _NEEDS_IT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tries: [None, 'absent'] after: absent" in r.stdout  # hidden once, then imported as usual


def test_converted_reads_equal_plain_reads_and_do_not_share_the_buffer(tmp_path):
    from lorakit.models.checkpoint_io import StateSource

    g = torch.Generator().manual_seed(0)
    tensors = {"a16": torch.randn(64, 33, generator=g).half(), "b32": torch.randn(7, 5, 3, generator=g),
               "cbf": torch.randn(300, generator=g).bfloat16(), "ints": torch.arange(12).reshape(3, 4),
               "empty": torch.zeros(0, 4, dtype=torch.float16), "big16": torch.randn(128, 257, generator=g).half()}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    src = StateSource(path)
    for want in (None, torch.float32, torch.bfloat16, torch.float16):
        got = {k: src.get(k, want) for k in tensors}  # all read before any is checked: a shared buffer would show
        for k, t in tensors.items():
            expect = t.to(want) if want is not None and t.is_floating_point() else t
            assert got[k].dtype == expect.dtype and got[k].shape == expect.shape
            assert torch.equal(got[k], expect), (k, want)
    src.close()
