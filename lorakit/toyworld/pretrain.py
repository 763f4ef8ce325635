"""Pretraining the toy base model (issue 9): a tiny SD1-family checkpoint that draws the toy world from tag prompts.

Two stages, each resumable from `work_dir` and bounded by wall-clock minutes:

1. `train_vae`: a tiny AutoencoderKL (SD1 block types; 64 px -> 8x8x4 latents in the shipped v1, 16x16x4 in v2: see
   `BaseSpec`) as an autoencoder on pretraining images, in v2 also open-world ones (L1 + MSE + a small KL). Its
   `scaling_factor` is set from the latent std so scaled latents have unit variance.
2. `train_unet`: the UNet (SD1 block structure and layer counts, tiny widths) and a tiny 12-layer CLIP text encoder
   from scratch, jointly, on frozen-VAE latents of pretraining images; epsilon prediction on SD1's scaled_linear
   schedule, uniform timesteps, min-SNR weighting, 10% empty captions (for CFG) and tag dropout/shuffle so short
   prompts ("bear", "cat, sky") work. An EMA of both is kept and is what gets exported.

`export_base` writes one SD1 single-file checkpoint (fp16) with UNet, VAE and text encoder; our files carry their
configs, so `load_bundle(path)` rebuilds the tiny modules.

The UNet and text encoder see only `pretraining_sample` images: the held-out "usu bear" (black bear, crescent) never
appears to them. The VAE decoder stage also sees open-world images (a codec must render every colour; see
`train_vae_decoder`).
Checkpoints are written atomically (`atomic_path`), so a killed run resumes from the last one.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorakit.utils.atomic import atomic_path

IMAGE_SIZE = 64  # the world's pictures, for every spec (the classifier reads 64 px)
DEFAULT_POOL = 20000


@dataclass(frozen=True)
class BaseSpec:
    """The shape of one toy base. `v1` is the shipped base of issue 9 (8x8 latents); `v2` (issue 18) keeps the world
    at 64 px but halves the VAE's downsampling, so the UNet works on 16x16 latents, and widens the text encoder.

    Why 16x16 and not 32x32: on this project's 2-core CPU a pretraining step of the same UNet at 32x32 latents takes
    8.6 s at batch 32 (one thread; 1.0 s at 16x16), and a demo step 1.16 s (0.19 s) -- the demo could not finish in
    five minutes. At 16x16 the four UNet levels work at 16, 8, 4 and 2 latent pixels: the outer blocks still carry
    detail (an ear is 2-3 latent pixels instead of under one), the inner ones layout."""
    name: str
    image_size: int = IMAGE_SIZE
    vae_widths: tuple[int, ...] = (16, 32, 64, 64)  # one level fewer halves the downsampling: 64 px -> 16x16
    unet_widths: tuple[int, ...] = (16, 32, 64, 64)  # SD1's 1:2:4:4 ratios, so the 1x1 skip convs (and key names) are the real ones
    te_width: int = 32
    te_heads: int = 2
    vae_open_fraction: float = 0.0  # share of each VAE batch from the open world (see train_vae_decoder)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_widths) - 1)


SPECS = {
    "v1": BaseSpec("v1"),
    # The VAE sees the open world from its first step: it is a general codec, like SD's (see train_vae_decoder).
    "v2": BaseSpec("v2", vae_widths=(32, 64, 64), te_width=64, te_heads=4, vae_open_fraction=0.5),
}


def toy_configs(spec: BaseSpec | str = "v1") -> dict[str, dict]:
    """Module configs of the toy base: SD1 block types, layer counts and text-encoder depth; tiny widths."""
    from lorakit.models.families import get_family
    from lorakit.models.tiny import tiny_configs

    spec = SPECS[spec] if isinstance(spec, str) else spec
    cfg = tiny_configs(get_family("sd1"))
    cfg["text_encoder"].update(hidden_size=spec.te_width, intermediate_size=2 * spec.te_width,
                               num_attention_heads=spec.te_heads, projection_dim=spec.te_width)
    cfg["unet"].update(block_out_channels=list(spec.unet_widths), sample_size=spec.latent_size, attention_head_dim=4,
                       cross_attention_dim=spec.te_width)
    # one resnet per VAE level: the VAE is frozen, never LoRA-trained, and a cheaper one leaves time for the UNet
    cfg["vae"].update(block_out_channels=list(spec.vae_widths), layers_per_block=1, sample_size=spec.image_size,
                      down_block_types=cfg["vae"]["down_block_types"][:len(spec.vae_widths)],
                      up_block_types=cfg["vae"]["up_block_types"][:len(spec.vae_widths)])
    return cfg


def work_spec(work_dir: Path, spec: str | None = None) -> BaseSpec:
    """The spec a work dir was started with (spec.json); a new work dir takes `spec` (default v1). A different
    `spec` for an existing work dir is refused: its checkpoints have the other shapes."""
    path = Path(work_dir) / "spec.json"
    if path.exists():
        name = json.loads(path.read_text())["name"]
        if spec and spec != name:
            from lorakit.errors import UserError

            raise UserError(f"{work_dir} holds a '{name}' toy base; --spec {spec} needs a new --work_dir.")
        return SPECS[name]
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    chosen = SPECS[spec or "v1"]
    path.write_text(json.dumps(asdict(chosen)))
    return chosen


# ------------------------------------------------------------------------------------------------------------ data
def image_pool(work_dir: Path, n: int, seed: int = 0, log=print, kind: str = "pretrain"
               ) -> tuple[np.ndarray, list[dict]]:
    """The first `n` samples of a distribution ("pretrain", or "open" for the VAE decoder) as uint8 (n, 64, 64, 3)
    + attribute dicts, cached in work_dir."""
    from lorakit.toyworld.world import ToyWorld

    world = ToyWorld(seed, IMAGE_SIZE)
    sample = {"pretrain": world.sample, "open": world.open_sample}[kind]
    prefix = "pool" if kind == "pretrain" else f"pool_{kind}"
    img_path, meta_path = work_dir / f"{prefix}_{seed}_{n}.npy", work_dir / f"{prefix}_{seed}_{n}.json"
    if img_path.exists() and meta_path.exists():
        return np.load(img_path), json.loads(meta_path.read_text())
    t0 = time.time()
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    attrs = []
    for i in range(n):
        img, _, a = sample(i)
        images[i] = np.asarray(img, dtype=np.uint8)
        attrs.append(a)
    with atomic_path(img_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, images)
    with atomic_path(meta_path) as tmp:
        Path(tmp).write_text(json.dumps(attrs))
    log(f"rendered {n} {kind} images in {time.time() - t0:.0f}s")
    return images, attrs


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B,H,W,3) -> float (B,3,H,W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_caption(attrs: dict, rng: np.random.Generator, empty_p: float = 0.1) -> str:
    """Booru tags of `attrs`, each kept with a per-sample probability in [0.25, 1], shuffled; 10% empty (CFG)."""
    from lorakit.toyworld.world import tags

    if rng.random() < empty_p:
        return ""
    all_tags = tags(attrs)
    keep = rng.uniform(0.25, 1.0)
    kept = [t for t in all_tags if rng.random() < keep] or [all_tags[int(rng.integers(len(all_tags)))]]
    rng.shuffle(kept)
    return ", ".join(kept)


def _save_state(state: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ------------------------------------------------------------------------------------------------------------- VAE
def train_vae(work_dir: str | Path, minutes: float, batch_size: int = 32, lr: float = 2e-3, kl_weight: float = 1e-6,
              pool: int = DEFAULT_POOL, seed: int = 0, threads: int = 1, checkpoint_every_s: float = 120.0,
              log=print, spec: str | None = None, max_steps: int | None = None, open_pool: int = 6000) -> dict:
    """Stage 1: the whole VAE, on pretraining images and, as the spec says, open-world ones (`vae_open_fraction`)."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(threads)
    work_dir = Path(work_dir)
    bspec = work_spec(work_dir, spec)
    images, _ = image_pool(work_dir, pool, seed, log)
    n_open = int(round(batch_size * bspec.vae_open_fraction))
    open_images = image_pool(work_dir, open_pool, seed, log, kind="open")[0] if n_open else None
    cfg = toy_configs(bspec)["vae"]
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(cfg).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    run = StageState(work_dir / "vae_state.pt", {"model": vae, "opt": opt}, {"config": cfg}, checkpoint_every_s)
    run.resume(log, "VAE")
    rng = np.random.default_rng([seed, 11, run.step])
    losses = []
    with run.saved_on_interrupt(log):
        while _go_on(run, minutes, max_steps):
            for g in opt.param_groups:  # short warmup; a decay needs the stage's length, unknown: keep constant
                g["lr"] = lr * min(1.0, (run.step + 1) / 100)
            x = to_tensor(_batch(images, open_images, batch_size, n_open, rng))
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            l1, l2 = (rec - x).abs().mean(), (rec - x).pow(2).mean()
            kl = post.kl().mean()  # summed over latent dims by diffusers
            loss = l1 + l2 + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            run.step += 1
            losses.append(l1.item())
            if run.step % 25 == 0:
                log(f"vae step {run.step} l1 {np.mean(losses[-25:]):.4f} kl {kl.item():.1f} ({_s_per_step(run, losses)})")
            run.save_if_due()
    run.save()
    scale = latent_scale(vae, images[-512:])
    info = {"steps": run.step, "minutes": run.minutes(), "l1_last": float(np.mean(losses[-50:] or [0])),
            "scaling_factor": scale}
    (work_dir / "vae_info.json").write_text(json.dumps(info, indent=1))
    log(f"VAE: {info}")
    return info


