"""`lorakit lora filter`: keep or drop whole blocks of a LoRA by readable name, or scale blocks, into a new file.

Block names are the LBW ones (lorakit.generate.lbw): BASE or TE (every text-encoder module), IN00..IN11, M00 or MID,
OUT00..OUT11, ranges such as IN04-IN07 or OUT03-06. For SDXL the numbers are SAI input/output block numbers; FLUX.1's
blocks are D00..D18 (double-stream) and S00..S37 (single-stream), as `lora info` shows them.
Modules outside the numbered blocks (time embedding, conv_in/out) are dropped by --keep and kept by --drop.
Scaling multiplies the output-side factor (lora_up, hada_w1_a, lokr_w1/lokr_w1_a, diff), which scales the delta
exactly; a factor of 0 removes the module. DoRA, IA3 and OFT modules are not linear in their tensors: they can be
kept or dropped, not scaled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from lorakit.errors import UserError
from lorakit.tools.lora_resize import group_modules, read_kohya

# tensors that scale the delta linearly, per algorithm (first one present is scaled)
_LINEAR_PARAMS = (("lora_up.weight",), ("hada_w1_a",), ("lokr_w1", "lokr_w1_a"), ("diff", "diff_b"),
                  ("w_norm", "b_norm"))


def _blocks(spec: str | None) -> set[str] | None:
    if spec is None or not str(spec).strip():
        return None
    from lorakit.generate import lbw

    return lbw.parse_block_selector(str(spec))


def scale_module(name: str, w: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """The module's tensors with its delta multiplied by `factor`."""
    if factor == 1:
        return dict(w)
    if "dora_scale" in w or "oft_blocks" in w or "oft_diag" in w or "on_input" in w:
        raise UserError(f"module {name} is DoRA/OFT/IA3, whose change is not linear in its tensors; it cannot be "
                        f"scaled (keep or drop its block instead).")
    out = dict(w)
    for group in _LINEAR_PARAMS:
        present = [p for p in group if p in w]
        if not present:
            continue
        if group[0] in ("diff", "w_norm"):
            targets = present  # weight and bias diffs both scale
        else:
            targets = present[:1]
        for p in targets:
            out[p] = (w[p].float() * factor).to(w[p].dtype)
        return out
    raise UserError(f"module {name}: no tensor lorakit knows how to scale ({', '.join(sorted(w))}).")


@dataclass
class FilterReport:
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    scaled: dict[str, float] = field(default_factory=dict)
    blocks_kept: set[str] = field(default_factory=set)

    def summary(self) -> str:
        s = f"kept {len(self.kept)} modules, dropped {len(self.dropped)}"
        if self.scaled:
            s += f", scaled {len(self.scaled)}"
        if self.blocks_kept:
            order = _order()
            s += f"; blocks kept: {', '.join(sorted(self.blocks_kept, key=lambda b: order.get(b, 99)))}"
        return s


def _order() -> dict[str, int]:
    from lorakit.generate import lbw

    return {b: i for i, b in enumerate(lbw.BLOCKS_26 + lbw.BLOCKS_FLUX[1:] + ["OTHER"])}


def filter_state_dict(sd: Mapping[str, torch.Tensor], keep: str | None = None, drop: str | None = None,
                      scale: str | Mapping[str, float] | None = None) -> tuple[dict[str, torch.Tensor], FilterReport]:
    """Apply --keep / --drop selectors and --scale block weights ("IN04-IN07:0.5,TE:0") to a kohya state dict."""
    from lorakit.generate import lbw
    from lorakit.tools.lora_merge import parse_block_weights

    keep_set, drop_set = _blocks(keep), _blocks(drop)
    if keep_set is None and drop_set is None and not scale:
        raise UserError("nothing to do: give --keep, --drop and/or --scale.")
    if isinstance(scale, str):
        if ":" not in scale:
            raise UserError(f"--scale {scale!r}: write BLOCKS:FACTOR pairs, e.g. IN04-IN07:0.5,TE:0.")
        weights = parse_block_weights(scale)
    else:
        weights = dict(scale) if scale else None
    out: dict[str, torch.Tensor] = {}
    report = FilterReport()
    for name, w in group_modules(sd).items():
        block = lbw.block_of_lora_name(name)
        selected = (keep_set is None or (block is not None and block in keep_set)) and \
                   (drop_set is None or block is None or block not in drop_set)
        factor = lbw.block_weight(name, weights) if weights else 1.0
        if not selected or factor == 0:
            report.dropped.append(name)
            continue
        if factor != 1:
            report.scaled[name] = factor
        out.update({f"{name}.{p}": t for p, t in scale_module(name, w, factor).items()})
        report.kept.append(name)
        report.blocks_kept.add(block or "OTHER")
    if not out:
        raise UserError("the filter leaves no module at all; check the block names (the file's blocks are: "
                        + ", ".join(sorted({lbw.block_of_lora_name(n) or 'OTHER' for n in group_modules(sd)},
                                           key=lambda b: _order().get(b, 99))) + ").")
    return out, report


def filter_lora(model: str | os.PathLike, save_to: str | os.PathLike, keep: str | None = None,
                drop: str | None = None, scale: str | None = None, drop_embeddings: bool = False,
                log: Callable[[str], None] | None = print) -> FilterReport:
    """Filter a LoRA file into `save_to` (atomic; tensors keep their dtype; metadata notes the filter). Bundled token
    embeddings are kept unless drop_embeddings (they are not in any block)."""
    from lorakit.adapters.file import save_lora
    from lorakit.tools.lora_resize import output_metadata

    save_to = Path(save_to)
    if save_to.suffix.lower() != ".safetensors":
        raise UserError(f"--save_to {save_to}: lorakit writes LoRAs as .safetensors; change the extension.")
    src = read_kohya(model)
    if drop_embeddings and not src.embeddings:
        raise UserError(f"--drop_embeddings: {model} bundles no token embeddings (bundle_emb.*).")
    if drop_embeddings and not (keep or drop or scale):
        sd, report = dict(src.sd), FilterReport(kept=sorted(group_modules(src.sd)))
    else:
        sd, report = filter_state_dict(src.sd, keep, drop, scale)
    md = output_metadata(src, save_to)
    what = "; ".join(x for x in (f"keep {keep}" if keep else "", f"drop {drop}" if drop else "",
                                 f"scale {scale}" if scale else "",
                                 "bundled embeddings dropped" if drop_embeddings else "") if x)
    comment = md.get("ss_training_comment", "")
    md["ss_training_comment"] = f"filtered ({what}); {comment}" if comment else f"filtered ({what})"
    save_lora(save_to, {**sd, **({} if drop_embeddings else src.embeddings)}, md, precision=None)
    if log:
        log(report.summary())
        log(f"saved {save_to}")
    return report


__all__ = ["filter_state_dict", "filter_lora", "scale_module", "FilterReport"]
