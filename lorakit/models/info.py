"""`lorakit model info`: what a checkpoint (or a family's full-size architecture) is made of."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.models.bundle import ModelBundle, count_parameters


def describe_bundle(bundle: ModelBundle) -> dict:
    fam = bundle.family
    comps = bundle.components()
    params = {name: count_parameters(m) for name, m in comps.items()}
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for m in comps.values() for p in m.parameters()})
    return {
        "family": fam.name,
        "title": fam.title,
        # a flow model's scheduler has no prediction type: the family's ("flow") stands there
        "prediction_type": bundle.noise_scheduler.config.get("prediction_type", fam.prediction_type),
        "base_model_version": fam.base_model_version,
        "resolution": fam.resolution,
        "latent_scale": bundle.latent_scale,
        "latent_shift": bundle.latent_shift,
        "default_clip_skip": fam.default_clip_skip,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "parameters": params,
        "parameters_total": sum(params.values()),
        "vae_present": bundle.vae is not None,
        "text_encoders_present": all(te is not None for te in bundle.text_encoders),
    }


def describe_family(name: str) -> dict:
    from lorakit.models.meta import meta_bundle

    info = describe_bundle(meta_bundle(name))
    info.update(source=f"{name} (full-size architecture on the meta device, no weights)", dtype="float32")
    return info


def describe_file(path: str, hashes: bool = True, **load_kwargs) -> dict:
    from lorakit.models.loading import load_bundle
    from lorakit.models.saving import file_hashes

    bundle = load_bundle(path, **load_kwargs)
    info = describe_bundle(bundle)
    info["source"] = str(path)
    problems = []
    if bundle.info.get("vae_missing"):
        flag = "--ae" if bundle.family.split_files else "--vae"
        problems.append(f"no VAE inside the file: pass {flag} for training and generation")
    flags = {spec.config_name: flag for spec, flag in zip(bundle.family.text_encoders, ("--clip_l", "--t5xxl"))}
    for name in bundle.info.get("text_encoders_missing", []):
        problems.append(f"no {name} inside the file: pass {flags[name]} for training and generation")
    if bundle.info.get("ignored_keys"):
        problems.append(f"{bundle.info['ignored_keys']} tensors not used (e.g. {', '.join(bundle.info['ignored_examples'][:3])})")
    if bundle.info.get("prediction_probed"):
        problems.append(f"prediction type not stated in the file; probed as {info['prediction_type']} "
                        "(pass --v_parameterization to override)")
    for name, module in bundle.components().items():
        bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            problems.append(f"{name}: {len(bad)} tensors hold NaN/inf (e.g. {bad[0]})")
    info["ema_present"] = bool(bundle.info.get("ema_present"))
    info["file_dtypes"] = bundle.info.get("file_dtypes")
    if Path(path).is_file():
        info["file_size"] = Path(path).stat().st_size
        if hashes:
            info.update(file_hashes(path))
    info["problems"] = problems
    return info


def format_info(info: dict) -> str:
    lines = [f"{info['source']}", f"  family:          {info['family']} ({info['title']})",
             f"  prediction type: {info['prediction_type']}", f"  resolution:      {info['resolution']}",
             f"  latent scale:    {info['latent_scale']}", f"  dtype:           {info['dtype']}"]
    if info.get("latent_shift"):
        lines.insert(5, f"  latent shift:    {info['latent_shift']}")
    if info.get("file_dtypes"):
        lines.append(f"  file dtypes:     {', '.join(info['file_dtypes'])}")
    lines.append("  parameters:")
    for name, n in info["parameters"].items():
        lines.append(f"    {name:<15} {n:>15,}")
    lines.append(f"    {'total':<15} {info['parameters_total']:>15,}")
    lines.append(f"  VAE present:     {'yes' if info['vae_present'] else 'no'}")
    lines.append(f"  text encoders:   {'yes' if info['text_encoders_present'] else 'no'}")
    if "ema_present" in info:
        lines.append(f"  EMA weights:     {'yes' if info['ema_present'] else 'no'}")
    if "file_size" in info:
        lines.append(f"  file size:       {info['file_size']:,} bytes")
    if "sha256" in info:
        lines.append(f"  short hash:      {info['short_hash']}  (A1111)")
        lines.append(f"  legacy hash:     {info['legacy_hash']}")
        lines.append(f"  sha256:          {info['sha256']}")
    if "problems" in info:
        lines.append("  problems:        " + ("none found" if not info["problems"] else ""))
        lines.extend(f"    - {p}" for p in info["problems"])
    return "\n".join(lines)
