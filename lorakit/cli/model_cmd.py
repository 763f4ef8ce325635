"""`lorakit model info|tiny|convert`."""

from __future__ import annotations

import json
from pathlib import Path


def _load_flags(p) -> None:
    p.add_argument("--vae", help="a separate VAE file or folder to use instead of the checkpoint's own")
    p.add_argument("--v2", action="store_true", help="SD2.x model (detected from keys; accepted for sd-scripts habits)")
    p.add_argument("--v_parameterization", action="store_true", help="SD2.x 768-v model (v-prediction)")
    p.add_argument("--sdxl", action="store_true", help="SDXL model (detected from keys; accepted for compatibility)")
    p.add_argument("--clip_l", help="FLUX: the CLIP-L text encoder file (clip_l.safetensors)")
    p.add_argument("--t5xxl", help="FLUX: the T5-XXL text encoder file (t5xxl_fp16.safetensors)")
    p.add_argument("--ae", help="FLUX: the autoencoder file (ae.safetensors)")


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint, diffusers folder or family (sd1, sd2, sd2-v, sdxl, flux-dev...)")
    p.add_argument("model", help="checkpoint file, diffusers folder, or a family name: sd1, sd2, sd2-v, sdxl, sdxl-v, "
                   "flux-dev, flux-schnell")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--no_hash", action="store_true", help="skip the sha256 of the whole file")
    _load_flags(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tiny", help="write a tiny random model of a family (same key names as the real one)")
    p.add_argument("--family", default="sd1", help="sd1, sd2, sd2-v, sdxl, sdxl-v, flux-dev or flux-schnell (default sd1)")
    p.add_argument("--out", required=True, help="output .safetensors file or diffusers folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("convert", help="convert between single-file .safetensors/.ckpt and diffusers folders")
    p.add_argument("model", help="input checkpoint file or diffusers folder")
    p.add_argument("out", help="output: a .safetensors path (single file, A1111/ComfyUI layout) or a folder (diffusers)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="save precision (default: as loaded, fp32)")
    _load_flags(p)
    p.set_defaults(func=cmd_convert)


def _load_kwargs(args) -> dict:
    return dict(vae=args.vae, v2=args.v2, v_parameterization=args.v_parameterization, sdxl=args.sdxl,
                clip_l=args.clip_l, t5xxl=args.t5xxl, ae=args.ae)


def cmd_info(args) -> int:
    from lorakit.models.families import ALIASES, FAMILIES
    from lorakit.models.info import describe_family, describe_file, format_info

    name = args.model.lower()
    if not Path(args.model).exists() and (name in FAMILIES or name in ALIASES):
        info = describe_family(ALIASES.get(name, name))
    else:
        info = describe_file(args.model, hashes=not args.no_hash, **_load_kwargs(args))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _save(bundle, out: str, dtype=None, metadata=None) -> str:
    from lorakit.models.saving import save_diffusers_folder, save_single_file

    if out.lower().endswith(".safetensors"):
        return str(save_single_file(bundle, out, dtype=dtype, metadata=metadata))
    return str(save_diffusers_folder(bundle, out, dtype=dtype))


def cmd_tiny(args) -> int:
    from lorakit.models.tiny import tiny_bundle

    bundle = tiny_bundle(args.family, seed=args.seed)
    print(f"wrote tiny {bundle.family.name} model to {_save(bundle, args.out)}")
    return 0


def cmd_convert(args) -> int:
    from lorakit.models.loading import load_bundle

    bundle = load_bundle(args.model, **_load_kwargs(args))
    print(f"wrote {bundle.family.name} model to {_save(bundle, args.out, dtype=args.dtype)}")
    return 0
