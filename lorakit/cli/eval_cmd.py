"""`lorakit eval`: score every saved checkpoint of a run on its own training data and recommend one.

The base model is loaded once and sampled once; each checkpoint is merged into it, sampled on the same prompts and
seeds, and taken out again. Every sample is read by a local WD14 tagger (or the toy world's classifier); the scores
and the recommendation are written next to the LoRAs (lorakit.eval.report).
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score every checkpoint of a run (concept recall, prompt adherence, prior drift, "
        "memorisation) with a local tagger and recommend the best one",
        description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and checkpoints")
    g.add_argument("--model", required=True, help="the base model the LoRAs were trained on (file or diffusers folder)")
    g.add_argument("--vae", help="a separate VAE file or folder")
    g.add_argument("--v2", action="store_true", help="SD2.x model (normally detected)")
    g.add_argument("--v_parameterization", action="store_true", help="SD2.x 768-v model (v-prediction)")
    g.add_argument("--sdxl", action="store_true", help="SDXL model (normally detected)")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="model precision (default fp16 on GPU, fp32 on CPU)")
    g.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: cuda when available)")
    g.add_argument("--lora_dir", required=True, help="the run's --output_dir (the LoRA files)")
    g.add_argument("--loras", default=None, help='glob of the checkpoint names to score, e.g. "usu_bear*" '
                   "(default: every LoRA file in --lora_dir)")
    g.add_argument("--multiplier", type=float, default=1.0, help="LoRA weight (default 1)")
    g = p.add_argument_group("the concept (read from the training data)")
    g.add_argument("--train_data_dir", help="the training images (folders `N_trigger class` with captions)")
    g.add_argument("--dataset_config", help="or the run's dataset TOML")
    g.add_argument("--caption_extension", default=".txt", help="caption file extension (default .txt)")
    g.add_argument("--tagger", choices=["wd14", "toy"], default="wd14",
                   help="what reads the samples: a WD14 ONNX tagger (--tagger_dir) or the toy world's classifier")
    g.add_argument("--tagger_dir", help="WD14 tagger folder: model.onnx + selected_tags.csv")
    g.add_argument("--tag_threshold", type=float, default=0.35, help="tagger probability threshold (default 0.35)")
    g.add_argument("--core_tags", help='the concept\'s tags, e.g. "black hair, red eyes, school uniform" (default: '
                   "tags in at least --core_share of the training images, captions or tagger)")
    g.add_argument("--core_share", type=float, default=0.75, help="share of images a core tag must be in (0.75)")
    g.add_argument("--match_share", type=float, default=0.75, help="share of the core tags a sample must show to "
                   "count as the concept (concept recall; default 0.75)")
    g.add_argument("--trigger", help="the trigger (default: the captions' common first tag, else the folder's class "
                   "tokens)")
    g.add_argument("--class_prompt", help='the class without the trigger (default: the trigger minus its first word, '
                   'e.g. "usu bear" -> "bear", else the most frequent caption tag)')
    g.add_argument("--scene_tags", default="3", help='trigger prompts with each of these tags ("outdoors, night"), '
                   "or with N tags chosen (a number; default 3): the most frequent caption tags the tagger reads, "
                   "its scene labels (settings, props) first, else its own scene labels; the log says which and why")
    g.add_argument("--unrelated_prompts", help='prompts the LoRA should leave alone, separated by "|" (default: two '
                   "the tagger knows)")
    g = p.add_argument_group("sampling")
    g.add_argument("--seeds", type=int, default=8, help="samples per prompt (default 8: 64 samples per checkpoint)")
    g.add_argument("--seed", type=int, default=1000, help="first seed (the same seeds for every checkpoint)")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--sampler", default="DDIM", help="A1111 sampler name (default DDIM: no sampler noise)")
    g.add_argument("--cfg_scale", type=float, default=7.0)
    g.add_argument("--width", type=int, help="default: the training resolution in the LoRA's metadata")
    g.add_argument("--height", type=int, help="default: the training resolution in the LoRA's metadata")
    g.add_argument("--negative_prompt", default="")
    g.add_argument("--clip_skip", type=int, help="default: the LoRA's training clip skip, else the family's")
    g.add_argument("--batch_size", type=int, default=None, help="images per UNet call (default 64 on CPU, 16 on GPU)")
    g = p.add_argument_group("thresholds of the recommendation")
    g.add_argument("--max_drift", type=float, default=0.8, help="highest prior drift (1 = other prompts as changed "
                   "as by a new seed; default 0.8)")
    g.add_argument("--max_copy_rate", type=float, default=0.25, help="highest share of trigger samples that copy a "
                   "training image (default 0.25)")
    g.add_argument("--copy_distance", type=int, default=8, help="perceptual-hash bits (of 63) within which a sample "
                   "copies a training image (default 8)")
    g.add_argument("--min_diversity", type=float, default=0.5, help="lowest sample diversity as a share of the base "
                   "model's (default 0.5)")
    g = p.add_argument_group("output")
    g.add_argument("--outdir", help="where the JSON and PNGs go (default: --lora_dir)")
    g.add_argument("--name", help="file name prefix (default: the checkpoints' common name, e.g. usu_bear)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from lorakit.eval.api import EvalJob, run_eval
    from lorakit.eval.concept import split_list
    from lorakit.eval.report import table_markdown

    job = EvalJob(
        model=args.model, lora_dir=args.lora_dir, loras=args.loras, train_data_dir=args.train_data_dir,
        dataset_config=args.dataset_config, caption_extension=args.caption_extension, tagger=args.tagger,
        tagger_dir=args.tagger_dir, tag_threshold=args.tag_threshold, core_tags=split_list(args.core_tags),
        core_share=args.core_share, match_share=args.match_share, trigger=args.trigger,
        class_prompt=args.class_prompt,
        scene_tags=int(args.scene_tags) if args.scene_tags.strip().isdigit() else split_list(args.scene_tags),
        unrelated_prompts=split_list(args.unrelated_prompts, "|"), seeds=args.seeds, seed=args.seed,
        steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg_scale, width=args.width, height=args.height,
        negative_prompt=args.negative_prompt, clip_skip=args.clip_skip, batch_size=args.batch_size,
        multiplier=args.multiplier, max_drift=args.max_drift, max_copy_rate=args.max_copy_rate,
        copy_distance=args.copy_distance, min_diversity=args.min_diversity, outdir=args.outdir, name=args.name,
        vae=args.vae, v2=args.v2, v_parameterization=args.v_parameterization, sdxl=args.sdxl, dtype=args.dtype,
        device=args.device)
    bar = None

    def on_model(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # made once the model is loaded, so loading messages are not drawn over
            bar = tqdm(total=total, unit="model", desc="eval", disable=args.no_progress, file=sys.stderr)
        bar.update(done - bar.n)

    def log(line: str) -> None:
        tqdm.write(line, file=sys.stdout)

    try:
        result = run_eval(job, log=log, on_model=on_model)
    finally:
        if bar is not None:
            bar.close()
    print()
    print(table_markdown(result), end="")
    files = result["files"]
    print(f"written: {files['json']}, {Path(files['table']).name}, {Path(files['chart']).name}, "
          f"{Path(files['sheet']).name}")
    if result["recommended_path"]:
        print(f"recommended: {result['recommended_path']}")
    return 0
