"""`lorakit lora resize`: re-factorise every module of a LoRA to a smaller rank by SVD (sd-scripts resize_lora.py
semantics), plus the per-module delta maths the other LoRA tools share (merge, filter).

Facts kept from sd-scripts networks/resize_lora.py:
- each module's product up @ down (without alpha/rank) is decomposed, up' = U_k diag(S_k), down' = Vh_k, and the new
  alpha is scale x k (scale = old alpha / old rank), so (alpha'/k) up' @ down' is the rank-k truncation of the delta;
- dynamic ranks: sv_ratio keeps singular values >= S_max / param; sv_fro takes the smallest k whose kept Frobenius
  norm sqrt(sum S_k^2) / ||S|| reaches param; sv_cumulative the smallest k whose sum(S_k) / sum(S) reaches param;
  the rank never exceeds --new_rank (--new_conv_rank for 3x3 convs); an all-zero module gets rank 1;
- metadata: ss_network_dim / ss_network_alpha become the new values ("Dynamic" in dynamic mode), a note goes in front
  of ss_training_comment, hashes are recomputed.
Differences: a LoRA product of rank r is decomposed exactly through QR of its factors (no full-size SVD, and no
svd_lowrank approximation); 1x1 convs get --new_rank like Linear layers (sd-scripts gives them the conv rank); the rank
is also capped by the rank the module actually has. Non-LoRA algorithms (LoHa, LoKr, full, Tucker, DoRA, IA3, OFT) are
first expanded to their full weight change through the adapter layer's maths.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from lorakit.errors import UserError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # sd-scripts: a module whose largest singular value is below this is treated as zero


# ---- rank choice --------------------------------------------------------------------------------------------------
def dynamic_rank(S: torch.Tensor, method: str, param: float) -> int:
    """The rank a dynamic method chooses for descending singular values S (at least 1, at most len(S))."""
    S = S.detach().double().cpu()
    n = int(S.numel())
    if n == 0:
        return 1
    if method == "sv_ratio":
        if param <= 0:
            raise UserError("--dynamic_param for sv_ratio must be > 0 (the ratio to the largest singular value).")
        k = int((S >= S[0] / param).sum())
    elif method in ("sv_fro", "sv_cumulative"):
        vals = S.pow(2) if method == "sv_fro" else S.abs()
        total = float(vals.sum())
        if total <= 0:
            return 1
        target = param ** 2 if method == "sv_fro" else param
        frac = torch.cumsum(vals, 0) / total
        # the smallest k whose kept fraction reaches the target (a hair of slack for rounding at target 1.0)
        k = int(torch.searchsorted(frac, torch.tensor([target - 1e-12], dtype=frac.dtype)).item()) + 1
    else:
        raise UserError(f"--dynamic_method {method!r}: use one of {', '.join(DYNAMIC_METHODS)}.")
    return max(1, min(k, n))


def choose_rank(S: torch.Tensor, max_rank: int, dynamic_method: str | None = None,
                dynamic_param: float | None = None) -> int:
    """Fixed rank (max_rank) or the dynamic one, never above max_rank nor len(S); 1 for a zero module."""
    n = int(S.numel())
    if n == 0 or float(S[0]) <= MIN_SV:
        return 1
    k = dynamic_rank(S, dynamic_method, float(dynamic_param)) if dynamic_method else max_rank
    return max(1, min(k, max_rank, n))


def retained(S: torch.Tensor, k: int) -> tuple[float, float]:
    """(Frobenius-norm fraction, singular-value-sum fraction) kept by the first k singular values."""
    S = S.detach().double()
    fro_total = float(S.pow(2).sum())
    sum_total = float(S.abs().sum())
    fro = math.sqrt(float(S[:k].pow(2).sum()) / fro_total) if fro_total > 0 else 1.0
    sm = float(S[:k].abs().sum()) / sum_total if sum_total > 0 else 1.0
    return fro, sm


# ---- exact SVDs ---------------------------------------------------------------------------------------------------
def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of up @ down (up: out x r, down: r x n) without forming the product: QR of both factors, then the
    SVD of a small r x r core. Exact; costs O((out + n) r^2) instead of O(out n min(out, n))."""
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    um, s, vhm = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ um, s, vhm @ qd.T


