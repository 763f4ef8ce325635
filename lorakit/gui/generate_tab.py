"""The Generate tab: txt2img with A1111 prompt syntax (<lora:name:weight>, LBW), a LoRA picker showing each file's
metadata, and X/Y/Z grids over epoch snapshots, weights and LBW presets. Uses the code behind `lorakit generate` and
`lorakit grid` (Generator, GenerationSettings, make_axis, run_grid, save_image_unique)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import UserError
from lorakit.gui.common import Context, handler

PREVIEW_SUFFIXES = (".preview.png", ".png", ".jpg", ".jpeg", ".webp")


class GeneratorCache:
    """One loaded model at a time (models are large); LoRAs named in the prompt are applied per call."""

    def __init__(self, allow=None):
        self.allow = allow  # which LoRA files a prompt may load (inside the GUI's roots)
        self.lock = threading.Lock()
        self.key = None
        self.gen = None

    def get(self, model: Path, lora_dir: Path | None, flux_files: "FluxFiles | None" = None):
        import torch

        from lorakit.generate.lora_loading import LoraLibrary
        from lorakit.generate.pipeline import Generator
        from lorakit.models.loading import load_bundle

        ff = flux_files or FluxFiles()
        key = (str(model), str(lora_dir), model.stat().st_mtime, ff)
        if self.key != key:
            self.close()
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            bundle = load_bundle(str(model), dtype="fp16" if dev == "cuda" else "fp32", clip_l=ff.clip_l,
                                 t5xxl=ff.t5xxl, ae=ff.ae)
            from lorakit.models.component_files import check_complete

            check_complete(bundle, model)  # a transformer-only FLUX file names the part fields to fill
            ff.apply_tokenizer(bundle)
            from lorakit.utils.finite import check_model_finite

            check_model_finite(bundle, model)
            bundle.to(dev)
            self.gen = Generator(bundle, library=LoraLibrary(lora_dir, allow=self.allow), model_name=model.stem,
                                 device=dev,
                                 model_hash=_model_hash(model))
            self.key = key
        else:
            self.gen.library.refresh()  # new epoch files appear while a run trains
        return self.gen

    def close(self):
        if self.gen is not None:
            self.gen.close()
        self.gen, self.key = None, None


@dataclass(frozen=True)
class FluxFiles:
    """FLUX.1's parts kept as files of their own (for a transformer-only model file), as `lorakit generate` takes
    them: --clip_l, --t5xxl, --ae and --tokenizer_cache_dir (T5's tokenizer for a full-size T5)."""

    clip_l: str | None = None
    t5xxl: str | None = None
    ae: str | None = None
    tokenizer_dir: str | None = None

    def apply_tokenizer(self, bundle) -> None:
        if not self.tokenizer_dir:
            return
        from lorakit.models.component_files import set_t5_tokenizer
        from lorakit.models.tokenizer import t5_tokenizer_from_cache

        if not bundle.family.t5_max_length:
            raise UserError(f"T5 tokenizer folder: {bundle.family.title} has no T5 encoder; clear the field.")
        set_t5_tokenizer(bundle, t5_tokenizer_from_cache(self.tokenizer_dir))


def family_defaults(family) -> dict:
    """Sampler settings that suit the model (FLUX.1: its Euler flow sampler at CFG 1 with dev's distilled guidance,
    schnell in 4 steps; the others: A1111's Euler a at CFG 7)."""
    if family.objective == "flow":
        return {"sampler": "Euler", "cfg": 1.0, "steps": 20 if family.guidance_embed else 4, "flux": True}
    return {"sampler": "Euler a", "cfg": 7.0, "steps": 20, "flux": False}


def _model_hash(path: Path) -> str | None:
    if not path.is_file():
        return None
    from lorakit.models.saving import file_hashes

    return file_hashes(path)["short_hash"]


def lora_files(folder: Path, allow=None) -> list[Path]:
    from lorakit.generate.lora_loading import LORA_EXTENSIONS

    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in LORA_EXTENSIONS and p.is_file()
                   and (allow is None or allow(p))), key=lambda p: p.name.lower())


