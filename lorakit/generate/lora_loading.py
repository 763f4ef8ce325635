"""`<lora:NAME...>` tags -> LoRA files in --lora_dir -> applied to a model bundle.

NAME resolves by file stem first, then by the `ss_output_name` alias in the file's metadata. Every tag is checked
(file found, preset known, weights valid) before anything touches the model, so a bad tag fails the whole generation
with a clear message instead of silently dropping LoRAs (A1111 drops them all).

Application is merged (weights written into the base layers, originals kept for restoring): a sampling step then
costs exactly what it costs without LoRA. Only a tag with start=/stop= is applied unmerged, because its UNet part
switches on and off during sampling (its text-encoder part stays on, as in the LoRA Block Weight extension).
"""

from __future__ import annotations

import difflib
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from lorakit.errors import UserError
from lorakit.generate.extra_networks import LoraTag, hash_alias
from lorakit.generate.lbw import (DEFAULT_PRESETS, block_of_lora_name, elemental_weight, load_preset_file,
                                  parse_elemental, resolve_lbw)

__all__ = ["LoraLibrary", "ResolvedLora", "AppliedLoras", "resolve_tags", "apply_loras", "lora_file_hash",
           "PRESET_FILE_NAMES"]

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
# The LBW extension's user preset file; one found in --lora_dir is read automatically.
PRESET_FILE_NAMES = ("lbwpresets.txt",)


def lora_file_hash(path: str | Path) -> str:
    """A1111's LoRA hash (full hex): for .safetensors the sha256 of the bytes after the header (the "addnet" hash,
    = sshs_model_hash), for other files the sha256 of the whole file. "Lora hashes" shows the first 12 digits."""
    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        if p.suffix.lower() == ".safetensors":
            n = int.from_bytes(fh.read(8), "little")
            fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class LoraLibrary:
    """The LoRA files under a folder (recursively), by stem and by ss_output_name; file contents and hashes cached."""

    def __init__(self, lora_dir: str | Path | None, preset_file: str | Path | None = None, allow=None):
        """`allow(path) -> bool` leaves files out of the index (the GUI: links that lead outside its roots)."""
        self.allow = allow or (lambda path: True)
        self.root = Path(lora_dir) if lora_dir else None
        if self.root is not None and not self.root.is_dir():
            raise UserError(f"--lora_dir {self.root} is not a folder; point it at the folder holding your LoRA files.")
        self._by_stem: dict[str, Path] | None = None
        self._by_alias: dict[str, Path] | None = None
        self._files: dict[Path, object] = {}
        self._hashes: dict[Path, str] = {}
        self.presets: dict[str, str] = dict(DEFAULT_PRESETS)
        if self.root is not None:
            for name in PRESET_FILE_NAMES:
                if (self.root / name).is_file() and self.allow(self.root / name):
                    self.presets.update(load_preset_file(self.root / name))
        if preset_file:
            self.presets.update(load_preset_file(preset_file))

    # ---- index ---------------------------------------------------------------------------------------------------
    def _index(self) -> None:
        if self._by_stem is not None:
            return
        from lorakit.models.checkpoint_io import read_safetensors_header

        self._by_stem, self._by_alias = {}, {}
        if self.root is None:
            return
        files = sorted(p for p in self.root.rglob("*")
                       if p.suffix.lower() in LORA_EXTENSIONS and p.is_file() and self.allow(p))
        for p in files:
            self._by_stem.setdefault(p.stem, p)
        for p in files:
            if p.suffix.lower() != ".safetensors":
                continue
            try:
                _, md = read_safetensors_header(p)
            except UserError:
                continue  # a broken file only matters if a tag names it; read_lora_file reports it then
            alias = md.get("ss_output_name")
            if alias:
                self._by_alias.setdefault(alias, p)

    def refresh(self) -> None:
        self._by_stem = self._by_alias = None

    def names(self) -> list[str]:
        self._index()
        return sorted(self._by_stem)

    def resolve(self, name: str) -> Path:
        """Path of the LoRA called `name` (stem, or ss_output_name alias); UserError with suggestions if none."""
        self._index()
        p = self._by_stem.get(name) or self._by_alias.get(name)
        if p is not None:
            return p
        if self.root is None:
            raise UserError(f"The prompt uses <lora:{name}:...> but no --lora_dir was given; pass the folder "
                            f"holding {name}.safetensors.")
        # a file's ss_output_name is usually its stem: list each name once
        close = difflib.get_close_matches(name, list(dict.fromkeys([*self._by_stem, *self._by_alias])), n=5)
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise UserError(f"LoRA {name!r} was not found in {self.root} (by file name or ss_output_name); "
                        f"check the spelling in the prompt or the --lora_dir.{hint}")

    def glob(self, pattern: str) -> list[str]:
        """Stems matching a glob (`name-*`), in natural order (epoch snapshots name-000001.. sort by number)."""
        import fnmatch
        import re

        self._index()
        hits = [s for s in self._by_stem if fnmatch.fnmatchcase(s, pattern)]

        def natural(s: str):
            return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]

        return sorted(hits, key=natural)

    # ---- contents ------------------------------------------------------------------------------------------------
    def read(self, path: Path):
        from lorakit.adapters.file import read_lora_file

        lf = self._files.get(path)
        if lf is None:
            lf = read_lora_file(path)
            self._files = {path: lf}  # keep only the newest: full-size LoRAs are large and grids walk many files
        return lf

    def short_hash(self, path: Path) -> str:
        h = self._hashes.get(path)
        if h is None:
            h = self._hashes[path] = lora_file_hash(path)
        return h[:12]


