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
                   help="no progress bar: log lines only, with a step line (loss, lr, it/s, time left) every "
                        "--log_every_n_steps steps (the default when the output is not a terminal, e.g. a log file)")
    p.add_argument("--log_every_n_steps", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="without a progress bar: a step line every N steps (default: about 20 lines a run, at least "
                        "every 100 steps)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.utils.collector import paused_start_up

    with paused_start_up():  # start-up creates millions of objects that live for the run: no collection until the loop
        return _run(args)


def _run(args) -> int:
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

    every = getattr(args, "log_every_n_steps", None)
    if every is not None and every < 1:
        from lorakit.errors import UserError

        raise UserError(f"--log_every_n_steps {every}: give a number of steps of at least 1.")
    from lorakit.utils.terminal import want_bar

    result = train(opts, progress=want_bar(getattr(args, "no_progress", False)), log_every=every)
    if opts.estimate_memory:
        return 0  # the prediction was printed; nothing was trained
    # the run's summary (time, loss, every file written) was logged by train()
    return 130 if result.interrupted else 0