def lora_preview(path: Path) -> str | None:
    for suffix in PREVIEW_SUFFIXES:
        p = path.with_name(path.stem + suffix)
        if p.is_file():
            return str(p)
    return None


def lora_card(info: dict) -> str:
    """Markdown of what matters when picking a LoRA: trained tags, dims, base model."""
    t = info.get("training", {})
    ranks = {b: v["rank"] for b, v in info.get("blocks", {}).items() if v.get("rank") is not None}
    dims = sorted({str(r) for r in ranks.values()})
    rows = [("family", info.get("family_title")), ("algorithm", info.get("algorithm")),
            ("network dim / alpha", f"{t.get('network_dim', '/'.join(dims) or '?')} / {t.get('network_alpha', '?')}"),
            ("base model", t.get("base_model")), ("output name", t.get("output_name")),
            ("steps / epoch", f"{t.get('steps', '?')} / {t.get('epoch', '?')}"),
            ("trigger", t.get("trigger_phrase")), ("resolution", t.get("resolution")),
            ("blocks", ", ".join(info.get("blocks_present", [])))]
    md = "\n".join(f"- **{k}**: {v}" for k, v in rows if v not in (None, "", "? / ?"))
    if t.get("top_tags"):
        md += "\n- **trained tags**: " + ", ".join(f"{tag} ({n})" for tag, n in t["top_tags"])
    if info.get("flagged"):
        md += f"\n- **warning**: {len(info['flagged'])} module(s) hold NaN/Inf or are all zero"
    return md


