"""The message for a model path that does not exist, shared by every command that loads a model.

sd-scripts and diffusers accept a Hugging Face Hub id (`runwayml/stable-diffusion-v1-5`) and download it; lorakit
never downloads, so such an id must get a message saying what to pass instead, not a bare "file does not exist".
"""

from __future__ import annotations

import os
import re

from lorakit.errors import UserError

# "owner/name": what from_pretrained would look up on the Hub (names: letters, digits, - _ .; no file suffix)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


def looks_like_hub_id(text: str | os.PathLike) -> bool:
    """True for `owner/name` that is not a path on this machine (no leading ./ ~ /, no model file suffix)."""
    s = str(text)
    return (bool(_HUB_ID.fullmatch(s)) and not s.lower().endswith(_MODEL_SUFFIXES) and not os.path.exists(s)
            and not s.startswith((".", "~")))


def missing_model_error(path: str | os.PathLike, flag: str | None = None, what: str = "model") -> UserError:
    """The UserError for a model (or VAE) path that does not exist; `flag` names the option it came from."""
    where = f"{flag} {path}" if flag else f"{what} {path}"
    if looks_like_hub_id(path):
        return UserError(
            f"{where} is not a file or folder here; it looks like a Hugging Face Hub id. lorakit never downloads "
            f"models: download the checkpoint once (e.g. a .safetensors file from https://huggingface.co/{path}) "
            "and pass the local file, or a local diffusers folder.")
    return UserError(f"{where} does not exist; check the path (a .safetensors/.ckpt file or a diffusers folder).")


__all__ = ["looks_like_hub_id", "missing_model_error"]
