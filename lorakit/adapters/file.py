"""The LoRA file: read any supported style, convert to kohya keys, detect the model family, save with the metadata
A1111 / ComfyUI / diffusers / civitai expect (ss_*, ModelSpec 1.0.1 with hash_sha256, sshs_* hashes).

Hashes (as sd-scripts and ModelSpec define them):
- sshs_model_hash: sha256 of the file bytes after the header of the file saved with only the ss_* metadata
  (the tensor bytes do not depend on metadata, so it equals the hash of our file's data section).
- sshs_legacy_hash: first 8 hex of sha256 over bytes 0x100000..0x110000 of that same ss_*-only file.
- modelspec.hash_sha256: "0x" + sha256 over each tensor's raw bytes (as saved), tensors in key order.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from lorakit.errors import UserError
from lorakit.models.detect import lora_metadata_families
from lorakit.models.dtypes import DTYPES
from lorakit.models.families import FAMILIES, families_of_width

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")  # te3: sd-scripts' FLUX T5
SDXL_UNET_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                      "lora_unet_time_embed_", "lora_unet_label_emb_", "lora_unet_out_")
FLUX_UNET_PREFIXES = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")
PRECISIONS = DTYPES


@dataclass
class LoraFile:
    path: Path | None
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    size: int = 0


# ---- reading ------------------------------------------------------------------------------------------------------
def read_lora_file(path: str | os.PathLike, finite: bool = True) -> LoraFile:
    """Load tensors and metadata; a missing, unreadable or corrupt file raises UserError naming it, and so does one
    holding NaN/inf (unless finite=False: `lora info` reports those modules instead)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"LoRA file {p} does not exist.")
    size = p.stat().st_size
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors import safe_open

            tensors = {}
            with safe_open(str(p), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except Exception as exc:  # safetensors raises several types for damaged files
            raise UserError(f"LoRA file {p} is not a readable .safetensors file ({exc}); it may be truncated or "
                            f"corrupt: download or copy it again.") from None
    elif p.suffix.lower() in (".pt", ".ckpt", ".bin", ".pth"):
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"LoRA file {p} could not be read as a PyTorch file ({exc}).") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise UserError(f"LoRA file {p} holds no state dict.")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        metadata = {}
    else:
        raise UserError(f"LoRA file {p}: unknown extension {p.suffix!r}; use .safetensors (or .pt/.ckpt).")
    if not tensors:
        raise UserError(f"LoRA file {p} holds no tensors.")
    if finite:
        from lorakit.utils.finite import check_lora_finite

        check_lora_finite(tensors, p)
    return LoraFile(p, tensors, metadata, size)


# ---- key styles ---------------------------------------------------------------------------------------------------
_PEFT_PARAM = re.compile(r"^(?P<mod>.+?)\.(?:lora_A|lora\.down|lora_down)(?:\.default)?\.weight$|"
                         r"^(?P<mod2>.+?)\.(?:lora_B|lora\.up|lora_up)(?:\.default)?\.weight$")
_TE_PATH = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


