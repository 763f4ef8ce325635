"""Refusing tensors that hold NaN or inf before they are used or written.

A LoRA or checkpoint saved from a diverged run gives black or noise images, and merging it spreads the NaN into a
model. The check is one reduction per tensor (a sum in float32: NaN and inf propagate through it), so it costs a
fraction of reading the file; only when a sum is not finite is the tensor itself inspected (a sum of large finite
values could overflow).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from lorakit.errors import UserError

FP16_MAX = 65504.0


def tensor_is_finite(t, max_abs: float | None = None) -> bool:
    """True when a floating tensor holds no NaN/inf (and, with max_abs, no value beyond it); other dtypes are fine."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    if max_abs is not None:
        return bool(torch.isfinite(t).all()) and float(t.detach().abs().max()) <= max_abs
    s = t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    if bool(torch.isfinite(s)):
        return True
    return bool(torch.isfinite(t).all())


def nonfinite_names(named: Iterable[tuple[str, object]], max_abs: float | None = None) -> list[str]:
    """The names whose tensors are not finite (see tensor_is_finite)."""
    return [name for name, t in named if not tensor_is_finite(t, max_abs)]


def _module(key: str) -> str:
    # kohya LoRA keys: "<module>.<param>"; checkpoint keys: the parameter path itself
    head, _, tail = key.partition(".")
    return head if head.startswith(("lora_", "lycoris_")) else key


def nonfinite_message(what: str, names: list[str]) -> str:
    modules = list(dict.fromkeys(_module(n) for n in names))
    more = f" (and {len(modules) - 1} more)" if len(modules) > 1 else ""
    return f"{what} holds NaN/inf values in {modules[0]}{more}"


def check_lora_finite(tensors: Mapping[str, object], source) -> None:
    """UserError naming the file and the first module when a LoRA's tensors hold NaN/inf."""
    bad = nonfinite_names(tensors.items())
    if bad:
        raise UserError(
            f"{nonfinite_message(f'LoRA file {source}', bad)}: the run that saved it diverged, and using it gives "
            "black or noise images (merging it would spread the NaN into the model). Use an earlier save of that "
            "run, or train again with a lower --learning_rate (or --mixed_precision bf16 instead of fp16); "
            f"`lorakit lora info {source}` lists every bad module.")


def bundle_tensors(bundle) -> list[tuple[str, object]]:
    """(component.parameter name, tensor) of every weight of a model bundle (UNet, text encoders, VAE)."""
    parts = [("unet", bundle.unet), ("vae", bundle.vae)]
    parts += [(f"text_encoder{'' if i == 0 else i + 1}", te) for i, te in enumerate(bundle.text_encoders or [])]
    out = []
    for prefix, module in parts:
        if module is None:
            continue
        out += [(f"{prefix}.{name}", t) for name, t in module.state_dict().items()]
    return out


def check_model_finite(bundle, source, max_abs: float | None = None, saving: bool = False) -> None:
    """UserError naming the model and the first weight when it holds NaN/inf (or, with max_abs, values a save
    precision cannot hold)."""
    bad = nonfinite_names(bundle_tensors(bundle), max_abs)
    if not bad:
        return
    if saving:
        limit = f" or beyond {max_abs:g} (the largest value of the save precision)" if max_abs else ""
        raise UserError(
            f"the merged model {source} would hold NaN/inf{limit} in {bad[0]}"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; nothing was written. Lower the LoRA ratios, "
            "or save in fp32 (--save_precision float).")
    raise UserError(
        f"{nonfinite_message(f'model {source}', bad)}: images made with it are black or noise, and a LoRA merged "
        "into it or extracted from it would carry the NaN. Use another copy of the checkpoint (download or convert "
        "it again).")


__all__ = ["tensor_is_finite", "nonfinite_names", "nonfinite_message", "check_lora_finite", "bundle_tensors",
           "check_model_finite", "FP16_MAX"]
