"""Peak memory of a training step, predicted before the model loads, and the measured peak after a run.

The prediction builds the full model with fake tensors (shapes and dtypes, no data: nothing is read from the
checkpoint and nothing is allocated), injects the network, and runs one training step's forward and backward under
`LiveBytes`, a dispatch mode that adds up every storage an op creates and subtracts it when the storage dies. Its
high-water mark is the activation peak: whatever autograd keeps, recomputation under gradient checkpointing,
attention and the adapters' transients included, exactly as the real step would allocate them, because the real
modules run. Weights, gradients and optimizer state are counted from the real shapes and dtypes; optimizer state by
running the chosen optimizer once on one real tensor of each distinct trainable shape.

Why our own tracker and not torch.distributed._tools.MemTracker: that one is private API (it may change in any torch
release, and we support torch >= 2.1), needs torch.distributed, and rounds to the CUDA allocator's blocks; the part
we need (live bytes of new storages, views not counted twice) is the 30 lines of `LiveBytes`.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorakit.train import memory_cache
from lorakit.utils.cpu import half_ok

GIB = 2**30


# ================================================================================================ the tracker ======
class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, and their high-water mark.

    An op's output whose storage is one of its inputs' (a view, an in-place op) is not new memory; everything else
    is counted once per storage and released by a weakref finalizer when the storage dies."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) not in inputs and id(st) not in self._sizes:
                    self._add(st)
        return out

    def _add(self, storage) -> None:
        key, size = id(storage), storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live


# ================================================================================================ the estimate =====
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes at the peak of a training step, by kind. `runtime` is what the process holds besides tensors (the
    interpreter and libraries on a CPU; the CUDA context on a GPU)."""

    device: str
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    caches: int
    runtime: int
    notes: tuple[str, ...] = ()

    @property
    def peak(self) -> int:
        return (self.weights + self.trainable + self.gradients + self.optimizer + self.activations + self.caches
                + self.runtime)

    def line(self) -> str:
        parts = [("weights", self.weights), ("network", self.trainable), ("gradients", self.gradients),
                 ("optimizer", self.optimizer), ("activations", self.activations), ("caches", self.caches),
                 ("runtime", self.runtime)]
        kinds = ", ".join(f"{name} {gib(v)}" for name, v in parts if v >= 0.005 * GIB)
        return f"predicted peak memory on {self.device}: {gib(self.peak)} GiB ({kinds})"

    def table(self) -> str:
        rows = [("frozen weights", self.weights), ("trainable network (fp32)", self.trainable),
                ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations (forward + backward peak)", self.activations), ("caches (latents, text)", self.caches),
                ("runtime (interpreter, libraries / CUDA context)", self.runtime)]
        out = [f"{name:<48} {gib(v):>8} GiB" for name, v in rows]
        out.append(f"{'predicted peak on ' + self.device:<48} {gib(self.peak):>8} GiB")
        return "\n".join(out + [f"note: {n}" for n in self.notes])


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f}"


