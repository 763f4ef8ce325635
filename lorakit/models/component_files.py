"""Model parts in files of their own, the way FLUX users keep them: a transformer-only file (BFL's bare keys,
ComfyUI's `model.diffusion_model.`, or diffusers' names), clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors.

`single_file_view` shows such a file under the key names our single-file rules expect, so one loader serves every
layout; `load_text_encoder_into` loads (or replaces) one text encoder of a bundle from its own file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.errors import UserError
from lorakit.models.flux_keys import BFL_DENOISER_MARKERS, diffusers_to_bfl, is_diffusers_flux


class SourceView:
    """A StateSource read through a key map (our file key -> the key in the file), or through tensors converted in
    memory (a diffusers transformer's fused layers). Reads like a StateSource."""

    def __init__(self, src, names: dict[str, str], converted: dict[str, torch.Tensor] | None = None):
        self.src, self.names, self.converted = src, names, converted or {}
        self.metadata = src.metadata

    def keys(self) -> list[str]:
        return list(self.names) + list(self.converted)

    def __contains__(self, key: str) -> bool:
        return key in self.names or key in self.converted

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.converted[key] if key in self.converted else self.src.get(self.names[key], dtype)

    def shape(self, key: str):
        return tuple(self.converted[key].shape) if key in self.converted else self.src.shape(self.names.get(key, ""))

    def dtype_name(self, key: str):
        if key in self.converted:
            return str(self.converted[key].dtype).removeprefix("torch.")
        return self.src.dtype_name(self.names[key])

    def release(self, key: str) -> None:
        self.converted.pop(key, None)
        if key in self.names:
            self.src.release(self.names[key])


def single_file_view(src, family):
    """`src` unchanged, or seen under our names: a FLUX transformer saved without ComfyUI's prefix (BFL's release
    files) or in diffusers' layout, and a T5 stored with its embedding once (`shared.weight` only)."""
    if not family.split_files:
        return src
    keys = src.keys()
    prefix = family.unet_ldm_prefix
    if is_diffusers_flux(keys):
        tensors = diffusers_to_bfl({k: src.get(k) for k in keys if not k.startswith(prefix)})
        return SourceView(src, {}, {prefix + k: v for k, v in tensors.items()})
    bare = any(k.startswith(BFL_DENOISER_MARKERS) for k in keys)
    names = {(prefix + k if bare and not k.startswith(prefix) else k): k for k in keys}
    tied = [spec.config_name for spec in family.text_encoders if spec.kind == "t5" and
            spec.ldm_prefix + "shared.weight" in names and spec.ldm_prefix + "encoder.embed_tokens.weight" not in names]
    for spec in family.text_encoders:
        if spec.config_name in tied:
            names[spec.ldm_prefix + "encoder.embed_tokens.weight"] = names[spec.ldm_prefix + "shared.weight"]
    if not bare and not tied:
        return src
    view = SourceView(src, names)
    view.tied_t5 = tied
    return view


def tie_t5_embeddings(bundle, src) -> None:
    """A T5 whose file held its embedding once holds it once in memory too (the encoder reads the same values)."""
    for name in getattr(src, "tied_t5", ()):
        index = [s.config_name for s in bundle.family.text_encoders].index(name)
        te = bundle.text_encoders[index]
        if te is not None:
            te.encoder.embed_tokens = te.shared


def _candidates(key: str, spec) -> list[str]:
    """Names a text encoder's tensor goes by in files of its own: transformers' (with or without `text_model.`),
    or under the family's all-in-one prefix (ComfyUI)."""
    bare = key.removeprefix("text_model.")
    return [key, bare, "text_model." + bare, spec.ldm_prefix + bare]


def load_text_encoder_into(bundle, index: int, path: str | os.PathLike, dtype: torch.dtype, flag: str) -> None:
    """Text encoder `index` of the bundle from `path` (a .safetensors file or a transformers folder)."""
    from accelerate import init_empty_weights

    from lorakit.models.bundle import build_text_encoder
    from lorakit.models.checkpoint_io import StateSource

    spec = bundle.family.text_encoders[index]
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file or folder.")
    if path.is_dir():
        path = _folder_weights(path, flag)
    src = StateSource(path)
    with init_empty_weights(include_buffers=False):
        te = build_text_encoder(bundle.configs[spec.config_name], spec.with_projection, spec.kind)
    expected = te.state_dict()
    keys = set(src.keys())
    loaded, tied = {}, False
    for key, want in expected.items():
        found = next((c for c in _candidates(key, spec) if c in keys), None)
        if found is None and key == "encoder.embed_tokens.weight":
            found, tied = next((c for c in _candidates("shared.weight", spec) if c in keys), None), True
        if found is None:
            raise UserError(f"{flag} {path} is not the {spec.kind.upper()} text encoder of {bundle.family.title}: "
                            f"tensor {key} is missing.")
        t = src.get(found)
        if tuple(t.shape) != tuple(want.shape):
            raise UserError(f"{flag} {path}: {found} has shape {tuple(t.shape)}, expected {tuple(want.shape)}; the "
                            f"file is another text encoder than {bundle.family.title}'s {spec.kind.upper()}.")
        loaded[key] = t.to(dtype) if t.is_floating_point() else t
    te.load_state_dict(loaded, assign=True, strict=True)
    if tied:  # the file stores T5's embedding once (transformers dedups it): share it, hold it once
        te.encoder.embed_tokens = te.shared
    bundle.text_encoders[index] = te.eval().requires_grad_(False)
    missing = bundle.info.get("text_encoders_missing", [])
    if spec.config_name in missing:
        missing.remove(spec.config_name)
    bundle.info[f"{spec.config_name}_source"] = str(path)


def _folder_weights(folder: Path, flag: str) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(f"{flag} {folder}: expected one .safetensors file in the folder, found {len(files)}; pass the "
                        "file itself.")
    return files[0]


def set_t5_tokenizer(bundle, tokenizer) -> None:
    """Use `tokenizer` for the bundle's T5 encoder (sd-scripts' --tokenizer_cache_dir); families without T5 keep
    their bundled CLIP tokenizers."""
    for i, spec in enumerate(bundle.family.text_encoders):
        if spec.kind == "t5":
            bundle.tokenizers[i] = tokenizer


def check_complete(bundle, path) -> None:
    """Training and generation need every part: name the file flag of a part the model file did not hold (a BFL
    transformer-only release needs --clip_l, --t5xxl and --ae beside it)."""
    flags = dict(zip([s.config_name for s in bundle.family.text_encoders], ("--clip_l", "--t5xxl")))
    missing = [flags.get(name, name) for name in bundle.info.get("text_encoders_missing", [])]
    if bundle.vae is None:
        missing.append("--ae" if bundle.family.split_files else "--vae")
    if missing:
        raise UserError(f"{path} holds no {', '.join(m.lstrip('-') for m in missing)} weights: pass "
                        f"{' and '.join(m + ' FILE' for m in missing)} (the files kept beside the model).")