@dataclass
class ResolvedLora:
    tag: LoraTag
    path: Path
    module_weight: object = None  # callable lora_name -> factor (LBW), or None for 1 everywhere

    @property
    def unmerged(self) -> bool:
        return self.tag.needs_unmerged


def _module_weights(tag: LoraTag, presets: Mapping[str, str], rng: random.Random):
    if tag.lbw is None and tag.lbwe is None:
        return None
    blocks = resolve_lbw(tag.lbw, presets, x=tag.x, rng=rng, where=tag.raw) if tag.lbw is not None else None
    rules = parse_elemental(tag.lbwe, presets) if tag.lbwe is not None else None

    def weight(lora_name: str) -> float:
        w = 1.0
        if blocks is not None:
            b = block_of_lora_name(lora_name)
            w = 1.0 if b is None else float(blocks.get(b, 1.0))
        if rules is not None:
            w = elemental_weight(lora_name, rules, w)
        return w

    return weight


def resolve_tags(tags: Sequence[LoraTag], library: LoraLibrary, seed: int = 0) -> list[ResolvedLora]:
    """Check every tag (file, preset, values) before anything is applied. `seed` fixes LBW's R/U random weights."""
    rng = random.Random(seed)
    out = []
    for tag in tags:
        path = library.resolve(tag.name)
        out.append(ResolvedLora(tag, path, _module_weights(tag, library.presets, rng)))
    return out


