"""The GUI offers FLUX.1: the Train form detects the family from the model file and shows the FLUX.1 section (hidden
for SD models, whose runs refuse those flags); the Generate tab sets FLUX's sampler defaults, takes the text encoders
and AE as files of their own, and generates with a tiny FLUX through its handler."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from lorakit.gui.app import build_app
    from lorakit.models.saving import checkpoint_metadata, ldm_state_dict, save_single_file
    from lorakit.models.tiny import tiny_bundle

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("flux_gui")
    save_single_file(tiny_bundle("sd1", seed=0), root / "sd1.safetensors")
    bundle = tiny_bundle("flux-schnell", seed=0)
    save_single_file(bundle, root / "schnell.safetensors")
    sd = ldm_state_dict(bundle)  # the transformer alone, its CLIP-L beside it (as users keep BFL's release)
    md = {"lorakit.configs": checkpoint_metadata(bundle, "t")["lorakit.configs"]}
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("text_encoders.clip_l.")},
              str(root / "no_clip.safetensors"), metadata=md)
    prefix = "text_encoders.clip_l.transformer."
    save_file({k[len(prefix):]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)},
              str(root / "clip_l.safetensors"))
    demo, ctx = build_app(roots=[root], jobs_dir=root / "jobs")
    fns = {}
    for f in demo.fns.values():
        fns.setdefault(f.name, f.fn)
    yield {"root": root, "fns": fns, "ctx": ctx}
    demo.lorakit_generators.close()
    torch.set_num_threads(old)


def test_train_form_detects_flux_and_shows_its_section(env):
    from lorakit.gui import forms

    root, ctx = env["root"], env["ctx"]
    fam, line = forms.detected_family(str(root / "schnell.safetensors"), ctx.roots)
    assert fam.name == "flux-schnell" and "FLUX.1 [schnell]" in line and forms.flux_section_visible(fam)
    fam, line = forms.detected_family(str(root / "sd1.safetensors"), ctx.roots)
    assert fam.name == "sd1" and not forms.flux_section_visible(fam) and "FLUX" not in line
    fam, line = forms.detected_family("/etc/passwd", ctx.roots)
    assert fam is None and "outside" in line
    assert {"clip_l", "t5xxl", "ae", "blocks_to_swap", "timestep_sampling"} <= set(dict(forms.BASIC_SECTIONS)["FLUX.1"])
    label, update = env["fns"]["on_model"](str(root / "schnell.safetensors"), False, False, False)
    assert "FLUX.1 [schnell]" in label and update["visible"] is True


def test_generate_tab_sets_flux_defaults_and_generates(env, tmp_path):
    from lorakit.gui.generate_tab import family_defaults
    from lorakit.models.families import get_family

    assert family_defaults(get_family("flux-schnell")) == {"sampler": "Euler", "cfg": 1.0, "steps": 4, "flux": True}
    assert family_defaults(get_family("flux-dev"))["steps"] == 20
    assert family_defaults(get_family("sd1"))["sampler"] == "Euler a"
    root, fns = env["root"], env["fns"]
    md, row, sampler, cfg, steps = fns["on_gen_model"](str(root / "no_clip.safetensors"))
    assert "FLUX.1 [schnell]" in md and row["visible"] and (sampler["value"], cfg["value"], steps["value"]) == \
        ("Euler", 1.0, 4)
    args = [str(root / "no_clip.safetensors"), "", "a red cube", "", "Euler", 2, 1.0, 5, 64, 64, 1, 0,
            str(root / "gen")]
    with pytest.raises(Exception, match="clip_l"):  # the transformer-only file needs its CLIP-L
        fns["on_generate"](*args)
    paths, text = fns["on_generate"](*args, str(root / "clip_l.safetensors"), "", "", "", 3.5)
    assert len(paths) == 1 and "Steps: 2" in text and "Sampler: Euler" in text