def parse_size(text: str | int | float) -> int:
    """'8GB', '8 GiB', '7.5G', '8000MB', or a number of bytes -> bytes (GB and GiB both mean 2**30, as tools
    report memory)."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace(" ", "").removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    mult = units.get(s[-1:], 1)
    num = s[:-1] if s[-1:] in units else s
    value = float(num)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return int(value * mult)


# ================================================================================================ pieces ==========
def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


def module_bytes(*modules) -> int:
    return tensor_bytes(t for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers()))


def optimizer_state_bytes(params: list[torch.Tensor], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                          ) -> int:
    """State bytes of the optimizer after one step, measured on one real tensor per distinct (shape, dtype) and
    multiplied by how often that shape occurs (per-parameter state only depends on the parameter's shape)."""
    counts: dict[tuple, int] = {}
    for p in params:
        key = (tuple(p.shape), p.dtype)
        counts[key] = counts.get(key, 0) + 1
    probes = []
    for shape, dtype in counts:
        t = torch.zeros(shape, dtype=dtype, requires_grad=True)
        t.grad = torch.full(shape, 1e-3, dtype=dtype)
        probes.append(t)
    opt = make_optimizer([{"params": probes}])
    opt.step()
    total = 0
    for probe, ((shape, dtype), n) in zip(probes, counts.items()):
        state = opt.state.get(probe, {})
        total += n * tensor_bytes(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def current_rss() -> int:
    """Resident memory of this process now (bytes)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory(device: torch.device) -> int:
    """Free memory of the device: the GPU's free memory, or MemAvailable of the machine (plus what this process
    already holds, since the prediction includes it)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + current_rss()
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measured_peak(device: torch.device) -> int:
    """What the prediction is checked against: peak allocated GPU memory, or the process' peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss()


@contextlib.contextmanager
def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # real tensors (tokenizer ids, generators' draws, the LoRA's init) may meet fake ones: treat them as constants
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


@dataclass
class TraceResult:
    peak: int  # high-water mark of new storages during the step
    kept: int = 0  # still alive after the step (gradients, outputs)
    notes: list[str] = field(default_factory=list)


def trace(step: Callable[[], None]) -> TraceResult:
    """Run `step` (fake tensors inside) under LiveBytes; the peak of what it allocated."""
    tracker = LiveBytes()
    with tracker:
        step()
    return TraceResult(peak=tracker.peak, kept=tracker.live)


__all__ = ["LiveBytes", "MemoryEstimate", "trace", "fake_mode", "optimizer_state_bytes", "module_bytes",
           "tensor_bytes", "parse_size", "available_memory", "measured_peak", "current_rss", "peak_rss", "gib",
           "replace"]


# ================================================================================================ a run's step =====
@dataclass(frozen=True)
class StepShape:
    """What sizes one training step: the largest batch x area any dataset feeds, and the caption windows."""

    batch: int
    height: int
    width: int
    n_images: int  # distinct images (latent cache entries)
    n_captions: int  # distinct captions (text-encoder cache entries)


def step_shape(data) -> StepShape:
    """From the scanned datasets (`stages.Data`): buckets never exceed the resolution's area, so the resolution at
    the largest batch is the worst step."""
    worst = max(data.configs, key=lambda c: c.batch_size * c.resolution[0] * c.resolution[1])
    w, h = worst.resolution
    entries = [e for ds in data.group.datasets for e in ds.entries]
    return StepShape(batch=worst.batch_size, height=h, width=w, n_images=len(entries),
                     n_captions=len({e.caption for e in entries}))


def latent_shape(configs: dict, height: int, width: int) -> tuple[int, int, int]:
    """(channels, h, w) of the VAE's latents for an image (the VAE halves the size per level after the first)."""
    vae = configs["vae"]
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    return vae.get("latent_channels", 4), height // f, width // f


def make_fake(bundle, device: torch.device, dtypes: dict[str, torch.dtype]) -> None:
    """Give a bundle built on the meta device fake tensors on `device`, each component in its training dtype (call
    inside `fake_mode()`). New Parameters are assigned rather than converted: torch cannot swap a fake parameter,
    so the stages' moves must find nothing to do."""
    for name, module in bundle.components().items():
        dt = dtypes[name]
        for sub in module.modules():
            for key, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[key] = torch.nn.Parameter(
                        torch.empty(p.shape, dtype=dt if p.is_floating_point() else p.dtype, device=device),
                        requires_grad=False)
            for key, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[key] = torch.empty(b.shape, dtype=dt if b.is_floating_point() else b.dtype,
                                                    device=device)
        module.eval()


class _CachedText:
    """Stands in for a filled text-encoder cache: returns tensors of the cached outputs' shapes."""

    def __init__(self, hidden: torch.Tensor, pooled: torch.Tensor | None):
        self.hidden, self.pooled = hidden, pooled

    def get(self, captions):
        n = len(captions)
        h = self.hidden[:1].expand(n, *self.hidden.shape[1:]).clone()
        return h if self.pooled is None else (h, self.pooled[:1].expand(n, -1).clone())


def estimate(opts, run, family, configs: dict, shape: StepShape) -> MemoryEstimate:
    """The peak memory of one training step of this run, before anything is loaded (see the module docstring).
    `opts` are the run's frozen options, `run` the stages' Run, `configs` the model's module configs (None: the
    family's full-size ones), `shape` the worst step of the scanned datasets. The traced part is kept between runs
    (train.memory_cache): the same settings again cost no trace."""
    configs = {**{n: family.config(n) for n in ["unet", "vae"] + [s.config_name for s in family.text_encoders]},
               **(configs or {})}
    key = memory_cache.step_key(opts, run.device, run.weight_dtype, family.name, configs,
                                (shape.batch, shape.height, shape.width))
    traced = memory_cache.load(key)
    if traced is None:
        traced = trace_step(opts, run, family, configs, shape)
        memory_cache.save(key, traced)
    else:  # the libraries a trace would have imported count in the process' runtime memory (_runtime_bytes)
        from lorakit.models.bundle import import_model_libraries

        import_model_libraries()
    return MemoryEstimate(str(run.device.type), weights=traced.weights, trainable=traced.trainable,
                          gradients=traced.trainable, optimizer=traced.optimizer, activations=traced.activations,
                          caches=_cache_bytes(opts, family, shape, configs), runtime=_runtime_bytes(run.device),
                          notes=traced.notes)


def trace_step(opts, run, family, configs: dict, shape: StepShape):
    """Build the model with fake tensors, inject the network and trace one step (memory_cache.TracedStep)."""
    from lorakit.models.bundle import build_bundle
    from lorakit.train import stages as S

    quiet = replace(run, log=lambda *a, **k: None)
    notes: list[str] = []
    bundle = build_bundle(family, configs, device="meta")
    with fake_mode():
        make_fake(bundle, run.device, S.component_dtypes(opts.no_half_vae, run.weight_dtype, family))
        model = S.prepare_model(replace(S.picked(S.ModelOptions, opts), base_weights=None), quiet, bundle)
        net = S.build_network(replace(S.picked(S.NetworkOptions, opts), network_weights=None), quiet, model)
        trainable = [p for p in net.network.parameters() if p.requires_grad]
        weights = module_bytes(*bundle.components().values()) + _moved_weights(opts, run, family, configs, bundle,
                                                                                notes)
        traced = trace(_step(opts, run, model, net, shape))
    opt_state = optimizer_state_bytes(trainable, _optimizer_factory(opts))
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return memory_cache.TracedStep(weights=weights, trainable=grads, optimizer=opt_state, activations=traced.peak,
                      notes=tuple(notes))


def _moved_weights(opts, run, family, configs: dict, bundle, notes: list[str]) -> int:
    """What stages.place_denoiser changes in the device's weights (negative: bytes that leave it). Block swap and
    offloading move weights, not activations, so the step is traced without them. On a GPU: cached text encoders
    leave (FLUX), and --blocks_to_swap keeps its blocks in CPU memory (a block leaves before the next comes: none is
    in flight on top of the ones the device holds). On the CPU nothing leaves, and block swap adds the copies of the
    swapped blocks the device holds at once."""
    from lorakit.models.block_swap import device_bytes_change
    from lorakit.train.stages import check_blocks_to_swap

    change = 0
    if family.denoiser_after_caching and opts.cache_text_encoder_outputs and run.device.type != "cpu":
        change -= module_bytes(*bundle.text_encoders)
        notes.append(f"text encoders ({gib(module_bytes(*bundle.text_encoders))} GiB) leave the device once their "
                     "outputs are cached")
    counts = check_blocks_to_swap(opts.blocks_to_swap, family, configs)
    if counts and any(counts):
        lists = [getattr(bundle.unet, name) for name, _key in family.block_lists]
        swap = device_bytes_change(lists, counts, run.device.type)
        change += swap
        notes.append(f"--blocks_to_swap {opts.blocks_to_swap}: {' and '.join(map(str, counts))} blocks "
                     + (f"({gib(-swap)} GiB) wait in CPU memory" if swap < 0 else
                        f"take turns, their copies adding {gib(swap)} GiB on the CPU"))
    return change


def _step(opts, run, model, net, shape: StepShape) -> Callable[[], None]:
    """One step of the run's loop body on fake inputs of the worst shape: encode (unless cached), UNet, loss,
    backward."""
    from lorakit.models.conditioning import encode_captions
    from lorakit.train import stages as S
    from lorakit.train.loop import LossOptions, NoiseOptions, StepMaths, batch_loss

    b, h, w = shape.batch, shape.height, shape.width
    bundle = model.bundle
    c, lh, lw = latent_shape(bundle.configs, h, w)
    batch = {"latents": torch.randn(b, c, lh, lw) if opts.cache_latents else None,
             "images": None if opts.cache_latents else torch.randn(b, 3, h, w),
             "captions": ["a"] * b, "loss_weights": torch.ones(b), "alpha_masks": None,
             "original_sizes_hw": torch.tensor([[h, w]] * b), "crop_top_lefts": torch.zeros(b, 2, dtype=torch.long),
             "target_sizes_hw": torch.tensor([[h, w]] * b)}
    te_cache = None
    if opts.cache_text_encoder_outputs:
        with torch.no_grad(), S.autocast(run.device, run.weight_dtype):
            te_cache = _CachedText(*(model.objective.cached_text_like(bundle) if model.objective is not None
                                     else encode_captions(bundle, ["a"], opts.clip_skip, opts.max_token_length)))
    # noise is latent-sized whatever its options; multi-resolution noise reads random values (.item()), which fake
    # tensors do not have, so the trace draws plain noise
    noise = replace(S.picked(NoiseOptions, opts), multires_noise_iterations=None, noise_offset_random_strength=False,
                    ip_noise_gamma_random_strength=False)
    maths = StepMaths(model.alphas_cumprod, model.prediction, noise,
                      S.picked(LossOptions, opts), opts.clip_skip, opts.max_token_length, net.train_te, run.device,
                      run.weight_dtype, objective=model.objective)
    # one image at a time, as the run's remembering encoder does (no memo here: fake pixels have no bytes to key)
    encode_latents = S.vae_encoder(bundle, torch.Generator(), model.vae_dtype, per_image=True)
    gen = torch.Generator()

    def step() -> None:
        with S.autocast(run.device, run.weight_dtype):
            loss = batch_loss(bundle, batch, maths, gen, encode_latents, te_cache)
        loss.backward()

    return step


def _cache_bytes(opts, family, shape: StepShape, configs: dict) -> int:
    """Latents and text-encoder outputs held in memory for the whole run."""
    from lorakit.data.latents import memo_budget_bytes

    total = 0
    latent = math.prod(latent_shape(configs, shape.height, shape.width)) * 4
    if opts.cache_latents:
        total += shape.n_images * latent
    else:  # the VAE posteriors each step's encode remembers (mean and std per image; data.latents.PosteriorMemo)
        total += min(memo_budget_bytes(), shape.n_images * 2 * latent)
    if opts.cache_text_encoder_outputs or (opts.network_train_unet_only and not opts.train_embedding):
        width = sum(configs[s.config_name].get("hidden_size") or configs[s.config_name]["d_model"]
                    for s in family.text_encoders)
        tokens = 2 + 75 * max(1, (opts.max_token_length or 75) // 75)
        if family.t5_max_length:  # FLUX: T5's tokens (CLIP-L keeps only its pooled vector, counted below)
            tokens = opts.t5xxl_max_token_length or family.t5_max_length
        text = shape.n_captions * (tokens * width + 1280) * 4
        # not cached, the frozen encoders' outputs are remembered within a budget (stages.prepare_inputs)
        total += text if opts.cache_text_encoder_outputs else min(memo_budget_bytes(), text)
    return total


def _optimizer_factory(opts):
    from lorakit.train.optimizers import create_optimizer

    kind = "AdamW8bit" if opts.use_8bit_adam else ("Lion" if opts.use_lion_optimizer else opts.optimizer_type)
    return lambda groups: create_optimizer(kind or "AdamW", groups, opts.learning_rate, opts.optimizer_args).optimizer


def _runtime_bytes(device: torch.device) -> int:
    """What the process holds besides tensors: on a CPU, the interpreter and libraries as resident now (torch,
    diffusers, transformers are imported by the time this runs) plus their growth during training (kernels' code
    and thread stacks, measured: ~0.3 GiB); on a GPU, the CUDA context and cuBLAS workspace (not counted by
    max_memory_allocated, ~0.5 GiB)."""
    global _BASELINE_RSS
    if device.type == "cuda":
        return int(0.5 * GIB)
    if _BASELINE_RSS is None:  # the process as it was before the first prediction: stable for every later one
        _BASELINE_RSS = current_rss()
    return _BASELINE_RSS + int(0.3 * GIB)


_BASELINE_RSS: int | None = None


# ================================================================================================ fitting ==========
@dataclass(frozen=True)
class Fix:
    """A memory option a user could add: the flags as typed, and the options and step shape it gives."""

    flags: str
    apply: Callable  # (options, StepShape) -> (options, StepShape)
    changes_data: bool = False  # batches or buckets change: the datasets are scanned again


def candidate_fixes(opts, configs: list, swap_fix: Fix | None = None, half_fast: bool = True) -> list[Fix]:
    """The memory options not in use yet that could apply to this run, least change to what is learned first
    (`swap_fix`: the model's --blocks_to_swap, which learns the same, only slower). `half_fast` False (a CPU without
    bf16 arithmetic, utils.cpu) leaves out bf16 and --fp8_base: there they make each step tens of times slower."""
    fixes = [swap_fix] if swap_fix is not None and not opts.blocks_to_swap else []
    subsets = [s for c in configs for s in c.subsets]
    if not opts.gradient_checkpointing:
        fixes.append(Fix("--gradient_checkpointing", lambda o, sh: (replace(o, gradient_checkpointing=True), sh)))
    if not opts.cache_latents and not any(getattr(s, "color_aug", False) or getattr(s, "random_crop", False)
                                          for s in subsets):
        fixes.append(Fix("--cache_latents", lambda o, sh: (replace(o, cache_latents=True), sh)))
    if opts.mixed_precision == "no" and half_fast:
        fixes.append(Fix("--mixed_precision bf16", lambda o, sh: (replace(o, mixed_precision="bf16"), sh)))
    if not opts.fp8_base and half_fast:
        mp = opts.mixed_precision if opts.mixed_precision != "no" else "bf16"
        flags = "--fp8_base" + ("" if opts.mixed_precision != "no" else " --mixed_precision bf16")
        fixes.append(Fix(flags, lambda o, sh: (replace(o, fp8_base=True, mixed_precision=mp), sh)))
    dynamic = ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs",
               "token_warmup_step", "enable_wildcard")
    static = not any(getattr(s, k, None) for s in subsets for k in dynamic)
    if not opts.cache_text_encoder_outputs and static and not opts.train_embedding:
        flags = "--cache_text_encoder_outputs" + ("" if opts.network_train_unet_only else
                                                  " --network_train_unet_only (the text encoder is not trained)")
        fixes.append(Fix(flags, lambda o, sh: (replace(o, cache_text_encoder_outputs=True,
                                                        network_train_unet_only=True), sh)))
    if not opts.dataset_config and opts.train_batch_size > 1:
        b, acc = opts.train_batch_size // 2, max(1, opts.gradient_accumulation_steps) * 2
        fixes.append(Fix(f"--train_batch_size {b} --gradient_accumulation_steps {acc} (same effective batch)",
                         lambda o, sh: (replace(o, train_batch_size=b, gradient_accumulation_steps=acc),
                                        replace(sh, batch=max(1, sh.batch // 2))), changes_data=True))
    if not opts.dataset_config and configs and max(configs[0].resolution) > 512:
        w, h = configs[0].resolution
        w2, h2 = (max(256, int(v * 0.75) // 64 * 64) for v in (w, h))
        fixes.append(Fix(f"--resolution {w2},{h2} (trains at a lower resolution)",
                         lambda o, sh: (replace(o, resolution=f"{w2},{h2}"), replace(sh, width=w2, height=h2)),
                         changes_data=True))
    return fixes


def _swap_fix(plan, device: torch.device) -> Fix | None:
    """--blocks_to_swap with sd-scripts' usual 18 (or the model's most) for a model with block lists to swap, on a
    GPU (on the CPU the blocks already are in CPU memory: swapping saves nothing)."""
    from lorakit.models.block_swap import max_blocks_to_swap

    if not plan.family.block_lists or device.type == "cpu":
        return None
    unet = (plan.configs or {}).get("unet") or plan.family.config("unet")
    n = min(18, max_blocks_to_swap([int(unet[key]) for _name, key in plan.family.block_lists]))
    return Fix(f"--blocks_to_swap {n} (slower: blocks take turns on the device)",
               lambda o, sh: (replace(o, blocks_to_swap=n), sh)) if n else None


@dataclass(frozen=True)
class MemoryCheck:
    options: Any  # the options to train with (--auto_fit may have changed them)
    estimate: MemoryEstimate
    budget: int | None
    applied: tuple[str, ...] = ()
    alternatives: tuple[tuple[str, MemoryEstimate], ...] = ()
    rescan: bool = False  # the datasets must be scanned again (batch or resolution changed)


def memory_budget(value, device: torch.device) -> int | None:
    """--max_memory in bytes; None for 'off'; the device's free memory when not given."""
    from lorakit.errors import UserError

    if value is None:
        return available_memory(device)
    if str(value).strip().lower() in ("off", "none", "0"):
        return None
    try:
        return parse_size(value)
    except ValueError:
        raise UserError(f"--max_memory {value!r}: give a size such as 8GB, 7.5GiB or 8000MB, or 'off' to skip the "
                        "check.") from None


def check_memory(opts, run, plan, data) -> MemoryCheck:
    """Predict the run's peak; under --max_memory go on, over it refuse with the changes that would fit (or, with
    --auto_fit, apply the smallest set of them). --estimate_memory also predicts every single change."""
    from lorakit.errors import UserError

    budget = memory_budget(opts.max_memory, run.device)
    shape = step_shape(data)
    predict = _predictor(run, plan, shape)
    est = predict(opts, ())
    run.log(est.line() + (f"; budget {gib(budget)} GiB" if budget else ""))
    fixes = candidate_fixes(opts, data.configs, _swap_fix(plan, run.device), half_ok(run.device, torch.bfloat16))
    if opts.estimate_memory:
        alts = tuple((f.flags, predict(opts, (f,))) for f in fixes)
        return MemoryCheck(opts, est, budget, alternatives=alts)
    if budget is None or est.peak <= budget:
        return MemoryCheck(opts, est, budget)
    if opts.auto_fit:  # the gentlest single change that fits needs no other traces
        for f in fixes:
            if predict(opts, (f,)).peak <= budget:
                return _applied(opts, run, (f,), predict(opts, (f,)), budget, shape)
    singles = [(f, predict(opts, (f,))) for f in fixes]
    chosen = _smallest_fitting_set(opts, fixes, singles, est, budget, predict)
    listed = "; ".join(f"{f.flags} -> {gib(e.peak)} GiB" for f, e in singles) or "none apply"
    need = f"this run needs about {gib(est.peak)} GiB ({est.line().split('(', 1)[1].rstrip(')')})"
    if chosen is None:
        raise UserError(
            f"{need}, more than the {gib(budget)} GiB budget (--max_memory, default: the free memory), and no "
            f"combination of memory options fits; stopped before loading the model. Each alone: {listed}. Use a "
            f"smaller --network_dim, --resolution or --train_batch_size, free memory, or pass --max_memory off to "
            f"try anyway.")
    if opts.auto_fit:
        return _applied(opts, run, chosen[0], chosen[1], budget, shape)
    flags = " ".join(f.flags.split(" (")[0] for f in chosen[0])
    raise UserError(
        f"{need}, more than the {gib(budget)} GiB budget (--max_memory, default: the free memory); stopped before "
        f"loading the model. Each change alone: {listed}. Smallest set that fits: {flags} -> "
        f"{gib(chosen[1].peak)} GiB. Add it, or pass --auto_fit to apply it.")


def _applied(opts, run, fixes, est: MemoryEstimate, budget: int, shape: StepShape) -> MemoryCheck:
    new_opts = opts
    for f in fixes:
        new_opts, _ = f.apply(new_opts, shape)
    run.log(f"--auto_fit: {' '.join(f.flags.split(' (')[0] for f in fixes)} (predicted {gib(est.peak)} GiB <= "
            f"budget {gib(budget)} GiB)")
    return MemoryCheck(new_opts, est, budget, applied=tuple(f.flags for f in fixes),
                       rescan=any(f.changes_data for f in fixes))


def _predictor(run, plan, shape: StepShape):
    memo: dict[tuple, MemoryEstimate] = {}

    def predict(opts, fixes: tuple) -> MemoryEstimate:
        key = tuple(f.flags for f in fixes)
        if key not in memo:
            o, sh = opts, shape
            for f in fixes:
                o, sh = f.apply(o, sh)
            r = replace(run, weight_dtype=training_dtype(o.mixed_precision))
            memo[key] = estimate(o, r, plan.family, plan.configs, sh)
        return memo[key]

    return predict


def _smallest_fitting_set(opts, fixes, singles, est, budget, predict):
    """(fixes, estimate) of the smallest set that fits, preferring earlier (gentler) fixes; sets whose savings,
    added up from the single fixes, miss the budget by more than 10% are not traced."""
    import itertools

    saving = {f.flags: est.peak - e.peak for f, e in singles}
    for size in range(1, len(fixes) + 1):
        for combo in itertools.combinations(fixes, size):
            guess = est.peak - sum(max(0, saving[f.flags]) for f in combo)
            if size > 1 and guess > budget * 1.1:
                continue
            e = predict(opts, combo)
            if e.peak <= budget:
                return combo, e
    return None


def training_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def peak_report(device: torch.device, predicted: MemoryEstimate | None) -> str:
    measured = measured_peak(device)
    what = "peak GPU memory allocated" if device.type == "cuda" else "peak resident memory"
    if predicted is None:
        return f"{what}: {gib(measured)} GiB"
    pred = predicted.peak - (predicted.runtime if device.type == "cuda" else 0)
    return f"{what}: {gib(measured)} GiB (predicted {gib(pred)} GiB, {100 * (measured - pred) / max(pred, 1):+.0f}%)"


def estimate_report(check: MemoryCheck | None) -> str:
    """--estimate_memory's table: the prediction by kind, and each memory option's predicted peak."""
    if check is None:
        return "memory prediction skipped"
    lines = [check.estimate.table()]
    if check.budget:
        lines.append(f"{'budget (--max_memory, default: free memory)':<48} {gib(check.budget):>8} GiB")
    if check.alternatives:
        lines.append("with one more memory option:")
        lines += [f"  {flags:<70} {gib(e.peak):>6} GiB" for flags, e in check.alternatives]
    return "\n".join(lines)


def predict_options(ns, log: Callable[[str], None] = lambda *a, **k: None) -> tuple[MemoryEstimate, int | None]:
    """(prediction, budget) for resolved options, as `lorakit train` would make them before loading the model
    (the GUI shows it beside its Start button)."""
    from lorakit import options as O
    from lorakit.train import stages as S

    opts = O.normalize(ns)
    run = S.set_up_run(S.picked(S.RunOptions, opts), log, False)
    plan = S.plan_base_model(S.picked(S.LoadOptions, opts))
    data = S.load_data(S.dataset_configs(opts, plan.family, log), S.picked(S.DataOptions, opts), run)
    return estimate(opts, run, plan.family, plan.configs, step_shape(data)), memory_budget(opts.max_memory, run.device)
