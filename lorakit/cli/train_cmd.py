"""`lorakit train`: sd-scripts' train_network.py / sdxl_train_network.py flags, as written.

    lorakit train --pretrained_model_name_or_path=model.safetensors --train_data_dir=data --output_dir=out ...
    lorakit train accelerate launch --num_cpu_threads_per_process 16 train_network.py --pretrained_model_...  (also ok)
    lorakit train --config_file run.toml --network_dim 32           (command line > config file > defaults)
    lorakit train --config_file new.toml --output_config ...         (write the options, do not train)
"""

from __future__ import annotations

import argparse

DESCRIPTION = ("Train a LoRA. Takes kohya-ss/sd-scripts train_network.py / sdxl_train_network.py options with the "
               "same names and meanings; a leading `accelerate launch ... train_network.py` is accepted and ignored.")


def register(subparsers) -> None:
    from lorakit import options as O

    p = subparsers.add_parser("train", help="train a LoRA (sd-scripts flags)", description=DESCRIPTION,
                              allow_abbrev=False, usage="%(prog)s [sd-scripts train_network.py options]")
    p.__class__ = O.SuggestingParser  # unknown flags get a "did you mean" answer
    O.add_options(p)
    p.add_argument("--no_progress", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bar (logs only)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit import options as O

    given = O.given_from_namespace(args)
    opts = O.resolve_given(given)
    if getattr(args, "sdxl", False):
        opts.sdxl = True
    if opts.output_config:
        if not opts.config_file:
            from lorakit.errors import UserError

            raise UserError("--output_config writes the options to --config_file FILE.toml; add --config_file.")
        path = O.write_config_file(opts, opts.config_file)
        print(f"wrote {path}")
        return 0
    from lorakit.train.trainer import train

    result = train(opts, progress=not getattr(args, "no_progress", False))
    if result.interrupted:
        print(f"interrupted at step {result.global_step}: LoRA {result.final_lora}, state {result.states[-1]}")
        return 130
    print(f"LoRA: {result.final_lora}")
    for s in result.samples:
        print(f"sample: {s}")
    return 0
