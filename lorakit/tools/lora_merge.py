"""Merging LoRAs: into a model's weights (`lorakit lora merge --model ...`), or into one LoRA (`lorakit lora merge`).

Into a model: W += ratio x block weight x delta for every module of every LoRA (DoRA/IA3/OFT through the adapter
layer's merged weight), then saved as a single-file checkpoint (A1111/ComfyUI) or a diffusers folder. The
checkpoint's metadata lists what was merged (name, ratio, block weights, sha256 of the LoRA file).

Into one LoRA, two exact methods:
- svd: per module the sum of the full deltas (ratio x block weight x alpha/rank x up @ down, other algorithms
  expanded), then an SVD to --new_rank or a dynamic rank (as `lora resize`); the retained fraction is printed.
  For LoRA inputs the sum is decomposed exactly through the stacked factors, never as a full matrix.
- concat: the factors stacked, rank = sum of the ranks, each input's ratio and alpha/rank folded into its up
  weights so one alpha (= the new rank, scale 1) serves the module. The delta equals the sum exactly.
sd-scripts' merge_lora.py instead adds the factors themselves (up1 + up2, down1 + down2), which is only an
approximation of the summed deltas (cross terms up1 @ down2 appear); lorakit does not offer that.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from lorakit.errors import UserError
from lorakit.tools.lora_resize import (DYNAMIC_METHODS, DeltaSource, ModuleDelta, ResizeReport, cast_tensors,
                                       factors_to_tensors, group_modules, parse_precision, read_kohya, refactor)


# ---- block weights ------------------------------------------------------------------------------------------------
def parse_block_weights(spec: str | None, presets: Mapping[str, str] | None = None) -> dict[str, float] | None:
    """Block weights from "IN04-IN07:0,OUT03:0.5,TE:0.8" (listed blocks get the weight, others 1), or an LBW preset
    name / vector of 12, 17, 20 or 26 values (lorakit.generate.lbw). None or "" means no block weights."""
    if spec is None or not str(spec).strip() or str(spec).strip() == "-":
        return None
    from lorakit.generate import lbw

    s = str(spec).strip()
    if ":" not in s:
        table = dict(lbw.DEFAULT_PRESETS)
        table.update(presets or {})
        return lbw.resolve_lbw(s, table, where="block weights")
    weights: dict[str, float] = {}
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        sel, sep, val = part.rpartition(":")
        if not sep or not sel.strip():
            raise UserError(f"block weights {spec!r}: {part!r} should be BLOCKS:WEIGHT, e.g. IN04-IN07:0 or OUT03:0.5.")
        try:
            w = float(val)
        except ValueError:
            raise UserError(f"block weights {spec!r}: {val!r} in {part!r} is not a number.") from None
        for block in lbw.parse_block_selector(sel):
            weights[block] = w
    return weights


def module_factor(name: str, block_weights: Mapping[str, float] | None) -> float:
    """A module's block weight (1 outside the numbered blocks or without block weights)."""
    if not block_weights:
        return 1.0
    from lorakit.generate import lbw

    return lbw.block_weight(name, block_weights)


@dataclass
class LoraSpec:
    """One LoRA to merge: file, ratio, optional block weights (see parse_block_weights)."""

    path: str | os.PathLike
    ratio: float = 1.0
    block_weights: str | None = None


def specs_from_lists(models: list[str], ratios: list[float] | None = None,
                     block_weights: list[str] | None = None) -> list[LoraSpec]:
    """CLI lists -> specs; ratios default to 1; a single ratio or block-weight spec applies to every model."""
    if not models:
        raise UserError("no LoRA given: pass --models A.safetensors [B.safetensors ...].")
    ratios = list(ratios or [])
    if len(ratios) == 1 and len(models) > 1:
        ratios = ratios * len(models)
    if ratios and len(ratios) != len(models):
        raise UserError(f"--ratios has {len(ratios)} values for {len(models)} models; give one per model (or one).")
    bws = list(block_weights or [])
    if len(bws) == 1 and len(models) > 1:
        bws = bws * len(models)
    if bws and len(bws) != len(models):
        raise UserError(f"--block_weights has {len(bws)} values for {len(models)} models; give one per model "
                        f"(use - for none).")
    return [LoraSpec(m, ratios[i] if ratios else 1.0, bws[i] if bws else None) for i, m in enumerate(models)]


def _sha256(path) -> str:
    from lorakit.models.saving import file_hashes

    return file_hashes(path)["sha256"]


def _record(spec: LoraSpec) -> dict:
    p = Path(spec.path)
    rec = {"name": p.stem, "file": p.name, "ratio": float(spec.ratio), "sha256": _sha256(p)}
    if spec.block_weights:
        rec["block_weights"] = str(spec.block_weights)
    return rec


