"""Loading a model bundle from a single-file checkpoint (LDM/SAI layout) or a diffusers folder, offline.

Modules are built on the meta device and the checkpoint's tensors are assigned into them one by one, converted to
the requested dtype on the way: the weights are never held twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import UserError
from lorakit.models.bundle import ModelBundle, build_bundle, import_model_libraries
from lorakit.models.checkpoint_io import StateSource
from lorakit.models.detect import (declares_zero_terminal_snr, detect_ldm_family, family_from_diffusers_config,
                                   looks_like_v_prediction)
from lorakit.models.dtypes import DTYPES
from lorakit.models.families import Family, get_family, with_prediction
from lorakit.models.keymaps import build_rules, from_ldm_tensor

CONFIGS_METADATA_KEY = "lorakit.configs"  # our saved files carry their configs (tiny or non-standard widths)


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise UserError(f"unknown dtype {value!r}: use one of fp32, fp16, bf16.")
    return DTYPES[value]


def load_bundle(path: str | os.PathLike, *, family: str | Family | None = None, vae: str | os.PathLike | None = None,
                dtype: str | torch.dtype | None = None, v2: bool = False, v_parameterization: bool = False,
                sdxl: bool = False, components: tuple[str, ...] = ("unet", "vae", "text_encoders"),
                configs: dict[str, dict] | None = None, clip_l: str | os.PathLike | None = None,
                t5xxl: str | os.PathLike | None = None, ae: str | os.PathLike | None = None) -> ModelBundle:
    """Load a checkpoint file or diffusers folder. The family is detected; flags or `family` only settle what keys
    cannot tell (SD2 epsilon vs v-prediction) or confirm it. `configs` overrides module configs for non-standard
    widths in files that do not carry them (our own files do, in their metadata). FLUX keeps its parts apart:
    `clip_l`, `t5xxl` and `ae` (sd-scripts' --clip_l, --t5xxl, --ae) load or replace them from their own files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_model_libraries()
    path = Path(path)
    torch_dtype = parse_dtype(dtype)
    from lorakit.models.flux_folder import is_flux_folder, load_flux_folder

    if path.is_dir() and is_flux_folder(path):
        bundle = load_flux_folder(path, torch_dtype, components)
    elif path.is_dir():
        bundle = load_diffusers_folder(path, torch_dtype, components)
    else:
        bundle = load_single_file(path, torch_dtype, components, v2=v2, v_parameterization=v_parameterization,
                                  sdxl=sdxl, configs=configs)
    if family is not None:
        wanted = family if isinstance(family, Family) else get_family(family)
        if not wanted.shares_weights_with(bundle.family):
            raise UserError(f"{path} is a {bundle.family.title} model, not {wanted.title} as requested.")
        if wanted != bundle.family:  # sd2 vs sd2-v: the caller's word settles the prediction type
            bundle = _with_family(bundle, wanted)
    if vae is not None or ae is not None:
        load_vae_into(bundle, ae if ae is not None else vae, torch_dtype)
    from lorakit.models.component_files import load_text_encoder_into

    for index, te_path in enumerate((clip_l, t5xxl)):
        if te_path is not None:
            load_text_encoder_into(bundle, index, te_path, torch_dtype, "--clip_l" if index == 0 else "--t5xxl")
    return bundle


def _with_family(bundle: ModelBundle, family: Family) -> ModelBundle:
    from lorakit.models.bundle import build_noise_scheduler

    bundle.family = family
    bundle.noise_scheduler = build_noise_scheduler(bundle.configs["scheduler"], family.prediction_type)
    return bundle


def with_schedule(bundle: ModelBundle, *, v_prediction: bool = False, zero_terminal_snr: bool = False) -> ModelBundle:
    """The bundle as training asks for it (--v_parameterization, --zero_terminal_snr) or a checkpoint declares it:
    the family's v-prediction sibling (SD2 768-v, SDXL v-pred), and a zero-terminal-SNR noise schedule (diffusers'
    rescale_betas_zero_snr with trailing timesteps, so sampling starts from pure noise at t = 999). Generation and
    previews build their samplers from the bundle's scheduler config, so they follow."""
    from lorakit.models.bundle import build_noise_scheduler

    fam = bundle.family
    if v_prediction and fam.prediction_type != "v_prediction":
        fam = with_prediction(fam, "v_prediction")  # a family without a v sibling (SD1) stays, predicting v
        bundle.family = fam
    cfg = dict(bundle.configs["scheduler"])
    if zero_terminal_snr:
        cfg.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    bundle.configs["scheduler"] = cfg
    bundle.noise_scheduler = build_noise_scheduler(cfg, "v_prediction" if v_prediction else fam.prediction_type)
    return bundle


@dataclass(frozen=True)
class ModelPlan:
    """What loading a model will build, known from a file's header or a folder's configs (no weights read): the
    family and the module configs (None: the family's full-size ones). `prediction_known` is False for an SD2 file
    that names neither epsilon nor v: the loader then probes the weights, and may settle on the v family."""

    family: Family
    configs: dict | None
    prediction_known: bool = True

    @classmethod
    def of(cls, bundle: ModelBundle) -> "ModelPlan":
        return cls(bundle.family, bundle.configs)


def plan_model(path: str | os.PathLike, *, v2: bool = False, v_parameterization: bool = False,
               sdxl: bool = False) -> ModelPlan:
    """The ModelPlan of a checkpoint file or diffusers folder, for checks that must come before loading."""
    from lorakit.models.flux_folder import folder_plan, is_flux_folder

    path = Path(path)
    if path.is_dir() and is_flux_folder(path):
        return ModelPlan(*folder_plan(path))
    if path.is_dir():
        unet_cfg, sched_cfg, te_cfg = _folder_configs(path)
        family = family_from_diffusers_config(unet_cfg, sched_cfg, path, te_cfg)
        configs = {"unet": unet_cfg}
        for name in ["vae"] + [s.config_name for s in family.text_encoders]:
            cfg = path / name / "config.json"
            if cfg.exists():
                configs[name] = json.loads(cfg.read_text())
        return ModelPlan(family, configs)
    family, known, configs = _single_file_plan(StateSource(path), path, v2, v_parameterization, sdxl, None)
    return ModelPlan(family, configs, known)


def _single_file_plan(src: StateSource, path, v2, v_parameterization, sdxl, configs):
    family, prediction_known = detect_ldm_family(path, set(src.keys()), src.shape, src.metadata, v2,
                                                 v_parameterization, sdxl)
    if configs is None and CONFIGS_METADATA_KEY in src.metadata:
        try:
            configs = json.loads(src.metadata[CONFIGS_METADATA_KEY])
        except json.JSONDecodeError:
            raise UserError(f"{path}: metadata {CONFIGS_METADATA_KEY} is not valid JSON; the file is damaged.") from None
    return family, prediction_known, configs


def load_single_file(path: Path, dtype: torch.dtype, components=("unet", "vae", "text_encoders"), *, v2=False,
                     v_parameterization=False, sdxl=False, configs: dict | None = None) -> ModelBundle:
    from lorakit.models.component_files import single_file_view, tie_t5_embeddings

    src = StateSource(path)
    keys = set(src.keys())
    family, prediction_known, configs = _single_file_plan(src, path, v2, v_parameterization, sdxl, configs)
    src = single_file_view(src, family)  # BFL's bare and diffusers' FLUX transformer files under our file names
    bundle = build_bundle(family, configs=configs, device="empty", components=components, dtype=dtype)
    bundle.source = str(path)
    bundle.info.update(
        metadata=src.metadata,
        ema_present=any(k.startswith("model_ema.") for k in keys),
        file_dtypes=sorted({src.dtype_name(k) for k in src.keys() if k.startswith(family.unet_ldm_prefix)}),
    )
    _assign_from_ldm(bundle, src, dtype, path)
    tie_t5_embeddings(bundle, src)
    if not prediction_known and bundle.unet is not None:  # an SD2 file that does not say epsilon or v
        if looks_like_v_prediction(bundle.unet):
            bundle = _with_family(bundle, with_prediction(family, "v_prediction"))
        bundle.info["prediction_probed"] = True
    if declares_zero_terminal_snr(keys):  # the `ztsnr` marker: sample (and train) on its schedule
        bundle = with_schedule(bundle, zero_terminal_snr=True)
        bundle.info["zero_terminal_snr"] = True
    return bundle


def _assign_from_ldm(bundle: ModelBundle, src: StateSource, dtype: torch.dtype, path) -> None:
    modules = bundle.components()
    rules = build_rules(bundle.family, {name: list(m.state_dict().keys()) for name, m in modules.items()})
    expected = {name: dict(m.state_dict()) for name, m in modules.items()}  # meta tensors: shapes only
    loaded: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    missing: dict[str, list[str]] = {}
    used: set[str] = set()
    for rule in rules:
        component = rule.ours[0].split(".", 1)[0]
        if rule.ldm not in src:
            missing.setdefault(component, []).append(rule.ldm)
            continue
        for our_key, tensor in zip(rule.ours, from_ldm_tensor(rule, src.get(rule.ldm, dtype))):
            local = our_key.split(".", 1)[1]
            want = tuple(expected[component][local].shape)
            if tuple(tensor.shape) != want:
                raise UserError(
                    f"{path}: tensor {rule.ldm} has shape {tuple(tensor.shape)} but the {bundle.family.title} "
                    f"architecture needs {want}. The file is a different or modified architecture."
                )
            loaded[component][local] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        used.add(rule.ldm)
        src.release(rule.ldm)
    for component, names in missing.items():
        if len(names) == len(expected[component]) and _may_be_apart(bundle.family, component):
            _drop_component(bundle, component)  # the caller passes it as its own file (--vae, --clip_l, --t5xxl)
            continue
        if len(names) == len(expected[component]):
            raise UserError(f"{path} has no {component} weights (expected keys like {names[0]}). It may be a partial "
                            "or extracted file; use a full checkpoint.")
        raise UserError(f"{path}: {len(names)} {component} tensors are missing, e.g. {names[0]}. The file is damaged "
                        "or is a different architecture.")
    for name, module in bundle.components().items():
        module.load_state_dict(loaded[name], assign=True, strict=True)
        module.eval().requires_grad_(False)
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{name}: tensors left without data after loading: {left[:3]}")
    ignored = [k for k in src.keys() if k not in used]
    bundle.info["ignored_keys"] = len(ignored)
    bundle.info["ignored_examples"] = ignored[:5]


def _may_be_apart(family: Family, component: str) -> bool:
    """A component a file may lack: the VAE of any family; FLUX's text encoders too (BFL and ComfyUI ship them
    as separate files)."""
    return component == "vae" or (family.split_files and component != "unet")


def _drop_component(bundle: ModelBundle, component: str) -> None:
    if component == "vae":
        bundle.vae = None  # no VAE inside: the caller must pass --vae (FLUX: --ae) for training or generation
        bundle.info["vae_missing"] = True
        return
    index = [s.config_name for s in bundle.family.text_encoders].index(component)
    bundle.text_encoders[index] = None
    bundle.info.setdefault("text_encoders_missing", []).append(component)


def load_vae_into(bundle: ModelBundle, vae_path, dtype: torch.dtype) -> None:
    """A separate VAE file: LDM layout (with or without `first_stage_model.`) or diffusers layout."""
    from lorakit.models.bundle import build_vae
    from lorakit.models.keymaps import vae_key_to_ldm

    vae_path = Path(vae_path)
    if vae_path.is_dir():
        from diffusers import AutoencoderKL

        bundle.vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype, local_files_only=True)
        bundle.vae.eval().requires_grad_(False)
        return
    src = StateSource(vae_path)
    cfg = bundle.configs["vae"]
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        vae = build_vae(cfg)
    ours = list(vae.state_dict().keys())
    expected = vae.state_dict()
    keys = set(src.keys())
    sd = {}
    for key in ours:
        ldm = vae_key_to_ldm(key, cfg)
        for candidate in (key, ldm, bundle.family.vae_ldm_prefix + ldm, "first_stage_model." + ldm):
            if candidate in keys:
                t = src.get(candidate)
                if t.ndim == 4 and expected[key].ndim == 2:
                    t = t.reshape(t.shape[0], t.shape[1])
                if tuple(t.shape) != tuple(expected[key].shape):
                    raise UserError(f"{vae_path}: {candidate} has shape {tuple(t.shape)}, expected "
                                    f"{tuple(expected[key].shape)}: not a VAE for this model.")
                sd[key] = t.to(dtype)
                break
        else:
            raise UserError(f"{vae_path} is not a VAE for {bundle.family.short_title}: tensor {key} (LDM name {ldm}) is "
                            "missing.")
    vae.load_state_dict(sd, assign=True, strict=True)
    bundle.vae = vae.eval().requires_grad_(False)
    bundle.info["vae_source"] = str(vae_path)


