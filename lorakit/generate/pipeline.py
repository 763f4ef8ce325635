"""txt2img, img2img and highres fix over a ModelBundle, with our own denoising loop on diffusers schedulers.

    gen = Generator(bundle, lora_dir="loras", model_name="nai", model_hash="1a2b3c4d5e")
    result = gen(GenerationSettings(prompt="1girl <lora:aru:0.8>", steps=28, seed=42))
    result.images[0], result.infotexts[0]
    gen.close()   # restores LoRA-free weights

Seeds follow A1111: image i of a batch (and of later iterations) uses seed + i. Each image has its own CPU random
generator for its initial noise and for the sampler's noise, so an image does not depend on the batch it was in.
Classifier-free guidance with AND weights: eps = uncond + sum_i w_i * cfg * (cond_i - uncond).
"""

from __future__ import annotations

import inspect
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from lorakit.errors import UserError
from lorakit.generate.conditioning_prompt import ConditioningSchedule, PromptEncoder, split_prompt_tags
from lorakit.generate.infotext import GenerationParams, format_infotext, parse_infotext, png_info_for

__all__ = ["GenerationSettings", "GenerationResult", "Generator", "settings_from_infotext", "save_image_unique",
           "next_image_path", "random_seed", "generate_samples", "HIRES_UPSCALERS"]

HIRES_UPSCALERS = ("Latent", "Latent (nearest)", "Latent (nearest-exact)", "Latent (bicubic)")
_UPSCALE_MODES = {"latent": "bilinear", "latent (nearest)": "nearest", "latent (nearest-exact)": "nearest-exact",
                  "latent (bicubic)": "bicubic"}


def random_seed() -> int:
    return random.randrange(4294967294)  # A1111's range


@dataclass
class GenerationSettings:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    schedule_type: str | None = None
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    clip_skip: int | None = None  # None: the family's default (1 on SD1, 2 on SD2/SDXL)
    batch_size: int = 1
    n_iter: int = 1
    hires_scale: float | None = None  # highres fix when set (e.g. 2.0)
    hires_steps: int = 0  # 0: same as steps
    hires_upscaler: str = "Latent"
    denoising_strength: float | None = None  # img2img / hires; default 0.75 img2img, 0.7 hires (A1111)
    init_image: object = None  # img2img: a PIL image or a path
    emphasis: str = "Original"
    distilled_cfg_scale: float = 3.5  # FLUX.1-dev's guidance value (Forge's "Distilled CFG Scale")


@dataclass
class GenerationResult:
    images: list = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = None  # final latents (all images), before decoding


def _validate(s: GenerationSettings, family) -> None:
    if s.steps < 1:
        raise UserError(f"--steps must be at least 1, got {s.steps}.")
    for name, v in (("width", s.width), ("height", s.height)):
        if v < 64 or v % 8:
            raise UserError(f"--{name} {v}: use a multiple of 8 of at least 64 (e.g. {family.resolution}).")
    if s.batch_size < 1 or s.n_iter < 1:
        raise UserError("--batch_size and --n_iter must be at least 1.")
    if s.denoising_strength is not None and not 0.0 <= s.denoising_strength <= 1.0:
        raise UserError(f"--denoising_strength {s.denoising_strength} must be between 0 and 1.")
    if s.hires_scale is not None and s.hires_scale <= 0:
        raise UserError(f"--hr_scale {s.hires_scale} must be positive.")
    if s.hires_scale is not None and s.init_image is not None:
        raise UserError("Highres fix is a txt2img option; for img2img set --width/--height to the size you want.")
    if s.hires_upscaler.lower() not in _UPSCALE_MODES:
        raise UserError(f"Hires upscaler {s.hires_upscaler!r} is not supported; use one of {', '.join(HIRES_UPSCALERS)}.")


