"""`lorakit lora extract`: a LoRA from the difference of two checkpoints of one family (sd-scripts
extract_lora_from_models.py semantics).

- Modules: those sd-scripts networks.lora builds (transformer Linear/1x1 conv layers, CLIP q/k/v/out/fc1/fc2; with
  --conv_dim also the ResNet/down/upsample blocks, 3x3 convs at conv_dim).
- Text encoders are included only when some text-encoder weight differs by more than --min_diff (absolute).
- Per module: diff = tuned - base; up = U_k diag(S_k), down = Vh_k (k = dim, or conv_dim for 3x3 convs, at most the
  layer's size); both clamped to +-(the --clamp_quantile quantile of their values together); alpha = k (scale 1).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorakit.errors import UserError
from lorakit.tools.lora_resize import cast_tensors, factors_to_tensors, parse_precision


def quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile (torch.quantile refuses inputs above 16M values)."""
    v = values.detach().flatten().float()
    if v.numel() == 0:
        return 0.0
    s, _ = torch.sort(v)
    pos = q * (s.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.numel() - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def lora_targets(bundle, conv: bool):
    """(text-encoder targets, UNet targets) of sd-scripts networks.lora for this bundle."""
    from lorakit.adapters.targets import UNET_CONV_BLOCKS, UNET_TRANSFORMER, family_classes, te_targets, unet_targets

    classes = family_classes(bundle.family, UNET_TRANSFORMER) + (UNET_CONV_BLOCKS if conv else ())
    return te_targets(bundle.text_encoders, bundle.family), unet_targets(bundle.unet, bundle.family, classes, conv=conv)


@dataclass
class ExtractReport:
    modules: int = 0
    text_encoder_included: bool = False
    te_max_diff: float = 0.0
    energy: float = 0.0
    kept_energy: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def fro_retained(self) -> float:
        return math.sqrt(self.kept_energy / self.energy) if self.energy > 0 else 1.0

    def summary(self) -> str:
        te = "with" if self.text_encoder_included else "without"
        return (f"extracted {self.modules} modules {te} the text encoder; Frobenius norm of the difference "
                f"retained: {self.fro_retained:.2%}")


@torch.no_grad()
def extract_from_bundles(base, tuned, dim: int = 4, conv_dim: int | None = None, clamp_quantile: float = 0.99,
                         min_diff: float = 0.01, device=None,
                         log: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], ExtractReport]:
    """kohya-keyed LoRA tensors (float32) approximating tuned - base."""
    if not base.family.shares_weights_with(tuned.family):
        raise UserError(f"the models are of different families ({base.family.title} and {tuned.family.title}); "
                        f"extract works between two checkpoints of the same family.")
    if dim < 1 or (conv_dim is not None and conv_dim < 1):
        raise UserError("--dim and --conv_dim must be at least 1.")
    if not 0 < clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {clamp_quantile}: a fraction in (0, 1] (1 disables clamping).")
    conv = conv_dim is not None
    te_o, unet_o = lora_targets(base, conv)
    te_t, unet_t = lora_targets(tuned, conv)
    by_name_t = {t.lora_name: t for t in te_t + unet_t}
    report = ExtractReport()
    diffs: list[tuple[str, str, torch.Tensor]] = []
    te_diffs = []
    for t in te_o:
        other = by_name_t.get(t.lora_name)
        if other is None:
            raise UserError(f"the tuned model lacks {t.lora_name}; are the models of the same architecture?")
        d = other.module.weight.float() - t.module.weight.float()
        report.te_max_diff = max(report.te_max_diff, float(d.abs().max()) if d.numel() else 0.0)
        te_diffs.append((t.lora_name, t.kind, d))
    report.text_encoder_included = report.te_max_diff > min_diff
    if report.text_encoder_included:
        diffs.extend(te_diffs)
        if log:
            log(f"text encoder differs (max |diff| {report.te_max_diff:.4g} > {min_diff}): extracting it too")
    elif log:
        log(f"text encoder is the same (max |diff| {report.te_max_diff:.4g} <= {min_diff}): extracting the UNet only")
    del te_diffs
    for t in unet_o:
        other = by_name_t.get(t.lora_name)
        if other is None:
            raise UserError(f"the tuned model lacks {t.lora_name}; are the models of the same architecture?")
        diffs.append((t.lora_name, t.kind, other.module.weight.float() - t.module.weight.float()))
    out: dict[str, torch.Tensor] = {}
    for name, kind, d in diffs:
        shape = tuple(d.shape)
        mat = d.reshape(shape[0], -1)
        if device:
            mat = mat.to(device)
        rank = min(conv_dim if kind == "conv" else dim, mat.shape[0], mat.shape[1])
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
        up = U[:, :rank] * S[:rank]
        down = Vh[:rank]
        if clamp_quantile < 1:
            hi = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
            up = up.clamp(-hi, hi)
            down = down.clamp(-hi, hi)
        s2 = S.double().pow(2)
        report.energy += float(s2.sum())
        report.kept_energy += float(s2[:rank].sum())
        out.update(factors_to_tensors(name, up.cpu(), down.cpu(), float(rank), shape))
        report.modules += 1
    return out, report


def extract_lora(model_org: str | os.PathLike, model_tuned: str | os.PathLike, save_to: str | os.PathLike,
                 dim: int = 4, conv_dim: int | None = None, clamp_quantile: float = 0.99, min_diff: float = 0.01,
                 save_precision: str | None = None, load_precision: str | None = None, device: str | None = None,
                 load_kwargs: dict | None = None, log: Callable[[str], None] | None = print) -> ExtractReport:
    """Load both models (UNet and text encoders only), extract, save (atomic)."""
    from lorakit.adapters.file import build_metadata, save_lora
    from lorakit.models.loading import load_bundle

    save_to = Path(save_to)
    if save_to.suffix.lower() != ".safetensors":
        raise UserError(f"--save_to {save_to}: lorakit writes LoRAs as .safetensors; change the extension.")
    kw = dict(components=("unet", "text_encoders"), dtype=load_precision or "fp32", **(load_kwargs or {}))
    if log:
        log(f"loading {model_org}")
    from lorakit.utils.finite import check_model_finite

    base = load_bundle(model_org, **kw)
    check_model_finite(base, model_org)
    if log:
        log(f"loading {model_tuned}")
    tuned = load_bundle(model_tuned, **kw)
    check_model_finite(tuned, model_tuned)  # a NaN would become the extracted LoRA's every value
    sd, report = extract_from_bundles(base, tuned, dim, conv_dim, clamp_quantile, min_diff, device, log)
    family = base.family
    del base, tuned
    md = build_metadata(family, save_to.stem, sd_model_name=Path(model_org).name)
    args = {}
    if conv_dim is not None:
        args = {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))}
    md.update({"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim)),
               "ss_network_args": json.dumps(args),
               "ss_training_comment": f"extracted from {Path(model_tuned).name} - {Path(model_org).name} "
                                      f"(clamp_quantile {clamp_quantile}, min_diff {min_diff})"})
    save_lora(save_to, cast_tensors(sd, parse_precision(save_precision, torch.float32)), md, precision=None)
    if log:
        log(report.summary())
        log(f"saved {save_to}")
    return report


__all__ = ["extract_from_bundles", "extract_lora", "ExtractReport", "lora_targets", "quantile"]