@torch.no_grad()
def latent_scale(vae, images: np.ndarray) -> float:
    vae.eval()
    lat = torch.cat([vae.encode(to_tensor(images[i:i + 64])).latent_dist.mean for i in range(0, len(images), 64)])
    return float(1.0 / lat.std())


def train_vae_decoder(work_dir: str | Path, minutes: float, batch_size: int = 32, lr: float = 1e-3,
                      pool: int = DEFAULT_POOL, seed: int = 0, threads: int = 1, checkpoint_every_s: float = 120.0,
                      open_fraction: float = 0.5, open_pool: int = 6000, log=print, max_steps: int | None = None) -> dict:
    """Stage 1b: keep the encoder (hence the latents the UNet learns) fixed and go on training the decoder only, on
    posterior samples; it can run next to the UNet stage. Writes vae_decoder_state.pt, which export prefers.

    `open_fraction` of each batch comes from the open world (black bears, crescents). The VAE is a general image
    codec, like SD's, which has seen every colour: a decoder trained on pretraining images only turns every bear
    brown, so no LoRA could ever show the new character. The UNet and text encoder still never see it."""
    torch.set_num_threads(threads)
    work_dir = Path(work_dir)
    images, _ = image_pool(work_dir, pool, seed, log)
    open_images = image_pool(work_dir, open_pool, seed, log, kind="open")[0] if open_fraction > 0 else None
    vae, cfg = load_trained_vae(work_dir, decoder=False)
    dec_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(dec_params, lr=lr, weight_decay=0.0)
    run = StageState(work_dir / "vae_decoder_state.pt", {"model": vae, "opt": opt}, {"config": cfg}, checkpoint_every_s)
    run.resume(log, "VAE decoder")
    for p in dec_params:
        p.requires_grad_(True)
    vae.decoder.train()
    rng = np.random.default_rng([seed, 17, run.step])
    losses = []
    n_open = int(round(batch_size * open_fraction)) if open_images is not None else 0
    with run.saved_on_interrupt(log):
        while _go_on(run, minutes, max_steps):
            x = to_tensor(_batch(images, open_images, batch_size, n_open, rng))
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample()
            rec = vae.decode(z).sample
            l1 = (rec - x).abs().mean()
            loss = l1 + (rec - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dec_params, 1.0)
            opt.step()
            run.step += 1
            losses.append(l1.item())
            if run.step % 25 == 0:
                log(f"decoder step {run.step} l1 {np.mean(losses[-25:]):.4f} ({_s_per_step(run, losses)})")
            run.save_if_due()
    run.save()
    info = {"steps": run.step, "minutes": run.minutes(), "l1_last": float(np.mean(losses[-50:] or [0]))}
    (work_dir / "vae_decoder_info.json").write_text(json.dumps(info, indent=1))
    log(f"VAE decoder: {info}")
    return info