def _limit_rank(sd: dict, dyn: int) -> dict:
    """dyn=N: keep the first N ranks of every LoRA module; alpha is scaled so alpha/rank stays that of the file."""
    out = dict(sd)
    for key in list(sd):
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = sd[key], sd[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        if dyn >= rank:
            continue
        out[key] = down[:dyn].clone()
        out[f"{name}.lora_up.weight"] = up[:, :dyn].clone()
        if f"{name}.lora_mid.weight" in sd:
            out[f"{name}.lora_mid.weight"] = sd[f"{name}.lora_mid.weight"][:dyn, :dyn].clone()
        alpha = sd.get(f"{name}.alpha")
        a = float(alpha) if alpha is not None else float(rank)
        import torch

        out[f"{name}.alpha"] = torch.tensor(a * dyn / rank)
    return out


@dataclass
class AppliedLoras:
    """LoRAs applied to a bundle; `restore()` puts the original weights back. `set_step(step)` switches the UNet
    part of start=/stop= LoRAs (1-based sampling step)."""

    networks: list = field(default_factory=list)  # (ResolvedLora, Network), in application order
    hashes: dict[str, str] = field(default_factory=dict)
    key: tuple = ()
    # one copy of each original layer weight however many LoRAs touch it: id(layer) -> (layer, weight, bias)
    backups: dict = field(default_factory=dict)
    embeddings: list = field(default_factory=list)  # bundled token embeddings of merged LoRAs (hooked, not merged)

    @property
    def has_schedule(self) -> bool:
        return any(r.unmerged for r, _ in self.networks)

    def set_step(self, step: int) -> None:
        for r, net in self.networks:
            if not r.unmerged:
                continue
            on = (r.tag.start is None or step >= r.tag.start) and (r.tag.stop is None or step < r.tag.stop)
            for a in net.unet_adapters:
                a.enabled = on

    def merge(self, net) -> None:
        """Add a network's weight changes to the base layers (W <- new_weight(W, multiplier x block weight))."""
        import torch

        with torch.no_grad():
            for a in net.adapters:
                org = a.org_module
                if id(org) not in self.backups:
                    bias = getattr(org, "bias", None)
                    self.backups[id(org)] = (org, org.weight.detach().clone(),
                                             None if bias is None else bias.detach().clone())
                m = a.multiplier * a.module_weight
                if m == 0:
                    continue
                w = org.weight
                w.copy_(a.new_weight(w, m).to(w.dtype))
                db = a.delta_bias()
                if db is not None and getattr(org, "bias", None) is not None:
                    org.bias.add_((db * m).to(org.bias.dtype))

    def restore(self) -> None:
        import torch

        for r, net in reversed(self.networks):
            if r.unmerged:
                net.remove()
        for emb in self.embeddings:
            emb.detach()
        self.embeddings = []
        with torch.no_grad():
            for org, w, b in self.backups.values():
                org.weight.copy_(w)
                if b is not None:
                    org.bias.copy_(b)
        self.backups = {}
        self.networks = []


def apply_loras(bundle, resolved: Sequence[ResolvedLora], library: LoraLibrary) -> AppliedLoras:
    """Apply resolved LoRAs (merged unless start/stop needs them unmerged); deltas of several LoRAs add."""
    from lorakit.adapters.file import check_family, to_kohya
    from lorakit.adapters.network import build_network_from_state_dict

    applied = AppliedLoras(key=tuple((r.tag, str(r.path)) for r in resolved))
    try:
        for r in resolved:
            lf = library.read(r.path)
            check_family(lf, bundle.family)
            sd = to_kohya(lf.tensors, lf.metadata, bundle.family, source=str(lf.path))
            if r.tag.dyn is not None:
                sd = _limit_rank(sd, r.tag.dyn)
            net = build_network_from_state_dict(bundle, sd, lf.metadata, source=str(lf.path))
            net.set_multiplier(r.tag.unet, te_multiplier=r.tag.te)
            net.set_module_weights(r.module_weight)
            applied.networks.append((r, net))
            if r.unmerged:
                net.apply_to(bundle)
            else:
                applied.merge(net)
                if net.embeddings is not None:  # a prompt's word -> trained vectors, as A1111 registers them
                    net.embeddings.attach()
                    applied.embeddings.append(net.embeddings)
                # merged: the adapter copies of the LoRA weights are not needed any more
                applied.networks[-1] = (r, _Merged())
            applied.hashes[hash_alias(r.tag.name)] = library.short_hash(r.path)
    except BaseException:
        applied.restore()
        raise
    return applied


class _Merged:
    """Placeholder for a network whose changes live in the base weights (restored from AppliedLoras.backups)."""

    unet_adapters: list = []

    def remove(self) -> None:
        pass