class Generator:
    """Generation with one model. LoRAs named in prompts stay applied between calls with the same tags (a grid over
    seeds or steps merges once); `close()` restores the original weights."""

    def __init__(self, bundle, lora_dir=None, lbw_presets=None, model_name: str | None = None,
                 model_hash: str | None = None, device=None, library=None):
        from lorakit.generate.lora_loading import LoraLibrary

        self.bundle = bundle
        self.device = torch.device(device) if device is not None else next(bundle.unet.parameters()).device
        self.library = library if library is not None else LoraLibrary(lora_dir, lbw_presets)
        self.model_name = model_name
        self.model_hash = model_hash
        self._applied = None
        self._encoders: dict[tuple, PromptEncoder] = {}
        self.version = _version()

    # ---- LoRAs ---------------------------------------------------------------------------------------------------
    def _set_loras(self, tags, seed: int):
        from lorakit.generate.lora_loading import apply_loras, resolve_tags

        resolved = resolve_tags(tags, self.library, seed=seed)  # every tag checked before anything is applied
        key = tuple((r.tag, str(r.path)) for r in resolved)
        if self._applied is not None and self._applied.key == key and not any(self._random_lbw(t) for t in tags):
            return self._applied
        self._drop_loras()
        self._applied = apply_loras(self.bundle, resolved, self.library)
        return self._applied

    def _random_lbw(self, tag) -> bool:
        # R/U block weights are drawn from the seed: a new seed needs a new merge
        if not tag.lbw:
            return False
        csv = self.library.presets.get(tag.lbw.strip(), tag.lbw)
        return any(v.strip() in ("R", "U") for v in csv.split(","))

    def invalidate(self) -> None:
        """Forget cached text encodings: call it after changing model weights outside this Generator."""
        self._encoders.clear()

    def _drop_loras(self) -> None:
        if self._applied is not None:
            self._applied.restore()
            self._applied = None
        self._encoders.clear()  # cached encodings saw other text-encoder weights

    def close(self) -> None:
        self._drop_loras()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _encoder(self, clip_skip, emphasis) -> PromptEncoder:
        key = (clip_skip, emphasis)
        enc = self._encoders.get(key)
        if enc is None:
            enc = self._encoders[key] = PromptEncoder(self.bundle, clip_skip, emphasis)
        return enc

    # ---- main ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, settings: GenerationSettings, progress=None, decode: bool = True) -> GenerationResult:
        """Generate batch_size x n_iter images. decode=False skips the VAE (latents only, no images)."""
        s = replace(settings)
        fam = self.bundle.family
        _validate(s, fam)
        if s.seed is None or int(s.seed) < 0:
            s.seed = random_seed()
        if fam.objective == "flow":
            return self._flow_call(s, progress, decode)
        clean, neg_clean, tags = split_prompt_tags(s.prompt, s.negative_prompt)
        applied = self._set_loras(tags, s.seed)
        encoder = self._encoder(s.clip_skip, s.emphasis)
        first_steps = s.steps
        cond = ConditioningSchedule(encoder, clean, neg_clean, first_steps)
        init_latents = self._encode_init(s) if s.init_image is not None else None
        hr_cond = None
        hr_steps = s.hires_steps or s.steps
        if s.hires_scale is not None and init_latents is None:
            hr_cond = ConditioningSchedule(encoder, clean, neg_clean, s.steps, hires_steps=hr_steps)

        result = GenerationResult()
        all_latents = []
        for it in range(s.n_iter):
            seeds = [int(s.seed) + it * s.batch_size + i for i in range(s.batch_size)]
            latents = self._sample_batch(s, cond, applied, seeds, init_latents, progress)
            if hr_cond is not None:
                latents = self._hires(s, hr_cond, applied, seeds, latents, hr_steps, progress)
            all_latents.append(latents)
            images = self.decode(latents) if decode else [None] * len(seeds)
            for seed, img in zip(seeds, images):
                if decode:
                    result.images.append(img)
                result.seeds.append(seed)
                result.infotexts.append(self.infotext(s, seed, applied.hashes))
        result.latents = torch.cat(all_latents)
        return result

    def _flow_call(self, s: GenerationSettings, progress, decode: bool) -> GenerationResult:
        """FLUX.1: Euler along the flow with dev's distilled guidance (no negative prompt, no second pass)."""
        from lorakit.generate.flux_sampling import euler_flow, flux_timesteps, flux_velocity
        from lorakit.models.conditioning import encode_t5_clip
        from lorakit.models.flux import pack_latents, unpack_latents

        _check_flow_settings(s, self.bundle.family)
        clean, _neg, tags = split_prompt_tags(s.prompt, s.negative_prompt)
        applied = self._set_loras(tags, s.seed)
        hidden, pooled = encode_t5_clip(self.bundle, [clean], self.bundle.family.t5_max_length, False)
        c, h, w = self._latent_shape(s.width, s.height)
        shift = bool(self.bundle.configs["scheduler"].get("use_dynamic_shifting"))  # dev: yes; schnell: no
        times = flux_timesteps(s.steps, (h // 2) * (w // 2), shift)
        result = GenerationResult()
        for it in range(s.n_iter):
            seeds = [int(s.seed) + it * s.batch_size + i for i in range(s.batch_size)]
            velocity = flux_velocity(self.bundle, hidden.expand(len(seeds), -1, -1),
                                     pooled.expand(len(seeds), -1), s.distilled_cfg_scale, h, w, self.device)
            noise = self._noise((c, h, w), seeds).to(self.device)
            latents = unpack_latents(euler_flow(velocity, pack_latents(noise), times, progress), h, w)
            result.latents = latents if result.latents is None else torch.cat([result.latents, latents])
            for seed, img in zip(seeds, self.decode(latents) if decode else [None] * len(seeds)):
                if decode:
                    result.images.append(img)
                result.seeds.append(seed)
                result.infotexts.append(self.infotext(s, seed, applied.hashes))
        return result

    def infotext(self, s: GenerationSettings, seed: int, lora_hashes: dict) -> str:
        fam = self.bundle.family
        clip = s.clip_skip if s.clip_skip is not None else fam.default_clip_skip
        sampler, sched = s.sampler, s.schedule_type
        from lorakit.generate.samplers import resolve_sampler

        sampler = resolve_sampler(sampler).name
        p = GenerationParams(
            prompt=s.prompt, negative_prompt=s.negative_prompt, steps=s.steps, sampler=sampler, schedule_type=sched,
            cfg_scale=float(s.cfg_scale), seed=int(seed), width=s.width, height=s.height,
            model_hash=self.model_hash, model=self.model_name, clip_skip=int(clip), lora_hashes=dict(lora_hashes),
            version=f"lorakit {self.version}")
        if s.init_image is not None or s.hires_scale is not None:
            p.denoising_strength = self._strength(s)
        if s.hires_scale is not None and s.init_image is None:
            p.hires_upscale = s.hires_scale
            p.hires_steps = s.hires_steps or None
            p.hires_upscaler = s.hires_upscaler
        if s.emphasis != "Original":
            p.extra["Emphasis"] = s.emphasis
        if fam.guidance_embed:
            p.extra["Distilled CFG Scale"] = f"{s.distilled_cfg_scale:g}"
        return format_infotext(p)

    # ---- pieces --------------------------------------------------------------------------------------------------
    @staticmethod
    def _strength(s: GenerationSettings) -> float:
        if s.denoising_strength is not None:
            return float(s.denoising_strength)
        return 0.75 if s.init_image is not None else 0.7

    def _latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        f = self.bundle.latent_factor
        return self.bundle.vae.config.latent_channels, height // f, width // f

    def _scheduler(self, s: GenerationSettings):
        from lorakit.generate.samplers import make_scheduler

        return make_scheduler(s.sampler, self.bundle.noise_scheduler.config, s.schedule_type)

    @staticmethod
    def _noise(shape, seeds: Sequence[int], gens=None) -> torch.Tensor:
        gens = gens or [torch.Generator("cpu").manual_seed(int(sd)) for sd in seeds]
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])

    def _sample_batch(self, s, cond, applied, seeds, init_latents, progress):
        gens = [torch.Generator("cpu").manual_seed(sd) for sd in seeds]
        shape = self._latent_shape(s.width, s.height)
        noise = self._noise(shape, seeds, gens).to(self.device)
        sched = self._scheduler(s)
        if init_latents is None:
            sched.set_timesteps(s.steps, device=self.device)
            timesteps = sched.timesteps
            latents = noise * sched.init_noise_sigma
            n_steps = s.steps
        else:
            timesteps, n_steps = _img2img_timesteps(sched, s.steps, self._strength(s), exact=False,
                                                    device=self.device)
            if n_steps == 0:
                return init_latents.expand(len(seeds), -1, -1, -1).clone()
            base = init_latents.expand(len(seeds), -1, -1, -1)
            latents = sched.add_noise(base, noise, timesteps[:1].repeat(len(seeds)))
            if n_steps != s.steps:
                cond = ConditioningSchedule(cond.encoder, cond.prompt, cond.negative_prompt, n_steps)
        return self._denoise(s, sched, timesteps, latents, cond, applied, gens, n_steps, (s.height, s.width), progress)

    def _hires(self, s, cond, applied, seeds, latents, hr_steps, progress):
        c, h, w = latents.shape[1:]
        f = self.bundle.latent_factor
        tw, th = int(s.width * s.hires_scale) // f * f, int(s.height * s.hires_scale) // f * f
        mode = _UPSCALE_MODES[s.hires_upscaler.lower()]
        kw = {} if mode.startswith("nearest") else {"align_corners": False}
        up = torch.nn.functional.interpolate(latents, size=(th // f, tw // f), mode=mode, **kw)
        strength = self._strength(s)
        # A1111: the second pass uses fresh generators with the same seeds
        gens = [torch.Generator("cpu").manual_seed(sd) for sd in seeds]
        noise = self._noise(up.shape[1:], seeds, gens).to(self.device)
        sched = self._scheduler(s)
        timesteps, n = _img2img_timesteps(sched, hr_steps, strength, exact=True, device=self.device)
        if n == 0:
            return up
        latents = sched.add_noise(up, noise, timesteps[:1].repeat(len(seeds)))
        return self._denoise(s, sched, timesteps, latents, cond, applied, gens, hr_steps, (th, tw), progress)

    def _denoise(self, s, sched, timesteps, latents, cond, applied, gens, n_steps, size_hw, progress):
        from lorakit.models.conditioning import added_cond_kwargs

        unet = self.bundle.unet
        udtype = next(unet.parameters()).dtype
        bsz = latents.shape[0]
        order = max(int(getattr(sched, "order", 1)), 1)
        step_takes_gen = "generator" in inspect.signature(sched.step).parameters
        cfg = float(s.cfg_scale)
        for i, t in enumerate(timesteps):
            step = min(i // order, n_steps - 1) + 1
            sc = cond.at(step)
            if applied.has_schedule:
                applied.set_step(step)
            n_c = sc.context.shape[0]  # 1 (negative) + AND sub-prompts
            x = torch.cat([latents] * n_c)
            x = sched.scale_model_input(x, t)
            ctx = sc.context.to(self.device, udtype).repeat_interleave(bsz, dim=0)
            pooled = None if sc.pooled is None else sc.pooled.to(self.device, udtype).repeat_interleave(bsz, dim=0)
            rows = n_c * bsz
            kwargs = {"encoder_hidden_states": ctx, **added_cond_kwargs(
                self.bundle.family, pooled, [size_hw] * rows, [(0, 0)] * rows, [size_hw] * rows, dtype=udtype,
                device=self.device)}
            out = unet(x.to(udtype), t, **kwargs).sample.float()
            out = out.view(n_c, bsz, *out.shape[1:])
            uncond = out[0]
            guided = uncond.clone()
            for k, wgt in enumerate(sc.weights):
                guided += (out[k + 1] - uncond) * (wgt * cfg)
            extra = {"generator": gens} if step_takes_gen else {}
            latents = sched.step(guided, t, latents, **extra, return_dict=False)[0]
            if progress is not None:
                progress(i + 1, len(timesteps))
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list:
        """Latents -> PIL images, VAE in float32 (fp16 VAEs overflow, SDXL's in particular)."""
        from PIL import Image

        vae = self.bundle.vae
        vdtype = next(vae.parameters()).dtype
        if vdtype != torch.float32:
            vae.to(torch.float32)
        try:
            images = []
            for lat in latents:  # one at a time: decoding is the memory peak
                z = lat[None].float() / self.bundle.latent_scale
                shift = self.bundle.latent_shift  # FLUX's AE: z = latents / 0.3611 + 0.1159
                x = vae.decode((z + shift if shift else z).to(self.device)).sample
                x = ((x[0].float() + 1) / 2).clamp(0, 1)
                arr = (x.permute(1, 2, 0).cpu().numpy() * 255.0).astype("uint8")
                images.append(Image.fromarray(arr))
        finally:
            if vdtype != torch.float32:
                vae.to(vdtype)
        return images

    @torch.no_grad()
    def _encode_init(self, s: GenerationSettings) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        from lorakit.utils.images import load_rgb

        img = s.init_image
        if isinstance(img, (str, os.PathLike)):
            if not Path(img).is_file():
                raise UserError(f"--init_image {img} does not exist.")
            img = load_rgb(img)
        img = img.convert("RGB")
        if img.size != (s.width, s.height):
            img = img.resize((s.width, s.height), Image.LANCZOS)  # A1111 "Just resize"
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        vae = self.bundle.vae
        vdtype = next(vae.parameters()).dtype
        if vdtype != torch.float32:
            vae.to(torch.float32)
        try:
            # the distribution's mean: deterministic, so --from_png reproduces img2img too
            lat = vae.encode(x.to(self.device)).latent_dist.mean
        finally:
            if vdtype != torch.float32:
                vae.to(vdtype)
        return lat.float() * self.bundle.latent_scale


def _check_flow_settings(s: GenerationSettings, family) -> None:
    """What FLUX.1 sampling does not do (yet): classifier-free guidance with a negative prompt, other samplers,
    img2img and highres fix. Each is refused by name rather than ignored."""
    if s.width % 16 or s.height % 16:
        raise UserError(f"--width/--height {s.width}x{s.height}: {family.short_title} needs multiples of 16 (the AE's "
                        "8x downscale, then 2x2 latent patches).")
    asked = [flag for flag, on in (("--negative_prompt", bool(s.negative_prompt.strip())),
                                   (f"--cfg_scale {s.cfg_scale:g} (FLUX samples with 1; dev's guidance is "
                                    "--distilled_cfg_scale)", s.cfg_scale != 1),
                                   (f"--sampler {s.sampler}", s.sampler.lower() != "euler"),
                                   ("--init_image", s.init_image is not None),
                                   ("highres fix", s.hires_scale is not None))
             if on]
    if asked:
        raise UserError(f"{family.title} generation is the flow-matching Euler sampler with distilled guidance; "
                        f"not supported with it: {'; '.join(asked)}.")


def _img2img_timesteps(sched, steps: int, strength: float, exact: bool, device):
    """(timesteps, steps run). exact=False: A1111 img2img, int(strength * steps) of a `steps` schedule.
    exact=True: highres fix, `steps` steps of a longer schedule (A1111 runs exactly the hires steps asked for)."""
    strength = min(float(strength), 0.999)
    if strength <= 0:
        return [], 0
    if exact:
        total = max(int(steps / strength), steps)
        run = steps
    else:
        total = steps
        run = min(int(steps * strength), steps)
        if run == 0:
            return [], 0
    sched.set_timesteps(total, device=device)
    order = max(int(getattr(sched, "order", 1)), 1)
    t_start = (total - run) * order
    timesteps = sched.timesteps[t_start:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start)
    return timesteps, run


def _version() -> str:
    from lorakit import __version__

    return __version__


# ---- the trainer's previews ---------------------------------------------------------------------------------------
def generate_samples(bundle, prompts, outdir: str | Path, *, prefix: str = "", sampler: str = "DDIM",
                     clip_skip: int | None = None, lora_dir=None, device=None) -> list[Path]:
    """Render sd-scripts sample prompts (`lorakit.generate.sample_prompts.SamplePrompt`, e.g. from
    `load_sample_prompts`) with the bundle as it is now (a LoRA being trained may be hooked in). Unset fields take
    sd-scripts' defaults (30 steps, 512x512, CFG 7.5, sampler `sampler`). Files: `<prefix><index:02d>-<seed>.png`,
    written atomically with the parameters text."""
    from lorakit.generate.infotext import save_png_with_infotext
    from lorakit.generate.sample_prompts import SD_SCRIPTS_DEFAULTS

    outdir = Path(outdir)
    written = []
    gen = Generator(bundle, lora_dir=lora_dir, device=device)
    # sd-scripts' FLUX previews: no CFG unless --l asks (scale 1), dev's guidance from --g (3.5), the flow's Euler
    flow = bundle.family.objective == "flow"
    defaults = {**SD_SCRIPTS_DEFAULTS, **({"scale": 1.0, "guidance_scale": 3.5} if flow else {})}
    try:
        for sp in prompts:
            sp = sp.with_defaults(**defaults)
            s = GenerationSettings(prompt=sp.prompt, negative_prompt=sp.negative_prompt or "", steps=sp.steps,
                                   width=sp.width, height=sp.height, cfg_scale=sp.scale,
                                   seed=sp.seed if sp.seed is not None else -1,
                                   sampler=sp.sampler or ("Euler" if flow else sampler), clip_skip=clip_skip,
                                   distilled_cfg_scale=sp.guidance_scale if flow else 3.5)
            r = gen(s)
            path = outdir / f"{prefix}{sp.index:02d}-{r.seeds[0]}.png"
            save_png_with_infotext(r.images[0], path, r.infotexts[0])
            written.append(path)
    finally:
        gen.close()
    return written


# ---- settings from a PNG ------------------------------------------------------------------------------------------
def settings_from_infotext(text: str, base: GenerationSettings | None = None) -> GenerationSettings:
    """Settings that reproduce an image from its "parameters" text (fields it lacks keep `base`'s values)."""
    p = parse_infotext(text)
    s = replace(base) if base is not None else GenerationSettings()
    s.prompt, s.negative_prompt = p.prompt, p.negative_prompt
    for attr, val in (("steps", p.steps), ("sampler", p.sampler), ("schedule_type", p.schedule_type),
                      ("cfg_scale", p.cfg_scale), ("seed", p.seed), ("width", p.width), ("height", p.height)):
        if val is not None:
            if attr in ("steps", "seed", "width", "height") and not isinstance(val, int):
                raise UserError(f"The PNG's parameters have a bad {attr}: {val!r}.")
            setattr(s, attr, val)
    s.clip_skip = int(p.clip_skip) if p.clip_skip is not None else 1
    s.batch_size, s.n_iter = 1, 1
    if p.hires_upscale is not None:
        s.hires_scale = float(p.hires_upscale)
        s.hires_steps = int(p.hires_steps or 0)
        s.hires_upscaler = p.hires_upscaler or "Latent"
    if p.denoising_strength is not None:
        s.denoising_strength = float(p.denoising_strength)
    if "Emphasis" in p.extra:
        s.emphasis = p.extra["Emphasis"]
    return s


# ---- saving -------------------------------------------------------------------------------------------------------
def next_image_path(outdir: str | Path, tail, suffix: str = ".png", start: int | None = None) -> Path:
    """A1111-style `NNNNN-<tail>.png` (tail = the seed for images): the counter is one more than the highest
    counter already in the folder."""
    outdir = Path(outdir)
    if start is None:
        start = 0
        if outdir.is_dir():
            for p in outdir.iterdir():
                head = p.name.split("-", 1)[0]
                if head.isdigit() and not p.name.startswith("."):
                    start = max(start, int(head) + 1)
    return outdir / f"{start:05d}-{tail}{suffix}"


def save_image_unique(image, outdir: str | Path, tail, infotext: str | None) -> Path:
    """Save atomically as `NNNNN-<tail>.png` under a fresh counter. The file appears through a hard link, which
    fails instead of overwriting when another process took the name meanwhile; the counter then moves on."""
    import tempfile

    from lorakit.utils.atomic import FILE_MODE

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lorakit-", suffix=".png.tmp", dir=outdir)
    os.close(fd)
    try:
        kw = {"pnginfo": png_info_for(infotext)} if infotext else {}
        image.save(tmp, format="PNG", **kw)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600: a web UI running as another user could not read it
        target = next_image_path(outdir, tail)
        counter = int(target.name.split("-", 1)[0])
        for _ in range(100000):
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                counter += 1
                target = next_image_path(outdir, tail, start=counter)
            except OSError:  # file systems without hard links: rename (a file made in between could be replaced)
                if target.exists():
                    counter += 1
                    target = next_image_path(outdir, tail, start=counter)
                    continue
                os.replace(tmp, target)
                return target
        raise UserError(f"Could not find a free file name in {outdir}.")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