# ---- into a model -------------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_into_bundle(bundle, specs: list[LoraSpec], presets: Mapping[str, str] | None = None,
                      log: Callable[[str], None] | None = None) -> list[dict]:
    """Add each LoRA (ratio x block weight) into the bundle's weights, in place. Returns one record per LoRA."""
    from lorakit.adapters.file import check_family, read_lora_file, to_kohya
    from lorakit.adapters.network import build_network_from_state_dict

    records = []
    for spec in specs:
        lf = read_lora_file(spec.path)
        check_family(lf, bundle.family)
        sd = to_kohya(lf.tensors, lf.metadata, bundle.family, source=str(lf.path))
        net = build_network_from_state_dict(bundle, sd, lf.metadata, source=str(lf.path))
        weights = parse_block_weights(spec.block_weights, presets)
        merged = 0
        for a in net.adapters:
            m = float(spec.ratio) * module_factor(a.lora_name, weights)
            if m == 0:
                continue
            org = a.org_module
            w = org.weight
            # no backups (unlike Network.merge_into): a full-size model is not held twice
            w.copy_(a.new_weight(w, m).to(w.dtype))
            db = a.delta_bias()
            bias = getattr(org, "bias", None)
            if db is not None and bias is not None:
                bias.add_((db * m).to(bias.dtype))
            merged += 1
        words = net.embeddings.write_rows() if net.embeddings is not None else []
        del net
        records.append(_record(spec))
        if log:
            bw = f", block weights {spec.block_weights}" if spec.block_weights else ""
            emb = f"; trained embeddings of {', '.join(words)} written into the token rows" if words else ""
            log(f"merged {Path(spec.path).name} at {spec.ratio:g}{bw}: {merged} modules{emb}")
    return records


def merge_into_model(model: str | os.PathLike, specs: list[LoraSpec], save_to: str | os.PathLike,
                     save_precision: str | None = None, presets_file: str | None = None,
                     load_kwargs: dict | None = None, log: Callable[[str], None] | None = print) -> Path:
    """Load `model`, merge the LoRAs, save to `save_to` (.safetensors: single file; otherwise a diffusers folder)."""
    from lorakit.models.loading import load_bundle
    from lorakit.models.saving import save_diffusers_folder, save_single_file
    from lorakit.utils.atomic import write_text_atomic

    save_to = Path(save_to)
    presets = _load_presets(presets_file)
    for s in specs:  # fail on a bad spec before the slow model load
        parse_block_weights(s.block_weights, presets)
        if not Path(s.path).is_file():
            raise UserError(f"LoRA file {s.path} does not exist.")
    dtype = {"float": "fp32", None: None}.get(save_precision, save_precision)
    bundle = load_bundle(model, dtype="fp32", **(load_kwargs or {}))
    from lorakit.utils.finite import FP16_MAX, check_model_finite

    check_model_finite(bundle, model)
    records = merge_into_bundle(bundle, specs, presets, log)
    # never write NaN/inf into a checkpoint (large ratios can also overflow what fp16 holds)
    check_model_finite(bundle, save_to, max_abs=FP16_MAX if dtype in ("fp16", "float16", "half") else None,
                       saving=True)
    merged_from = ", ".join([Path(model).stem] + [r["name"] for r in records])
    if save_to.suffix.lower() == ".safetensors":
        meta = {"modelspec.merged_from": merged_from, "lorakit.merged_loras": json.dumps(records)}
        save_single_file(bundle, save_to, dtype=dtype, metadata=meta)
    else:
        save_diffusers_folder(bundle, save_to, dtype=dtype)
        write_text_atomic(save_to / "lorakit_merged_loras.json",
                          json.dumps({"base_model": str(model), "merged_loras": records}, indent=2))
    if log:
        log(f"saved {save_to}")
    return save_to


def _load_presets(presets_file: str | None) -> dict[str, str] | None:
    if not presets_file:
        return None
    from lorakit.generate import lbw

    return lbw.load_preset_file(presets_file)


# ---- LoRAs into one LoRA ------------------------------------------------------------------------------------------
@dataclass
class MergeReport:
    mode: str
    modules: int = 0
    ranks: set = field(default_factory=set)
    resize: ResizeReport | None = None
    records: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        ranks = sorted(self.ranks)
        rank_txt = (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}") if ranks else "-"
        if self.resize is not None:
            return f"svd merge: {self.resize.summary()}"
        return f"{self.mode} merge: {self.modules} modules, rank {rank_txt} (exact)"


def _same_shape(name: str, a: ModuleDelta, b: ModuleDelta) -> None:
    if a.shape[0] != b.shape[0] or a.cols != b.cols:
        raise UserError(f"module {name}: the LoRAs disagree on the layer's shape ({a.shape} vs {b.shape}); "
                        f"are they for different model families?")


