"""`lorakit lora resize|merge|extract|filter|relora` (sd-scripts' resize_lora.py, merge_lora.py / svd_merge_lora.py,
extract_lora_from_models.py flag names where they exist).

    lorakit lora resize in.safetensors --new_rank 16 --save_to out.safetensors
    lorakit lora resize in.safetensors --new_rank 64 --dynamic_method sv_fro --dynamic_param 0.9 --save_to out.safetensors
    lorakit lora merge --model base.safetensors --models a.safetensors b.safetensors --ratios 0.8 0.5 --save_to merged.safetensors
    lorakit lora merge --models a.safetensors b.safetensors --ratios 1 0.5 --new_rank 32 --save_to ab.safetensors
    lorakit lora merge --models a.safetensors b.safetensors --mode concat --save_to ab.safetensors
    lorakit lora extract --model_org base.safetensors --model_tuned tuned.safetensors --dim 64 --save_to diff.safetensors
    lorakit lora filter in.safetensors --keep IN04-IN07,OUT03-OUT06 --save_to out.safetensors
    lorakit lora relora --rounds 3 --learning_rates 1e-4 5e-5 2.5e-5 --output_dir relora -- <lorakit train flags>
"""

from __future__ import annotations

import argparse

PRECISIONS = ["float", "fp32", "fp16", "bf16"]

MERGE_DESC = """Merge LoRAs.

With --model (alias --sd_model): the LoRAs are added into that checkpoint's weights (ratio x block weight x delta)
and the model is saved to --save_to: a .safetensors path gives a single-file checkpoint for A1111/ComfyUI, any other
path a diffusers folder. The checkpoint's metadata (lorakit.merged_loras, modelspec.merged_from) lists each LoRA's
name, ratio, block weights and sha256.

Without --model: the LoRAs become one LoRA. --mode svd (default) sums the full deltas and decomposes the sum to
--new_rank (or a dynamic rank) by SVD, printing the retained Frobenius fraction; --mode concat stacks the factors
(rank = sum of ranks) and is exact. Ranks and alphas may differ between inputs. Note: sd-scripts' merge_lora.py adds
the factors themselves, which only approximates the sum of the deltas; lorakit's two modes are exact (svd up to the
rank cut).

Block weights (--block_weights, one per LoRA or one for all, "-" for none): "IN04-IN07:0,OUT03:0.5,TE:0.8" (listed
blocks get the weight, the rest 1), or an LBW preset name (ALL, INS, OUTD, ...; user presets from --lbw_presets) or a
vector of 12/17/20/26 values."""


def _precision(p) -> None:
    p.add_argument("--save_precision", choices=PRECISIONS, default=None,
                   help="precision of the saved tensors (default: that of the input LoRA; float = fp32)")


def _dynamic(p) -> None:
    p.add_argument("--new_conv_rank", type=int, default=None,
                   help="rank of 3x3 conv (LoCon) modules (default: --new_rank)")
    p.add_argument("--dynamic_method", choices=["sv_ratio", "sv_fro", "sv_cumulative"], default=None,
                   help="choose each module's rank: sv_ratio keeps singular values >= largest / param; sv_fro the "
                        "smallest rank keeping that fraction of the Frobenius norm; sv_cumulative the smallest rank "
                        "keeping that fraction of the sum of singular values. --new_rank stays the maximum")
    p.add_argument("--dynamic_param", type=float, default=None, help="the target of --dynamic_method")
    p.add_argument("--device", default=None, help="device for the SVDs (cuda for a GPU; default cpu)")
    p.add_argument("--verbose", action="store_true", help="print every module's retained fractions and rank")


def _model_flags(p) -> None:
    p.add_argument("--v2", action="store_true", help="SD2.x model (detected from keys; accepted for sd-scripts habits)")
    p.add_argument("--v_parameterization", action="store_true", help="SD2.x 768-v model")
    p.add_argument("--sdxl", action="store_true", help="SDXL model (detected from keys)")


