"""Saving a bundle as a single-file LDM/SAI checkpoint (A1111, ComfyUI, sd-scripts) or as a diffusers folder."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

import torch

from lorakit.errors import UserError
from lorakit.models.bundle import ModelBundle
from lorakit.models.keymaps import build_rules, to_ldm_tensor
from lorakit.models.loading import CONFIGS_METADATA_KEY, parse_dtype
from lorakit.utils.atomic import atomic_path, save_safetensors_atomic


def ldm_state_dict(bundle: ModelBundle, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All weights under their single-file checkpoint names (tensors shared with the modules where possible)."""
    modules = bundle.components()
    states = {name: m.state_dict() for name, m in modules.items()}
    rules = build_rules(bundle.family, {name: list(sd) for name, sd in states.items()})
    out = {}
    for rule in rules:
        tensors = [states[k.split(".", 1)[0]][k.split(".", 1)[1]] for k in rule.ours]
        t = to_ldm_tensor(rule, tensors)
        out[rule.ldm] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    # the empty marker tensors ComfyUI and A1111 read to pick a v-prediction / zero-terminal-SNR schedule
    from lorakit.models.detect import V_PRED_KEY, ZTSNR_KEY, declares_zero_terminal_snr

    if bundle.family.prediction_type == "v_prediction":
        out[V_PRED_KEY] = torch.tensor([])
    if declares_zero_terminal_snr((), bundle.configs.get("scheduler")):
        out[ZTSNR_KEY] = torch.tensor([])
    return out


def _non_default_configs(bundle: ModelBundle) -> dict[str, dict]:
    differing = {}
    for name in bundle.components():
        cfg = bundle.configs.get(name)
        if cfg is not None and _comparable(cfg) != _comparable(bundle.family.config(name)):
            differing[name] = _comparable(cfg)
    return differing


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version", "architectures")}


def checkpoint_metadata(bundle: ModelBundle, title: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    fam = bundle.family
    # the VAE's sample size is the model's image size: the family's for real checkpoints, 64 for the toy base
    size = (bundle.configs.get("vae") or {}).get("sample_size") or fam.resolution
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": fam.modelspec_architecture,
        "modelspec.implementation": fam.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        # FLUX files state no prediction type (sd-scripts writes none for flow models)
        **({"modelspec.prediction_type": fam.modelspec_prediction_type} if fam.modelspec_prediction_type else {}),
        "modelspec.date": _dt.datetime.now().replace(microsecond=0).isoformat(),
        "lorakit.family": fam.name,
    }
    configs = _non_default_configs(bundle)
    if configs:
        meta[CONFIGS_METADATA_KEY] = json.dumps(configs, sort_keys=True)
    meta.update(extra or {})
    return meta


def save_single_file(bundle: ModelBundle, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: single-file checkpoints are written as .safetensors (safe to load anywhere); "
                        "change the extension.")
    if bundle.vae is None:
        raise UserError("this model has no VAE loaded; pass --vae so the saved checkpoint is complete.")
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    tensors = ldm_state_dict(bundle, torch_dtype)
    save_safetensors_atomic(tensors, path, checkpoint_metadata(bundle, path.stem, metadata))
    return path


# entries a pipeline class expects in model_index.json beyond its modules (SD1/2's disabled safety checker)
_PIPELINE_EXTRAS = {"StableDiffusionPipeline": {"safety_checker": [None, None], "feature_extractor": [None, None],
                                                "requires_safety_checker": False}}


def save_diffusers_folder(bundle: ModelBundle, folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
    """A diffusers model folder, written beside the target and renamed into place when complete."""
    import shutil

    folder = Path(folder)
    if bundle.family.denoiser != "unet":
        raise UserError(f"writing {bundle.family.title} as a diffusers folder is not supported yet; save it as a single "
                        ".safetensors file (ComfyUI's layout), which lorakit, ComfyUI and Forge load.")
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"output folder {folder} exists and is not empty; choose a new folder.")
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    for name, module in bundle.components().items():
        if torch_dtype is not None:
            module = module.to(torch_dtype)
        module.save_pretrained(tmp / name, safe_serialization=True)
    for spec, tok in zip(bundle.family.text_encoders, bundle.tokenizers):
        tok.save_pretrained(tmp / spec.config_name.replace("text_encoder", "tokenizer"))
    bundle.noise_scheduler.save_pretrained(tmp / "scheduler")
    pipeline = bundle.family.diffusers_pipeline
    index = {"_class_name": pipeline, "_diffusers_version": _diffusers_version(), "scheduler": ["diffusers", "DDPMScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for spec in bundle.family.text_encoders:
        index[spec.config_name] = ["transformers", "CLIPTextModelWithProjection" if spec.with_projection else "CLIPTextModel"]
        index[spec.config_name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    index.update(_PIPELINE_EXTRAS.get(pipeline, {}))
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    _usual_modes(tmp)
    if folder.exists():
        folder.rmdir()
    os.replace(tmp, folder)
    return folder


def _usual_modes(root: Path) -> None:
    """0666/0777 minus the umask on every file and folder (some writers make 0600 files), so a UI running as
    another user can read the model."""
    from lorakit.utils.atomic import DIR_MODE, FILE_MODE

    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), DIR_MODE)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), FILE_MODE)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def file_hashes(path: str | os.PathLike, full: bool = True) -> dict[str, str]:
    """A1111's hashes: sha256 of the whole file (short hash = first 10 hex) and the legacy 8-hex model hash."""
    path = Path(path)
    out = {}
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        out["legacy_hash"] = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
        if full:
            fh.seek(0)
            h = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
            out["sha256"] = h.hexdigest()
            out["short_hash"] = out["sha256"][:10]
    return out


__all__ = ["ldm_state_dict", "save_single_file", "save_diffusers_folder", "checkpoint_metadata", "file_hashes", "atomic_path"]