def merge_lora_state_dicts(sources: list[tuple[Mapping[str, torch.Tensor], float, Mapping[str, float] | None]],
                           mode: str = "svd", new_rank: int | None = None, new_conv_rank: int | None = None,
                           dynamic_method: str | None = None, dynamic_param: float | None = None, *, family=None,
                           bundle=None, device=None) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """Merge kohya-keyed state dicts, each with (ratio, block weights). See the module docstring for the modes."""
    if mode not in ("svd", "concat"):
        raise UserError(f"--mode {mode!r}: use svd or concat.")
    if mode == "svd" and not new_rank:
        raise UserError("svd merge needs --new_rank (the maximum rank with --dynamic_method).")
    if dynamic_method and mode != "svd":
        raise UserError("--dynamic_method works with --mode svd only; concat keeps every rank.")
    if dynamic_method and dynamic_method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method {dynamic_method!r}: use one of {', '.join(DYNAMIC_METHODS)}.")
    if dynamic_method and dynamic_param is None:
        raise UserError(f"--dynamic_method {dynamic_method} needs --dynamic_param.")
    src = DeltaSource(family, bundle, "LoRA merge")
    parts: dict[str, list[tuple[ModuleDelta, float]]] = {}
    passthrough: dict[str, list[tuple[dict, float]]] = {}
    for sd, ratio, weights in sources:
        for name, w in group_modules(sd).items():
            c = float(ratio) * module_factor(name, weights)
            if c == 0:
                continue
            md = src.delta(name, w)
            if md is None:
                passthrough.setdefault(name, []).append((w, c))
                continue
            if name in parts:
                _same_shape(name, parts[name][0][0], md)
            parts.setdefault(name, []).append((md, c))
    out: dict[str, torch.Tensor] = {}
    report = MergeReport(mode)
    resize = ResizeReport() if mode == "svd" else None
    conv_cap = int(new_conv_rank or new_rank or 0)
    with torch.no_grad():
        for name, items in parts.items():
            first = items[0][0]
            factored = all(md.full is None for md, _ in items)
            if mode == "concat":
                if not factored:
                    algos = sorted({md.algo for md, _ in items if md.full is not None})
                    raise UserError(f"module {name}: concat merges LoRA/LoCon factors only, this one is "
                                    f"{'/'.join(algos)}; use --mode svd.")
                up = torch.cat([md.up * (md.scale * c) for md, c in items], 1)
                down = torch.cat([md.down for md, _ in items], 0)
                out.update(factors_to_tensors(name, up, down, float(down.shape[0]), first.shape))
                report.ranks.add(int(down.shape[0]))
                report.modules += 1
                continue
            if factored:
                up = torch.cat([md.up * (md.scale * c) for md, c in items], 1)
                down = torch.cat([md.down for md, _ in items], 0)
                total = ModuleDelta(name, first.shape, 1.0, up=up, down=down, algo="lora")
            else:
                full = sum(md.matrix() * c for md, c in items)
                total = ModuleDelta(name, first.shape, 1.0, full=full, algo="full")
            cap = conv_cap if total.kind == "conv" else int(new_rank)
            tensors, mr = refactor(total, cap, dynamic_method, dynamic_param, device)
            mr.old_rank = sum((md.rank or 0) for md, _ in items) or None
            out.update(tensors)
            resize.modules.append(mr)
            report.ranks.add(mr.new_rank)
            report.modules += 1
        for name, items in passthrough.items():  # norm diffs add linearly
            keys = set().union(*[w.keys() for w, _ in items])
            for p in keys:
                vals = [w[p].float() * c for w, c in items if p in w]
                out[f"{name}.{p}"] = sum(vals)
    report.resize = resize
    return out, report


def _merged_embeddings(specs: list[LoraSpec], loras: list) -> dict[str, torch.Tensor]:
    """The bundled token embeddings of all inputs, unchanged: a trained word's vectors are not a weight delta to
    scale or add, so one word bundled by two inputs is refused rather than averaged into something neither learned."""
    from lorakit.adapters.embeddings import bundle_words

    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for s, lo in zip(specs, loras):
        for word in bundle_words(lo.embeddings):
            if word in owner:
                raise UserError(f"{owner[word]} and {Path(s.path).name} both bundle a trained embedding for {word!r}; "
                                f"lorakit keeps bundled embeddings unchanged and cannot merge two of one word. Remove "
                                f"it from one file first (lorakit lora filter --drop_embeddings).")
            owner[word] = Path(s.path).name
        out.update(lo.embeddings)
    return out


