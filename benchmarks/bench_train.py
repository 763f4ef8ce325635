"""Training-step benchmark on full-size SD1.5 / SDXL architectures with random weights.

Per configuration (family x fp32/bf16 x gradient checkpointing on/off), in a fresh process so peak RSS is its own:
  - floor: forward + backward through the frozen UNet (no LoRA; gradient w.r.t. the noisy latents only), the least
    any LoRA training step must cost, measured before each LoRA step with the adapters switched off;
  - step: one real training step of lorakit's loop body as a UNet-only run does it (noise, UNet with LoRA rank 16 on
    every attention layer, loss, backward, clipping, AdamW as the trainer builds it, the NaN guard), latents given
    as if cached and the frozen text encoder's output remembered as the trainer does (data.latents.TextEncoderCache
    as a memo); `step_te_s` is the same step with the captions encoded every time;
  - ratio = step / floor; peak RSS of the process;
  - where the difference goes: the adapted layers' own cost, each timed alone (forward + backward with the adapter on
    minus off, warm caches), and the step's tail (clipping, AdamW, the NaN guard); `ratio_bound` = 1 + both / floor,
    the least step/floor these kernels allow on this machine.

    .venv/bin/python benchmarks/bench_train.py                       # all configurations, a table at the end
    .venv/bin/python benchmarks/bench_train.py --family sd1 --steps 3 # only SD1.5
    .venv/bin/python benchmarks/bench_train.py --one sd1 fp32 0       # one configuration (JSON line)
    .venv/bin/python benchmarks/bench_train.py --family sd1 --resolution 512  # at the size SD1.5 LoRAs train at

256 px (the default) is where issue 14's and sd-scripts' reference figures were taken; there most adapted layers see
64-256 tokens, the frozen layer is cheap and each rank-16 product costs its fixed ~16-25 us, so the ratio is at its
worst. At 512 px (SD1.5) or 1024 px (SDXL) every product is 4-16x larger and the ratio falls towards the LoRA's
share of the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _random_full_bundle(family_name: str, dtype, gemm_convs: bool = True):
    """Full-size modules with random weights, built on meta then filled (fast: no per-layer init); the UNet's
    low-resolution convolutions as GEMMs and float32 Linear layers through oneDNN, as `lorakit train` runs them on a
    CPU (models.conv_gemm, models.dnn_linear), unless not `gemm_convs`."""
    import torch

    from lorakit.models.bundle import build_bundle
    from lorakit.models.families import get_family

    fam = get_family(family_name)
    bundle = build_bundle(fam, device="meta", components=("unet", "text_encoders"))
    g = torch.Generator().manual_seed(0)
    for module in [bundle.unet] + list(bundle.text_encoders):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.ndim == 1:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
            for name, b in module.named_buffers():
                if name.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1]).expand(b.shape))
        module.to(dtype=dtype)
        module.requires_grad_(False).eval()
    if gemm_convs:
        from lorakit.models.conv_gemm import use_gemm_convs
        from lorakit.models.dnn_linear import use_dnn_linears

        use_gemm_convs(bundle.unet)
        for module in [bundle.unet] + list(bundle.text_encoders):
            use_dnn_linears(module)
    return bundle


def run_one(family: str, dtype_name: str, gc: bool, steps: int, gemm_convs: bool = True, res: int = 256) -> dict:
    import torch

    from lorakit.adapters.network import create_network
    from lorakit.train import noise as N
    from lorakit.models.conditioning import added_cond_kwargs, caption_outputs, encode_captions
    from lorakit.train.loop import LossOptions, NoiseOptions, StepMaths, batch_loss
    from lorakit.train.stages import picked
    from lorakit.data.latents import TextEncoderCache, memo_budget_bytes
    from lorakit.train.guard import WeightGuard
    from lorakit.train.optimizers import clip_grad_norm, create_optimizer

    from lorakit.utils.allocator import keep_freed_memory

    keep_freed_memory()  # as `lorakit train` does: floor and step both run with it
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t0 = time.time()
    bundle = _random_full_bundle(family, dtype, gemm_convs)
    build_s = time.time() - t0
    fam = bundle.family
    lat = torch.randn(1, 4, res // 8, res // 8, generator=torch.Generator().manual_seed(1))
    ac = N.alphas_cumprod_from_betas(bundle.noise_scheduler.betas.double()).float()
    if gc:
        bundle.unet.enable_gradient_checkpointing()
        bundle.unet.train()
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    batch = {"latents": lat, "images": None, "captions": ["a photo of a bear, forest, standing"],
             "loss_weights": torch.ones(1), "alpha_masks": None,
             "original_sizes_hw": torch.tensor([[res, res]]), "crop_top_lefts": torch.tensor([[0, 0]]),
             "target_sizes_hw": torch.tensor([[res, res]])}
    opts = SimpleNamespace(clip_skip=None, max_token_length=None, noise_offset=None, noise_offset_random_strength=False,
                           adaptive_noise_scale=None, multires_noise_iterations=None, multires_noise_discount=0.3,
                           ip_noise_gamma=None, ip_noise_gamma_random_strength=False, min_timestep=None,
                           max_timestep=None, loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0,
                           min_snr_gamma=None, scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=None,
                           debiased_estimation_loss=False, masked_loss=False, alpha_mask=False)

    # floor: frozen UNet forward + backward to the input
    with torch.no_grad(), autocast:
        hidden, pooled = encode_captions(bundle, batch["captions"], None, None)
    kwargs = added_cond_kwargs(fam, pooled, batch["original_sizes_hw"], batch["crop_top_lefts"],
                               batch["target_sizes_hw"], dtype=hidden.dtype, device="cpu")

    def floor_step():
        x = lat.clone().to(dtype).requires_grad_(True)
        with autocast:
            out = bundle.unet(x, torch.tensor([500]), hidden, **kwargs).sample
        out.float().square().mean().backward()

    torch.manual_seed(0)
    net = create_network(bundle, "networks.lora", 16, 8, {}, train_text_encoder=False)
    net.apply_to(bundle)
    opt = create_optimizer("AdamW", list(net.parameters()), 1e-4).optimizer
    guard = WeightGuard(list(net.parameters()))
    gen = torch.Generator().manual_seed(0)
    maths = StepMaths(ac, fam.prediction_type, picked(NoiseOptions, opts), picked(LossOptions, opts), None, None,
                      False, torch.device("cpu"), dtype)
    memo = TextEncoderCache(lambda caps: caption_outputs(bundle, caps, None, None), batch_size=1,
                            max_bytes=memo_budget_bytes())

    adapters = [m for m in net.modules() if hasattr(m, "enabled")]

    def timed_floor() -> float:
        for a in adapters:  # the frozen UNet alone: each layer's own forward (the adapters' hooks return at once)
            a.enabled = False
        try:
            t = time.time()
            floor_step()
            return time.time() - t
        finally:
            for a in adapters:
                a.enabled = True

    def train_step(te_cache) -> float:
        """One step; returns the seconds of its tail (clipping, AdamW, zeroing, the NaN guard)."""
        with autocast:
            loss = batch_loss(bundle, batch, maths, gen, None, te_cache)
        loss.backward()
        t_tail = time.time()
        clip_grad_norm(list(net.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        guard.check()
        return time.time() - t_tail

    def timed_steps(te_cache, floor: list[float] | None = None, tail: list[float] | None = None) -> list[float]:
        """LoRA steps; with `floor`, each preceded by a floor step (interleaved: both see the same machine state,
        which drifts by more than the difference measured over a run's minute) and its tail's time added to
        `tail`."""
        times = []
        for i in range(steps + 1):
            f = timed_floor() if floor is not None else None
            t = time.time()
            tail_s = train_step(te_cache)
            if i:
                times.append(time.time() - t)
                if floor is not None:
                    floor.append(f)
                if tail is not None:
                    tail.append(tail_s)
        return times

    floor: list[float] = []
    tail: list[float] = []
    shapes = _record_inputs(adapters, lambda: train_step(memo))  # also the first, slow step
    step_t = timed_steps(memo, floor, tail)
    step_te = timed_steps(None)
    layers_s = isolated_layer_costs(adapters, shapes, autocast, forward_twice=gc)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    f, s = statistics.median(floor), statistics.median(step_t)
    return {"family": family, "dtype": dtype_name, "gradient_checkpointing": gc, "resolution": res, "batch": 1,
            "lora_params": sum(p.numel() for p in net.parameters()), "floor_s": round(f, 3), "step_s": round(s, 3),
            "ratio": round(s / f, 3), "step_te_s": round(statistics.median(step_te), 3),
            "lora_layers_isolated_s": round(layers_s, 3), "optimizer_tail_s": round(statistics.median(tail), 3),
            "ratio_bound": round(1 + (layers_s + statistics.median(tail)) / f, 3),
            "peak_rss_gib": round(rss_gib, 2), "build_s": round(build_s, 1),
            "threads": torch.get_num_threads(), "steps": steps}


def _record_inputs(adapters, one_step) -> dict:
    """{adapter: (input shape, dtype)} as one training step calls each adapted layer (the first call's)."""
    seen: dict = {}

    def hook_for(a):
        def hook(_module, args):  # returns None: the layer's inputs stay as they are
            seen.setdefault(a, (tuple(args[0].shape), args[0].dtype))
        return hook

    hooks = [a.org_module.register_forward_pre_hook(hook_for(a)) for a in adapters]
    try:
        one_step()
    finally:
        for h in hooks:
            h.remove()
    return seen


def isolated_layer_costs(adapters, shapes: dict, autocast, reps: int = 15, forward_twice: bool = False) -> float:
    """Seconds a step spends in its adapted layers beyond their frozen cost, each layer timed alone with warm caches:
    its forward + backward with the adapter on minus the same with it off, summed over the layers (one timing per
    distinct layer kind, size and input shape, times its count); `forward_twice` (gradient checkpointing, which runs
    each forward again in backward) adds the forward's difference once more. What a LoRA step must cost over the
    floor even if nothing else did: with the optimizer's tail, the ratio this machine's kernels allow."""
    import torch

    groups: dict = {}
    for a, (shape, dtype) in shapes.items():
        key = (type(a.org_module).__name__, tuple(a.shape), shape, dtype)
        groups.setdefault(key, []).append(a)
    total = 0.0
    for (_, _, shape, dtype), members in groups.items():
        a = members[0]
        x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        with autocast:
            g = torch.randn_like(a.org_module(x), dtype=torch.float32)
        both, forward = {}, {}
        for enabled in (False, True):
            a.enabled = enabled
            runs, fw = [], []
            for _ in range(reps + 2):
                t = time.perf_counter()
                with autocast:
                    y = a.org_module(x)
                fw.append(time.perf_counter() - t)
                y.backward(g.to(y.dtype))
                runs.append(time.perf_counter() - t)
                x.grad = None
            both[enabled], forward[enabled] = statistics.median(runs[2:]), statistics.median(fw[2:])
        a.enabled = True
        for p in a.parameters():
            p.grad = None
        extra = both[True] - both[False] + (forward[True] - forward[False] if forward_twice else 0.0)
        total += extra * len(members)
    return total

# sd-scripts' UNet-only LoRA step on this machine kind (../shared/reference/performance-targets.md, side by side on one
# idle machine, dim 16, 256 px, batch 1); its step also encodes the latents, so on the same flags ours is compared
# in benchmarks/bench_memory.py's whole-run s/step - this column is the reference the targets are ratios of
SD_SCRIPTS_S_PER_STEP = {("sd1", "fp32", False): 4.80, ("sd1", "fp32", True): 7.31, ("sd1", "bf16", False): 2.77}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", nargs=3, metavar=("FAMILY", "DTYPE", "GC"))
    ap.add_argument("--family", action="append", choices=["sd1", "sdxl"])
    ap.add_argument("--dtype", action="append", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--resolution", type=int, default=256,
                    help="image side in pixels (256: the issue's and sd-scripts' reference figures; 512 / 1024: what "
                         "SD1.5 / SDXL LoRAs are trained at)")
    ap.add_argument("--plain_convs", action="store_true",
                    help="every UNet convolution through oneDNN as before models.conv_gemm, every Linear through torch's own matmul as before models.dnn_linear (floor and step alike)")
    args = ap.parse_args()
    if args.resolution < 64 or args.resolution % 64:
        ap.error(f"--resolution {args.resolution}: give a multiple of 64 (the UNet halves the latent three times)")
    if args.one:
        fam, dt, gc = args.one
        print(json.dumps(run_one(fam, dt, gc in ("1", "true", "True"), args.steps, not args.plain_convs,
                                    args.resolution)), flush=True)
        return 0
    rows = []
    for fam in args.family or ["sd1", "sdxl"]:
        for dt in args.dtype or ["fp32", "bf16"]:
            for gc in ("0", "1"):
                cmd = [sys.executable, os.path.abspath(__file__), "--one", fam, dt, gc, "--steps", str(args.steps),
                       "--resolution", str(args.resolution)]
                cmd += ["--plain_convs"] if args.plain_convs else []
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{fam} {dt} gc={gc}: timed out", flush=True)
                    continue
                line = [x for x in out.stdout.splitlines() if x.startswith("{")]
                if out.returncode or not line:
                    print(f"{fam} {dt} gc={gc}: failed\n{out.stderr[-2000:]}", flush=True)
                    continue
                row = json.loads(line[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| family | px | dtype | grad ckpt | floor s | step s | step/floor (target <= 1.05) | LoRA layers alone s | "
          "clip + AdamW + guard s | step/floor these allow | step s, captions encoded each step | "
          "sd-scripts s/step (target: step <= 0.8x) | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = SD_SCRIPTS_S_PER_STEP.get((r["family"], r["dtype"], bool(r["gradient_checkpointing"]))) \
            if r["resolution"] == 256 else None  # sd-scripts was measured at 256 px only
        verdict = "-" if ref is None else f"{ref} ({'met' if r['step_s'] <= 0.8 * ref else 'not met'})"
        print(f"| {r['family']} | {r['resolution']} | {r['dtype']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['floor_s']} | "
              f"{r['step_s']} | {r['ratio']} ({'met' if r['ratio'] <= 1.05 else 'not met'}) | "
              f"{r['lora_layers_isolated_s']} | {r['optimizer_tail_s']} | {r['ratio_bound']} | {r['step_te_s']} | "
              f"{verdict} | "
              f"{r['peak_rss_gib']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
