"""Does the toy base model follow prompts? Sample it and read the samples with the attribute classifier.

`prompt_following(bundle)` draws prompts from the pretraining distribution ("cat, orange fur, forest" and single tags
like "bear" or "night"), samples with a batched DDIM + classifier-free guidance loop (our own, so the score does not
depend on the generation pipeline), and returns per-attribute accuracy next to two baselines: chance (1/K) and the
same targets scored on unconditional samples (empty prompt, same seeds), which is what "ignoring the prompt" reads.
`word_reaction(bundle, words)` (`--reaction`) measures how much the denoiser reacts to single words, such as a trigger.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from lorakit.toyworld.world import BACKGROUNDS, COLORS, INSTANCE_TOKEN, SPECIES, _FUR_NOUN

HEADS = ("species", "color", "background")


@torch.no_grad()
def sample_latents(bundle, prompts: list[str], seeds: list[int], steps: int = 20, cfg_scale: float = 5.0,
                   batch_size: int = 64) -> torch.Tensor:
    """DDIM (eta 0, trailing timesteps) with CFG on the empty prompt; returns scaled-back latents for the VAE."""
    from lorakit.models.conditioning import encode_text, tokenize

    unet = bundle.unet
    dtype = next(unet.parameters()).dtype
    ac = bundle.noise_scheduler.alphas_cumprod.double()
    n_train = len(ac)
    ts = np.round(np.arange(n_train, 0, -n_train / steps)).astype(int) - 1  # trailing: starts at t=999
    size = bundle.configs["unet"]["sample_size"]
    ch = bundle.configs["unet"]["in_channels"]
    uncond, _ = encode_text(bundle, tokenize(bundle, [""]))
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i:i + batch_size], seeds[i:i + batch_size]
        cond, _ = encode_text(bundle, tokenize(bundle, ps))
        ctx = torch.cat([uncond.expand(len(ps), -1, -1), cond]).to(dtype)
        x = torch.stack([torch.randn(ch, size, size, generator=torch.Generator().manual_seed(int(s))) for s in ss])
        x = x.double()
        for k, t in enumerate(ts):
            eps_u, eps_c = unet(torch.cat([x, x]).to(dtype), torch.full((2 * len(ps),), int(t)),
                                encoder_hidden_states=ctx).sample.double().chunk(2)
            eps = eps_u + cfg_scale * (eps_c - eps_u)
            a = ac[t]
            a_prev = ac[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        out.append(x.float())
    return torch.cat(out) / bundle.latent_scale


@torch.no_grad()
def decode(bundle, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Latents -> images (B, 3, H, W) in [-1, 1]."""
    vae = bundle.vae
    dtype = next(vae.parameters()).dtype
    imgs = [vae.decode(latents[i:i + batch_size].to(dtype)).sample.float() for i in range(0, len(latents), batch_size)]
    return torch.cat(imgs).clamp(-1, 1)


def sample_images(bundle, prompts, seeds, **kw) -> torch.Tensor:
    return decode(bundle, sample_latents(bundle, list(prompts), list(seeds), **kw))


def eval_prompts(n_full: int = 60, seed: int = 1234) -> list[tuple[str, dict]]:
    """(prompt, targets) pairs: single tags (each species, each background) and species + colour + background."""
    rng = np.random.default_rng(seed)
    out = [(sp, {"species": sp}) for sp in SPECIES] + [(bg, {"background": bg}) for bg in BACKGROUNDS]
    for _ in range(n_full):
        sp = SPECIES[rng.integers(len(SPECIES))]
        colors = [c for c in COLORS if not (sp == "bear" and c == "black")]  # black bears are held out
        col = colors[rng.integers(len(colors))]
        bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        out.append((f"{sp}, {col} {_FUR_NOUN.get(sp, 'fur')}, {bg}",
                    {"species": sp, "color": col, "background": bg}))
    return out


def _score(pred: dict, targets: list[dict]) -> dict[str, dict]:
    res = {}
    for head in HEADS:
        rows = [(i, t[head]) for i, t in enumerate(targets) if head in t]
        if not rows:
            continue
        labels = pred[head]["labels"]
        hits = [labels[i] == want for i, want in rows]
        res[head] = {"accuracy": float(np.mean(hits)), "n": len(rows), "chance": 1.0 / len(pred[head]["classes"])}
    return res


def prompt_following(bundle, n_full: int = 60, repeats: int = 2, steps: int = 20, cfg_scale: float = 5.0,
                     seed: int = 0, classifier=None, with_uncond: bool = True) -> dict:
    """Per-attribute accuracy of samples vs the prompt, for single-tag and full prompts, with baselines."""
    from lorakit.toyworld.classifier import load_classifier

    clf = classifier or load_classifier()
    pairs = eval_prompts(n_full) * repeats
    prompts = [p for p, _ in pairs]
    targets = [t for _, t in pairs]
    seeds = [seed + i for i in range(len(pairs))]
    imgs = sample_images(bundle, prompts, seeds, steps=steps, cfg_scale=cfg_scale)
    pred = clf.predict(imgs, value_range=(-1, 1))
    single = [i for i, p in enumerate(prompts) if "," not in p]
    full = [i for i, p in enumerate(prompts) if "," in p]
    out = {"settings": {"steps": steps, "cfg_scale": cfg_scale, "n_images": len(prompts), "sampler": "DDIM"},
           "single_tag": _score(_subset(pred, single), [targets[i] for i in single]),
           "full_prompt": _score(_subset(pred, full), [targets[i] for i in full])}
    if with_uncond:
        u_imgs = sample_images(bundle, [""] * len(full), [seeds[i] for i in full], steps=steps, cfg_scale=1.0)
        out["uncond_vs_full_targets"] = _score(clf.predict(u_imgs, value_range=(-1, 1)), [targets[i] for i in full])
    return out


