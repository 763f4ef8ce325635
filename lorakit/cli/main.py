"""The `lorakit` command.

Each command group lists the modules that add its subcommands. A module defines `register(subparsers)` and sets
`func` on each parser it adds; it imports torch/diffusers only inside those functions so `lorakit --help` stays fast.
Top-level commands (train, demo, generate, grid, gui) register on the root parser through the "" group.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# group name -> modules that register its subcommands; a module not present yet is skipped.
COMMAND_MODULES: dict[str, list[str]] = {
    "": ["lorakit.cli.train_cmd", "lorakit.cli.demo_cmd", "lorakit.cli.generate_cmd", "lorakit.cli.gui_cmd",
         "lorakit.cli.eval_cmd"],
    "model": ["lorakit.cli.model_cmd"],
    "lora": ["lorakit.cli.lora_cmd", "lorakit.cli.lora_tools_cmd"],
    "dataset": ["lorakit.cli.dataset_cmd", "lorakit.cli.dataset_prep_cmd"],
}

GROUP_HELP = {
    "model": "inspect, convert and create Stable Diffusion checkpoints",
    "lora": "inspect, resize, merge, extract and filter LoRA files",
    "dataset": "check, tag, edit and resize training datasets",
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Stable Diffusion LoRA toolkit.")
    from lorakit import __version__

    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    root = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group, modules in COMMAND_MODULES.items():
        if group:
            gp = root.add_parser(group, help=GROUP_HELP.get(group), description=GROUP_HELP.get(group))
            target = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            gp.set_defaults(func=lambda args, _gp=gp: (_gp.print_help(), 2)[1])
        else:
            target = root
        for name in modules:
            mod = _load(name)
            if mod is not None:
                mod.register(target)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from lorakit.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except UserError as exc:
        print(f"lorakit: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