def build(gr, ctx: Context) -> dict:
    from lorakit.generate.samplers import sampler_names
    from lorakit.generate.xyz_values import AXIS_TYPES

    cache = GeneratorCache(allow=ctx.roots.contains)
    gr.Markdown("Prompts use the A1111 syntax: `(word:1.2)`, `[from:to:when]`, `AND`, `BREAK`, "
                "`<lora:NAME:WEIGHT>` and `<lora:NAME:1:lbw=PRESET>`. Images are saved with their parameters text.")
    with gr.Row():
        model = gr.Textbox(label="Model (checkpoint file or diffusers folder)", scale=3, elem_id="gen-model")
        lora_dir = gr.Textbox(label="LoRA folder", scale=3, elem_id="gen-lora-dir")
        refresh = gr.Button("List LoRAs", scale=1, elem_id="gen-refresh")
    ctx.targets["Generate: model"] = model
    ctx.targets["Generate: LoRA folder"] = lora_dir
    with gr.Row():
        with gr.Column(scale=2):
            lora_pick = gr.Dropdown(label="LoRA", choices=[], elem_id="gen-lora")
            lora_weight = gr.Slider(-1, 2, value=1.0, step=0.05, label="weight")
            insert = gr.Button("Add to prompt", elem_id="gen-insert")
        with gr.Column(scale=3):
            lora_md = gr.Markdown("", elem_id="gen-lora-card")
        lora_img = gr.Image(label="Preview", type="filepath", interactive=False, height=160, scale=1)
    family_md = gr.Markdown("", elem_id="gen-family")
    with gr.Row(visible=False) as flux_row:
        clip_l = gr.Textbox(label="FLUX.1 CLIP-L file (for a transformer-only model)", elem_id="gen-clip-l")
        t5xxl = gr.Textbox(label="FLUX.1 T5-XXL file", elem_id="gen-t5xxl")
        ae = gr.Textbox(label="FLUX.1 AE file", elem_id="gen-ae")
        tok_dir = gr.Textbox(label="T5 tokenizer folder (--tokenizer_cache_dir)", elem_id="gen-t5-tokenizer")
        distilled = gr.Number(label="Distilled CFG scale (FLUX.1-dev)", value=3.5, elem_id="gen-distilled-cfg")
    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="gen-prompt")
    negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="gen-negative")
    with gr.Row():
        sampler = gr.Dropdown(label="Sampler", choices=sampler_names(), value="Euler a", elem_id="gen-sampler")
        steps = gr.Number(label="Steps", value=20, precision=0, elem_id="gen-steps")
        cfg = gr.Number(label="CFG scale", value=7.0, elem_id="gen-cfg")
        seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id="gen-seed")
    with gr.Row():
        width = gr.Number(label="Width (0: the model's size)", value=0, precision=0, elem_id="gen-width")
        height = gr.Number(label="Height (0: the model's size)", value=0, precision=0, elem_id="gen-height")
        batch = gr.Number(label="Batch size", value=1, precision=0)
        clip_skip = gr.Number(label="Clip skip (0: the family's default)", value=0, precision=0)
        outdir = gr.Textbox(label="Save to", value=str(ctx.outputs / "txt2img"), elem_id="gen-outdir")
    gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-btn")
    gallery = gr.Gallery(label="Images", columns=4, height=320, elem_id="gen-gallery")
    infotext = gr.Textbox(label="Parameters (infotext)", lines=4, interactive=False, elem_id="gen-infotext")

    with gr.Accordion("X/Y/Z grid", open=False):
        gr.Markdown("Values as in A1111: `a,b,c`, `1-5`, `1-10 [5]`; the LoRA file axis takes globs over epoch "
                    "snapshots such as `mylora-*`.")
        axis_names = [a.name for a in AXIS_TYPES]
        axes = []
        for letter, default in (("X", "LoRA weight"), ("Y", "Nothing"), ("Z", "Nothing")):
            with gr.Row():
                t = gr.Dropdown(axis_names, value=default, label=f"{letter} type", elem_id=f"grid-{letter.lower()}-type")
                v = gr.Textbox(label=f"{letter} values", scale=3, elem_id=f"grid-{letter.lower()}-values",
                               value="0,0.5,1" if letter == "X" else "")
            axes += [t, v]
        grid_btn = gr.Button("Make grid", elem_id="grid-btn")
        grid_img = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="grid-image")

    def library_dir(text):
        return ctx.path(text, "LoRA folder", kind="dir") if text and text.strip() else None

    def model_path(text):
        p = ctx.path(text, "model")
        return ctx.roots.check_tree(p, "model folder") if p.is_dir() else p  # a diffusers folder's files too

    @handler
    def on_refresh(folder):
        d = library_dir(folder)
        if d is None:
            raise UserError("Type the LoRA folder first (or pick it in the Files tab).")
        names = [str(p.relative_to(d)) for p in lora_files(d, ctx.roots.contains)]
        if not names:
            gr.Warning(f"No LoRA files in {d}.")
        return gr.update(choices=names, value=names[-1] if names else None)

    @handler
    def on_pick(folder, name):
        from lorakit.adapters.info import summarize

        if not name:
            return "", None
        d = library_dir(folder)
        path = ctx.path(str(d / name), "LoRA file", kind="file")
        return lora_card(summarize(path)), lora_preview(path)

    def on_insert(text, name, weight):
        if not name:
            return text
        tag = f"<lora:{Path(name).stem}:{weight:g}>"
        return (text.rstrip() + " " + tag).strip() if text else tag

    def settings(fam, p, n, smp, st, c, sd, w, h, b, cs, dg=3.5):
        from lorakit.generate.pipeline import GenerationSettings

        return GenerationSettings(prompt=p or "", negative_prompt=n or "", steps=int(st), sampler=smp,
                                  cfg_scale=float(c), seed=int(sd if sd is not None else -1),
                                  width=int(w) or fam.resolution, height=int(h) or fam.resolution,
                                  clip_skip=int(cs) or None, batch_size=max(1, int(b or 1)),
                                  distilled_cfg_scale=float(dg if dg is not None else 3.5))

    def flux_files(cl, t5, a, tok):
        def opt(text, what, kind="file"):
            return str(ctx.path(text, what, kind=kind)) if text and str(text).strip() else None

        return FluxFiles(opt(cl, "CLIP-L file"), opt(t5, "T5-XXL file"), opt(a, "AE file"),
                         opt(tok, "T5 tokenizer folder", kind="dir"))

    @handler
    def on_gen_model(m):
        from lorakit.models.loading import plan_model

        if not m or not m.strip():
            return "", gr.update(visible=False), gr.update(), gr.update(), gr.update()
        fam = plan_model(model_path(m)).family
        d = family_defaults(fam)
        note = (" Sampling: Euler along the flow, CFG 1, no negative prompt; dev reads the distilled CFG scale."
                if d["flux"] else "")
        return (f"Model: **{fam.title}**.{note}", gr.update(visible=d["flux"]), gr.update(value=d["sampler"]),
                gr.update(value=d["cfg"]), gr.update(value=d["steps"]))

    @handler
    def on_generate(m, ld, p, n, smp, st, c, sd, w, h, b, cs, out, cl=None, t5=None, a=None, tok=None, dg=3.5):
        from lorakit.generate.pipeline import save_image_unique

        if not (p or "").strip():
            raise UserError("Type a prompt.")
        model_p = model_path(m)
        out_p = ctx.path(out, "output folder", must_exist=False)
        with cache.lock:
            gen = cache.get(model_p, library_dir(ld), flux_files(cl, t5, a, tok))
            s = settings(gen.bundle.family, p, n, smp, st, c, sd, w, h, b, cs, dg)
            r = gen(s)
        paths = [str(save_image_unique(img, out_p, sd_, text)) for img, sd_, text in zip(r.images, r.seeds,
                                                                                         r.infotexts)]
        return paths, "\n\n".join(r.infotexts)

    @handler
    def on_grid(m, ld, p, n, smp, st, c, sd, w, h, b, cs, out, xt, xv, yt, yv, zt, zv, cl=None, t5=None, a=None,
                tok=None, dg=3.5):
        from lorakit.generate.grid import make_axis, run_grid
        from lorakit.generate.pipeline import save_image_unique

        model_p = model_path(m)
        out_p = ctx.path(out, "output folder", must_exist=False)
        grids = ctx.path(str(Path(out_p).parent / "grids"), "grid folder (beside the output folder)", must_exist=False)
        with cache.lock:
            gen = cache.get(model_p, library_dir(ld), flux_files(cl, t5, a, tok))
            axes_ = [make_axis(t, v, gen.library) for t, v in ((xt, xv), (yt, yv), (zt, zv))]
            if all(a.name == "Nothing" for a in axes_):
                raise UserError("Choose at least the X axis type and values.")
            if any(a.name == "Checkpoint name" for a in axes_):
                raise UserError("The Checkpoint axis is available in `lorakit grid`; here the model is fixed.")
            base = settings(gen.bundle.family, p, n, smp, st, c, sd, w, h, 1, cs, dg)
            result = run_grid(lambda ckpt: gen, base, *axes_)
        text = result.infotexts[(0, 0, 0)]
        path = save_image_unique(result.image, grids, "grid", text)
        return str(path), text

    gen_inputs = [model, lora_dir, prompt, negative, sampler, steps, cfg, seed, width, height, batch, clip_skip,
                  outdir]
    flux_inputs = [clip_l, t5xxl, ae, tok_dir, distilled]
    model.change(on_gen_model, model, [family_md, flux_row, sampler, cfg, steps], show_progress="hidden")
    refresh.click(on_refresh, lora_dir, lora_pick)
    lora_pick.change(on_pick, [lora_dir, lora_pick], [lora_md, lora_img])
    insert.click(on_insert, [prompt, lora_pick, lora_weight], prompt)
    gen_btn.click(on_generate, gen_inputs + flux_inputs, [gallery, infotext])
    grid_btn.click(on_grid, gen_inputs + axes + flux_inputs, [grid_img, infotext])
    return {"cache": cache}


__all__ = ["build", "GeneratorCache", "FluxFiles", "family_defaults", "lora_card", "lora_files", "lora_preview"]
