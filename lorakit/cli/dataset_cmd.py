"""`lorakit dataset check`: what the trainer will see, before it trains (sd-scripts flag names)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check", help="report folders, captions, buckets, steps and problems of a dataset",
        description="Scan a DreamBooth-style train folder (subfolders `N_class`) or an sd-scripts dataset TOML and "
                    "report repeats, image/caption counts, bad files, buckets, steps per epoch, top tags and warnings.")
    p.add_argument("source", metavar="TRAIN_DIR_OR_TOML", help="--train_data_dir folder or --dataset_config TOML")
    p.add_argument("--reg_data_dir", default=None)
    p.add_argument("--in_json", default=None, help="fine-tuning metadata JSON/JSONL (with TRAIN_DIR as image dir)")
    p.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=".txt",
                   help="caption file extension (default .txt; sd-scripts defaults to .caption)")
    p.add_argument("--resolution", default=None, help="W,H or one number (default 512)")
    p.add_argument("--enable_bucket", action="store_true")
    p.add_argument("--min_bucket_reso", type=int, default=None)
    p.add_argument("--max_bucket_reso", type=int, default=None)
    p.add_argument("--bucket_reso_steps", type=int, default=None)
    p.add_argument("--bucket_no_upscale", action="store_true")
    p.add_argument("--train_batch_size", type=int, default=None)
    p.add_argument("--max_token_length", type=int, default=None, choices=(75, 150, 225))
    p.add_argument("--tokenizer", default=None, help="a local CLIP tokenizer folder for exact token counts")
    p.add_argument("--quick", action="store_true", help="read image headers only (no full decode, no hashing)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_check)


def _token_counter(path: str | None):
    if not path:
        return None
    from transformers import CLIPTokenizer

    from lorakit.errors import UserError

    try:
        tok = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's path
        raise UserError(f"--tokenizer {path} cannot be loaded ({exc}); give a local folder with vocab.json and merges.txt.") from None
    return lambda text: len(tok(text, truncation=False, add_special_tokens=False)["input_ids"])


def run_check(args: argparse.Namespace) -> int:
    from lorakit.data.check import check_source

    opts = {k: v for k, v in vars(args).items() if k not in ("func", "source", "json", "quick", "tokenizer", "command", "subcommand")}
    report = check_source(args.source, opts, seed=args.seed, quick=args.quick,
                          token_counter=_token_counter(args.tokenizer), max_token_length=args.max_token_length)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(report.to_text())
    return 1 if report.problems else 0
