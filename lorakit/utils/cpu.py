"""Half precision on the CPU: whether this processor has the arithmetic for it, and what it costs when it has not.

PyTorch runs bf16/fp16 convolutions and matrix products through oneDNN only when the CPU has the instructions for
them (AVX-512 for bf16, AVX512-FP16 or AMX-FP16 for fp16). Without them (every AVX2-only CPU: most desktop and many
server chips) it falls back to a single-threaded reference loop: on the 2-core AVX2 EPYC this was measured on, a
320-channel 3x3 convolution took 3.0 s in bf16 and 0.044 s in fp32, so a full-size SD1.5 step at 256 px takes many
minutes instead of seconds. `--mixed_precision bf16` there is a trap a user meets only after the first step; these
helpers let the trainer say so before loading and keep --auto_fit from walking into it.
"""

from __future__ import annotations

import functools
import time

import torch

_PROBES = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


def native_half(dtype: torch.dtype) -> bool:
    """True when oneDNN reports that this CPU computes `dtype` natively (fp32 and unknown builds: True)."""
    probe = _PROBES.get(dtype)
    if probe is None:
        return True
    fn = getattr(torch.ops.mkldnn, probe, None)
    try:
        return bool(fn()) if fn is not None else True
    except RuntimeError:  # a build without oneDNN answers nothing; do not guess a slowdown
        return True


@functools.lru_cache(maxsize=None)
def half_slowdown(dtype: torch.dtype, repeats: int = 2) -> float:
    """How many times slower one 64-channel 3x3 convolution (32x32) runs in `dtype` than in fp32 here, measured
    (best of `repeats` after a warm-up; about 0.2 s where the reference path is taken; once a process: a grid that
    loads several checkpoints warns each time without measuring again)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 32, 32, generator=g)
    w = torch.randn(64, 64, 3, 3, generator=g)

    def best(xx, ww) -> float:
        torch.nn.functional.conv2d(xx, ww, padding=1)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.nn.functional.conv2d(xx, ww, padding=1)
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad():
        return best(x.to(dtype), w.to(dtype)) / max(best(x, w), 1e-9)


def half_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether computing in `dtype` on `device` is a sensible choice (CUDA/other accelerators: yes)."""
    return torch.device(device).type != "cpu" or native_half(dtype)


TRAIN_ADVICE = ("(fp32; --gradient_checkpointing and --cache_latents keep memory down) or train on a GPU; --auto_fit "
                "will not pick bf16 or --fp8_base on this CPU")


def slow_half_warning(device, dtype: torch.dtype | str, flag: str = "--mixed_precision",
                      advice: str = TRAIN_ADVICE) -> str | None:
    """The paragraph a run on a CPU without `dtype` arithmetic prints before loading, with the measured slowdown;
    None where there is nothing to say. `dtype` may be a name as the options give it ("bf16", "fp32"); `flag` names
    the option that chose it; `advice` follows "Drop <flag>"."""
    from lorakit.models.dtypes import dtype_named

    dtype = dtype_named(dtype, torch.float32) if isinstance(dtype, str) else dtype
    if half_ok(device, dtype):
        return None
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    ratio = half_slowdown(dtype)
    return (f"{flag} {name} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no {name} instructions): PyTorch "
            f"runs {name} convolutions and matrix products on a single-threaded reference path, measured here "
            f"{ratio:.0f}x slower than fp32, so a full-size model takes minutes where fp32 takes seconds. Drop "
            f"{flag} {advice}.")


__all__ = ["native_half", "half_slowdown", "half_ok", "slow_half_warning"]