def _folder_configs(folder: Path) -> tuple[dict, dict, dict | None]:
    """(unet, scheduler, text encoder) configs of a diffusers folder."""
    if not (folder / "model_index.json").exists():
        raise UserError(f"{folder} is a folder but has no model_index.json: pass a diffusers model folder or a "
                        "single .safetensors/.ckpt file.")
    try:
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
        sched_path = folder / "scheduler" / "scheduler_config.json"
        sched_cfg = json.loads(sched_path.read_text()) if sched_path.exists() else {}
        te_path = folder / "text_encoder" / "config.json"
        te_cfg = json.loads(te_path.read_text()) if te_path.exists() else None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder}: cannot read the UNet/scheduler/text-encoder config ({exc}).") from None
    return unet_cfg, sched_cfg, te_cfg


def load_diffusers_folder(folder: Path, dtype: torch.dtype, components=("unet", "vae", "text_encoders")) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_cfg, sched_cfg, te_cfg = _folder_configs(folder)
    family = family_from_diffusers_config(unet_cfg, sched_cfg, folder, te_cfg)
    bundle = build_bundle(family, device="meta", components=())
    bundle.source = str(folder)
    if "unet" in components:
        bundle.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, local_files_only=True)
        bundle.configs["unet"] = dict(bundle.unet.config)
    if "vae" in components and (folder / "vae").exists():
        bundle.vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, local_files_only=True)
        bundle.configs["vae"] = dict(bundle.vae.config)
    if "text_encoders" in components:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        tes = []
        for spec in family.text_encoders:
            cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
            te = cls.from_pretrained(folder / spec.config_name, torch_dtype=dtype, local_files_only=True)
            bundle.configs[spec.config_name] = te.config.to_dict()
            tes.append(te)
        bundle.text_encoders = tes
    if sched_cfg:
        bundle.configs["scheduler"] = {**bundle.configs["scheduler"], **sched_cfg}
    if declares_zero_terminal_snr((), sched_cfg):
        bundle = with_schedule(bundle, zero_terminal_snr=True)
        bundle.info["zero_terminal_snr"] = True
    for module in bundle.components().values():
        module.eval().requires_grad_(False)
    return bundle