@dataclass
class StageState:
    """What a stage checkpoints and resumes: its modules and optimizer by key, the step reached and the seconds
    trained (over all runs). The loop advances `step`; `save` writes everything at once (atomically), so a resumed
    stage continues exactly where the file says."""
    path: Path
    parts: dict  # state-file key -> object with state_dict() / load_state_dict()
    extra: dict = field(default_factory=dict)  # constants stored beside the parts (configs, scaling factor)
    every_s: float = 120.0
    step: int = 0
    spent: float = 0.0
    t_start: float = field(default_factory=time.time)
    t_saved: float = field(default_factory=time.time)

    def resume(self, log, what: str) -> None:
        if not self.path.exists():
            return
        st = torch.load(self.path, weights_only=True)
        for key, obj in self.parts.items():
            obj.load_state_dict(st[key])
        self.step, self.spent = st["step"], st["seconds"]
        log(f"resumed {what} at step {self.step} ({self.spent / 60:.1f} min trained)")

    def minutes(self) -> float:
        return (self.spent + time.time() - self.t_start) / 60

    def save(self) -> None:
        state = {key: obj.state_dict() for key, obj in self.parts.items()}
        _save_state({**state, **self.extra, "step": self.step, "seconds": self.minutes() * 60}, self.path)
        self.t_saved = time.time()

    def save_if_due(self) -> None:
        if time.time() - self.t_saved > self.every_s:
            self.save()

    @contextmanager
    def saved_on_interrupt(self, log):
        """Ctrl-C in the stage's loop keeps what was trained since the last checkpoint, then stops."""
        try:
            yield
        except KeyboardInterrupt:
            self.save()
            log("interrupted: state saved")
            raise