def register(subparsers) -> None:
    p = subparsers.add_parser("resize", help="shrink a LoRA's rank by SVD (sd-scripts resize_lora.py)",
                              description="Re-factorise every module of a LoRA to a lower rank by SVD, keeping its "
                                          "scale (new alpha = old alpha / old rank x new rank). LoHa/LoKr/full/DoRA "
                                          "modules are expanded first and come out as plain LoRA/LoCon.")
    p.add_argument("lora", nargs="?", help="input LoRA (.safetensors; also --model, as in sd-scripts)")
    p.add_argument("--model", dest="lora_opt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--new_rank", type=int, default=4, help="rank of the output LoRA (default 4; the maximum with "
                                                             "--dynamic_method)")
    _dynamic(p)
    p.add_argument("--save_to", required=True, help="output .safetensors file")
    _precision(p)
    p.add_argument("--base_model", default=None,
                   help="base checkpoint; needed only for DoRA/IA3/OFT modules, whose change depends on the base weights")
    p.set_defaults(func=cmd_resize)

    p = subparsers.add_parser("merge", help="merge LoRAs into a model (--model) or into one LoRA",
                              description=MERGE_DESC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("loras", nargs="*", help="LoRA files (or --models)")
    p.add_argument("--models", nargs="+", default=[], help="LoRA files to merge (sd-scripts' name)")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="one ratio per LoRA (default 1)")
    p.add_argument("--block_weights", nargs="+", default=None,
                   help='per-LoRA block weights: "IN04-IN07:0,OUT03:0.5", an LBW preset or vector; "-" for none')
    p.add_argument("--lbw_presets", default=None, help="a file of NAME:v1,v2,... LBW presets")
    p.add_argument("--model", "--sd_model", dest="model", default=None,
                   help="checkpoint to merge the LoRAs into (file or diffusers folder)")
    p.add_argument("--save_to", required=True, help="output: LoRA .safetensors, or with --model a checkpoint "
                                                    ".safetensors or a diffusers folder")
    _precision(p)
    p.add_argument("--mode", choices=["svd", "concat"], default=None,
                   help="LoRA merge method: svd (default; needs --new_rank) or concat (exact, rank = sum)")
    p.add_argument("--concat", action="store_true", help="= --mode concat (sd-scripts' flag)")
    p.add_argument("--new_rank", type=int, default=None, help="rank of the merged LoRA (svd mode)")
    _dynamic(p)
    p.add_argument("--base_model", default=None, help="base checkpoint for DoRA/IA3/OFT inputs (LoRA merge only)")
    p.add_argument("--vae", default=None, help="with --model: a VAE to use instead of the checkpoint's own")
    _model_flags(p)
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser("extract", help="extract a LoRA from the difference of two checkpoints",
                              description="Extract a LoRA approximating model_tuned - model_org by SVD "
                                          "(sd-scripts extract_lora_from_models.py). The text encoder is included "
                                          "only when it changed by more than --min_diff.")
    p.add_argument("--model_org", required=True, help="the original (base) checkpoint")
    p.add_argument("--model_tuned", required=True, help="the fine-tuned checkpoint (same family)")
    p.add_argument("--save_to", required=True, help="output .safetensors file")
    p.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    p.add_argument("--conv_dim", type=int, default=None,
                   help="rank of 3x3 conv modules; also adds the ResNet/down/upsample layers (default: none)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clamp the factors to this quantile of their values (default 0.99; 1 = no clamping)")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="the text encoder counts as changed when some weight differs by more (default 0.01)")
    p.add_argument("--save_precision", choices=PRECISIONS, default=None, help="saved precision (default float)")
    p.add_argument("--load_precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="precision to load the models in (default fp32; fp16/bf16 halve the memory)")
    p.add_argument("--device", default=None, help="device for the SVDs (cuda for a GPU)")
    _model_flags(p)
    p.set_defaults(func=cmd_extract)

    p = subparsers.add_parser("filter", help="keep, drop or scale blocks of a LoRA",
                              description="Write a new LoRA with only some blocks (--keep), without some (--drop), "
                                          "or with blocks scaled (--scale). Blocks: TE (or BASE), IN00..IN11, MID "
                                          "(M00), OUT00..OUT11, ranges like IN04-IN07 or OUT03-06; FLUX.1: D00..D18 "
                                          "(double blocks), S00..S37 (single blocks).")
    p.add_argument("lora", help="input LoRA")
    p.add_argument("--keep", default=None, help='blocks to keep, e.g. "IN04-IN07,OUT03-OUT06" (others are dropped)')
    p.add_argument("--drop", default=None, help='blocks to drop, e.g. "TE,MID"')
    p.add_argument("--scale", default=None, help='block factors, e.g. "IN04-IN07:0.5,TE:0" (0 drops)')
    p.add_argument("--drop_embeddings", action="store_true",
                   help="leave out the bundled token embeddings (bundle_emb.*, from --train_embedding): a plain LoRA")
    p.add_argument("--save_to", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_filter)

    p = subparsers.add_parser("relora", help="ReLoRA loop: train, merge into the model, train again (N rounds)",
                              description="Train a LoRA, merge it into the base model, train the next round on the "
                                          "merged model with the next learning rate; N rounds. Each round keeps its "
                                          "LoRA and merged model under --output_dir/round_NN; a state file "
                                          "(relora_state.json) lets a rerun continue after the last finished round. "
                                          "Training flags (sd-scripts names) follow `--`.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="folder for the rounds and the state file")
    p.add_argument("--rounds", type=int, default=None, help="number of rounds (default: number of learning rates)")
    p.add_argument("--learning_rates", nargs="+", type=float, default=None,
                   help="learning rate of each round (the last one repeats); default: the training flags' rate, "
                        "halved each round")
    p.add_argument("--lr_decay", type=float, default=0.5, help="factor per round when --learning_rates is not given")
    p.add_argument("--merge_ratio", type=float, default=1.0, help="ratio used to merge each round's LoRA (default 1)")
    p.add_argument("--save_precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="precision of the merged models (default fp32)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then lorakit train flags")
    p.set_defaults(func=cmd_relora)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _must_exist(path, flag: str) -> None:
    """Name the flag a missing model came from before the loader (which knows no flag names) is reached."""
    from pathlib import Path

    from lorakit.errors import UserError

    if path and not Path(path).exists():
        raise UserError(f"{flag} {path} does not exist: give a checkpoint file (.safetensors/.ckpt) or a diffusers "
                        "folder.")


def cmd_resize(args) -> int:
    from lorakit.errors import UserError
    from lorakit.tools.lora_resize import resize_lora

    lora = args.lora or args.lora_opt
    if not lora:
        raise UserError("give the LoRA to resize: lorakit lora resize IN.safetensors --new_rank R --save_to OUT.")
    resize_lora(lora, args.save_to, args.new_rank, args.new_conv_rank, args.dynamic_method, args.dynamic_param,
                save_precision=args.save_precision, device=args.device, verbose=args.verbose,
                base_model=args.base_model, log=_log)
    return 0


def cmd_merge(args) -> int:
    from lorakit.errors import UserError
    from lorakit.tools.lora_merge import merge_into_model, merge_lora_files, specs_from_lists

    specs = specs_from_lists(list(args.loras) + list(args.models), args.ratios, args.block_weights)
    if args.model:
        if args.mode or args.concat or args.new_rank or args.dynamic_method:
            raise UserError("--mode/--concat/--new_rank/--dynamic_method are for merging LoRAs into one LoRA; with "
                            "--model the LoRAs go into the checkpoint's weights. Drop one or the other.")
        _must_exist(args.model, "--model")
        load_kwargs = dict(vae=args.vae, v2=args.v2, v_parameterization=args.v_parameterization, sdxl=args.sdxl)
        merge_into_model(args.model, specs, args.save_to, args.save_precision, args.lbw_presets, load_kwargs, log=_log)
        return 0
    mode = "concat" if args.concat else (args.mode or "svd")
    if args.concat and args.mode == "svd":
        raise UserError("--concat and --mode svd contradict each other; pick one.")
    merge_lora_files(specs, args.save_to, mode, args.new_rank, args.new_conv_rank, args.dynamic_method,
                     args.dynamic_param, args.save_precision, args.device, args.lbw_presets, args.base_model,
                     args.verbose, log=_log)
    return 0


def cmd_extract(args) -> int:
    from lorakit.tools.lora_extract import extract_lora

    _must_exist(args.model_org, "--model_org")
    _must_exist(args.model_tuned, "--model_tuned")
    load_kwargs = dict(v2=args.v2, v_parameterization=args.v_parameterization, sdxl=args.sdxl)
    extract_lora(args.model_org, args.model_tuned, args.save_to, args.dim, args.conv_dim, args.clamp_quantile,
                 args.min_diff, args.save_precision, args.load_precision, args.device, load_kwargs, log=_log)
    return 0


def cmd_filter(args) -> int:
    from lorakit.tools.lora_filter import filter_lora

    filter_lora(args.lora, args.save_to, args.keep, args.drop, args.scale, drop_embeddings=args.drop_embeddings,
                log=_log)
    return 0


def cmd_relora(args) -> int:
    from lorakit.tools.relora import relora_from_cli

    return relora_from_cli(args, log=_log)
