"""X/Y/Z grid: 2 LoRA files (glob over epoch snapshots) x 3 weights x 2 seeds on a tiny SD1 model."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import UserError
from lorakit.generate.grid import make_axis, run_grid, set_lora_tag
from lorakit.generate.lora_loading import LoraLibrary
from lorakit.generate.pipeline import GenerationSettings, Generator
from lorakit.models.tiny import tiny_bundle

torch.set_num_threads(1)  # tiny models: extra threads only fight the other jobs on a shared 2-core machine

MODULES = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
           "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]


def lora(bundle, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        w = bundle.unet.get_submodule(m).weight
        name = "lora_unet_" + m.replace(".", "_")
        out[f"{name}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.5
        out[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.5
        out[f"{name}.alpha"] = torch.tensor(2.0)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    bundle = tiny_bundle("sd1", seed=5)
    d = tmp_path_factory.mktemp("loras")
    for i in (1, 2):
        save_file(lora(bundle, i), str(d / f"run-00000{i}.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    save_file(lora(bundle, 9), str(d / "other.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    return bundle, d


def test_lora_file_by_weight_by_seed_grid(env):
    bundle, d = env
    lib = LoraLibrary(d)
    x = make_axis("LoRA weight", "0.5-1 [3]", lib)
    y = make_axis("Seed", "11,12", lib)
    z = make_axis("LoRA file", "run-*", lib)
    assert x.values == [0.5, 0.75, 1.0] and z.values == ["run-000001", "run-000002"]
    assert x.labels[1] == "LoRA weight: 0.75" and y.labels == ["Seed: 11", "Seed: 12"]

    base = GenerationSettings(prompt="a cat", negative_prompt="blurry", steps=2, width=64, height=64,
                              sampler="Euler a", cfg_scale=6.0, seed=-1)
    calls = []
    with Generator(bundle, library=lib) as gen:
        order = []

        def get_gen(ckpt):
            calls.append(ckpt)
            return gen

        res = run_grid(get_gen, base, x, y, z, on_cell=lambda key, r: order.append(key))
    assert calls == [None]
    # the LoRA file axis (cost-heavy) changes least often: all cells of file 1 come first
    assert [k[2] for k in order] == [0] * 6 + [1] * 6

    left, top = res.cell_origin
    assert left > 0 and top > 0
    assert len(res.subgrids) == 2
    for g in res.subgrids:
        assert g.size == (left + 3 * 64, top + 2 * 64)
        arr = np.asarray(g)
        assert (arr[:top, left:] < 100).any()  # column labels drawn
        assert (arr[top:, :left] < 100).any()  # row labels drawn
    assert res.image.size[0] > 2 * res.subgrids[0].size[0] and res.image.size[1] > res.subgrids[0].size[1]

    # each cell equals an ordinary generation with the same settings
    with Generator(bundle, lora_dir=d) as single:
        for iz, name in enumerate(z.values):
            for ix, w in enumerate(x.values):
                for iy, seed in enumerate((11, 12)):
                    s = GenerationSettings(prompt=f"a cat, <lora:{name}:{w}>", negative_prompt="blurry", steps=2,
                                           width=64, height=64, sampler="Euler a", cfg_scale=6.0, seed=seed)
                    r = single(s)
                    cell = np.asarray(res.subgrids[iz])[top + iy * 64: top + (iy + 1) * 64,
                                                       left + ix * 64: left + (ix + 1) * 64]
                    np.testing.assert_array_equal(cell, np.asarray(r.images[0]))
                    assert f"<lora:{name}:{w:g}>" in res.infotexts[(ix, iy, iz)]
    # weights really matter
    assert not np.array_equal(np.asarray(res.cells[(0, 0, 0)]), np.asarray(res.cells[(2, 0, 0)]))


def test_set_lora_tag_and_axis_errors(env):
    _, d = env
    lib = LoraLibrary(d)
    assert set_lora_tag("x <lora:a:0.8:lbw=OUTD>, y", name="b") == "x <lora:b:0.8:lbw=OUTD>, y"
    assert set_lora_tag("x <lora:a:0.8>", weight=0.25) == "x <lora:a:0.25>"
    assert set_lora_tag("x <lora:a:1:0.5>", lbw="INS") == "x <lora:a:1:unet=0.5:lbw=INS>"
    assert set_lora_tag("x", name="a") == "x, <lora:a:1>"
    with pytest.raises(UserError):
        set_lora_tag("x", weight=0.5)
    with pytest.raises(UserError, match="matches"):
        make_axis("LoRA file", "nothing-*", lib)
    with pytest.raises(UserError, match="not found"):
        make_axis("LoRA file", "run-000003", lib)
    with pytest.raises(UserError, match="preset"):
        make_axis("LBW preset", "ALL,NCNF", lib)
    assert make_axis("Size", "64x96", lib).values == [(64, 96)]