@torch.no_grad()
def word_reaction(bundle, words: list[str], context: str = "bear, forest", n: int = 16, seed: int = 0) -> dict:
    """How strongly the denoiser reacts to a word placed before `context`'s first tag: the mean absolute change of
    the noise prediction, "usu bear, forest" against "bear, forest", on the same noised latents (n samples at
    timesteps 100-700). A word the base reads well ("black": 0.046 on the v2 base) moves it ten times more than one it
    never saw ("usu": 0.004); a LoRA can only key on a trigger that the base does not ignore."""
    from lorakit.models.conditioning import encode_text, tokenize

    if n <= 0 or n % 4:
        raise ValueError(f"word_reaction: n={n} must be a positive multiple of 4 (one sample per timestep 100-700)")
    g = torch.Generator().manual_seed(seed)
    size, ch = bundle.configs["unet"]["sample_size"], bundle.configs["unet"]["in_channels"]
    x0, noise = torch.randn(n, ch, size, size, generator=g), torch.randn(n, ch, size, size, generator=g)
    t = torch.tensor([100, 300, 500, 700] * (n // 4))
    a = bundle.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

    def eps(prompt: str) -> torch.Tensor:
        ctx, _ = encode_text(bundle, tokenize(bundle, [prompt]))
        return bundle.unet(xt, t, encoder_hidden_states=ctx.expand(n, -1, -1)).sample

    ref = eps(context)
    return {w: float((eps(f"{w} {context}") - ref).abs().mean()) for w in words}


def _subset(pred: dict, idx: list[int]) -> dict:
    return {h: {"labels": [v["labels"][i] for i in idx], "classes": v["classes"]} for h, v in pred.items()}


def format_report(res: dict) -> str:
    lines = [f"settings: {json.dumps(res['settings'])}", "| prompts | head | accuracy | chance | n |", "|---|---|---|---|---|"]
    for key in ("single_tag", "full_prompt", "uncond_vs_full_targets"):
        for head, r in res.get(key, {}).items():
            lines.append(f"| {key} | {head} | {r['accuracy']:.3f} | {r['chance']:.3f} | {r['n']} |")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Score the toy base model's prompt following with the classifier.")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped toy base)")
    p.add_argument("--work_dir", default=None, help="score the EMA weights of a pretraining work dir instead")
    p.add_argument("--n_full", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg_scale", type=float, default=5.0)
    p.add_argument("--raw", action="store_true", help="with --work_dir: the raw weights instead of the EMA")
    p.add_argument("--grid", default=None, help="write a PNG grid of the first 40 samples here")
    p.add_argument("--reaction", nargs="*", default=None, metavar="WORD",
                   help="only print how much the denoiser reacts to each word before 'bear, forest' (default words: "
                        f"the trigger '{INSTANCE_TOKEN}' and the tag 'black')")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.work_dir:
        from lorakit.toyworld.pretrain import bundle_from_work_dir

        bundle = bundle_from_work_dir(a.work_dir, ema=not a.raw)
    else:
        from lorakit.models.loading import load_bundle
        from lorakit.toyworld.pretrain import default_base_path

        bundle = load_bundle(a.model or default_base_path(), family="sd1", dtype="fp32")
    if a.reaction is not None:
        for word, r in word_reaction(bundle, a.reaction or [INSTANCE_TOKEN, "black"]).items():
            print(f"{word}: {r:.4f}")
        return None
    res = prompt_following(bundle, n_full=a.n_full, repeats=a.repeats, steps=a.steps, cfg_scale=a.cfg_scale)
    print(format_report(res))
    if a.grid:
        save_grid(bundle, a.grid, steps=a.steps, cfg_scale=a.cfg_scale)
    return res


def save_grid(bundle, path, steps: int = 20, cfg_scale: float = 5.0, cols: int = 8):
    from PIL import Image

    pairs = eval_prompts(30)[:40]
    imgs = sample_images(bundle, [p for p, _ in pairs], list(range(len(pairs))), steps=steps, cfg_scale=cfg_scale)
    arr = ((imgs.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    h = arr.shape[1]
    rows = (len(arr) + cols - 1) // cols
    grid = Image.new("RGB", (cols * h, rows * h))
    for i, im in enumerate(arr):
        grid.paste(Image.fromarray(im), ((i % cols) * h, (i // cols) * h))
    grid.save(path)


if __name__ == "__main__":
    main()