def _go_on(run: StageState, minutes: float, max_steps: int | None) -> bool:
    """A stage runs for its wall-clock minutes (this run's), or to `max_steps` in all (tests, exact rebuilds)."""
    return time.time() - run.t_start < minutes * 60 and (max_steps is None or run.step < max_steps)


def _s_per_step(run: StageState, losses: list) -> str:
    return f"{(time.time() - run.t_start) / max(len(losses), 1):.2f}s/step"


def _batch(images: np.ndarray, open_images: np.ndarray | None, batch_size: int, n_open: int,
           rng: np.random.Generator) -> np.ndarray:
    batch = images[rng.integers(0, len(images), batch_size - n_open)]
    if n_open:
        batch = np.concatenate([batch, open_images[rng.integers(0, len(open_images), n_open)]])
    return batch


def load_trained_vae(work_dir: Path, decoder: bool = True):
    """The stage-1 VAE with its scaling factor; with `decoder`, the stage-1b decoder when there is one."""
    from diffusers import AutoencoderKL

    path = work_dir / "vae_decoder_state.pt"
    if not (decoder and path.exists()):
        path = work_dir / "vae_state.pt"
    st = torch.load(path, weights_only=True)
    cfg = dict(st["config"])
    info_path = work_dir / "vae_info.json"
    if info_path.exists():
        cfg["scaling_factor"] = json.loads(info_path.read_text())["scaling_factor"]
    vae = AutoencoderKL.from_config(cfg)
    vae.load_state_dict(st["model"])
    return vae.eval().requires_grad_(False), cfg


