"""`lorakit generate` (txt2img, img2img, highres fix, prompt files, --from_png, regularization images) and
`lorakit grid` (X/Y/Z comparison grids)."""

from __future__ import annotations

import sys
from pathlib import Path


def _common(p, grid: bool = False) -> None:
    p.add_argument("--model", required=True, help="checkpoint (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("--vae", help="a separate VAE file or folder")
    p.add_argument("--v2", action="store_true", help="SD2.x model (normally detected)")
    p.add_argument("--v_parameterization", action="store_true", help="SD2.x 768-v model (v-prediction)")
    p.add_argument("--sdxl", action="store_true", help="SDXL model (normally detected)")
    p.add_argument("--clip_l", help="FLUX.1: the CLIP-L text encoder file, for a transformer-only --model")
    p.add_argument("--t5xxl", help="FLUX.1: the T5-XXL text encoder file")
    p.add_argument("--ae", help="FLUX.1: the autoencoder file (ae.safetensors)")
    p.add_argument("--tokenizer_cache_dir", help="FLUX.1: folder with T5's tokenizer (DIR/google_t5-v1_1-xxl, as "
                                                 "sd-scripts keeps it) for single-file models")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="model precision (default fp16 on GPU, fp32 on CPU)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: cuda when available)")
    p.add_argument("--no_hash", action="store_true", help="do not hash the checkpoint for the 'Model hash' field")
    p.add_argument("--prompt", default=None, help="prompt in A1111 syntax, <lora:NAME:WEIGHT> tags included")
    p.add_argument("--negative_prompt", default="", help="negative prompt")
    p.add_argument("--lora_dir", help="folder of LoRA files; <lora:NAME> matches a file stem or ss_output_name")
    p.add_argument("--lbw_presets", help="LoRA Block Weight preset file (NAME:v1,v2,... lines); "
                                        "lbwpresets.txt in --lora_dir is read automatically")
    p.add_argument("--outdir", default="outputs/grids" if grid else "outputs/txt2img", help="output folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--width", type=int, help="default: the model's native size")
    p.add_argument("--height", type=int, help="default: the model's native size")
    p.add_argument("--seed", type=int, default=-1, help="-1: random")
    p.add_argument("--cfg_scale", type=float, help="classifier-free guidance scale (default 7; FLUX.1: 1)")
    p.add_argument("--distilled_cfg_scale", type=float, default=3.5,
                   help="FLUX.1-dev: the distilled guidance value (Forge's Distilled CFG Scale; default 3.5)")
    p.add_argument("--sampler", help="A1111 name: Euler a (default), Euler, DPM++ 2M Karras, DDIM, UniPC, ... "
                                     "(FLUX.1: Euler, the default there)")
    p.add_argument("--schedule_type", help="A1111 schedule type: Karras, Exponential, ... (optional)")
    p.add_argument("--clip_skip", type=int, help="A1111 clip skip (1 = last layer; default: the model family's)")
    p.add_argument("--emphasis", default="Original", help="Original, No norm, Ignore or None")
    p.add_argument("--hires_fix", action="store_true", help="highres fix: a second pass at --hr_scale")
    p.add_argument("--hr_scale", type=float, help="highres fix upscale factor (default 2; giving it turns highres "
                                                  "fix on)")
    p.add_argument("--hr_steps", type=int, default=0, help="highres fix steps (0 = --steps)")
    p.add_argument("--hr_upscaler", default="Latent", help="Latent, Latent (nearest), Latent (nearest-exact), Latent (bicubic)")
    p.add_argument("--denoising_strength", type=float, help="img2img / highres fix strength (default 0.75 / 0.7)")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images (txt2img, img2img, highres fix) with LoRAs in the prompt")
    _common(p)
    p.add_argument("--batch_size", type=int, default=1, help="images per batch (seeds seed, seed+1, ...)")
    p.add_argument("--n_iter", type=int, default=1, help="batches")
    p.add_argument("--init_image", help="img2img: the starting image")
    p.add_argument("--from_png", help="reproduce a PNG from its A1111 'parameters' text")
    p.add_argument("--prompt_file", help="sd-scripts prompt file (.txt lines with --n --w --h --d --l --s, .toml, .json)")
    p.add_argument("--count", type=int, help="regularization images: make COUNT images of --prompt in --outdir "
                                             "(resumable; suggested: 5x the training images)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("grid", help="X/Y/Z comparison grid (A1111 axis syntax; LoRA file / weight / LBW axes)")
    _common(p, grid=True)
    for axis in ("x", "y", "z"):
        p.add_argument(f"--{axis}_type", help="Seed, Steps, CFG Scale, Sampler, Prompt S/R, Checkpoint name, Clip skip, "
                                             "Size, Denoising, Hires steps, Hires upscale, LoRA file, LoRA weight, "
                                             "LBW preset" if axis == "x" else f"like --x_type ({axis.upper()} axis)")
        p.add_argument(f"--{axis}_values", help="a,b,c | 1-5 | 1-5 (+2) | 1-10 [5] | LoRA globs like name-*"
                       if axis == "x" else f"like --x_values ({axis.upper()} axis)")
    p.add_argument("--save_cells", action="store_true", help="also save every cell image")
    p.set_defaults(func=cmd_grid)


# ---- helpers ------------------------------------------------------------------------------------------------------
class _Models:
    """Loads models on demand and remembers the current one (a grid's Checkpoint axis switches between them)."""

    def __init__(self, args):
        self.args = args
        self.library = None

    def device_dtype(self):
        import torch

        dev = self.args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.args.dtype or ("fp16" if str(dev).startswith("cuda") else "fp32")
        return dev, dtype

    def generator(self, model: str | None = None):
        from lorakit.generate.lora_loading import LoraLibrary
        from lorakit.generate.pipeline import Generator
        from lorakit.models.loading import load_bundle

        a = self.args
        path = model or a.model
        if not Path(path).exists():
            from lorakit.models.paths import missing_model_error

            raise missing_model_error(path, "--model" if model is None else "Checkpoint name axis value")
        dev, dtype = self.device_dtype()
        from lorakit.utils.cpu import slow_half_warning

        slow = slow_half_warning(dev, dtype, "--dtype", "(fp32 is the CPU default) or generate on a GPU")
        if slow:
            print("warning: " + slow, file=sys.stderr)
        print(f"loading {path} ...", file=sys.stderr)
        bundle = load_bundle(path, vae=a.vae, dtype=dtype, v2=a.v2, v_parameterization=a.v_parameterization,
                             sdxl=a.sdxl, clip_l=a.clip_l, t5xxl=a.t5xxl, ae=a.ae)
        from lorakit.models.component_files import check_complete

        check_complete(bundle, path)
        if a.tokenizer_cache_dir:
            from lorakit.models.component_files import set_t5_tokenizer
            from lorakit.models.tokenizer import t5_tokenizer_from_cache

            if not any(spec.kind == "t5" for spec in bundle.family.text_encoders):
                raise _user(f"--tokenizer_cache_dir: {bundle.family.title} has no T5 encoder (its CLIP tokenizers "
                            "are bundled); remove the flag.")
            set_t5_tokenizer(bundle, t5_tokenizer_from_cache(a.tokenizer_cache_dir))
        from lorakit.utils.finite import check_model_finite

        check_model_finite(bundle, path)  # a NaN weight gives black images, not an error
        bundle.to(dev)
        if self.library is None:
            self.library = LoraLibrary(a.lora_dir, a.lbw_presets)
        return Generator(bundle, library=self.library, model_name=Path(path).stem,
                         model_hash=None if a.no_hash else _model_hash(path), device=dev)


def _check_outdir(outdir) -> None:
    """Before the model loads: the images must have somewhere to go."""
    from lorakit.utils.atomic import check_writable_dir

    check_writable_dir(outdir, "--outdir")


def _user(msg):
    from lorakit.errors import UserError

    return UserError(msg)


def _model_hash(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None  # diffusers folders have no A1111 hash
    from lorakit.models.saving import file_hashes

    return file_hashes(p)["short_hash"]


def _settings(args, family, prompt_required: bool = True):
    from lorakit.generate.pipeline import GenerationSettings

    if args.prompt is None and prompt_required:
        raise _user("Give --prompt (or --from_png / --prompt_file).")
    flow = family.objective == "flow"  # FLUX.1: Euler along the flow, no classifier-free guidance by default
    return GenerationSettings(
        prompt=args.prompt or "", negative_prompt=args.negative_prompt or "", steps=args.steps,
        sampler=args.sampler or ("Euler" if flow else "Euler a"), schedule_type=args.schedule_type,
        cfg_scale=args.cfg_scale if args.cfg_scale is not None else (1.0 if flow else 7.0), seed=args.seed,
        distilled_cfg_scale=args.distilled_cfg_scale,
        width=args.width or family.resolution, height=args.height or family.resolution, clip_skip=args.clip_skip,
        batch_size=getattr(args, "batch_size", 1), n_iter=getattr(args, "n_iter", 1),
        hires_scale=(args.hr_scale or 2.0) if args.hires_fix else args.hr_scale, hires_steps=args.hr_steps,
        hires_upscaler=args.hr_upscaler, denoising_strength=args.denoising_strength,
        init_image=getattr(args, "init_image", None), emphasis=args.emphasis)


def _progress_bar(total_hint: str = ""):
    """`cells 3/12` redrawn in place in a terminal; in a log file or pipe (where a carriage return glues the counts
    into one line) a line at about every tenth of the work and at the end."""
    from lorakit.utils.terminal import want_bar

    tty = want_bar(False)

    def show(done, total):
        if tty:
            print(f"\r{total_hint}{done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(f"{total_hint}{done}/{total}", file=sys.stderr, flush=True)

    return show


# ---- generate -----------------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from dataclasses import replace

    from lorakit.generate.infotext import read_infotext
    from lorakit.generate.pipeline import save_image_unique, settings_from_infotext

    _check_outdir(args.outdir)
    models = _Models(args)
    jobs = []
    if args.from_png:
        text = read_infotext(args.from_png) if Path(args.from_png).is_file() else None
        if not Path(args.from_png).is_file():
            raise _user(f"--from_png {args.from_png} does not exist.")
        if not text:
            raise _user(f"{args.from_png} has no 'parameters' text; only images saved by lorakit or the A1111 web "
                        f"UI (with their metadata intact) can be reproduced.")
    gen = models.generator()
    try:
        fam = gen.bundle.family
        if args.from_png:
            base = _settings(args, fam, prompt_required=False)
            s = settings_from_infotext(text, replace(base, hires_scale=None))
            if s.init_image is None and "Denoising strength" in text and "Hires upscale" not in text:
                raise _user(f"{args.from_png} is an img2img result; pass its --init_image as well.")
            from lorakit.generate.infotext import parse_infotext

            p = parse_infotext(text)
            if p.model_hash and gen.model_hash and p.model_hash != gen.model_hash:
                print(f"note: the PNG was made with model hash {p.model_hash}, --model has {gen.model_hash}; "
                      f"the image will differ.", file=sys.stderr)
            jobs.append(s)
        elif args.prompt_file:
            from lorakit.generate.sample_prompts import load_sample_prompts

            base = _settings(args, fam, prompt_required=False)
            for sp in load_sample_prompts(args.prompt_file):
                s = replace(base, prompt=sp.prompt)
                for attr, val in (("negative_prompt", sp.negative_prompt), ("width", sp.width),
                                  ("height", sp.height), ("seed", sp.seed), ("steps", sp.steps),
                                  ("cfg_scale", sp.scale), ("sampler", sp.sampler)):
                    if val is not None:
                        setattr(s, attr, val)
                jobs.append(s)
        else:
            jobs.append(_settings(args, fam))

        if args.count is not None:
            from lorakit.generate.reg_images import generate_reg_images

            if len(jobs) != 1:
                raise _user("--count makes regularization images from one --prompt; drop --prompt_file.")
            written = generate_reg_images(gen, jobs[0], args.count, args.outdir, model_id=Path(args.model).name,
                                          progress=_progress_bar("images "))
            print(f"{len(written)} new image(s) in {args.outdir} ({args.count} wanted)")
            return 0
        for s in jobs:
            r = gen(s, progress=_progress_bar("step "))
            for img, seed, text in zip(r.images, r.seeds, r.infotexts):
                path = save_image_unique(img, args.outdir, seed, text)
                print(path)
    finally:
        gen.close()
    return 0


# ---- grid ---------------------------------------------------------------------------------------------------------
def cmd_grid(args) -> int:
    from lorakit.generate.grid import make_axis, run_grid
    from lorakit.generate.lora_loading import LoraLibrary
    from lorakit.generate.pipeline import save_image_unique

    _check_outdir(args.outdir)
    models = _Models(args)
    models.library = LoraLibrary(args.lora_dir, args.lbw_presets)
    axes = [make_axis(getattr(args, f"{a}_type"), getattr(args, f"{a}_values"), models.library) for a in "xyz"]
    if all(a.name == "Nothing" for a in axes):
        raise _user("Give at least one axis: --x_type and --x_values (e.g. --x_type Seed --x_values 1-4).")
    ckpt_axis = any(a.name == "Checkpoint name" for a in axes)
    cache = {}

    def get_generator(ckpt):
        key = ckpt or args.model
        if key not in cache:
            cache.clear()  # one model in memory at a time
            cache[key] = models.generator(ckpt)  # None: --model (an error names that flag, not the axis)
        return cache[key]

    first = get_generator(None if not ckpt_axis else axes[[a.name for a in axes].index("Checkpoint name")].values[0])
    base = _settings(args, first.bundle.family)

    def on_cell(key, r):
        if args.save_cells:
            print(save_image_unique(r.images[0], Path(args.outdir) / "cells", r.seeds[0], r.infotexts[0]))

    try:
        result = run_grid(get_generator, base, *axes, progress=_progress_bar("cells "), on_cell=on_cell)
    finally:
        for g in cache.values():
            g.close()
    text = result.infotexts[(0, 0, 0)]
    print(save_image_unique(result.image, args.outdir, "grid", text))
    if len(result.subgrids) > 1:
        for iz, img in enumerate(result.subgrids):
            print(save_image_unique(img, args.outdir, f"grid-z{iz + 1}", text))
    return 0