def svd_of_matrix(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(mat, full_matrices=False)


# ---- per-module deltas --------------------------------------------------------------------------------------------
@dataclass
class ModuleDelta:
    """One module's weight change: scale * up @ down (factored) or scale * full, flattened to 2-D (out, in*kh*kw).
    `shape` is the weight shape the file implies (2-D for Linear, 4-D for convs)."""

    name: str
    shape: tuple[int, ...]
    scale: float = 1.0
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    full: torch.Tensor | None = None
    algo: str = "lora"
    dropped_bias: bool = False

    @property
    def kind(self) -> str:
        if len(self.shape) == 2:
            return "linear"
        return "conv1x1" if tuple(self.shape[2:]) == (1, 1) else "conv"

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def cols(self) -> int:
        return int(math.prod(self.shape[1:]))

    def matrix(self) -> torch.Tensor:
        """The scaled delta as a 2-D float32 matrix."""
        m = self.full if self.full is not None else self.up @ self.down
        return m * self.scale

    def weight(self) -> torch.Tensor:
        return self.matrix().reshape(self.shape)

    def svd(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SVD of the unscaled delta (up @ down or full)."""
        if self.full is not None:
            return svd_of_matrix(self.full.to(device or self.full.device))
        dev = device or self.up.device
        return svd_of_product(self.up.to(dev), self.down.to(dev))


def factors_to_tensors(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float,
                       shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """kohya tensors for up (out x k) and down (k x in*kh*kw) of a layer of weight `shape`."""
    k = down.shape[0]
    if len(shape) == 4:
        up_t = up.reshape(shape[0], k, 1, 1)
        down_t = down.reshape(k, shape[1], shape[2], shape[3])
    else:
        up_t, down_t = up.reshape(shape[0], k), down.reshape(k, shape[1])
    return {f"{name}.lora_up.weight": up_t.contiguous(), f"{name}.lora_down.weight": down_t.contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32)}


class DeltaSource:
    """Turns the modules of a kohya-keyed state dict into ModuleDelta objects. Plain LoRA/LoCon needs no model;
    other algorithms go through the adapter classes, which need the layers: those of `bundle` when given, else a
    weightless (meta) build of the family. DoRA, IA3 and OFT change weights multiplicatively, so they need a real
    base model."""

    def __init__(self, family=None, bundle=None, source: str = "LoRA"):
        self.family = bundle.family if bundle is not None else family
        self.bundle = bundle
        self.source = source
        self._targets = None

    def targets(self):
        if self._targets is None:
            from lorakit.adapters.targets import module_map

            bundle = self.bundle
            if bundle is None:
                if self.family is None:
                    raise UserError(f"{self.source}: its model family is unknown, and LoHa/LoKr/full modules need the "
                                    f"model's layer shapes; pass the base model with --base_model.")
                from lorakit.models.bundle import build_bundle

                bundle = build_bundle(self.family, device="meta", components=("unet", "text_encoders"))
            self._targets = module_map(bundle)
        return self._targets

    def delta(self, name: str, w: Mapping[str, torch.Tensor]) -> ModuleDelta | None:
        """None for modules that are not weight changes of a Linear/Conv2d (norm diffs): callers keep them as is."""
        if "lora_down.weight" in w and "lora_up.weight" in w and "dora_scale" not in w:
            down = w["lora_down.weight"].float()
            up = w["lora_up.weight"].float()
            r = down.shape[0]
            if up.dim() < 2 or down.dim() < 2 or (up.shape[1] != r and "lora_mid.weight" not in w):
                raise UserError(f"{self.source}: module {name} cannot be read: lora_up {tuple(up.shape)} and "
                                f"lora_down {tuple(down.shape)} have different ranks. The file is damaged or was "
                                f"edited; use another copy (`lorakit lora info` lists every such module).")
            alpha = w.get("alpha")
            alpha = float(alpha.float()) if alpha is not None else float(r)  # sd-scripts: no alpha = rank
            scale = alpha / r
            if "lora_mid.weight" in w:  # Tucker: expand (3x3 conv only)
                mid = w["lora_mid.weight"].float()
                full = torch.einsum("ijkl,oi,jn->onkl", mid, up.flatten(1), down.flatten(1))
                return ModuleDelta(name, tuple(full.shape), scale, full=full.flatten(1), algo="tucker")
            shape = (up.shape[0], *down.shape[1:]) if down.dim() == 4 else (up.shape[0], down.shape[1])
            return ModuleDelta(name, tuple(shape), scale, up=up.flatten(1), down=down.flatten(1))
        from lorakit.adapters.network import detect_algo
        from lorakit.adapters.others import NormModule

        cls = detect_algo(name, w)
        if cls is NormModule:
            return None
        t = self.targets().get(name)
        if t is None:
            raise UserError(f"{self.source}: module {name} does not exist in a {self.family.title} model; "
                            f"is the file for another model family?")
        if t.kind == "norm":
            return None
        dev = t.module.weight.device
        with torch.device("cpu" if dev.type == "meta" else dev):
            try:
                a = cls.from_weights(t.lora_name, t.module, dict(w))
            except ValueError as exc:
                raise UserError(f"{self.source}: {exc}") from None
        with torch.no_grad():
            if a.additive and not a.wd:
                full = a.delta_weight()
            elif dev.type == "meta":
                raise UserError(f"{self.source}: module {name} is {'DoRA' if a.wd else a.algo.upper()}, whose weight "
                                f"change depends on the base weights; pass the base model with --base_model.")
            else:
                full = a.weight_change(1.0)
            dropped = a.delta_bias() is not None
        return ModuleDelta(name, tuple(full.shape), 1.0, full=full.detach().float().flatten(1),
                           algo="dora" if a.wd else a.algo, dropped_bias=dropped)


def group_modules(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, _, param = k.partition(".")
        out.setdefault(name, {})[param] = v
    return out


# ---- reading ------------------------------------------------------------------------------------------------------
@dataclass
class KohyaLora:
    """A LoRA file read and converted to kohya keys, with its family when it can be told."""

    path: Path | None
    sd: dict[str, torch.Tensor]
    metadata: dict[str, str]
    family: object | None
    dtype: torch.dtype = torch.float32
    # bundled token embeddings (bundle_emb.*): not adapter modules; the tools copy them into what they write
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


def read_kohya(source, family=None) -> KohyaLora:
    """Read a LoRA (path or adapters.file.LoraFile) of any supported key style as kohya keys."""
    from lorakit.adapters.embeddings import split_bundle
    from lorakit.adapters.file import LoraFile, best_family, detect_family, read_lora_file, to_kohya
    from lorakit.models.families import FAMILIES, get_family

    lf = source if isinstance(source, LoraFile) else read_lora_file(source)
    sd = to_kohya(lf.tensors, lf.metadata, family, source=str(lf.path))
    if family is None:
        cands, _ = detect_family(sd, lf.metadata)
        name = best_family(cands) if len(cands) < len(FAMILIES) or lf.metadata else None
        family = get_family(name) if name else None
        if family is not None and not family.lora_unet_diffusers_names and not all(
                k.startswith(("lora_unet_", "lora_te")) for k in lf.tensors):
            sd = to_kohya(lf.tensors, lf.metadata, family, source=str(lf.path))  # PEFT SDXL: SAI UNet names
    dtypes = [v.dtype for v in lf.tensors.values() if v.is_floating_point() and v.dim() > 0]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    sd, embeddings = split_bundle(sd)
    return KohyaLora(lf.path, sd, dict(lf.metadata), family, dtype, embeddings)


# ---- resizing -----------------------------------------------------------------------------------------------------
@dataclass
class ModuleReport:
    name: str
    kind: str
    algo: str
    old_rank: int | None
    new_rank: int
    alpha: float
    fro_retained: float
    sum_retained: float
    max_ratio: float
    energy: float  # squared Frobenius norm of the module's (scaled) delta
    kept_energy: float


@dataclass
class ResizeReport:
    modules: list[ModuleReport] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_fro_retained(self) -> float:
        """Retained fraction of the Frobenius norm of all modules' deltas taken together."""
        total = sum(m.energy for m in self.modules)
        return math.sqrt(sum(m.kept_energy for m in self.modules) / total) if total > 0 else 1.0

    @property
    def mean_fro_retained(self) -> float:
        return sum(m.fro_retained for m in self.modules) / max(1, len(self.modules))

    @property
    def std_fro_retained(self) -> float:
        n = len(self.modules)
        if n == 0:
            return 0.0
        mu = self.mean_fro_retained
        return math.sqrt(sum((m.fro_retained - mu) ** 2 for m in self.modules) / n)

    def summary(self) -> str:
        ranks = sorted({m.new_rank for m in self.modules})
        rank_txt = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
        return (f"{len(self.modules)} modules, rank {rank_txt}; Frobenius norm retained: total "
                f"{self.total_fro_retained:.2%}, mean per module {self.mean_fro_retained:.2%} "
                f"(std {self.std_fro_retained:.3f})")

    def module_lines(self) -> list[str]:
        return [f"{m.name:75} | sum(S) retained: {m.sum_retained:.1%}, fro retained: {m.fro_retained:.1%}, "
                f"max(S) ratio: {m.max_ratio:0.1f} | dim: {m.old_rank} -> {m.new_rank}, alpha: {m.alpha:g}"
                for m in self.modules]


def refactor(md: ModuleDelta, max_rank: int, dynamic_method=None, dynamic_param=None,
             device=None) -> tuple[dict[str, torch.Tensor], ModuleReport]:
    """Rank-k factors of one module, keeping its scale (alpha' = scale x k)."""
    U, S, Vh = md.svd(device)
    k = choose_rank(S, max_rank, dynamic_method, dynamic_param)
    k_avail = min(k, S.numel())
    up = U[:, :k_avail] * S[:k_avail]
    down = Vh[:k_avail]
    if k_avail < k:  # only for a zero module of width 0 (cannot happen for real layers), kept for safety
        up = torch.cat([up, up.new_zeros(up.shape[0], k - k_avail)], 1)
        down = torch.cat([down, down.new_zeros(k - k_avail, down.shape[1])], 0)
    alpha = md.scale * k
    fro, sm = retained(S, k)
    s = S.detach().double().cpu()
    energy = float(s.pow(2).sum()) * md.scale ** 2
    kept = float(s[:k].pow(2).sum()) * md.scale ** 2
    ratio = float(s[0] / s[k - 1]) if k <= s.numel() and float(s[k - 1]) > 0 else float("inf")
    tensors = factors_to_tensors(md.name, up.float().cpu(), down.float().cpu(), alpha, md.shape)
    return tensors, ModuleReport(md.name, md.kind, md.algo, md.rank, k, alpha, fro, sm, ratio, energy, kept)


def resize_state_dict(sd: Mapping[str, torch.Tensor], new_rank: int, new_conv_rank: int | None = None,
                      dynamic_method: str | None = None, dynamic_param: float | None = None, *, family=None,
                      bundle=None, device=None, source: str = "LoRA",
                      progress: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], ResizeReport]:
    """Resize every module of a kohya-keyed state dict. Returns the new state dict (float32) and the report."""
    if new_rank is None or int(new_rank) < 1:
        raise UserError("--new_rank must be at least 1.")
    new_conv_rank = int(new_conv_rank) if new_conv_rank is not None else int(new_rank)
    if new_conv_rank < 1:
        raise UserError("--new_conv_rank must be at least 1.")
    if dynamic_method and dynamic_param is None:
        raise UserError(f"--dynamic_method {dynamic_method} needs --dynamic_param (sv_ratio: ratio to the largest "
                        f"singular value, e.g. 2; sv_fro / sv_cumulative: a fraction, e.g. 0.9).")
    if dynamic_method and dynamic_method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method {dynamic_method!r}: use one of {', '.join(DYNAMIC_METHODS)}.")
    if dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < float(dynamic_param) <= 1:
        raise UserError(f"--dynamic_param for {dynamic_method} is a fraction in (0, 1], got {dynamic_param}.")
    src = DeltaSource(family, bundle, source)
    out: dict[str, torch.Tensor] = {}
    report = ResizeReport()
    dropped_bias = []
    with torch.no_grad():
        for name, w in group_modules(sd).items():
            md = src.delta(name, w)
            if md is None:
                out.update({f"{name}.{p}": t for p, t in w.items()})
                report.passthrough.append(name)
                continue
            if md.dropped_bias:
                dropped_bias.append(name)
            cap = new_conv_rank if md.kind == "conv" else int(new_rank)
            tensors, mr = refactor(md, cap, dynamic_method, dynamic_param, device)
            out.update(tensors)
            report.modules.append(mr)
            if progress:
                progress(name)
    if dropped_bias:
        report.notes.append(f"{len(dropped_bias)} module(s) also changed a bias (e.g. {dropped_bias[0]}); a LoRA "
                            f"cannot hold bias changes, so they are left out.")
    if report.passthrough:
        report.notes.append(f"{len(report.passthrough)} norm-layer module(s) copied unchanged.")
    return out, report


def cast_tensors(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast factors to `dtype`, keeping alpha in float32 (an fp16/bf16 alpha would shift the scale)."""
    out = {}
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point() and not k.endswith(".alpha"):
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def parse_precision(value: str | None, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    from lorakit.models.dtypes import DTYPES as table

    if value.lower() not in table:
        raise UserError(f"--save_precision {value!r}: use float, fp16 or bf16.")
    return table[value.lower()]


def output_metadata(src: KohyaLora, out_path: str | os.PathLike) -> dict[str, str]:
    """The source's metadata, with the family's base keys filled in where the source has none."""
    md: dict[str, str] = {}
    if src.family is not None:
        from lorakit.adapters.file import build_metadata

        md.update(build_metadata(src.family, Path(out_path).stem))
    md.update(src.metadata)
    for k in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "lora_adapter_metadata"):
        md.pop(k, None)
    return md


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def resize_lora(model: str | os.PathLike, save_to: str | os.PathLike, new_rank: int, new_conv_rank: int | None = None,
                dynamic_method: str | None = None, dynamic_param: float | None = None,
                save_precision: str | None = None, device: str | None = None, verbose: bool = False,
                base_model: str | os.PathLike | None = None, bundle=None,
                log: Callable[[str], None] | None = print) -> ResizeReport:
    """Resize a LoRA file and save it (atomically) to `save_to`. `base_model`/`bundle` are needed only for DoRA,
    IA3 and OFT modules (and for LoHa/LoKr files whose family cannot be told). Returns the report."""
    from lorakit.adapters.file import save_lora

    save_to = Path(save_to)
    if save_to.suffix.lower() != ".safetensors":
        raise UserError(f"--save_to {save_to}: lorakit writes LoRAs as .safetensors; change the extension.")
    src = read_kohya(model)
    if bundle is None and base_model is not None:
        from lorakit.models.loading import load_bundle

        bundle = load_bundle(base_model, components=("unet", "text_encoders"))
    if bundle is not None and src.family is not None and not bundle.family.shares_weights_with(src.family):
        raise UserError(f"{model} is a {src.family.title} LoRA but --model is a {bundle.family.title} model.")
    dtype = parse_precision(save_precision, src.dtype)
    new_sd, report = resize_state_dict(src.sd, new_rank, new_conv_rank, dynamic_method, dynamic_param,
                                       family=src.family, bundle=bundle, device=device, source=str(model))
    old_dims = sorted({m.old_rank for m in report.modules if m.old_rank is not None})
    old_txt = (str(old_dims[-1]) if old_dims else "full")
    md = output_metadata(src, save_to)
    comment = md.get("ss_training_comment", "")
    conv_rank = new_conv_rank if new_conv_rank is not None else new_rank
    if dynamic_method:
        note = f"Dynamic resize with {dynamic_method}: {dynamic_param} from {old_txt} (max rank {new_rank})"
        md["ss_network_dim"] = "Dynamic"
        md["ss_network_alpha"] = "Dynamic"
    else:
        conv_desc = "" if conv_rank == new_rank else f" (conv: {conv_rank})"
        note = f"dimension is resized from {old_txt} to {new_rank}{conv_desc}"
        lin = [m for m in report.modules if m.kind != "conv"] or report.modules
        alphas = {round(m.alpha, 6) for m in lin}
        md["ss_network_dim"] = str(new_rank)
        md["ss_network_alpha"] = _num(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    md["ss_training_comment"] = f"{note}; {comment}" if comment else note
    algos = {m.algo for m in report.modules}
    convs = [m for m in report.modules if m.kind == "conv"]
    if algos - {"lora"} or "ss_network_module" not in md:
        md["ss_network_module"] = "networks.lora"
    try:
        args = json.loads(md.get("ss_network_args") or "{}")
        if not isinstance(args, dict):
            args = {}
    except ValueError:
        args = {}
    if algos - {"lora"}:  # the file is plain LoRA/LoCon now
        args = {k: v for k, v in args.items() if k in ("conv_dim", "conv_alpha")}
    if convs:
        conv_alphas = {round(m.alpha, 6) for m in convs}
        args["conv_dim"] = "Dynamic" if dynamic_method else str(conv_rank)
        args["conv_alpha"] = _num(conv_alphas.pop()) if len(conv_alphas) == 1 and not dynamic_method else "Dynamic"
    if args or "ss_network_args" in md:
        md["ss_network_args"] = json.dumps(args)
    save_lora(save_to, {**cast_tensors(new_sd, dtype), **src.embeddings}, md, precision=None)
    if log:
        if verbose:
            for line in report.module_lines():
                log(line)
        for n in report.notes:
            log(f"note: {n}")
        log(report.summary())
        log(f"saved {save_to}")
    return report


__all__ = ["DYNAMIC_METHODS", "dynamic_rank", "choose_rank", "retained", "svd_of_product", "ModuleDelta",
           "DeltaSource", "read_kohya", "KohyaLora", "resize_state_dict", "resize_lora", "ResizeReport",
           "ModuleReport", "factors_to_tensors", "cast_tensors", "group_modules", "refactor"]
