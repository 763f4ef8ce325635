"""Full-size architectures on the meta device: structure, names and parameter counts without weights."""

from __future__ import annotations

from lorakit.models.bundle import ModelBundle, build_bundle
from lorakit.models.families import get_family


def meta_bundle(family: str, components: tuple[str, ...] = ("unet", "vae", "text_encoders")) -> ModelBundle:
    return build_bundle(get_family(family), device="meta", components=components)