@torch.no_grad()
def encode_pool(vae, images: np.ndarray, work_dir: Path, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image (unscaled), cached."""
    path = work_dir / f"latents_{len(images)}.pt"
    if path.exists():
        d = torch.load(path, weights_only=True)
        return d["mean"], d["std"]
    t0 = time.time()
    means, stds = [], []
    for i in range(0, len(images), 128):
        post = vae.encode(to_tensor(images[i:i + 128])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    _save_state({"mean": mean, "std": std}, path)
    log(f"encoded {len(images)} latents in {time.time() - t0:.0f}s")
    return mean, std


# ------------------------------------------------------------------------------------------------------------ UNet
def _build_unet_te(cfg: dict):
    from lorakit.models.bundle import build_text_encoder, build_unet

    return build_unet(cfg["unet"]), build_text_encoder(cfg["text_encoder"], with_projection=False)


def train_unet(work_dir: str | Path, minutes: float, batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.998,
               min_snr_gamma: float = 5.0, pool: int = DEFAULT_POOL, seed: int = 0, threads: int = 1,
               checkpoint_every_s: float = 120.0, te_token_std: float | None = None, log=print,
               max_steps: int | None = None) -> dict:
    """te_token_std: re-initialise the text encoder's token embeddings with this std (CLIP's init is 0.02, the same as
    the position embeddings): larger token embeddings make captions distinguishable to the UNet from step 0."""
    from lorakit.models.bundle import build_noise_scheduler
    from lorakit.models.families import get_family
    from lorakit.models.tokenizer import make_clip_tokenizer

    torch.set_num_threads(threads)
    work_dir = Path(work_dir)
    if not (work_dir / "vae_state.pt").exists():
        from lorakit.errors import UserError

        raise UserError(f"{work_dir}: no trained VAE (vae_state.pt); run the vae stage first.")
    images, attrs = image_pool(work_dir, pool, seed, log)
    vae, vae_cfg = load_trained_vae(work_dir, decoder=False)  # latents come from the stage-1 encoder
    lat_mean, lat_std = encode_pool(vae, images, work_dir, log)
    scale = float(vae_cfg["scaling_factor"])
    del images

    fam = get_family("sd1")
    cfg = toy_configs(work_spec(work_dir))
    torch.manual_seed(seed)
    unet, te = _build_unet_te(cfg)
    if te_token_std:
        with torch.no_grad():
            te.get_input_embeddings().weight.normal_(0.0, te_token_std)
    unet.train()
    te.train()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, betas=(0.9, 0.99))
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    sched = build_noise_scheduler(fam.config("scheduler"), "epsilon")
    alphas_cumprod = sched.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    tok = make_clip_tokenizer(fam.text_encoders[0].pad_token)

    run = StageState(work_dir / "unet_state.pt",
                     {"unet": unet, "te": te, "ema_unet": ema_unet, "ema_te": ema_te, "opt": opt},
                     {"configs": cfg, "scaling_factor": scale}, checkpoint_every_s)
    run.resume(log, "UNet")
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    rng = np.random.default_rng([seed, 13, run.step])
    gen = torch.Generator().manual_seed(seed * 1000003 + run.step)
    losses = []
    with run.saved_on_interrupt(log):
        while _go_on(run, minutes, max_steps):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (run.step + 1) / 200)
            idx = rng.integers(0, len(lat_mean), batch_size)
            idx_t = torch.from_numpy(idx)
            lat = (lat_mean[idx_t] + lat_std[idx_t] * torch.randn(lat_mean[idx_t].shape, generator=gen)) * scale
            texts = [training_caption(attrs[i], rng) for i in idx]
            ids = _tokenize(tok, texts)
            ctx = te(ids).last_hidden_state  # SD1: last layer + final norm (clip skip 1)
            noise = torch.randn(lat.shape, generator=gen)
            t = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=gen)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
            pred = unet(noisy, t, encoder_hidden_states=ctx).sample
            w = torch.clamp(snr[t], max=min_snr_gamma) / snr[t] if min_snr_gamma else torch.ones_like(snr[t])
            loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * w).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            run.step += 1
            d = min(ema_decay, (1 + run.step) / (10 + run.step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - d)
            losses.append(loss.item())
            if run.step % 25 == 0:
                log(f"unet step {run.step} loss {np.mean(losses[-25:]):.4f} ({_s_per_step(run, losses)})")
            run.save_if_due()
    run.save()
    info = {"steps": run.step, "minutes": run.minutes(), "batch_size": batch_size,
            "loss_last": float(np.mean(losses[-100:] or [0]))}
    (work_dir / "unet_info.json").write_text(json.dumps(info, indent=1))
    log(f"UNet: {info}")
    return info


def _tokenize(tok, texts: list[str]) -> torch.Tensor:
    # the same padding as lorakit.models.conditioning.tokenize for one chunk (BOS + 75 + EOS, then pad)
    rows = []
    for text in texts:
        ids = tok(text, add_special_tokens=False, truncation=False).input_ids[:75]
        rows.append([tok.bos_token_id] + ids + [tok.eos_token_id] + [tok.pad_token_id] * (75 - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------- export
def bundle_from_work_dir(work_dir: str | Path, ema: bool = True):
    """A ModelBundle (fp32) from the stage checkpoints in work_dir."""
    from lorakit.models.bundle import build_bundle
    from lorakit.models.families import get_family

    work_dir = Path(work_dir)
    st = torch.load(work_dir / "unet_state.pt", weights_only=True)
    vae, vae_cfg = load_trained_vae(work_dir)
    cfg = {**st["configs"], "vae": vae_cfg}
    bundle = build_bundle(get_family("sd1"), configs=cfg)
    bundle.unet.load_state_dict(st["ema_unet" if ema else "unet"])
    bundle.text_encoders[0].load_state_dict(st["ema_te" if ema else "te"])
    bundle.vae.load_state_dict(vae.state_dict())
    bundle.source = "toy_base"
    return bundle


def export_base(work_dir: str | Path, out_path: str | Path, ema: bool = True, extra_metadata: dict | None = None):
    from lorakit.models.saving import save_single_file

    work_dir = Path(work_dir)
    bundle = bundle_from_work_dir(work_dir, ema)
    meta = {"lorakit.toy_base": json.dumps({
        "vae": _read_json(work_dir / "vae_info.json"), "vae_decoder": _read_json(work_dir / "vae_decoder_info.json"),
        "unet": _read_json(work_dir / "unet_info.json"), "ema": ema})}
    meta.update(extra_metadata or {})
    return save_single_file(bundle, out_path, dtype="fp16", metadata=meta)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def default_base_path() -> Path:
    return Path(__file__).parent / "data" / "toy_base.safetensors"
