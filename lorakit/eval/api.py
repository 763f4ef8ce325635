"""One call for the CLI and the GUI: `run_eval(EvalJob(...))` scores every checkpoint of a folder and writes the
results next to them. Everything that can fail without the model (folders, tagger, training data, thresholds) is
checked before the model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from lorakit.errors import UserError


@dataclass
class EvalJob:
    model: str
    lora_dir: str
    train_data_dir: Optional[str] = None
    dataset_config: Optional[str] = None
    loras: Optional[str] = None  # glob of checkpoint names
    caption_extension: str = ".txt"
    tagger: str = "wd14"  # or "toy"
    tagger_dir: Optional[str] = None
    tag_threshold: float = 0.35
    core_tags: list[str] = field(default_factory=list)
    core_share: float = 0.75
    match_share: float = 0.75
    trigger: Optional[str] = None
    class_prompt: Optional[str] = None
    scene_tags: int | list[str] = 3  # how many frequent caption tags, or which tags
    unrelated_prompts: list[str] = field(default_factory=list)
    seeds: int = 8
    seed: int = 1000
    steps: int = 20
    sampler: str = "DDIM"
    cfg_scale: float = 7.0
    width: Optional[int] = None
    height: Optional[int] = None
    negative_prompt: str = ""
    clip_skip: Optional[int] = None
    batch_size: Optional[int] = None
    multiplier: float = 1.0
    max_drift: float = 0.8
    max_copy_rate: float = 0.25
    copy_distance: int = 8
    min_diversity: float = 0.5
    outdir: Optional[str] = None
    name: Optional[str] = None
    vae: Optional[str] = None
    v2: bool = False
    v_parameterization: bool = False
    sdxl: bool = False
    dtype: Optional[str] = None
    device: Optional[str] = None


def _metadata_value(ckpts, key: str) -> Optional[str]:
    from lorakit.models.checkpoint_io import read_safetensors_header

    for c in ckpts:
        if c.path.suffix.lower() != ".safetensors":
            continue
        try:
            return read_safetensors_header(c.path)[1].get(key)
        except UserError:
            continue
    return None


def _resolution(ckpts, job: EvalJob, family) -> tuple[int, int]:
    """--width/--height, else the training resolution in the LoRA's metadata, else the family's."""
    text = _metadata_value(ckpts, "ss_resolution") or ""
    nums = [int(t) for t in text.strip("()[] ").replace(",", " ").split() if t.isdigit()]
    w, h = (nums if len(nums) == 2 else (family.resolution, family.resolution))
    return job.width or w, job.height or h


def _clip_skip(ckpts, job: EvalJob) -> Optional[int]:
    if job.clip_skip is not None:
        return job.clip_skip
    v = _metadata_value(ckpts, "ss_clip_skip") or ""
    return int(v) if v.isdigit() else None


def check_thresholds(job: EvalJob) -> None:
    from lorakit.eval.sampling import SampleSettings

    if job.seeds < 1:
        raise UserError(f"--seeds must be at least 1 (got {job.seeds}).")
    if not 0 < job.core_share <= 1 or not 0 < job.match_share <= 1:
        raise UserError(f"--core_share {job.core_share} / --match_share {job.match_share}: shares (of the training "
                        "images / of the core tags) between 0 and 1.")
    # the sampling values given: the defaults (resolution from the LoRA's metadata) are valid by construction
    SampleSettings(steps=job.steps, width=job.width or 64, height=job.height or 64,
                   batch_size=job.batch_size or 1).check()
    if job.max_drift <= 0 or not 0 <= job.max_copy_rate <= 1 or job.copy_distance < 0 or job.min_diversity < 0:
        raise UserError("--max_drift must be positive, --max_copy_rate between 0 and 1, --copy_distance and "
                        "--min_diversity at least 0.")


def run_eval(job: EvalJob, log: Callable[[str], None] = print,
             on_model: Optional[Callable[[int, int], None]] = None, bundle=None) -> dict:
    """Score the base model and every checkpoint; write JSON, table, chart and sheet; return the result (with
    `files`). `on_model(done, total)` once the model is loaded and after each model sampled; `bundle`: a base model
    already loaded (the GUI's)."""
    import torch

    from lorakit.eval.concept import find_concept, training_images
    from lorakit.eval.report import output_prefix, write_outputs
    from lorakit.eval.runner import EvalSettings, Evaluation, find_checkpoints
    from lorakit.eval.sampling import SampleSettings
    from lorakit.eval.scores import Thresholds
    from lorakit.eval.taggers import load_tagger
    from lorakit.utils.atomic import check_writable_dir

    check_thresholds(job)
    if not job.train_data_dir and not job.dataset_config:
        raise UserError("eval reads the concept from the training data: pass --train_data_dir (the folder with "
                        "`N_trigger class` subfolders) or --dataset_config (the run's TOML).")
    if bundle is None and not Path(job.model).exists():
        raise UserError(f"--model {job.model} does not exist; pass the base model the LoRAs were trained on.")
    ckpts = find_checkpoints(job.lora_dir, job.loras)
    outdir = check_writable_dir(job.outdir or job.lora_dir, "--outdir")
    tagger = load_tagger(job.tagger, job.tagger_dir, job.tag_threshold)
    images = training_images(job.train_data_dir, job.dataset_config, job.caption_extension)
    concept = find_concept(images, tagger, trigger=job.trigger, class_prompt=job.class_prompt,
                           core_tags=job.core_tags or None, core_share=job.core_share, scene_tags=job.scene_tags,
                           unrelated_prompts=job.unrelated_prompts or None)
    log(f"concept: trigger {concept.trigger!r}, class prompt {concept.class_prompt!r}, core tags "
        f"{', '.join(concept.core_tags)} ({len(images)} training images, read by {tagger.name})")
    log(f"scene tags: {', '.join(concept.scene_tags) or '-'} ({concept.scene_reason})")

    if bundle is None:
        from lorakit.models.loading import load_bundle
        from lorakit.utils.cpu import slow_half_warning
        from lorakit.utils.finite import check_model_finite

        dev = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = job.dtype or ("fp16" if str(dev).startswith("cuda") else "fp32")
        slow = slow_half_warning(dev, dtype, "--dtype", "(fp32 is the CPU default) or evaluate on a GPU")
        if slow:
            log("warning: " + slow)
        log(f"loading {job.model} ...")
        bundle = load_bundle(job.model, vae=job.vae, dtype=dtype, v2=job.v2, v_parameterization=job.v_parameterization,
                             sdxl=job.sdxl)
        check_model_finite(bundle, job.model)  # a NaN weight gives black images, not an error
        bundle.to(dev)
    on_gpu = next(bundle.unet.parameters()).device.type != "cpu"
    width, height = _resolution(ckpts, job, bundle.family)
    settings = EvalSettings(
        seeds=job.seeds, seed=job.seed, multiplier=job.multiplier,
        sample=SampleSettings(steps=job.steps, sampler=job.sampler, cfg_scale=job.cfg_scale, width=width,
                              height=height, negative_prompt=job.negative_prompt, clip_skip=_clip_skip(ckpts, job),
                              batch_size=job.batch_size or (16 if on_gpu else 64)),
        thresholds=Thresholds(max_drift=job.max_drift, max_copy_rate=job.max_copy_rate,
                              copy_distance=job.copy_distance, min_diversity_ratio=job.min_diversity,
                              match_share=job.match_share))
    ev = Evaluation(bundle, concept, tagger, settings, log=log)
    log(f"{ev.n_samples} samples per model ({len(ev.prompts)} prompts x {job.seeds} seeds, {width}x{height}, "
        f"{job.sampler} {job.steps} steps, CFG {job.cfg_scale}); {len(ckpts)} checkpoints")
    total = len(ckpts) + 1
    if on_model:
        on_model(0, total)
    ev.add_base()
    if on_model:
        on_model(1, total)
    for i, c in enumerate(ckpts):
        ev.add_file(c)
        if on_model:
            on_model(i + 2, total)
    result = ev.result()
    prefix = job.name or output_prefix([c.name for c in ckpts])
    paths = write_outputs(result, ev.sheet_images, outdir, prefix)
    result["files"] = {k: str(p) for k, p in paths.items()}
    return result