def merge_lora_files(specs: list[LoraSpec], save_to: str | os.PathLike, mode: str = "svd",
                     new_rank: int | None = None, new_conv_rank: int | None = None,
                     dynamic_method: str | None = None, dynamic_param: float | None = None,
                     save_precision: str | None = None, device: str | None = None, presets_file: str | None = None,
                     base_model: str | os.PathLike | None = None, verbose: bool = False,
                     log: Callable[[str], None] | None = print) -> MergeReport:
    """Merge LoRA files into one LoRA file (atomic save). Returns the report."""
    from lorakit.adapters.file import build_metadata, save_lora

    save_to = Path(save_to)
    if save_to.suffix.lower() != ".safetensors":
        raise UserError(f"--save_to {save_to}: lorakit writes LoRAs as .safetensors; change the extension.")
    presets = _load_presets(presets_file)
    loras = [read_kohya(s.path) for s in specs]
    if len({lo.family.weight_group for lo in loras if lo.family is not None}) > 1:
        listing = ", ".join(f"{Path(s.path).name} ({lo.family.name if lo.family else '?'})" for s, lo in zip(specs, loras))
        raise UserError(f"the LoRAs are for different model families ({listing}); merge LoRAs of one family only.")
    family = next((lo.family for lo in loras if lo.family is not None), None)
    bundle = None
    if base_model is not None:
        from lorakit.models.loading import load_bundle

        bundle = load_bundle(base_model, components=("unet", "text_encoders"))
    sources = [(lo.sd, s.ratio, parse_block_weights(s.block_weights, presets)) for s, lo in zip(specs, loras)]
    sd, report = merge_lora_state_dicts(sources, mode, new_rank, new_conv_rank, dynamic_method, dynamic_param,
                                        family=family, bundle=bundle, device=device)
    report.records = [_record(s) for s in specs]
    dtypes = [lo.dtype for lo in loras]
    dtype = parse_precision(save_precision, max(set(dtypes), key=dtypes.count))
    md: dict[str, str] = {}
    if family is not None:
        md.update(build_metadata(family, save_to.stem))
    first_md = loras[0].metadata
    for k in ("ss_sd_model_name", "ss_clip_skip", "ss_v2", "ss_base_model_version", "modelspec.resolution",
              "modelspec.prediction_type", "modelspec.encoder_layer"):
        if k in first_md:
            md[k] = first_md[k]
    if mode == "svd":
        dim = "Dynamic" if dynamic_method else str(new_rank)
    else:
        lin = {int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_down.weight")
               and not (v.dim() == 4 and tuple(v.shape[2:]) != (1, 1))}
        dim = str(lin.pop()) if len(lin) == 1 else "Dynamic"
    md["ss_network_module"] = "networks.lora"
    md["ss_network_dim"] = dim
    if mode == "concat":
        md["ss_network_alpha"] = md["ss_network_dim"]  # alpha = rank in every module
    else:
        alphas = {round(m.alpha, 6) for m in report.resize.modules}
        md["ss_network_alpha"] = "Dynamic" if len(alphas) != 1 else f"{alphas.pop():g}"
    conv_ranks, conv_alphas = set(), set()
    for k, v in sd.items():
        if k.endswith(".lora_down.weight") and v.dim() == 4 and tuple(v.shape[2:]) != (1, 1):
            conv_ranks.add(int(v.shape[0]))
            conv_alphas.add(round(float(sd[k[:-len(".lora_down.weight")] + ".alpha"]), 6))
    args = {}
    if conv_ranks:
        args = {"conv_dim": str(conv_ranks.pop()) if len(conv_ranks) == 1 and not dynamic_method else "Dynamic",
                "conv_alpha": f"{conv_alphas.pop():g}" if len(conv_alphas) == 1 else "Dynamic"}
    md["ss_network_args"] = json.dumps(args)
    how = f"svd to rank {new_rank}" if mode == "svd" and not dynamic_method else (
        f"svd, {dynamic_method} {dynamic_param}, max rank {new_rank}" if mode == "svd" else "concatenation")
    listing = ", ".join(f"{r['name']} ({r['ratio']:g})" for r in report.records)
    md["ss_training_comment"] = f"merged from {listing} by {how}"
    md["modelspec.merged_from"] = ", ".join(r["name"] for r in report.records)
    md["lorakit.merged_loras"] = json.dumps(report.records)
    save_lora(save_to, {**cast_tensors(sd, dtype), **_merged_embeddings(specs, loras)}, md, precision=None)
    if log:
        if verbose and report.resize is not None:
            for line in report.resize.module_lines():
                log(line)
        log(report.summary())
        log(f"saved {save_to}")
    return report


__all__ = ["LoraSpec", "specs_from_lists", "parse_block_weights", "module_factor", "merge_into_bundle",
           "merge_into_model", "merge_lora_state_dicts", "merge_lora_files", "MergeReport"]