def key_style(keys) -> str:
    """"kohya" (sd-scripts/LyCORIS/A1111-era), "peft" (diffusers/PEFT), or raises UserError for anything else.
    Bundled embeddings (bundle_emb.*) go with either style."""
    from lorakit.adapters.embeddings import is_bundle_key

    keys = [k for k in keys if not is_bundle_key(k)]
    if not keys:
        raise UserError("the file holds bundled embeddings (bundle_emb.*) but no LoRA modules.")
    kohya = [k for k in keys if k.startswith(KOHYA_PREFIXES)]
    if len(kohya) == len(keys):
        return "kohya"
    peftish = [k for k in keys if re.search(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_magnitude_vector)(?:[.]|$)|\.alpha$", k)]
    if not kohya and len(peftish) == len(keys):
        return "peft"
    if kohya:
        odd = [k for k in keys if not k.startswith(KOHYA_PREFIXES)]
        raise UserError(f"mixed key styles: {len(kohya)} kohya keys and {len(odd)} others (e.g. {odd[0]}); "
                        f"lorakit cannot tell which model layers those belong to.")
    raise UserError(f"unknown LoRA key style (first keys: {', '.join(keys[:3])}). lorakit reads kohya/LyCORIS "
                    f"files (lora_unet_..., lora_te_...) and diffusers/PEFT files (unet./text_encoder. with "
                    f"lora_A/lora_B).")


def _peft_component(key: str) -> tuple[str, str]:
    for pre, comp in (("base_model.model.", "unet"), ("unet.", "unet"), ("text_encoder_2.", "te2"),
                      ("text_encoder.", "te1"), ("transformer.", "unet")):
        if key.startswith(pre):
            return comp, key[len(pre):]
    return "unet", key


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    """lora_alpha per component from diffusers' lora_adapter_metadata, when present."""
    raw = metadata.get("lora_adapter_metadata")
    out: dict[str, float] = {}
    if not raw:
        return out
    try:
        data = json.loads(raw)
    except ValueError:
        return out
    for k, v in data.items():
        if k.endswith("lora_alpha") and isinstance(v, (int, float)):
            comp = k.split(".")[0] if "." in k else "unet"
            out[{"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}.get(comp, comp)] = float(v)
    return out


def peft_to_kohya(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], family=None) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys -> kohya keys; alpha from `.alpha` keys, else lora_adapter_metadata, else rank."""
    has_te2 = any(k.startswith("text_encoder_2.") for k in sd)
    te_prefix = {"te1": "lora_te", "te2": "lora_te2"}
    if family is not None:
        pre = family.lora_te_prefixes
        te_prefix = {"te1": pre[0], "te2": pre[-1]}
    elif has_te2:
        te_prefix = {"te1": "lora_te1", "te2": "lora_te2"}
    alphas = _peft_alphas(metadata)
    out: dict[str, torch.Tensor] = {}
    explicit_alpha: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[str, int]] = {}

    def kohya_name(comp: str, path: str) -> str:
        path = re.sub(r"\.processor\.(to_q|to_k|to_v)_lora$", r".\1", path)
        path = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", path)
        if comp == "unet":
            if family is not None:
                try:
                    return "lora_unet_" + family.unet_lora_path(path).replace(".", "_")
                except KeyError:
                    pass
            return "lora_unet_" + path.replace(".", "_")
        m = _TE_PATH.match(path)
        if not m:
            raise UserError(f"diffusers/PEFT text-encoder key {path!r} is not a CLIP attention/MLP layer.")
        layer, mod = int(m.group(1)), m.group(2).replace(".", "_")
        return f"{te_prefix[comp]}_text_model_encoder_layers_{layer}_{mod}"

    for k, v in sd.items():
        comp, rest = _peft_component(k)
        if rest.endswith(".alpha"):
            explicit_alpha[kohya_name(comp, rest[:-len(".alpha")])] = v
            continue
        m = re.match(r"^(.+?)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$", rest)
        if m:
            out[kohya_name(comp, m.group(1)) + ".dora_scale"] = v.reshape(-1, 1)
            continue
        m = _PEFT_PARAM.match(rest)
        if not m:
            raise UserError(f"diffusers/PEFT key {k!r} is not a LoRA weight lorakit knows.")
        is_down = m.group("mod") is not None
        name = kohya_name(comp, m.group("mod") or m.group("mod2"))
        out[f"{name}.{'lora_down' if is_down else 'lora_up'}.weight"] = v
        if is_down:
            ranks[name] = (comp, v.shape[0])
    for name, (comp, rank) in ranks.items():
        a = explicit_alpha.get(name)
        out[f"{name}.alpha"] = a if a is not None else torch.tensor(float(alphas.get(comp, rank)))
    return out


def to_kohya(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, family=None,
             source: str = "LoRA file") -> dict[str, torch.Tensor]:
    """Any supported key style -> kohya keys (module token + "." + parameter)."""
    try:
        style = key_style(tensors.keys())
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    if style == "kohya":
        return dict(tensors)
    from lorakit.adapters.embeddings import split_bundle
    from lorakit.adapters.flux_lora import diffusers_flux_to_bfl, is_diffusers_flux_lora

    tensors, bundled = split_bundle(tensors)
    if is_diffusers_flux_lora(tensors):  # diffusers' / ai-toolkit's FLUX names: onto BFL's fused layers first
        tensors = diffusers_flux_to_bfl(tensors, _peft_alphas(metadata or {}).get("unet"))
    return {**peft_to_kohya(tensors, metadata or {}, family), **bundled}


# ---- family detection ---------------------------------------------------------------------------------------------
def _in_width(w: Mapping[str, torch.Tensor], module: str) -> int | None:
    for p, axis in (("lora_down.weight", 1), ("hada_w1_b", 1), ("diff", 1)):
        t = w.get(f"{module}.{p}")
        if t is not None and t.dim() >= 2:
            return int(t.shape[axis])
    return None


def detect_family(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> tuple[set[str], str]:
    """Families a kohya-keyed state dict can belong to, and why. Keys decide SDXL vs SD1/SD2 (lora_te1_/lora_te2_,
    SAI UNet names); layer widths (cross-attention 768/1024/2048, text encoder 768/1024) decide SD1 vs SD2;
    metadata refines what keys leave open (SD2 epsilon vs v)."""
    metadata = metadata or {}
    keys = list(sd)
    cands = set(FAMILIES)
    reasons = []
    if any(k.startswith(FLUX_UNET_PREFIXES) for k in keys) or any(k.startswith("lora_te3_") for k in keys):
        cands = {n for n, f in FAMILIES.items() if f.denoiser == "flux"}
        reasons.append("keys use FLUX names (double_blocks/single_blocks, lora_te3_ T5)")
    elif any(k.startswith(("lora_te1_", "lora_te2_") + SDXL_UNET_PREFIXES) for k in keys):
        cands = {n for n, f in FAMILIES.items()
                 if f.denoiser == "unet" and (len(f.text_encoders) > 1 or not f.lora_unet_diffusers_names)}
        reasons.append("keys use lora_te1_/lora_te2_ or SAI UNet names (SDXL)")
    elif any(k.startswith("lora_te_") for k in keys):
        cands = {n for n, f in FAMILIES.items() if f.lora_te_prefixes == ("lora_te",)}
        reasons.append("keys use a single text encoder lora_te_ (SD 1.x/2.x)")
    modules = {k.split(".")[0] for k in keys}
    widths = {"cross": None, "te": None}
    for m in modules:
        if widths["cross"] is None and m.startswith("lora_unet_") and m.endswith("attn2_to_k"):
            widths["cross"] = _in_width(sd, m)
        if widths["te"] is None and m.startswith("lora_te_") and m.endswith("self_attn_q_proj"):
            widths["te"] = _in_width(sd, m)
    for label, w in widths.items():
        of_width = {f.name for f in families_of_width(w)} if w is not None else set()
        if cands & of_width:
            cands &= of_width
            reasons.append(f"{'cross-attention' if label == 'cross' else 'text-encoder'} width {w}")
    md_fams, md_reason = lora_metadata_families(metadata)
    if md_fams and (cands & md_fams):
        if cands - md_fams:
            reasons.append(md_reason)
        cands &= md_fams
    elif md_fams:
        reasons.append(f"{md_reason}, but the keys disagree (keys win)")
    return cands, "; ".join(reasons)


def best_family(cands: set[str]) -> str | None:
    return next((f for f in FAMILIES if f in cands), None)


def _compatible(cands: set[str], family) -> bool:
    return any(FAMILIES[c].shares_weights_with(family) for c in cands)


def _titles(cands: set[str]) -> str:
    return " or ".join(f.short_title for n, f in FAMILIES.items() if n in cands)


def check_family(lf: LoraFile, family) -> None:
    """UserError when the file is for another model family than `family`."""
    sd = to_kohya(lf.tensors, lf.metadata, None, source=str(lf.path))
    cands, why = detect_family(sd, lf.metadata)
    if not _compatible(cands, family):
        found = _titles(cands) or "another model"
        raise UserError(f"LoRA file {lf.path} is for {found} ({why}), but the model is {family.title}. "
                        f"Use a LoRA trained for this model family, or load a matching base model.")


def describe_family_mismatch(sd, metadata, family) -> str:
    cands, why = detect_family(sd, metadata)
    if cands and not _compatible(cands, family):
        found = _titles(cands)
        return f"The file looks like a {found} LoRA ({why}); the model is {family.title}."
    return "Was it trained for another base model or architecture?"


# ---- saving -------------------------------------------------------------------------------------------------------
def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def modelspec_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """ModelSpec hash_sha256: "0x" + sha256 over the tensors' raw little-endian bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(_raw_bytes(tensors[k]))
    return "0x" + h.hexdigest()


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts' precalculate_safetensors_hashes computes them."""
    from safetensors.torch import save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in tensors.items()}, ss)
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def cast_for_save(sd: Mapping[str, torch.Tensor], precision) -> dict[str, torch.Tensor]:
    if precision is None:
        dtype = None
    elif isinstance(precision, torch.dtype):
        dtype = precision
    else:
        if str(precision).lower() not in PRECISIONS:
            raise UserError(f"save_precision {precision!r}: use fp16, bf16 or fp32.")
        dtype = PRECISIONS[str(precision).lower()]
    out = {}
    for k in sorted(sd):
        v = sd[k].detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def build_metadata(family, output_name: str, title: str | None = None, resolution=None, clip_skip: int | None = None,
                   trigger_phrase: str | None = None, description: str | None = None, author: str | None = None,
                   timestamp: float | None = None, sd_model_name: str | None = None) -> dict[str, str]:
    """The keys known when a LoRA is saved: family (ss_base_model_version, ss_v2), ModelSpec 1.0.1 core fields."""
    ts = time.time() if timestamp is None else float(timestamp)
    if resolution is None:
        resolution = family.resolution
    if isinstance(resolution, (int, float)):
        res = f"{int(resolution)}x{int(resolution)}"
    elif isinstance(resolution, str):
        parts = [p for p in re.split(r"[,x ]+", resolution) if p]
        res = f"{parts[0]}x{parts[-1]}"
    else:
        res = f"{resolution[0]}x{resolution[-1]}"
    md = {
        "ss_output_name": output_name,
        "ss_base_model_version": family.base_model_version,
        "ss_v2": str(bool(family.is_v2)),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.lora_modelspec_architecture(),
        # sd-scripts: SDXL LoRAs name the SAI implementation, SD1/2 LoRAs "diffusers"
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title or output_name,
        "modelspec.resolution": res,
        "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
        # FLUX LoRAs state no prediction type (sd-scripts writes none for flow models)
        **({"modelspec.prediction_type": family.modelspec_prediction_type} if family.modelspec_prediction_type
           else {}),
        "modelspec.implementation_version": _impl_version(),
    }
    if sd_model_name:
        md["ss_sd_model_name"] = sd_model_name
    if clip_skip is not None:
        md["ss_clip_skip"] = str(clip_skip)
        md["modelspec.encoder_layer"] = str(clip_skip)
    if trigger_phrase:
        md["modelspec.trigger_phrase"] = trigger_phrase
    if description:
        md["modelspec.description"] = description
    if author:
        md["modelspec.author"] = author
    return md


def _impl_version() -> str:
    try:
        from lorakit import __version__

        return f"lorakit/{__version__}"
    except Exception:
        return "lorakit"


def save_lora(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
              precision="fp16", bare: bool = False) -> dict[str, str]:
    """Write kohya-keyed tensors atomically. ss_output_name becomes the file's stem, hashes are filled in,
    lora_adapter_metadata is never written. bare=True (--no_metadata) writes `metadata` as given and nothing else.
    Returns the metadata written."""
    from lorakit.utils.atomic import save_safetensors_atomic

    path = Path(path)
    tensors = cast_for_save(state_dict, precision)
    md = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
    md.pop("lora_adapter_metadata", None)
    if bare:
        save_safetensors_atomic(tensors, path, metadata=md or None)
        return md
    md["ss_output_name"] = path.stem
    for k in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
        md.pop(k, None)
    md["modelspec.hash_sha256"] = modelspec_hash(tensors)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = sshs_hashes(tensors, md)
    save_safetensors_atomic(tensors, path, metadata=md)
    return md
